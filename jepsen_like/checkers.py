"""Checkers for recorded histories: is what the clients saw allowed?

Theory of operation
-------------------
Every checker takes a :class:`~jepsen_like.history.History` (or replica
fingerprints) and returns a :class:`CheckResult`. ``valid`` is ``True`` only
when the check proved the property, ``False`` when it found a violation, and
``"unknown"`` when it could not decide (time limit, missing observations).
Nothing here does I/O; the linearizability search reads only the injected
``clock``, to honour its time limit.

Real-time order is entry order: operation A precedes B when A's completion
has a lower index than B's invocation. ``fail`` operations did not happen;
``info`` (or never completed) operations may have happened at any time after
their invocation, or not at all.

Linearizability (:func:`check_linearizable`) is Wing & Gong's search with
Lowe's improvements and Porcupine's cache: call and return entries sit in a
doubly linked list; the search linearizes the first call whose operation the
model accepts and whose (linearized-set bitmask, model state) pair is new,
and backtracks when it reaches a return entry (that operation had to take
effect before it returned). Registers are independent, so the history is
split per key. Three additions keep unknown outcomes from blowing the search
up, each exact (a brute-force reference checks them in the tests):

* unknown-outcome operations are optional and have no return entry; they
  are tried only at a dead end, and a configuration whose optional set is a
  superset of one already seen with the same required set and state is
  skipped (leaving an optional operation pending only adds options);
* values no read returned and no cas expected are merged into one opaque
  value, and optional operations with the same effect are tried once;
* proving a violation can need the whole search space before the bad op,
  so after a first pass the full search shares its time with searches of
  windows of consecutive operations, started from an unknown value, with
  operations crossing the window's edges made optional. That is more
  permissive than the whole history, so a failing window proves a violation
  (and gives the report a small window). Windows ending at the full
  search's deepest dead end are tried first, then every stretch of the
  history. Whichever decides first wins; the time limit bounds both.

Messages (:func:`check_messages`) and revocations
(:func:`check_revocations`) are checked in O(n log n) by indexing, not by a
search.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Generator, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .history import History, Op

__all__ = [
    "UNKNOWN",
    "CheckResult",
    "Validity",
    "availability",
    "check_convergence",
    "check_linearizable",
    "check_messages",
    "check_revocations",
    "combine_validity",
]

#: Outcome of a check: proved, violated, or could not decide.
Validity = bool | Literal["unknown"]

#: The ``valid`` value of a check that could not decide.
UNKNOWN: Final = "unknown"

#: At most this many examples of each kind of anomaly are kept in ``details``.
_MAX_EXAMPLES: Final = 20
#: At most this many entries go into ``CheckResult.failing``.
_MAX_FAILING: Final = 40


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a checker found.

    ``counts`` are totals for the report, ``details`` everything else (JSON
    values apart from :class:`Op`), ``failing`` the smallest set of entries
    that shows the problem, in history order, and ``message`` one sentence.
    """

    name: str
    valid: Validity
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    failing: list[Op] = field(default_factory=list)
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (entries via :meth:`Op.to_json`)."""
        return {
            "name": self.name,
            "valid": self.valid,
            "counts": dict(self.counts),
            "details": self.details,
            "failing": [op.to_json() for op in self.failing],
            "message": self.message,
        }


def combine_validity(values: Iterable[Validity]) -> Validity:
    """``False`` if any is False, else ``"unknown"`` if any is unknown, else True."""
    result: Validity = True
    for v in values:
        if v is False:
            return False
        if v == UNKNOWN:
            result = UNKNOWN
    return result


_SCALARS: Final = frozenset({type(None), bool, int, float, str, bytes})


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for a JSON-like value (lists and tuples alike)."""
    if type(value) in _SCALARS:
        return value  # type: ignore[no-any-return]
    if isinstance(value, list | tuple):
        return ("$seq", *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("$map", frozenset((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, set | frozenset):
        return ("$set", frozenset(_freeze(v) for v in value))
    if not isinstance(value, Hashable):
        raise TypeError(f"cannot compare values of type {type(value).__name__}")
    return value


def _in_order(ops: Iterable[Op | None]) -> list[Op]:
    seen = {op.index: op for op in ops if op is not None}
    return [seen[i] for i in sorted(seen)][:_MAX_FAILING]


# ====================================================================== registers

_READ: Final = 0
_WRITE: Final = 1
_CAS: Final = 2  # swapped (or unknown outcome: optional, takes effect only if it swaps)
_CAS_NO_SWAP: Final = 3  # completed ok without swapping: observed value != expected
_REGISTER_FS: Final = frozenset({"read", "write", "cas"})

#: First pass: the full search runs alone for this many steps per op (most
#: valid histories need fewer) before window searches get a share.
_FIRST_PASS_STEPS_PER_OP = 100
#: Window sizes (ops) for local refutation, smallest first.
_WINDOW_SIZES: tuple[int, ...] = (16, 64, 256, 1024)
#: Step budget of a window search, per op in the window.
_WINDOW_STEPS_PER_OP = 200
#: After the first pass, one chunk of window search per this many chunks of search.
_WINDOW_SHARE = 4
#: Window sizes (ops) ending at the full search's deepest dead end.
_AIMED_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
#: Step budget of an aimed window search, per op in the window.
_AIMED_STEPS_PER_OP = 2000


class _Opaque:
    """The register value when it holds something no op of the key observed."""

    def __repr__(self) -> str:
        return "<a value nothing observed>"


class _Any:
    """The register value at the start of a window: anything at all."""

    def __repr__(self) -> str:
        return "<any value>"


_OPAQUE: Final = _Opaque()
_ANY: Final = _Any()


@dataclass(slots=True)
class _RegOp:
    kind: int
    arg: Hashable  # read: value seen; write: value written; cas: expected
    new: Hashable  # cas: value written
    required: bool  # completed ok (an info op is optional)
    invoke: Op
    completion: Op | None


@dataclass(slots=True)
class _Stuck:
    """The deepest partial linearization the search reached before failing."""

    depth: int
    tail: list[int]  # last linearized ops, oldest first
    state: Hashable
    stuck: int  # op whose return entry was reached without it taking effect
    candidates: list[int]  # ops that could have been next; none could


@dataclass(slots=True)
class _KeyOutcome:
    valid: Validity
    steps: int
    cache: int
    stuck: _Stuck | None = None
    ops: list[_RegOp] = field(default_factory=list)  # what `stuck` indexes
    window: tuple[int, int] | None = None  # history indices, if a window failed


def _register_ops(pairs: list[tuple[Op, Op | None]], counts: Counter[str]) -> list[_RegOp]:
    """The operations of one key that constrain it, in invocation order."""
    ops: list[_RegOp] = []
    for inv, done in pairs:
        outcome = done.type if done is not None else "info"
        counts[outcome] += 1
        if outcome == "fail":
            continue  # did not happen
        if inv.f == "read":
            if outcome == "ok":
                assert done is not None
                ops.append(_RegOp(_READ, _freeze(done.value), None, True, inv, done))
            else:
                counts["dropped_unknown_reads"] += 1  # constrains nothing
        elif inv.f == "write":
            ops.append(_RegOp(_WRITE, _freeze(inv.value), None, outcome == "ok", inv, done))
        else:
            expected, new = _cas_args(inv)
            swapped = True
            if outcome == "ok":
                assert done is not None
                swapped = bool(done.extra.get("swapped", True))
            kind = _CAS if swapped else _CAS_NO_SWAP
            ops.append(_RegOp(kind, expected, new, outcome == "ok", inv, done))
    return ops


def _cas_args(inv: Op) -> tuple[Hashable, Hashable]:
    value = inv.value
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError(f"cas op #{inv.index} needs value [expected, new], not {value!r}")
    return _freeze(value[0]), _freeze(value[1])


def _simplify(
    ops: list[_RegOp], counts: Counter[str] | None = None, *, any_start: bool = False
) -> list[_RegOp]:
    """Copies of ``ops`` with unobservable values merged and useless ops dropped.

    * An optional cas whose expected value no op writes can only swap in the
      initial state: with ``any_start`` (a window starting from :data:`_ANY`)
      it becomes an optional write of its new value (more permissive: fine
      for a window), otherwise, unless it expects the initial None, it never
      takes effect and is dropped (repeated until nothing changes).
    * Values that no read returned and no cas expected are indistinguishable
      to every op (each one only compares the state with observed values),
      so they all become :data:`_OPAQUE`: fewer states to tell apart.
    * An optional write of such a value is dropped when no cas returned "not
      swapped": if it took effect, nothing saw it, and the next op to touch
      the register overwrote it, so removing it leaves a linearization. (A
      "not swapped" cas observes inequality, so with one of those it stays.)
    """
    ops = list(ops)
    while True:
        writable = {op.arg for op in ops if op.kind == _WRITE}
        writable.update(op.new for op in ops if op.kind == _CAS)
        if not any_start:
            writable.add(None)
        stuck = [op for op in ops if not op.required and op.kind == _CAS and op.arg not in writable]
        if not stuck:
            break
        if any_start:
            ops = [
                _RegOp(_WRITE, op.new, None, False, op.invoke, op.completion)
                if not op.required and op.kind == _CAS and op.arg not in writable
                else op
                for op in ops
            ]
            break
        if counts is not None:
            counts["pruned"] += len(stuck)
        ops = [op for op in ops if op.required or op.kind != _CAS or op.arg in writable]

    observed = {op.arg for op in ops if op.kind != _WRITE}
    no_swap = any(op.kind == _CAS_NO_SWAP for op in ops)
    kept: list[_RegOp] = []
    for op in ops:
        written = op.arg if op.kind == _WRITE else op.new
        if written not in observed and op.kind != _READ:
            if not op.required and not no_swap:
                if counts is not None:
                    counts["pruned"] += 1
                continue
            written = _OPAQUE
        if op.kind == _WRITE:
            kept.append(_RegOp(_WRITE, written, None, op.required, op.invoke, op.completion))
        elif op.kind == _READ:
            kept.append(_RegOp(_READ, op.arg, None, True, op.invoke, op.completion))
        else:
            kept.append(_RegOp(op.kind, op.arg, written, op.required, op.invoke, op.completion))
    return kept


def _initial(ops: list[_RegOp]) -> Hashable:
    return None if any(op.arg is None for op in ops if op.kind != _WRITE) else _OPAQUE


class _Windows:
    """Windows of consecutive ops of one key (``ops`` in invocation order).

    :meth:`ops` gives the ops of a window made at least as permissive as the
    full history when started from :data:`_ANY`, so a window that cannot be
    linearized proves the history cannot. Ops that returned before the window
    are summed up by the unknown initial value. Ops invoked after it are left
    out, so only window ops that returned before the next invocation (they
    precede everything left out) keep their result; the others, and ops
    still open when the window starts, may or may not take effect (reads and
    "not swapped" cas among them observe nothing). Unknown-outcome ops
    invoked before the window may still take effect in it.
    """

    def __init__(self, ops: list[_RegOp]) -> None:
        self._ops = ops
        self._optional = [p for p, op in enumerate(ops) if not op.required]
        self._open_at: list[list[int]] = []  # required ops still open at each invocation
        still_open: list[tuple[int, int]] = []  # (return index, position)
        for p, op in enumerate(ops):
            call = op.invoke.index
            still_open = [(ret, q) for ret, q in still_open if ret > call]
            self._open_at.append([q for _, q in still_open])
            if op.required:
                assert op.completion is not None
                still_open.append((op.completion.index, p))

    def ops(self, start: int, end: int) -> list[_RegOp]:
        """The relaxed ops of the window ``start:end`` (positions in ``ops``)."""
        ops = self._ops
        until = ops[end].invoke.index if end < len(ops) else math.inf
        picked = [ops[p] for p in self._optional[: bisect.bisect_left(self._optional, start)]]
        for p in self._open_at[start]:
            if ops[p].kind in (_WRITE, _CAS):
                picked.append(_as_optional(ops[p]))
        for op in ops[start:end]:
            ended = op.completion.index if op.required and op.completion else math.inf
            if not op.required or ended < until:
                picked.append(op)
            elif op.kind in (_WRITE, _CAS):
                picked.append(_as_optional(op))
        return picked


def _as_optional(op: _RegOp) -> _RegOp:
    return _RegOp(op.kind, op.arg, op.new, False, op.invoke, op.completion)


def _search(
    ops: list[_RegOp],
    initial: Hashable,
    time_up: Callable[[], bool],
    max_steps: float = math.inf,
) -> _KeyOutcome:
    """Run :func:`_searching` to the end, or ``"unknown"`` once ``time_up()``."""
    search = _searching(ops, initial, max_steps)
    steps = 0
    try:
        while True:
            steps = next(search)
            if time_up():
                return _KeyOutcome(UNKNOWN, steps, 0)
    except StopIteration as done:
        outcome: _KeyOutcome = done.value
        return outcome


def _searching(
    ops: list[_RegOp],
    initial: Hashable,
    max_steps: float = math.inf,
    stuck_at: list[Op] | None = None,
) -> Generator[int, None, _KeyOutcome]:
    """Wing-Gong-Lowe search with Porcupine's cache over one register's ops.

    Required (``ok``) ops live in a doubly linked list of call and return
    entries. Optional (unknown-outcome) ops have no return entry; they are
    tried only at a dead end (a return entry reached), among those invoked
    before it, one per distinct effect (ops with the same effect are
    interchangeable once invoked). The cache maps (required bitmask, state)
    to the optional bitmasks seen with it; a configuration is skipped when a
    seen one used a subset of its optional ops: an optional op left pending
    only adds options. ``initial`` may be :data:`_ANY` (window searches).

    A generator: yields the step count every 1024 steps or so, so callers can
    interleave searches and stop them; returns the outcome (``"unknown"``
    after ``max_steps`` steps). ``stuck_at``, if given, is kept holding the
    invocation of the op at the deepest dead end so far.
    """
    required_ops = [i for i, op in enumerate(ops) if op.required]
    optional_ops = sorted(
        (i for i, op in enumerate(ops) if not op.required), key=lambda i: ops[i].invoke.index
    )
    events: list[tuple[int, int, int]] = []  # (history index, is_return, position in ops)
    for i in required_ops:
        op = ops[i]
        assert op.completion is not None
        events += [(op.invoke.index, 0, i), (op.completion.index, 1, i)]
    events.sort()
    n_nodes = len(events) + 2
    head, tail = 0, n_nodes - 1
    nxt = list(range(1, n_nodes + 1))
    prv = list(range(-1, n_nodes - 1))
    node_op = [-1] * n_nodes  # position in ops
    node_bit = [0] * n_nodes  # required ops: 1 << their rank
    node_at = [0] * n_nodes  # history index of the entry
    node_at[tail] = 1 << 62
    is_call = [False] * n_nodes
    ret_node = [0] * n_nodes  # call node -> its return node
    call_of: dict[int, int] = {}
    rank = {i: r for r, i in enumerate(required_ops)}
    for pos, (at, is_return, i) in enumerate(events, 1):
        node_op[pos], node_at[pos], node_bit[pos] = i, at, 1 << rank[i]
        if is_return:
            ret_node[call_of[i]] = pos
        else:
            is_call[pos] = True
            call_of[i] = pos
    kinds = [op.kind for op in ops]
    args = [op.arg for op in ops]
    news = [op.new for op in ops]
    opt_at = [ops[i].invoke.index for i in optional_ops]
    opt_effect = [(kinds[i], args[i], news[i]) for i in optional_ops]
    n_opt = len(optional_ops)

    cache: dict[tuple[int, Hashable], list[int]] = {}
    cache_size = 0
    # (call node, -1, state before) for a required op; (return node where the
    # optional scan stood, rank among optional ops, state before) for an optional op
    stack: list[tuple[int, int, Hashable]] = []
    req_bits = opt_bits = 0
    state = initial
    remaining = len(required_ops)
    cur = nxt[head]
    opt_from = 0  # where the optional scan resumes after backtracking over one
    steps = 0
    next_check = min(1024, max_steps)
    best: _Stuck | None = None

    def fresh(req: int, new_state: Hashable, opt: int) -> bool:
        nonlocal cache_size
        seen = cache.get((req, new_state))
        if seen is None:
            cache[(req, new_state)] = [opt]
        elif any(o & opt == o for o in seen):
            return False
        else:
            seen.append(opt)
        cache_size += 1
        return True

    while remaining:
        steps += 1
        if steps >= next_check:
            next_check = steps + 1024
            if steps > max_steps:
                return _KeyOutcome(UNKNOWN, steps, cache_size)
            yield steps
        if is_call[cur]:
            i = node_op[cur]
            kind = kinds[i]
            if kind == _READ:
                ok, new_state = state == args[i] or state is _ANY, args[i]
            elif kind == _WRITE:
                ok, new_state = True, args[i]
            elif kind == _CAS:
                ok, new_state = state == args[i] or state is _ANY, news[i]
            else:
                ok, new_state = state != args[i], state
            if ok and fresh(req_bits | node_bit[cur], new_state, opt_bits):
                stack.append((cur, -1, state))
                state = new_state
                req_bits |= node_bit[cur]
                remaining -= 1
                # lift the call entry and its return entry out of the list
                p, n = prv[cur], nxt[cur]
                nxt[p], prv[n] = n, p
                r = ret_node[cur]
                p, n = prv[r], nxt[r]
                nxt[p], prv[n] = n, p
                cur = nxt[head]
                continue
            cur = nxt[cur]
            continue
        # A return entry: no required op before it can go next. Try optional ops.
        bound = node_at[cur]
        j = opt_from
        opt_from = 0
        tried = {opt_effect[k] for k in range(j) if not (opt_bits >> k) & 1}
        while j < n_opt and opt_at[j] < bound:
            if not (opt_bits >> j) & 1 and opt_effect[j] not in tried:
                tried.add(opt_effect[j])
                steps += 1
                i = optional_ops[j]
                if kinds[i] == _WRITE:
                    ok, new_state = True, args[i]
                else:
                    ok, new_state = state == args[i] or state is _ANY, news[i]
                if ok and fresh(req_bits, new_state, opt_bits | (1 << j)):
                    break
            j += 1
        else:
            j = -1
        if j >= 0:
            stack.append((cur, j, state))
            state = new_state
            opt_bits |= 1 << j
            cur = nxt[head]
            continue
        # Dead end: the op of this return entry cannot take effect in time.
        if best is None or len(stack) > best.depth:
            best = _Stuck(
                depth=len(stack),
                tail=[node_op[c] if k < 0 else optional_ops[k] for c, k, _ in stack[-3:]],
                state=state,
                stuck=node_op[cur],
                candidates=_candidates(cur, head, nxt, is_call, node_op)
                + [
                    optional_ops[k]
                    for k in range(n_opt)
                    if opt_at[k] < bound and not (opt_bits >> k) & 1
                ][-4:],
            )
            if stuck_at is not None and best.stuck >= 0:
                stuck_at[:] = [ops[best.stuck].invoke]
        if not stack:
            return _KeyOutcome(False, steps, cache_size, best, ops)
        node, j, state = stack.pop()
        if j >= 0:
            opt_bits &= ~(1 << j)
            opt_from = j + 1
            cur = node
            continue
        req_bits &= ~node_bit[node]
        remaining += 1
        r = ret_node[node]
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[node]] = node
        prv[nxt[node]] = node
        cur = nxt[node]
    return _KeyOutcome(True, steps, cache_size)


def _candidates(
    stop: int, head: int, nxt: list[int], is_call: list[bool], node_op: list[int]
) -> list[int]:
    found: list[int] = []
    node = nxt[head]
    while node != stop:
        if is_call[node]:
            found.append(node_op[node])
        node = nxt[node]
    return found


def _check_key(raw: list[_RegOp], time_up: Callable[[], bool], counts: Counter[str]) -> _KeyOutcome:
    """Decide one register.

    The full search runs alone for a first pass (enough for most valid
    histories), then gives every fourth chunk of 1024 steps to window
    searches until it decides or a window fails: at most 4/3 of the full
    search's work, or 4 times the window's. Windows aimed at the full search's deepest dead end (ending
    just after that op returned, 8 to 512 ops long) come first, then a scan
    of every stretch of 16, 64, 256 and 1024 ops.
    """
    if time_up():
        return _KeyOutcome(UNKNOWN, 0, 0)
    ops = _simplify(raw, counts)
    stuck_at: list[Op] = []
    full = _searching(ops, _initial(ops), stuck_at=stuck_at)
    full_steps = window_steps = 0
    first_pass = _FIRST_PASS_STEPS_PER_OP * len(ops)
    windows = _Windows(raw)
    position = {op.invoke.index: p for p, op in enumerate(raw)}
    scan = (
        (start, min(start + size, len(raw)), _WINDOW_STEPS_PER_OP)
        for size in _WINDOW_SIZES
        if size < len(raw)
        for start in range(0, len(raw) - size // 2, size // 2)
    )
    aimed_at: set[int] = set()
    aimed: list[tuple[int, int, int]] = []

    def next_window() -> tuple[int, int, int] | None:
        if stuck_at and stuck_at[0].index not in aimed_at:
            op = raw[position[stuck_at[0].index]]
            aimed_at.add(op.invoke.index)
            returned = op.completion.index if op.completion is not None else math.inf
            end = position[op.invoke.index] + 1
            while end < len(raw) and raw[end].invoke.index < returned:
                end += 1
            aimed[:0] = [
                (max(0, end - size), end, _AIMED_STEPS_PER_OP)
                for size in _AIMED_SIZES
                if size < len(raw) or size == _AIMED_SIZES[0]
            ]
        if aimed:
            return aimed.pop(0)
        return next(scan, None)

    window: Generator[int, None, _KeyOutcome] | None = None
    bounds = (0, 0)
    window_done = 0  # steps of the current window already counted
    chunks = 0
    while True:
        try:
            full_steps = next(full)
        except StopIteration as done:
            outcome: _KeyOutcome = done.value
            outcome.steps += window_steps
            return outcome
        if time_up():
            return _KeyOutcome(UNKNOWN, full_steps + window_steps, 0)
        chunks += 1
        if full_steps < first_pass or chunks % _WINDOW_SHARE:
            continue
        if window is None:
            picked = next_window()
            if picked is None:
                continue  # every window searched
            start, end, per_op = picked
            bounds = (raw[start].invoke.index, raw[end - 1].invoke.index)
            relaxed = _simplify(windows.ops(start, end), any_start=True)
            window = _searching(relaxed, _ANY, per_op * len(relaxed) + 1_000)
            window_done = 0
            counts["windows_searched"] += 1
        try:
            now = next(window)
            window_steps, window_done = window_steps + now - window_done, now
        except StopIteration as done:
            window = None
            found: _KeyOutcome = done.value
            window_steps += found.steps - window_done
            if found.valid is False:
                found.steps, found.window = full_steps + window_steps, bounds
                return found


def _describe(op: _RegOp) -> str:
    """The op as the client saw it (not as the search relaxed it)."""
    inv, done = op.invoke, op.completion
    outcome = done.type if done is not None else "info"
    if inv.f == "read" and done is not None:
        return f"#{inv.index} read -> {done.value!r}"
    if inv.f == "cas" and done is not None and outcome == "ok":
        swapped = "swapped" if done.extra.get("swapped", True) else "not swapped"
        return f"#{inv.index} cas {inv.value!r} ({swapped})"
    return f"#{inv.index} {inv.f} {inv.value!r} ({outcome})"


def check_linearizable(
    history: History,
    *,
    model: str = "cas-register",
    time_limit: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Is every register (``read``/``write``/``cas`` per key) linearizable?

    Recording convention: ``read`` completes ``ok`` with the value seen (None
    = never written); ``write`` has the value written; ``cas`` has value
    ``[expected, new]`` and completes ``ok`` with ``swapped=True|False`` in
    its extra (missing means True), or ``fail`` if it certainly did nothing.

    Per key: a full search bounded in steps (enough for valid histories);
    if undecided, windows of 16, 64, 256, 1024 ops are searched from an
    unknown initial value (a window that cannot be linearized proves the
    history cannot, and is a small failing window for the report); then the
    full search without a step bound. ``time_limit`` (seconds, measured with
    ``clock``) bounds the whole check: keys not decided in time make the
    result ``"unknown"``, never ``True``.

    On failure ``details["failures"]`` describes, per failing key, the
    deepest partial linearization found (of the whole key, or of the failing
    ``window``): its last ops, the register value there, the op that could not
    take effect before it returned, and the concurrent ops that were tried;
    ``failing`` holds those entries.

    Raises ``ValueError`` for another ``model`` or a malformed ``cas`` value.
    """
    if model != "cas-register":
        raise ValueError(f"unknown model {model!r}; only 'cas-register' is implemented")
    deadline = clock() + time_limit

    def time_up() -> bool:
        return clock() >= deadline

    by_key: dict[str | None, list[tuple[Op, Op | None]]] = defaultdict(list)
    for inv, done in history.pairs():
        if inv.f in _REGISTER_FS:
            by_key[inv.key].append((inv, done))

    counts: Counter[str] = Counter()
    key_rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    failing: list[Op] = []
    verdicts: list[Validity] = []
    for key in sorted(by_key, key=lambda k: (k is not None, k or "")):
        pairs = by_key[key]
        key_counts: Counter[str] = Counter()
        raw = _register_ops(pairs, key_counts)
        outcome = _check_key(raw, time_up, key_counts)
        counts.update(key_counts)
        counts["ops"] += len(pairs)
        counts["search_steps"] += outcome.steps
        key_rows.append(
            {
                "key": key,
                "ops": len(pairs),
                "max_concurrency": _max_concurrency(raw),
                "pruned": key_counts["pruned"],
                "valid": outcome.valid,
                "steps": outcome.steps,
                "cache": outcome.cache,
            }
        )
        verdicts.append(outcome.valid)
        if outcome.valid is False:
            assert outcome.stuck is not None
            summary, ops = _failure_info(key, outcome)
            failures.append(summary)
            if not failing:
                failing = ops
    counts["keys"] = len(by_key)
    counts["keys_invalid"] = sum(1 for v in verdicts if v is False)
    counts["keys_unknown"] = sum(1 for v in verdicts if v == UNKNOWN)
    valid = combine_validity(verdicts)
    if valid is False:
        message = failures[0]["explanation"]
        if len(failures) > 1:
            message += f" ({len(failures)} keys are not linearizable)"
    elif valid == UNKNOWN:
        message = (
            f"time limit of {time_limit} s reached; {counts['keys_unknown']} of "
            f"{counts['keys']} keys undecided"
        )
    else:
        message = f"{counts['ops']} register ops on {counts['keys']} keys are linearizable"
    details: dict[str, Any] = {"model": model, "keys": key_rows, "failures": failures}
    problems = history.validate()
    if problems:
        details["history_problems"] = problems[:_MAX_EXAMPLES]
        counts["history_problems"] = len(problems)
    return CheckResult("linearizable", valid, dict(counts), details, failing, message)


def _max_concurrency(ops: list[_RegOp]) -> int:
    edges: list[tuple[int, int]] = []
    for op in ops:
        edges.append((op.invoke.index, 1))
        if op.required and op.completion is not None:
            edges.append((op.completion.index, -1))
    level = peak = 0
    for _, delta in sorted(edges):
        level += delta
        peak = max(peak, level)
    return peak


def _failure_info(key: str | None, outcome: _KeyOutcome) -> tuple[dict[str, Any], list[Op]]:
    stuck, ops = outcome.stuck, outcome.ops
    assert stuck is not None
    stuck_op = ops[stuck.stuck] if stuck.stuck >= 0 else None
    others = [ops[i] for i in stuck.candidates if i != stuck.stuck]
    tail = [ops[i] for i in stuck.tail]
    state = _shown_state(stuck.state, tail)
    where = ""
    if outcome.window is not None:
        where = f"in the window of ops #{outcome.window[0]}..#{outcome.window[1]}, "
    what = f"{where}after {stuck.depth} ops linearized the register holds {state!r}"
    if stuck_op is not None:
        what += f"; {_describe(stuck_op)} cannot take effect before it returns"
    if others:
        what += ", nor can any concurrent op first: " + ", ".join(_describe(o) for o in others)
    window_ops: list[Op | None] = []
    for op in [*tail, *others, *([stuck_op] if stuck_op else [])]:
        window_ops += [op.invoke, op.completion]
    summary = {
        "key": key,
        "window": list(outcome.window) if outcome.window else None,
        "linearized": stuck.depth,
        "state": state,
        "last_linearized": [o.invoke.index for o in tail],
        "stuck": stuck_op.invoke.index if stuck_op else None,
        "concurrent": [o.invoke.index for o in others],
        "explanation": f"key {key!r} is not linearizable: {what}",
    }
    return summary, _in_order(window_ops)


def _shown_state(state: Hashable, tail: list[_RegOp]) -> Any:
    """The register value for a person: an opaque value is the last one written."""
    if state is _OPAQUE:
        for op in reversed(tail):
            if op.invoke.f == "write":
                return op.invoke.value
            if op.invoke.f == "cas":
                return op.invoke.value[1]
        return repr(state)
    if state is _ANY:
        return repr(state)
    return _thaw(state)


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and value[0] == "$seq":
        return [_thaw(v) for v in value[1:]]
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "$map":
        return {k: _thaw(v) for k, v in value[1]}
    return value


# ====================================================================== messages


@dataclass(slots=True)
class _Sent:
    ident: tuple[Any, Any]
    to: Any
    first_invoke: int
    acked_at: int | None = None  # index of the first ok completion
    status: str = "fail"  # best outcome over attempts: ok > info > fail
    mids: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)


@dataclass(slots=True)
class _Seen:
    """Observations of one message (identity) at one recipient."""

    deliveries: dict[str, int] = field(default_factory=dict)  # mid -> deliver events
    mids: list[str] = field(default_factory=list)  # distinct mids, first-seen order
    ops: list[Op] = field(default_factory=list)


_STATUS_RANK: Final = {"fail": 0, "info": 1, "ok": 2}
#: A position after every observation.
_NEVER: Final = (1 << 62, 0)


def _field(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, dict) else None


def check_messages(
    history: History,
    *,
    mode: Literal["cp", "hardened_ap"] = "cp",
    dedup_by_mid: bool = True,
    allow_late_after_crash: Collection[str] = (),
    allow_late_across_connections: Collection[str] = (),
    require_final_drain: bool = True,
    compare_push_order: bool = True,
) -> CheckResult:
    """Lost, duplicated, unexpected and reordered messages.

    Recording convention:

    * ``send``: invoke value ``{"id", "from", "to", "body"}`` (``id`` is the
      client id; retries reuse it); ``ok`` with ``mid=...`` in its extra.
    * ``deliver``: an ``ok`` entry (see :meth:`History.observe`) with value
      ``{"to", "mid", "from", "id"?, "body"?, "stream"?}``; ``to`` defaults to
      the key. ``stream`` (in the value or the extra) names one subscription:
      bump it when the subscriber reconnects, since the refetch after a
      reconnect may interleave with new pushes.
    * ``drain``: ``ok`` with value = list of ``{"mid", "from", "id"?,
      "body"?}`` in inbox order; the recipient is the key (or ``"to"``). The
      last ``ok`` drain of a recipient is its final state.

    A delivery is matched to its send by ``(from, id)``, else by an
    acknowledged ``mid``, else by a body unique among that sender's sends to
    that recipient. Violations: ``lost`` (acknowledged, never seen at a
    drained recipient), ``duplicated`` (one message seen under two mids; with
    ``dedup_by_mid=False`` also the same mid pushed twice), ``unexpected``
    (seen, never sent), ``failed_but_delivered``, ``misdelivered``,
    ``reordered`` (A acknowledged before B was invoked, same sender and
    recipient, yet B before A in one stream: one drain, or the deliveries of
    one recipient, process and ``stream``; the late message A is counted once;
    order is not compared across streams; with ``compare_push_order=False``
    only drains, i.e. inbox order, count), and in ``cp``
    mode ``multi_mid_acks`` (one client id acknowledged with two mids; in
    ``hardened_ap`` that is documented and only counted). In ``hardened_ap``
    a late message with a mid in ``allow_late_after_crash`` (its accepting
    core crashed before draining it) is counted as ``late``, not a violation;
    so is one with a mid in ``allow_late_across_connections`` (its accepting
    core may have been cut off or paused before draining it) when the message
    that overtook it was sent by a *different* process (connection): a sender
    that stays on one connection must keep its order.
    Recovered (``info`` sends seen delivered) are counted, fine.

    Messages to a recipient with no ``ok`` drain cannot be called lost; with
    ``require_final_drain`` they are ``unverified`` and make the result
    ``"unknown"`` if nothing else is wrong.

    Raises ``ValueError`` if ``allow_late_after_crash`` is given in ``cp`` mode.
    """
    if mode not in ("cp", "hardened_ap"):
        raise ValueError(f"mode must be 'cp' or 'hardened_ap', not {mode!r}")
    if (allow_late_after_crash or allow_late_across_connections) and mode == "cp":
        raise ValueError("late delivery after a crash is only allowed in hardened_ap mode")
    late_ok = frozenset(allow_late_after_crash)
    late_elsewhere = frozenset(allow_late_across_connections)
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    failing: list[Op | None] = []

    def report(kind: str, example: dict[str, Any], ops: Iterable[Op | None], n: int = 1) -> None:
        counts[kind] += n
        if len(examples[kind]) < _MAX_EXAMPLES:
            examples[kind].append(example)
        if len(failing) < _MAX_FAILING:
            failing.extend(ops)

    # --- sends
    sends: dict[tuple[Any, Any], _Sent] = {}
    mid_owner: dict[str, tuple[Any, Any]] = {}
    by_body: dict[tuple[Any, Any, Hashable], set[tuple[Any, Any]]] = defaultdict(set)
    pairs = history.pairs()
    for inv, done in pairs:
        if inv.f != "send":
            continue
        value = inv.value if isinstance(inv.value, dict) else {}
        sender, cid, to = value.get("from"), value.get("id"), value.get("to", inv.key)
        if sender is None or cid is None:
            counts["malformed_sends"] += 1
            continue
        ident = (sender, cid)
        sent = sends.get(ident)
        if sent is None:
            sent = sends[ident] = _Sent(ident, to, inv.index)
            body = value.get("body")
            if body is not None:
                by_body[(sender, to, _freeze(body))].add(ident)
        outcome = done.type if done is not None else "info"
        sent.ops += [inv, done] if done is not None else [inv]
        if _STATUS_RANK[outcome] > _STATUS_RANK[sent.status]:
            sent.status = outcome
        if outcome == "ok":
            assert done is not None
            if sent.acked_at is None:
                sent.acked_at = done.index
            mid = done.extra.get("mid", _field(done.value, "mid"))
            if mid is not None and mid not in sent.mids:
                sent.mids.append(mid)
                mid_owner.setdefault(mid, ident)
    counts["sends"] = len(sends)
    for sent in sends.values():
        counts[f"sent_{sent.status}"] += 1

    # --- observations
    seen: dict[Any, dict[tuple[Any, Any], _Seen]] = defaultdict(dict)  # recipient -> ident
    drained: set[Any] = set()
    unexpected_seen: set[tuple[Any, Any, Any]] = set()

    def observe(item: Any, to: Any, op: Op, offset: int, stream: tuple[Any, ...]) -> None:
        """One message seen at ``to``: matched by (from, id), acked mid, or body."""
        item = item if isinstance(item, dict) else {}
        n_observations[0] += 1
        sender, cid, mid = item.get("from"), item.get("id"), item.get("mid")
        ident: tuple[Any, Any] | None = None
        if sender is not None and cid is not None:
            ident = (sender, cid)
        elif mid is not None and mid in mid_owner:
            ident = mid_owner[mid]
        elif item.get("body") is not None:
            matches = by_body.get((sender, to, _freeze(item["body"])), set())
            if len(matches) == 1:
                ident = next(iter(matches))
        if ident is None or ident not in sends:
            key = (to, mid, ident)
            if key not in unexpected_seen:
                unexpected_seen.add(key)
                report("unexpected", {"to": to, "mid": mid, "item": item}, [op])
            return
        table = seen[to]
        obs = table.get(ident)
        if obs is None:
            obs = table[ident] = _Seen()
        if mid is not None:
            if mid not in obs.mids:
                obs.mids.append(mid)
            if stream[0] == "push":
                obs.deliveries[mid] = obs.deliveries.get(mid, 0) + 1
        if stream[0] == "drain" or compare_push_order:
            in_stream = streams[(stream, ident[0], to)]
            if ident not in in_stream:
                in_stream[ident] = (op.index, offset)
        if len(obs.ops) < 4:
            obs.ops.append(op)

    n_observations = [0]
    # (stream, sender, recipient) -> first position of each message in that stream
    streams: dict[tuple[Hashable, Any, Any], dict[tuple[Any, Any], tuple[int, int]]]
    streams = defaultdict(dict)
    for _, done in pairs:
        if done is None or done.type != "ok":
            continue
        if done.f == "deliver":
            value = done.value if isinstance(done.value, dict) else {}
            to = value.get("to", done.key)
            stream = ("push", to, done.process, value.get("stream", done.extra.get("stream")))
            observe(value, to, done, 0, stream)
        elif done.f == "drain":
            items = done.value if isinstance(done.value, list) else []
            for offset, item in enumerate(items):
                to = item.get("to", done.key) if isinstance(item, dict) else done.key
                observe(item, to, done, offset, ("drain", done.index))
            drained.add(done.key)
    counts["observations"] = n_observations[0]

    # --- classify every message
    seen_at: dict[tuple[Any, Any], list[Any]] = defaultdict(list)
    for to, table in seen.items():
        for ident in table:
            seen_at[ident].append(to)
    for ident, sent in sends.items():
        mids_text = {"from": ident[0], "id": ident[1], "to": sent.to, "mids": sent.mids}
        if len(sent.mids) > 1:
            if mode == "cp":
                report("multi_mid_acks", mids_text, sent.ops)
            else:
                counts["multi_mid_acks"] += 1
        for to in seen_at.get(ident, ()):
            if to == sent.to:
                continue
            report("misdelivered", {**mids_text, "seen_at": to}, [*sent.ops, *seen[to][ident].ops])
        obs = seen[sent.to].get(ident)
        if obs is None:
            if sent.status != "ok":
                continue
            if require_final_drain and sent.to not in drained:
                counts["unverified"] += 1
            else:
                report("lost", mids_text, sent.ops)
            continue
        counts["delivered"] += 1
        if sent.status == "info":
            counts["recovered"] += 1
        elif sent.status == "fail":
            report("failed_but_delivered", mids_text, [*sent.ops, *obs.ops])
        extra_mids = len(obs.mids) - 1
        if extra_mids > 0:
            example = {**mids_text, "seen_mids": obs.mids}
            report("duplicated", example, [*sent.ops, *obs.ops], extra_mids)
        repeats = sum(n - 1 for n in obs.deliveries.values() if n > 1)
        if repeats:
            if dedup_by_mid:
                counts["redelivered"] += repeats
            else:
                example = {**mids_text, "pushed": dict(obs.deliveries)}
                report("duplicated", example, obs.ops, repeats)

    # --- order per stream and sender -> recipient: A acked before B invoked, B seen first
    flagged: set[tuple[Any, Any]] = set()
    for (_, sender, to), firsts in streams.items():
        items = [(sends[i], pos) for i, pos in firsts.items() if sends[i].to == to]
        by_invoke = sorted(items, key=lambda item: item[0].first_invoke)
        invokes = [s.first_invoke for s, _ in by_invoke]
        suffix_min: list[tuple[tuple[int, int], int]] = [(_NEVER, -1)] * (len(by_invoke) + 1)
        for j in range(len(by_invoke) - 1, -1, -1):
            suffix_min[j] = min(suffix_min[j + 1], (by_invoke[j][1], j))
        for a, a_pos in items:
            if a.acked_at is None:
                continue
            j = bisect.bisect_right(invokes, a.acked_at)
            b_pos, b_at = suffix_min[j]
            if b_at < 0 or not b_pos < a_pos or a.ident in flagged:
                continue
            flagged.add(a.ident)
            b = by_invoke[b_at][0]
            example = {
                "from": sender,
                "to": to,
                "late": {"id": a.ident[1], "mids": a.mids},
                "overtaken_by": {"id": b.ident[1], "mids": b.mids},
            }
            other_connection = bool(a.ops and b.ops) and a.ops[0].process != b.ops[0].process
            if mode == "hardened_ap" and (
                late_ok.intersection(a.mids)
                or (other_connection and late_elsewhere.intersection(a.mids))
            ):
                counts["late"] += 1
                if len(examples["late"]) < _MAX_EXAMPLES:
                    examples["late"].append(example)
            else:
                report("reordered", example, [*a.ops, *b.ops])

    violations = [
        "lost",
        "duplicated",
        "unexpected",
        "failed_but_delivered",
        "misdelivered",
        "reordered",
    ] + (["multi_mid_acks"] if mode == "cp" else [])
    found = {k: counts[k] for k in violations if counts[k]}
    valid: Validity
    if found:
        valid = False
        message = "message anomalies: " + ", ".join(f"{k} {n}" for k, n in found.items())
    elif counts["unverified"]:
        valid = UNKNOWN
        message = (
            f"{counts['unverified']} acknowledged messages went to recipients "
            "that were never drained"
        )
    else:
        valid = True
        message = (
            f"{counts['sent_ok']} acknowledged messages all delivered once, in order "
            f"({counts['recovered']} unknown-outcome sends recovered, {counts['late']} late)"
        )
    informational = ["late", "recovered", "unverified", "delivered", "redelivered"]
    for k in [*violations, *informational, "multi_mid_acks"]:
        counts.setdefault(k, 0)
    details: dict[str, Any] = {
        "mode": mode,
        "examples": dict(examples),
        "undrained_recipients": sorted({str(s.to) for s in sends.values() if s.to not in drained})[
            :_MAX_EXAMPLES
        ],
    }
    return CheckResult("messages", valid, dict(counts), details, _in_order(failing), message)


# ====================================================================== revocations


def _millis(value: Any, seconds_name: str, ms_name: str) -> float | None:
    ms = _field(value, ms_name)
    if isinstance(ms, int | float):
        return float(ms)
    sec = _field(value, seconds_name)
    if isinstance(sec, int | float):
        return float(sec) * 1000.0
    return None


def check_revocations(history: History) -> CheckResult:
    """No token is accepted after its revocation was acknowledged.

    Recording convention: ``revoke`` with value ``{"jti": ...}`` (one token)
    or ``{"user": ..., "before": s}`` / ``{"user", "before_ms"}`` (every token
    of the user issued before the cut-off); ``auth`` with value ``{"jti",
    "user", "iat": s}`` (or ``"iat_ms"``), ``ok`` if the token was accepted.
    A token without ``iat`` counts as issued before any cut-off.

    A violation is an ``ok`` auth invoked after an ``ok`` revocation of its
    token completed. Auths concurrent with the revocation are fine (counted
    as ``concurrent``); revocations with unknown outcome are not used.
    """
    pairs = history.pairs()
    counts: Counter[str] = Counter()
    by_jti: dict[Any, list[tuple[int, Op, Op]]] = defaultdict(list)
    by_user: dict[Any, list[tuple[int, float, Op, Op]]] = defaultdict(list)
    for inv, done in pairs:
        if inv.f != "revoke":
            continue
        outcome = done.type if done is not None else "info"
        counts[f"revoke_{outcome}"] += 1
        if outcome != "ok":
            continue
        assert done is not None
        jti, user = _field(inv.value, "jti"), _field(inv.value, "user")
        if jti is not None:
            by_jti[jti].append((done.index, inv, done))
        elif user is not None:
            before = _millis(inv.value, "before", "before_ms")
            by_user[user].append((done.index, math.inf if before is None else before, inv, done))
        else:
            counts["malformed_revokes"] += 1
    for rows in by_jti.values():
        rows.sort(key=lambda r: r[0])
    user_index: dict[Any, tuple[list[int], list[tuple[float, int]]]] = {}
    for user, user_rows in by_user.items():
        user_rows.sort(key=lambda r: r[0])
        prefix: list[tuple[float, int]] = []
        best: tuple[float, int] = (-math.inf, -1)
        for pos, row in enumerate(user_rows):
            best = max(best, (row[1], pos))
            prefix.append(best)
        user_index[user] = ([r[0] for r in user_rows], prefix)

    violations: list[dict[str, Any]] = []
    failing: list[Op | None] = []
    for inv, done in pairs:
        if inv.f != "auth":
            continue
        outcome = done.type if done is not None else "info"
        counts[f"auth_{outcome}"] += 1
        if outcome != "ok":
            continue
        assert done is not None
        jti, user = _field(inv.value, "jti"), _field(inv.value, "user")
        iat = _millis(inv.value, "iat", "iat_ms")
        culprit: tuple[Op, Op] | None = None
        concurrent = False
        for done_at, r_inv, r_done in by_jti.get(jti, []) if jti is not None else []:
            if done_at < inv.index:
                culprit = (r_inv, r_done)
                break
            concurrent |= done.index > r_inv.index
        if culprit is None and user in user_index:
            done_list, prefix = user_index[user]
            j = bisect.bisect_left(done_list, inv.index)
            if j:
                before, pos = prefix[j - 1]
                if iat is None or iat < before:
                    _, _, r_inv, r_done = by_user[user][pos]
                    culprit = (r_inv, r_done)
            for _, before, r_inv, _r_done in by_user[user][j:]:
                if (iat is None or iat < before) and done.index > r_inv.index:
                    concurrent = True
        if culprit is not None:
            counts["violations"] += 1
            if len(violations) < _MAX_EXAMPLES:
                violations.append(
                    {
                        "auth": inv.index,
                        "token": inv.value,
                        "revoke": culprit[0].index,
                        "revoked_at": culprit[1].index,
                    }
                )
            if len(failing) < _MAX_FAILING:
                failing += [culprit[0], culprit[1], inv, done]
        elif concurrent:
            counts["concurrent"] += 1
    counts.setdefault("violations", 0)
    counts.setdefault("concurrent", 0)
    valid: Validity = counts["violations"] == 0
    if valid:
        message = f"no token accepted after its revocation ({counts['revoke_ok']} revocations)"
    else:
        v = violations[0]
        message = (
            f"{counts['violations']} auths accepted a revoked token; first: auth #{v['auth']} "
            f"started after revocation #{v['revoke']} completed (#{v['revoked_at']})"
        )
    details = {"violations": violations}
    return CheckResult("revocations", valid, dict(counts), details, _in_order(failing), message)


# ====================================================================== replicas


def check_convergence(replica_states: Mapping[Any, Any]) -> CheckResult:
    """Do all replicas hold the same state?

    ``replica_states`` maps a node to its state fingerprint (any JSON-like
    value; a dict of named parts shows which parts differ), or None if the
    node could not be asked. Nodes outside the largest group of equal
    fingerprints are reported as differing. Unreachable nodes make an
    otherwise equal result ``"unknown"``.
    """
    groups: dict[Hashable, list[Any]] = defaultdict(list)
    unreachable: list[Any] = []
    for node, fingerprint in replica_states.items():
        if fingerprint is None:
            unreachable.append(node)
        else:
            groups[_freeze(fingerprint)].append(node)
    ordered = sorted(groups.values(), key=lambda nodes: -len(nodes))
    majority = ordered[0] if ordered else []
    differing = [node for nodes in ordered[1:] for node in nodes]
    fields: dict[str, dict[str, Any]] = {}
    states = {n: s for n, s in replica_states.items() if s is not None}
    if differing and all(isinstance(s, dict) for s in states.values()):
        names = sorted({str(k) for s in states.values() for k in s})
        for name in names:
            values = {str(n): s.get(name) for n, s in states.items()}
            if len({repr(_freeze(v)) for v in values.values()}) > 1:
                fields[name] = values
    counts = {
        "nodes": len(replica_states),
        "groups": len(groups),
        "differing": len(differing),
        "unreachable": len(unreachable),
        "differing_fields": len(fields),
    }
    details = {
        "groups": [{"nodes": nodes, "fingerprint": replica_states[nodes[0]]} for nodes in ordered],
        "majority": majority,
        "differing": differing,
        "unreachable": unreachable,
        "fields": fields,
    }
    valid: Validity
    if differing:
        valid = False
        message = f"replicas diverged: {differing} differ from {majority}"
        if fields:
            message += f" in {sorted(fields)}"
    elif unreachable or not groups:
        valid = UNKNOWN
        message = f"{len(majority)} replicas agree; {unreachable} could not be read"
    else:
        valid = True
        message = f"all {len(majority)} replicas hold the same state"
    return CheckResult("convergence", valid, counts, details, [], message)


# ====================================================================== availability


def _tally(ops: Iterable[tuple[Op, Op | None]]) -> dict[str, Any]:
    row: dict[str, Any] = {"ops": 0, "ok": 0, "fail": 0, "info": 0}
    by_f: dict[str, Counter[str]] = defaultdict(Counter)
    for inv, done in ops:
        outcome = done.type if done is not None else "info"
        row["ops"] += 1
        row[outcome] += 1
        by_f[inv.f][outcome] += 1
    row["ok_fraction"] = row["ok"] / row["ops"] if row["ops"] else None
    row["by_f"] = {f: dict(c) for f, c in sorted(by_f.items())}
    return row


def availability(history: History) -> CheckResult:
    """How many operations succeeded during each fault window and outside all.

    An operation belongs to a window if it was invoked at or after the
    window's start and before its end (None: never healed). Informational:
    ``valid`` is always True; the table is ``details["windows"]`` and
    ``details["outside"]``.
    """
    pairs = [(inv, done) for inv, done in history.pairs() if inv.f != "nemesis"]
    windows = history.fault_windows()
    rows: list[dict[str, Any]] = []
    inside: set[int] = set()
    for start, end, name in windows:
        until = math.inf if end is None else end
        members = [(i, d) for i, d in pairs if start <= i.time < until]
        inside.update(i.index for i, _ in members)
        row = {"name": name, "start": start, "end": end, **_tally(members)}
        rows.append(row)
    outside = _tally((i, d) for i, d in pairs if i.index not in inside)
    total = _tally(pairs)
    counts = {
        "ops": total["ops"],
        "ok": total["ok"],
        "fail": total["fail"],
        "info": total["info"],
        "windows": len(windows),
        "ops_in_faults": len(inside),
    }
    parts = [f"{r['name']}: {r['ok']}/{r['ops']} ok" for r in rows] + [
        f"outside faults: {outside['ok']}/{outside['ops']} ok"
    ]
    details = {"windows": rows, "outside": outside, "total": total}
    return CheckResult("availability", True, counts, details, [], "; ".join(parts))
