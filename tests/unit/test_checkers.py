"""Unit tests for jepsen_like.history and jepsen_like.checkers.

Pure: hand-made histories with a counting clock, no sockets, no processes.
Every checker is shown a known-bad history and must reject it. The
linearizability checker is also compared against a real register: histories
generated from a sequential execution with random concurrency windows must
pass, and the same histories with one stale read injected must fail.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from jepsen_like import checkers as _checkers  # noqa: E402
from jepsen_like.checkers import (  # noqa: E402
    UNKNOWN,
    availability,
    check_convergence,
    check_linearizable,
    check_messages,
    check_revocations,
    combine_validity,
)
from jepsen_like.history import NEMESIS, History, HistoryError, Op  # noqa: E402


def new_history() -> History:
    """A history whose clock ticks once per entry (entry i at time i)."""
    return History(clock=itertools.count().__next__)


def run(
    h: History, p: int, f: str, key: str | None, value: Any, result: str = "ok", **kw: Any
) -> Op:
    """A sequential op: invoke then complete at once. ``out=`` sets the completion value."""
    inv = h.invoke(p, f, key, value)
    if "out" in kw:
        return h.complete(inv, result, kw.pop("out"), **kw)  # type: ignore[arg-type]
    return h.complete(inv, result, **kw)  # type: ignore[arg-type]


# ====================================================================== history


def test_invoke_complete_pairs_and_value_defaults() -> None:
    h = new_history()
    w = h.invoke(0, "write", "x", 1)
    r = h.invoke(1, "read", "x")
    h.complete(r, "ok", 1)
    h.complete(w, "ok", node="n1")
    pending = h.invoke(2, "write", "x", 2)
    pairs = h.pairs()
    assert [(i.index, d.index if d else None) for i, d in pairs] == [(0, 3), (1, 2), (4, None)]
    assert pairs[0][1] is not None and pairs[0][1].value == 1  # copied from the invoke
    assert pairs[0][1].extra == {"node": "n1"}
    assert pairs[1][1] is not None and pairs[1][1].value == 1
    assert [op.time for op in h] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert h.pending() == [pending]
    assert h.validate() == []


def test_recording_errors_are_raised() -> None:
    h = new_history()
    inv = h.invoke(0, "write", "x", 1)
    with pytest.raises(HistoryError, match="still has op #0 open"):
        h.invoke(0, "read", "x")
    with pytest.raises(HistoryError, match="ok, fail or info"):
        h.complete(inv, "invoke")
    h.complete(inv, "ok")
    with pytest.raises(HistoryError, match="not an open invocation"):
        h.complete(inv, "ok")
    with pytest.raises(HistoryError, match="nemesis"):
        h.invoke(-1, "read", "x")
    with pytest.raises(HistoryError, match="op type"):
        Op(0, 0, "done", "read", None, None, 0.0)  # type: ignore[arg-type]


def test_validate_reports_invoke_after_info() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1, "info")
    run(h, 0, "read", "x", None, out=1)
    problems = h.validate()
    assert len(problems) == 1 and "after its op #1 ended with info" in problems[0]
    # the pairing itself still works
    assert [d.type for _, d in h.pairs() if d] == ["info", "ok"]


def test_validate_reports_broken_pairing_in_loaded_ops() -> None:
    ops = [
        Op(0, 0, "invoke", "write", "x", 1, 0.0),
        Op(1, 0, "invoke", "write", "x", 2, 1.0),
        Op(2, 1, "ok", "read", "x", 1, 0.5),
        Op(3, 0, "ok", "read", "x", 2, 2.0),
    ]
    problems = History.from_ops(ops).validate()
    text = "\n".join(problems)
    assert "while op #0 was open" in text
    assert "has no open invocation" in text
    assert "does not match" in text
    assert "earlier" in text
    first_inv, first_done = History.from_ops(ops).pairs()[0]
    assert (first_inv.index, first_done) == (0, None)


def test_observe_records_an_invoke_and_its_ok() -> None:
    h = new_history()
    ok = h.observe(7, "deliver", "bob", {"mid": "m1"}, stream=3)
    assert [op.type for op in h] == ["invoke", "ok"]
    assert ok.value == {"mid": "m1"} and h.pairs() == [(h[0], ok)]
    assert ok.extra == h[0].extra == {"stream": 3}
    with pytest.raises(HistoryError, match="still has op"):
        h.invoke(8, "read", "x")
        h.observe(8, "deliver", "bob", {})


def test_fault_windows() -> None:
    h = new_history()
    h.nemesis("start", "partition")  # t=0
    h.nemesis("start", {"name": "kill", "node": 2})  # t=1
    h.nemesis("stop", "partition")  # t=2
    h.nemesis("heal")  # t=3: ends every open fault
    h.nemesis("start-pause", {"node": 1})  # t=4, Jepsen style
    h.nemesis("stop-pause")  # t=5
    h.nemesis("start", "clock")  # t=6, never healed
    assert h.fault_windows() == [
        (0.0, 2.0, "partition"),
        (1.0, 3.0, "kill"),
        (4.0, 5.0, "pause"),
        (6.0, None, "clock"),
    ]
    assert all(op.process == NEMESIS and op.type == "info" for op in h)
    assert h.pairs() == []


def test_jsonl_round_trip(tmp_path: Path) -> None:
    h = new_history()
    inv = h.invoke(0, "send", "bob", {"id": "c1", "body": b"\x00\xffhi", "path": ("a", 1)})
    h.complete(inv, "ok", mid="m1", code=None)
    run(h, 1, "read", None, None, out={"$b": "not base64, a user dict"})
    run(h, 2, "cas", "x", (1, 2), swapped=False)
    h.nemesis("start", "partition", nodes=[1, 2])
    pending = h.invoke(3, "write", "x", b"")
    path = tmp_path / "history.jsonl"
    h.dump(path)
    lines = path.read_text().splitlines()
    assert len(lines) == len(h) and '"$b"' in lines[0]
    loaded = History.load(path)
    assert len(loaded) == len(h)
    for a, b in zip(h, loaded, strict=True):
        assert (a.index, a.process, a.type, a.f, a.key, a.time) == (
            b.index,
            b.process,
            b.type,
            b.f,
            b.key,
            b.time,
        )
    assert loaded[0].value == {"id": "c1", "body": b"\x00\xffhi", "path": ["a", 1]}
    assert loaded[1].extra == {"mid": "m1", "code": None}
    assert loaded[3].value == {"$b": "not base64, a user dict"}
    assert loaded[5].value == [1, 2] and loaded[5].extra == {"swapped": False}
    assert loaded[6].extra == {"nodes": [1, 2]}
    assert loaded[7].value == b""
    # a loaded history keeps recording: the open invocation can be completed
    assert loaded.pending() == [dataclasses.replace(pending)]
    loaded.complete(loaded.pending()[0], "info")
    assert loaded.validate() == []


def test_dump_and_load_refuse_bad_data(tmp_path: Path) -> None:
    h = new_history()
    h.invoke(0, "write", "x", {1: "int key"})
    with pytest.raises(HistoryError, match="dict keys must be strings"):
        h.dump(tmp_path / "x.jsonl")
    h2 = new_history()
    h2.invoke(0, "write", "x", object())
    with pytest.raises(HistoryError, match="cannot store a value of type object"):
        h2.dump(tmp_path / "y.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"index":0,"process":0,"type":"invoke","f":"read","key":"x","value":null,'
        '"time":0.0,"extra":{}}\n{"index":1,"process":0}\n'
    )
    with pytest.raises(HistoryError, match=r"bad\.jsonl:2: entry has no 'type' field"):
        History.load(bad)
    bad.write_text("not json\n")
    with pytest.raises(HistoryError, match=r"bad\.jsonl:1"):
        History.load(bad)


# ====================================================================== linearizability


def test_sequential_register_is_linearizable() -> None:
    h = new_history()
    run(h, 0, "read", "x", None, out=None)
    run(h, 0, "write", "x", 1)
    run(h, 1, "read", "x", None, out=1)
    run(h, 1, "cas", "x", [1, 2], swapped=True)
    run(h, 0, "cas", "x", [1, 3], swapped=False)
    run(h, 0, "read", "x", None, out=2)
    result = check_linearizable(h)
    assert result.valid is True, result.message
    assert result.counts["ops"] == 6 and result.counts["keys"] == 1
    assert result.failing == []


def test_stale_read_after_a_completed_write_is_not_linearizable() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)
    run(h, 1, "write", "x", 2)
    stale = run(h, 2, "read", "x", None, out=1)
    result = check_linearizable(h)
    assert result.valid is False
    failure = result.details["failures"][0]
    assert failure["key"] == "x" and failure["stuck"] == stale.index - 1
    assert failure["state"] == 2
    assert stale in result.failing
    assert "'x'" in result.message and "read -> 1" in result.message


def test_lost_write_is_not_linearizable() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)
    run(h, 0, "write", "x", 2)  # acknowledged, then gone
    run(h, 1, "read", "x", None, out=1)
    run(h, 1, "read", "x", None, out=1)
    assert check_linearizable(h).valid is False


def test_read_of_a_value_never_written_is_not_linearizable() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)
    run(h, 1, "read", "x", None, out=99)
    result = check_linearizable(h)
    assert result.valid is False
    assert result.details["failures"][0]["linearized"] == 1


def test_failed_write_did_not_happen() -> None:
    h = new_history()
    run(h, 0, "write", "x", 9, "fail", error="write_blocked")
    run(h, 1, "read", "x", None, out=9)
    assert check_linearizable(h).valid is False
    h2 = new_history()
    run(h2, 0, "write", "x", 9, "fail")
    run(h2, 1, "read", "x", None, "fail")  # a read that errors says nothing
    run(h2, 1, "read", "x", None, out=None)
    assert check_linearizable(h2).valid is True


@pytest.mark.parametrize("final", [1, 2])
def test_concurrent_writes_may_take_effect_in_either_order(final: int) -> None:
    h = new_history()
    w1 = h.invoke(0, "write", "x", 1)
    w2 = h.invoke(1, "write", "x", 2)
    r = h.invoke(2, "read", "x")
    h.complete(r, "ok", 3 - final)  # a concurrent read sees the other value...
    h.complete(w1, "ok")
    h.complete(w2, "ok")
    run(h, 2, "read", "x", None, out=final)  # ...and the later read the last
    run(h, 3, "read", "x", None, out=final)
    assert check_linearizable(h).valid is True


def test_concurrent_reads_cannot_disagree_on_order() -> None:
    # Two sequential reads see 1 then 2, two others see 2 then 1, all after both writes.
    h = new_history()
    w1 = h.invoke(0, "write", "x", 1)
    w2 = h.invoke(1, "write", "x", 2)
    ra = h.invoke(2, "read", "x")
    h.complete(ra, "ok", 1)
    rb = h.invoke(3, "read", "x")
    h.complete(rb, "ok", 2)
    rc = h.invoke(2, "read", "x")
    h.complete(rc, "ok", 1)  # back to 1 after 2 was seen by a read that completed
    h.complete(w1, "ok")
    h.complete(w2, "ok")
    assert check_linearizable(h).valid is False


@pytest.mark.parametrize("seen", [None, 5])
def test_info_write_may_or_may_not_take_effect(seen: int | None) -> None:
    h = new_history()
    run(h, 0, "write", "x", 5, "info")
    run(h, 1, "read", "x", None, out=seen)
    run(h, 1, "read", "x", None, out=seen)
    assert check_linearizable(h).valid is True


def test_info_write_cannot_take_effect_then_vanish() -> None:
    h = new_history()
    run(h, 0, "write", "x", 5, "info")
    run(h, 1, "read", "x", None, out=5)
    run(h, 1, "read", "x", None, out=None)
    assert check_linearizable(h).valid is False


def test_pending_write_and_info_cas_are_optional() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)
    h.invoke(1, "write", "x", 7)  # never completed
    run(h, 2, "cas", "x", [1, 3], "info")
    run(h, 3, "read", "x", None, out=3)
    run(h, 3, "read", "x", None, out=7)
    assert check_linearizable(h).valid is True
    h2 = new_history()
    run(h2, 0, "write", "x", 1)
    run(h2, 2, "cas", "x", [5, 3], "info")  # cannot swap: 5 was never there
    run(h2, 3, "read", "x", None, out=3)
    assert check_linearizable(h2).valid is False


def test_cas_cannot_succeed_twice_from_the_same_value() -> None:
    h = new_history()
    run(h, 0, "write", "x", 0)
    run(h, 1, "cas", "x", [0, 1], swapped=True)
    run(h, 2, "cas", "x", [0, 2], swapped=True)
    assert check_linearizable(h).valid is False
    # concurrent: still only one of them can see 0
    h2 = new_history()
    run(h2, 0, "write", "x", 0)
    a = h2.invoke(1, "cas", "x", [0, 1])
    b = h2.invoke(2, "cas", "x", [0, 2])
    h2.complete(a, "ok", swapped=True)
    h2.complete(b, "ok", swapped=True)
    result = check_linearizable(h2)
    assert result.valid is False
    assert {op.index for op in result.failing} >= {a.index, b.index}
    # ...unless one failed to swap, which is fine
    h3 = new_history()
    run(h3, 0, "write", "x", 0)
    a = h3.invoke(1, "cas", "x", [0, 1])
    b = h3.invoke(2, "cas", "x", [0, 2])
    h3.complete(a, "ok", swapped=True)
    h3.complete(b, "ok", swapped=False)
    assert check_linearizable(h3).valid is True


def test_cas_that_did_not_swap_observes_a_different_value() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)
    run(h, 1, "cas", "x", [1, 2], swapped=False)  # but the register held 1
    assert check_linearizable(h).valid is False


def test_keys_are_checked_independently() -> None:
    h = new_history()
    for k in range(200):
        run(h, k % 7, "write", f"k{k}", k)
        run(h, k % 7, "read", f"k{k}", None, out=k)
    # x and y interleaved: each key on its own is fine
    wx = h.invoke(100, "write", "x", 1)
    wy = h.invoke(101, "write", "y", 1)
    h.complete(wx, "ok")
    run(h, 102, "read", "y", None, out=None)  # concurrent with y's write: fine
    h.complete(wy, "ok")
    good = check_linearizable(h)
    assert good.valid is True
    assert good.counts["keys"] == 202 and len(good.details["keys"]) == 202
    run(h, 103, "read", "k17", None, out=18)
    bad = check_linearizable(h)
    assert bad.valid is False and bad.counts["keys_invalid"] == 1
    assert [f["key"] for f in bad.details["failures"]] == ["k17"]
    assert {op.key for op in bad.failing} == {"k17"}


def test_time_limit_gives_unknown_never_true() -> None:
    h = generate_history(random.Random(3), 400, concurrency=8)
    assert check_linearizable(h).valid is True
    assert check_linearizable(h, time_limit=0.0).valid == UNKNOWN
    ticks = itertools.count()
    result = check_linearizable(h, time_limit=1.5, clock=lambda: float(next(ticks)))
    assert result.valid == UNKNOWN  # ran out inside the search, after 1024 steps
    assert result.counts["search_steps"] >= 1024
    assert "time limit" in result.message


def test_linearizable_edge_cases() -> None:
    assert check_linearizable(new_history()).valid is True
    with pytest.raises(ValueError, match="unknown model"):
        check_linearizable(new_history(), model="queue")
    h = new_history()
    run(h, 0, "cas", "x", 5)
    with pytest.raises(ValueError, match=r"\[expected, new\]"):
        check_linearizable(h)
    h2 = new_history()
    run(h2, 0, "write", "x", 1, "info")
    run(h2, 0, "read", "x", None, out=1)  # the invoke-after-info convention is broken
    result = check_linearizable(h2)
    assert result.valid is True and result.counts["history_problems"] == 1


# ---------------------------------------------------------------- generated histories


def generate_history(
    rng: random.Random,
    n_ops: int,
    concurrency: int,
    keys: tuple[str, ...] = ("x",),
    info_rate: float = 0.03,
    fail_rate: float = 0.03,
) -> History:
    """Run a real register under ``concurrency`` random clients.

    Each op takes effect at one random moment between its invocation and its
    completion (so the history is linearizable by construction), or, for
    ``fail`` and some ``info`` completions, never. Written values are unique.
    """
    h = new_history()
    state: dict[str, Any] = dict.fromkeys(keys)
    values = itertools.count(1)
    procs = list(range(concurrency))
    open_op: list[Op | None] = [None] * concurrency
    result: list[tuple[Any, dict[str, Any]] | None] = [None] * concurrency
    next_proc = concurrency
    invoked = 0
    while invoked < n_ops or any(op is not None for op in open_op):
        slot = rng.randrange(concurrency)
        inv = open_op[slot]
        if inv is None:
            if invoked < n_ops:
                key = rng.choice(keys)
                f = rng.choice(["read", "read", "write", "cas"])
                value: Any = None
                if f == "write":
                    value = next(values)
                elif f == "cas":
                    expected = state[key] if rng.random() < 0.5 else rng.randrange(invoked + 2)
                    value = [expected, next(values)]
                open_op[slot] = h.invoke(procs[slot], f, key, value)
                result[slot] = None
                invoked += 1
            continue
        r = rng.random()
        took_effect = result[slot] is not None
        if r < info_rate or (not took_effect and r < info_rate + fail_rate):
            outcome = "info" if r < info_rate else "fail"
            h.complete(inv, outcome)  # type: ignore[arg-type]
            open_op[slot] = None
            if outcome == "info":
                procs[slot], next_proc = next_proc, next_proc + 1
            continue
        if not took_effect:  # the linearization point
            assert inv.key is not None
            if inv.f == "read":
                result[slot] = (state[inv.key], {})
            elif inv.f == "write":
                state[inv.key] = inv.value
                result[slot] = (inv.value, {})
            else:
                expected, new = inv.value
                swapped = state[inv.key] == expected
                if swapped:
                    state[inv.key] = new
                result[slot] = (inv.value, {"swapped": swapped})
            continue
        done = result[slot]
        assert done is not None
        h.complete(inv, "ok", done[0], **done[1])
        open_op[slot] = None
    return h


def inject_stale_read(h: History, rng: random.Random) -> tuple[History, Op] | None:
    """Make one ok read return a value overwritten before the read started.

    Picks write W (or the initial None) and an ok write W2 of the same key
    with W done before W2 started and W2 done before the read R started; as
    written values are unique, nothing else writes W's value, so R seeing it
    cannot be linearized. Returns the new history and the changed completion,
    or None if the history has no such triple.
    """
    pairs = h.pairs()
    writes = [(i, d) for i, d in pairs if i.f == "write" and d is not None and d.type == "ok"]
    reads = [(i, d) for i, d in pairs if i.f == "read" and d is not None and d.type == "ok"]
    rng.shuffle(reads)
    for r_inv, r_done in reads:
        before = [(i, d) for i, d in writes if i.key == r_inv.key and d.index < r_inv.index]
        for w2_inv, _ in before:
            stale_values = [None] + [
                i.value for i, d in before if d.index < w2_inv.index and i.value != w2_inv.value
            ]
            stale = rng.choice(stale_values)
            if stale == r_done.value:
                continue
            ops = list(h)
            ops[r_done.index] = dataclasses.replace(r_done, value=stale)
            return History.from_ops(ops), ops[r_done.index]
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    n_ops=st.integers(1, 120),
    concurrency=st.integers(1, 6),
    n_keys=st.integers(1, 3),
)
def test_generated_histories_are_linearizable_and_a_stale_read_is_caught(
    seed: int, n_ops: int, concurrency: int, n_keys: int
) -> None:
    rng = random.Random(seed)
    keys = tuple(f"k{i}" for i in range(n_keys))
    h = generate_history(rng, n_ops, concurrency, keys)
    good = check_linearizable(h)
    assert good.valid is True, good.message
    injected = inject_stale_read(h, rng)
    if injected is not None:
        bad, stale = injected
        result = check_linearizable(bad)
        assert result.valid is False
        assert stale in result.failing


def reference_linearizable(h: History) -> bool:
    """Brute force: some subset of the unknown-outcome ops plus every ok op, in some
    order respecting real time, runs on a register and gives every observed result."""
    entries = []  # (invoke index, return index or inf, f, value, outcome, extra)
    for inv, done in h.pairs():
        outcome = done.type if done is not None else "info"
        if outcome == "fail" or (inv.f == "read" and outcome == "info"):
            continue
        ret = done.index if outcome == "ok" and done is not None else math.inf
        value = done.value if inv.f == "read" and done is not None else inv.value
        entries.append((inv.index, ret, inv.f, value, outcome, done.extra if done else {}))
    optional = [e for e in entries if e[4] != "ok"]
    required = [e for e in entries if e[4] == "ok"]
    for n in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, n):
            for order in itertools.permutations(required + list(chosen)):
                if any(b[1] < a[0] for k, a in enumerate(order) for b in order[k + 1 :]):
                    continue  # b returned before a was invoked, yet comes after it
                state: Any = None
                for _, _, f, value, outcome, extra in order:
                    if f == "read":
                        if state != value:
                            break
                    elif f == "write":
                        state = value
                    else:
                        swapped = outcome != "ok" or extra.get("swapped", True)
                        if (state == value[0]) != swapped:
                            break
                        if swapped:
                            state = value[1]
                else:
                    return True
    return False


@st.composite
def small_histories(draw: st.DrawFn) -> History:
    """Up to 6 random register ops on one key over values {None, 1, 2}, mostly invalid."""
    h = new_history()
    n = draw(st.integers(1, 6))
    open_ops: dict[int, Op] = {}
    started = 0
    while started < n or open_ops:
        if started < n and (not open_ops or draw(st.booleans())):
            f = draw(st.sampled_from(["read", "write", "cas"]))
            small = st.sampled_from([None, 1, 2])
            value = (
                draw(small) if f == "write" else [draw(small), draw(small)] if f == "cas" else None
            )
            open_ops[started] = h.invoke(started, f, "x", value)
            started += 1
            continue
        p = draw(st.sampled_from(sorted(open_ops)))
        inv = open_ops.pop(p)
        outcome = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        if inv.f == "read" and outcome == "ok":
            h.complete(inv, "ok", draw(st.sampled_from([None, 1, 2])))
        elif inv.f == "cas" and outcome == "ok":
            h.complete(inv, "ok", swapped=draw(st.booleans()))
        elif draw(st.booleans()) or outcome != "info":
            h.complete(inv, outcome)  # type: ignore[arg-type]
        # else: left pending, like an info
    return h


@settings(max_examples=400, deadline=None)
@given(small_histories())
def test_search_agrees_with_brute_force(h: History) -> None:
    assert check_linearizable(h).valid is reference_linearizable(h)


@settings(max_examples=300, deadline=None)
@given(small_histories())
def test_a_failing_window_proves_the_history_fails(h: History) -> None:
    """The window relaxation is sound: a window that cannot be linearized from any
    initial value means the whole history cannot be linearized either."""
    raw = _checkers._register_ops(h.pairs(), collections.Counter())
    windows = _checkers._Windows(raw)
    refuted = [
        (start, end)
        for start in range(len(raw))
        for end in range(start + 1, len(raw) + 1)
        if _checkers._search(
            _checkers._simplify(windows.ops(start, end), any_start=True),
            _checkers._ANY,
            lambda: False,
        ).valid
        is False
    ]
    if refuted:
        assert reference_linearizable(h) is False, refuted


def test_a_window_decides_when_the_full_search_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    real_searching = _checkers._searching

    def slow_full_search(
        ops: list[Any], initial: Any, *args: Any, **kw: Any
    ) -> Generator[int, None, Any]:
        if initial is not _checkers._ANY:  # the full search: pretend it takes long
            for _ in range(100):
                yield 0
        return (yield from real_searching(ops, initial, *args, **kw))

    monkeypatch.setattr(_checkers, "_searching", slow_full_search)
    monkeypatch.setattr(_checkers, "_FIRST_PASS_STEPS_PER_OP", 0)
    monkeypatch.setattr(_checkers, "_WINDOW_SIZES", (2,))
    h = new_history()
    for value in range(5):
        run(h, 0, "write", "x", value)
    run(h, 0, "write", "x", 10)
    stale = run(h, 1, "read", "x", None, out=3)
    run(h, 0, "write", "x", 11)
    result = check_linearizable(h)
    assert result.valid is False and result.counts["windows_searched"] >= 1
    failure = result.details["failures"][0]
    assert failure["window"] == [10, 12] and "in the window of ops #10..#12" in result.message
    assert stale in result.failing
    # a valid history is still decided by the full search
    h2 = new_history()
    for value in range(5):
        run(h2, 0, "write", "x", value)
        run(h2, 1, "read", "x", None, out=value)
    assert check_linearizable(h2).valid is True


def test_generated_history_with_more_info_ops() -> None:
    for seed in range(20):
        h = generate_history(random.Random(seed), 150, 5, ("x", "y"), info_rate=0.15)
        assert check_linearizable(h).valid is True


def test_performance_5000_ops_at_concurrency_5() -> None:
    h = generate_history(random.Random(42), 5000, 5)
    started = time.perf_counter()
    result = check_linearizable(h)
    elapsed = time.perf_counter() - started
    print(
        f"\nlinearizability: {len(h)} entries, 5000 ops, concurrency 5: {elapsed:.3f} s, "
        f"{result.counts['search_steps']} steps"
    )
    assert result.valid is True
    injected = inject_stale_read(h, random.Random(1))
    assert injected is not None
    bad, stale = injected
    started = time.perf_counter()
    result = check_linearizable(bad)
    elapsed = time.perf_counter() - started
    print(f"linearizability: same with one stale read: {elapsed:.3f} s; {result.message}")
    assert result.valid is False and stale in result.failing
    assert len(result.failing) <= 20


# ====================================================================== messages


def send(
    h: History,
    p: int,
    cid: str,
    to: str,
    result: str = "ok",
    mid: str | None = None,
    sender: str = "alice",
    **extra: Any,
) -> tuple[Op, Op]:
    inv = h.invoke(p, "send", to, {"id": cid, "from": sender, "to": to, "body": f"body-{cid}"})
    if mid is not None:
        extra["mid"] = mid
    return inv, h.complete(inv, result, **extra)  # type: ignore[arg-type]


def deliver(
    h: History, to: str, mid: str, cid: str | None = None, sender: str = "alice", **more: Any
) -> Op:
    value = {"to": to, "mid": mid, "from": sender, **more}
    if cid is not None:
        value["id"] = cid
    return h.observe(50, "deliver", to, value)


def drain(h: History, to: str, items: list[dict[str, Any]]) -> Op:
    inv = h.invoke(60, "drain", to)
    return h.complete(inv, "ok", items)


def test_messages_all_delivered_in_order() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 0, "c2", "bob", mid="m2")
    deliver(h, "bob", "m1", "c1")
    deliver(h, "bob", "m1", "c1")  # at-least-once push, dropped by mid
    send(h, 0, "c3", "bob", mid="m3")
    drain(h, "bob", [{"mid": "m2", "from": "alice"}, {"mid": "m3", "from": "alice"}])
    result = check_messages(h)
    assert result.valid is True, result.message
    assert result.counts["sent_ok"] == 3 and result.counts["delivered"] == 3
    assert result.counts["redelivered"] == 1 and result.counts["lost"] == 0


def test_lost_message() -> None:
    h = new_history()
    lost_inv, lost_ok = send(h, 0, "c1", "bob", mid="m1")
    send(h, 0, "c2", "bob", mid="m2")
    drain(h, "bob", [{"mid": "m2", "from": "alice", "id": "c2"}])
    result = check_messages(h)
    assert result.valid is False and result.counts["lost"] == 1
    assert result.details["examples"]["lost"][0]["id"] == "c1"
    assert result.failing == [lost_inv, lost_ok]
    assert "lost 1" in result.message


def test_undrained_recipient_is_unknown_not_lost() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    result = check_messages(h)
    assert result.valid == UNKNOWN and result.counts["unverified"] == 1
    assert check_messages(h, require_final_drain=False).counts["lost"] == 1


def test_duplicated_under_different_mids() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 1, "c1", "bob", mid="m1")  # a retry, same answer
    deliver(h, "bob", "m1", "c1")
    deliver(h, "bob", "m9", "c1")  # the same message again, stored twice
    drain(h, "bob", [])
    result = check_messages(h)
    assert result.valid is False and result.counts["duplicated"] == 1
    assert result.details["examples"]["duplicated"][0]["seen_mids"] == ["m1", "m9"]


def test_same_client_id_acknowledged_with_two_mids() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 1, "c1", "bob", mid="m2")  # retried through another core before the drain
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    cp = check_messages(h, mode="cp")
    assert cp.valid is False and cp.counts["multi_mid_acks"] == 1
    ap = check_messages(h, mode="hardened_ap")
    assert ap.valid is True and ap.counts["multi_mid_acks"] == 1


def test_repeated_mid_counts_as_duplicate_without_dedup() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    deliver(h, "bob", "m1", "c1")
    deliver(h, "bob", "m1", "c1")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [{"mid": "m1", "from": "alice"}])  # still stored: not a delivery
    assert check_messages(h).valid is True
    raw = check_messages(h, dedup_by_mid=False)
    assert raw.valid is False and raw.counts["duplicated"] == 2


def test_unexpected_message() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    deliver(h, "bob", "m1", "c1")
    ghost = deliver(h, "bob", "m7", "c7")  # never sent
    stray = deliver(h, "bob", "m8", body="who?")  # no id, unknown mid, unknown body
    drain(h, "bob", [])
    result = check_messages(h)
    assert result.valid is False and result.counts["unexpected"] == 2
    assert ghost in result.failing and stray in result.failing


def test_delivery_matched_by_body_or_mid() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", "info")  # unknown outcome, no mid learnt
    send(h, 0, "c2", "bob", mid="m2")
    deliver(h, "bob", "mx", body="body-c1")  # recovered: matched by its body
    drain(h, "bob", [{"mid": "m2", "from": "alice"}])  # matched by its mid
    result = check_messages(h)
    assert result.valid is True, result.message
    assert result.counts["recovered"] == 1 and result.counts["delivered"] == 2


def test_failed_send_must_not_be_delivered() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", "fail", error="write_blocked")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    result = check_messages(h)
    assert result.valid is False and result.counts["failed_but_delivered"] == 1


def test_misdelivered_message() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    deliver(h, "carol", "m1", "c1")
    drain(h, "bob", [])
    drain(h, "carol", [])
    result = check_messages(h)
    assert result.valid is False
    assert result.counts["misdelivered"] == 1 and result.counts["lost"] == 1


def test_reordered_messages() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 0, "c2", "bob", mid="m2")  # invoked after c1 was acknowledged
    deliver(h, "bob", "m2", "c2")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    result = check_messages(h)
    assert result.valid is False and result.counts["reordered"] == 1
    example = result.details["examples"]["reordered"][0]
    assert example["late"]["id"] == "c1" and example["overtaken_by"]["id"] == "c2"
    # in a drain, inbox order counts the same way
    h2 = new_history()
    send(h2, 0, "c1", "bob", mid="m1")
    send(h2, 0, "c2", "bob", mid="m2")
    drain(h2, "bob", [{"mid": "m2", "from": "alice"}, {"mid": "m1", "from": "alice"}])
    assert check_messages(h2).counts["reordered"] == 1


def test_order_is_compared_within_one_stream_only() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")  # pushed while bob's subscriber was away
    send(h, 0, "c2", "bob", mid="m2")
    deliver(h, "bob", "m2", "c2", stream=2)  # pushed on the new subscription...
    deliver(h, "bob", "m1", "c1", stream=2)  # ...and the refetch, on the same one: late
    drain(h, "bob", [{"mid": "m2", "from": "alice"}, {"mid": "m1", "from": "alice"}])
    result = check_messages(h)
    assert result.counts["reordered"] == 1  # once, though two streams show it
    h2 = new_history()
    send(h2, 0, "c1", "bob", mid="m1")
    send(h2, 0, "c2", "bob", mid="m2")
    h2.observe(50, "deliver", "bob", {"mid": "m2", "from": "alice"}, stream=2)  # new pushes
    h2.observe(50, "deliver", "bob", {"mid": "m1", "from": "alice"}, stream=3)  # refetch
    drain(h2, "bob", [])
    assert check_messages(h2).valid is True
    # pushes may be left out of order checks altogether; inbox order still counts
    h3 = new_history()
    send(h3, 0, "c1", "bob", mid="m1")
    send(h3, 0, "c2", "bob", mid="m2")
    deliver(h3, "bob", "m2", "c2")
    deliver(h3, "bob", "m1", "c1")
    drain(h3, "bob", [])
    assert check_messages(h3).counts["reordered"] == 1
    assert check_messages(h3, compare_push_order=False).valid is True
    drain(h3, "bob", [{"mid": "m2", "from": "alice"}, {"mid": "m1", "from": "alice"}])
    assert check_messages(h3, compare_push_order=False).counts["reordered"] == 1


def test_concurrent_sends_may_arrive_in_either_order() -> None:
    h = new_history()
    a = h.invoke(0, "send", "bob", {"id": "c1", "from": "alice", "to": "bob", "body": "1"})
    b = h.invoke(1, "send", "bob", {"id": "c2", "from": "alice", "to": "bob", "body": "2"})
    h.complete(a, "ok", mid="m1")
    h.complete(b, "ok", mid="m2")
    deliver(h, "bob", "m2", "c2")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    # other senders do not order each other either
    send(h, 2, "d1", "bob", mid="n1", sender="dave")
    send(h, 2, "e1", "bob", mid="n2", sender="erin")
    drain(h, "bob", [{"mid": "n2", "from": "erin"}, {"mid": "n1", "from": "dave"}])
    result = check_messages(h)
    assert result.valid is True, result.message


def test_late_after_crash_is_counted_in_hardened_ap_only() -> None:
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 0, "c2", "bob", mid="m2")
    deliver(h, "bob", "m2", "c2")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    ap = check_messages(h, mode="hardened_ap", allow_late_after_crash={"m1"})
    assert ap.valid is True and ap.counts["late"] == 1 and ap.counts["reordered"] == 0
    assert check_messages(h, mode="hardened_ap", allow_late_after_crash={"m2"}).valid is False
    with pytest.raises(ValueError, match="hardened_ap"):
        check_messages(h, mode="cp", allow_late_after_crash={"m1"})


def test_late_across_connections_needs_another_process() -> None:
    # m1 acknowledged on process 0, overtaken by m2 sent later on process 1
    h = new_history()
    send(h, 0, "c1", "bob", mid="m1")
    send(h, 1, "c2", "bob", mid="m2")
    deliver(h, "bob", "m2", "c2")
    deliver(h, "bob", "m1", "c1")
    drain(h, "bob", [])
    ap = check_messages(h, mode="hardened_ap", allow_late_across_connections={"m1"})
    assert ap.valid is True and ap.counts["late"] == 1, ap.message
    assert check_messages(h, mode="hardened_ap").counts["reordered"] == 1
    with pytest.raises(ValueError, match="hardened_ap"):
        check_messages(h, mode="cp", allow_late_across_connections={"m1"})
    # the same overtaking on ONE connection stays a violation
    same = new_history()
    send(same, 0, "c1", "bob", mid="m1")
    send(same, 0, "c2", "bob", mid="m2")
    deliver(same, "bob", "m2", "c2")
    deliver(same, "bob", "m1", "c1")
    drain(same, "bob", [])
    r = check_messages(same, mode="hardened_ap", allow_late_across_connections={"m1"})
    assert r.valid is False and r.counts["reordered"] == 1


# ====================================================================== revocations


def test_auth_after_revocation_is_a_violation() -> None:
    h = new_history()
    run(h, 0, "auth", None, {"jti": "t1", "user": "bob", "iat": 100})
    revoke = h.invoke(1, "revoke", None, {"jti": "t1"})
    during = h.invoke(0, "auth", None, {"jti": "t1", "user": "bob", "iat": 100})
    h.complete(revoke, "ok")
    h.complete(during, "ok")  # concurrent with the revocation: fine
    good = check_revocations(h)
    assert good.valid is True and good.counts["concurrent"] == 1
    late = h.invoke(0, "auth", None, {"jti": "t1", "user": "bob", "iat": 100})
    late_ok = h.complete(late, "ok")
    bad = check_revocations(h)
    assert bad.valid is False and bad.counts["violations"] == 1
    assert bad.details["violations"][0]["auth"] == late.index
    assert late in bad.failing and late_ok in bad.failing and revoke in bad.failing


def test_user_revocation_cut_off() -> None:
    h = new_history()
    run(h, 1, "revoke", None, {"user": "bob", "before_ms": 200_000})
    run(h, 0, "auth", None, {"jti": "new", "user": "bob", "iat": 300})  # issued after
    run(h, 0, "auth", None, {"jti": "x", "user": "carol", "iat": 100})  # other user
    run(h, 0, "auth", None, {"jti": "old", "user": "bob", "iat": 150}, "fail")  # refused
    assert check_revocations(h).valid is True
    run(h, 0, "auth", None, {"jti": "old", "user": "bob", "iat": 150})
    run(h, 0, "auth", None, {"jti": "no-iat", "user": "bob"})
    result = check_revocations(h)
    assert result.valid is False and result.counts["violations"] == 2


def test_revocation_with_unknown_outcome_is_not_used() -> None:
    h = new_history()
    run(h, 1, "revoke", None, {"jti": "t1"}, "info")
    run(h, 0, "auth", None, {"jti": "t1", "user": "bob", "iat": 1})
    result = check_revocations(h)
    assert result.valid is True and result.counts["revoke_info"] == 1


# ====================================================================== convergence, availability


def test_convergence() -> None:
    same = check_convergence({"n1": "abc", "n2": "abc", "n3": "abc"})
    assert same.valid is True and same.counts["groups"] == 1
    diff = check_convergence(
        {
            "n1": {"inboxes": 3, "messages": 10, "hash": "a"},
            "n2": {"inboxes": 3, "messages": 10, "hash": "a"},
            "n3": {"inboxes": 3, "messages": 9, "hash": "b"},
        }
    )
    assert diff.valid is False and diff.details["differing"] == ["n3"]
    assert sorted(diff.details["fields"]) == ["hash", "messages"]
    assert diff.details["fields"]["messages"] == {"n1": 10, "n2": 10, "n3": 9}
    assert diff.counts["differing"] == 1 and "n3" in diff.message
    partial = check_convergence({"n1": "abc", "n2": None})
    assert partial.valid == UNKNOWN and partial.details["unreachable"] == ["n2"]


def test_availability_table() -> None:
    h = new_history()
    run(h, 0, "write", "x", 1)  # t 0-1, before the fault
    h.nemesis("start", "partition")  # t 2
    run(h, 0, "write", "x", 2, "fail")  # t 3-4
    run(h, 1, "read", "x", None, out=1)  # t 5-6
    run(h, 2, "write", "x", 3, "info")  # t 7-8
    h.nemesis("stop", "partition")  # t 9
    run(h, 3, "read", "x", None, out=3)  # t 10-11
    result = availability(h)
    assert result.valid is True
    (window,) = result.details["windows"]
    assert (window["name"], window["start"], window["end"]) == ("partition", 2.0, 9.0)
    assert (window["ops"], window["ok"], window["fail"], window["info"]) == (3, 1, 1, 1)
    assert window["ok_fraction"] == pytest.approx(1 / 3)
    assert window["by_f"]["write"] == {"fail": 1, "info": 1}
    outside = result.details["outside"]
    assert (outside["ops"], outside["ok"], outside["ok_fraction"]) == (2, 2, 1.0)
    assert result.counts["ops_in_faults"] == 3
    assert "partition: 1/3 ok" in result.message


def test_results_are_strict_json() -> None:
    h = new_history()
    h.nemesis("start", "partition")  # never healed
    run(h, 0, "write", "x", b"\x01")
    run(h, 0, "read", "x", None, out=b"\x02")
    send(h, 1, "c1", "bob", mid="m1")
    deliver(h, "bob", "m9", "c9", body=b"\x00")
    run(h, 2, "auth", None, {"jti": "t", "user": "u"})
    results = [
        check_linearizable(h),
        check_messages(h),
        check_revocations(h),
        availability(h),
        check_convergence({"n1": {"hash": b"a"}, "n2": {"hash": b"b"}}),
    ]
    assert results[3].details["windows"][0]["end"] is None
    for result in results:
        json.dumps(result.as_dict(), allow_nan=False, default=str)


def test_combine_validity_and_as_dict() -> None:
    assert combine_validity([True, True]) is True
    assert combine_validity([True, UNKNOWN]) == UNKNOWN
    assert combine_validity([UNKNOWN, False, True]) is False
    h = new_history()
    run(h, 0, "write", "x", b"\x01")
    run(h, 0, "read", "x", None, out=b"\x02")
    as_dict = check_linearizable(h).as_dict()
    assert as_dict["valid"] is False
    assert as_dict["failing"][-1]["value"] == {"$b": "Ag=="}
