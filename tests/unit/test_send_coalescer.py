"""Unit tests for iris_raft._client.SendCoalescer against a fake connection.

No sockets and no core: the fake answers ``send_batch`` and ``send`` the way
the core's RPC server does, can hold calls at a gate, and records every call.
Time is trio's autojump clock, so "no timer" is checked exactly: a lone send
is answered with the clock not having moved.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from iris_raft._client import SendCoalescer
from iris_raft._exceptions import (
    BadRequest,
    InboxFull,
    IrisError,
    Unavailable,
    UnknownOutcome,
    WriteBlocked,
)


class FakeConn:
    """Answers like a core: per-item results, per-item errors for listed recipients."""

    def __init__(self, *, has_batch: bool = True) -> None:
        self.address = "fake:1"
        self.closed = False
        self.has_batch = has_batch
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.gate: trio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.item_errors: dict[str, IrisError] = {}  # recipient -> error for that item
        self.call_error: IrisError | None = None

    async def call(self, method: str, params: dict[str, Any], *, timeout: float) -> Any:
        self.calls.append((method, params))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            with trio.move_on_after(timeout):
                if self.gate is not None:
                    await self.gate.wait()
                await trio.lowlevel.checkpoint()
                return self._answer(method, params)
            raise UnknownOutcome(f"no answer to {method!r} within {timeout}s")
        finally:
            self.in_flight -= 1

    def _answer(self, method: str, params: dict[str, Any]) -> Any:
        if self.call_error is not None:
            raise self.call_error
        if method == "send":
            return self._one([params["sender"], params["client_id"], params["to"], params["body"]])
        if method == "send_batch" and self.has_batch:
            out: list[Any] = []
            for item in params["items"]:
                try:
                    out.append(self._one(item))
                except IrisError as exc:
                    out.append({"e": exc.to_wire()})
            return {"r": out}
        raise BadRequest(f"unknown method {method!r}")

    def _one(self, item: list[Any]) -> dict[str, Any]:
        sender, client_id, to, _body = item
        if to in self.item_errors:
            raise self.item_errors[to]
        return {"mid": f"mid-{sender}-{client_id}", "ts": 1, "duplicate": False}

    def batches(self) -> list[list[str]]:
        """The client ids of each send_batch call, in call order."""
        return [[it[1] for it in p["items"]] for m, p in self.calls if m == "send_batch"]


def params(client_id: str, to: str = "bob", body: bytes = b"x") -> dict[str, Any]:
    return {"sender": "alice", "client_id": client_id, "to": to, "body": body}


async def send_all(
    coalescer: SendCoalescer, ids: list[str], timeout: float = 5.0, **kw: Any
) -> dict[str, Any]:
    """Send ``ids`` from concurrent tasks; each task's result or exception, by id."""
    out: dict[str, Any] = {}

    async def one(cid: str) -> None:
        try:
            out[cid] = await coalescer.send(params(cid, **kw), timeout)
        except IrisError as exc:
            out[cid] = exc

    async with trio.open_nursery() as nursery:
        for cid in ids:
            nursery.start_soon(one, cid)
    return out


async def test_a_lone_send_leaves_at_once(autojump_clock: trio.testing.MockClock) -> None:
    conn = FakeConn()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        start = trio.current_time()
        result = await coalescer.send(params("c1"), 5.0)
        assert trio.current_time() == start  # no timer anywhere
        assert result == {"mid": "mid-alice-c1", "ts": 1, "duplicate": False}
        assert conn.batches() == [["c1"]]


async def test_sends_of_one_scheduler_pass_travel_as_one_call() -> None:
    conn = FakeConn()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        ids = [f"c{i}" for i in range(50)]
        out = await send_all(coalescer, ids)
    assert len(conn.batches()) == 1
    assert sorted(conn.batches()[0]) == sorted(ids)
    assert all(out[c]["mid"] == f"mid-alice-{c}" for c in ids)  # each got its own answer
    assert (coalescer.stats.calls, coalescer.stats.items) == (1, 50)


async def test_batches_are_capped_and_calls_in_flight_limited() -> None:
    conn = FakeConn()
    conn.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery, max_calls=2, max_items=3)  # type: ignore[arg-type]
        ids = [f"c{i}" for i in range(10)]
        out: dict[str, Any] = {}
        async with trio.open_nursery() as senders:
            for cid in ids:
                senders.start_soon(
                    lambda cid: _store(out, cid, coalescer.send(params(cid), 5.0)), cid
                )
            await trio.testing.wait_all_tasks_blocked()
            # Two calls of three are in flight; the other four wait for one to return.
            assert [len(b) for b in conn.batches()] == [3, 3]
            assert conn.in_flight == 2
            conn.gate.set()
        assert sorted(out) == sorted(ids)
        assert conn.max_in_flight == 2
        assert all(len(b) <= 3 for b in conn.batches())
        assert sum(len(b) for b in conn.batches()) == 10


async def _store(out: dict[str, Any], cid: str, awaitable: Any) -> None:
    out[cid] = await awaitable


async def test_a_large_send_goes_alone() -> None:
    conn = FakeConn()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery, max_bytes=1000)  # type: ignore[arg-type]
        async with trio.open_nursery() as senders:
            senders.start_soon(coalescer.send, params("big", body=b"x" * 5000), 5.0)
            for i in range(3):
                senders.start_soon(coalescer.send, params(f"small{i}"), 5.0)
    assert sorted(c for b in conn.batches() for c in b) == ["big", "small0", "small1", "small2"]
    assert ["big"] in conn.batches()  # over max_bytes with anything else: alone


async def test_an_items_error_is_raised_in_its_caller_only() -> None:
    conn = FakeConn()
    conn.item_errors["full"] = InboxFull("inbox of 'full' is full")
    conn.item_errors["blocked"] = WriteBlocked("PARTITION DETECTED", reachable=["a"])
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out: dict[str, Any] = {}

        async def one(cid: str, to: str) -> None:
            try:
                out[cid] = await coalescer.send(params(cid, to=to), 5.0)
            except IrisError as exc:
                out[cid] = exc

        async with trio.open_nursery() as senders:
            senders.start_soon(one, "ok1", "bob")
            senders.start_soon(one, "f", "full")
            senders.start_soon(one, "b", "blocked")
            senders.start_soon(one, "ok2", "bob")
    assert len(conn.batches()) == 1
    assert isinstance(out["f"], InboxFull)
    assert isinstance(out["b"], WriteBlocked) and out["b"].data == {"reachable": ["a"]}
    assert out["ok1"]["mid"] == "mid-alice-ok1" and out["ok2"]["mid"] == "mid-alice-ok2"


async def test_a_call_error_reaches_every_caller_as_its_own_exception() -> None:
    conn = FakeConn()
    conn.call_error = Unavailable("connection to fake:1 is closed")
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out = await send_all(coalescer, ["a", "b", "c"])
    assert all(isinstance(e, Unavailable) for e in out.values())
    assert len({id(e) for e in out.values()}) == 3


async def test_a_caller_that_times_out_mid_batch_gets_unknown_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = FakeConn()
    conn.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out: dict[str, Any] = {}

        async def one(cid: str, timeout: float) -> None:
            try:
                out[cid] = await coalescer.send(params(cid), timeout)
            except IrisError as exc:
                out[cid] = exc

        async def release_later() -> None:
            await trio.sleep(2.0)
            assert conn.gate is not None
            conn.gate.set()

        async with trio.open_nursery() as senders:
            senders.start_soon(one, "short", 1.0)
            senders.start_soon(one, "long", 5.0)
            senders.start_soon(release_later)
    assert conn.batches() == [["short", "long"]] or conn.batches() == [["long", "short"]]
    assert isinstance(out["short"], UnknownOutcome)
    assert out["long"]["mid"] == "mid-alice-long"


async def test_a_cancelled_caller_does_not_disturb_its_batch() -> None:
    conn = FakeConn()
    conn.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        cancel = trio.CancelScope()

        async def cancelled() -> None:
            with cancel:
                await coalescer.send(params("gone"), 5.0)
            out["gone"] = "cancelled" if cancel.cancelled_caught else "answered"

        async with trio.open_nursery() as senders:
            senders.start_soon(cancelled)
            for cid in ("a", "b"):
                senders.start_soon(
                    lambda cid: _store(out, cid, coalescer.send(params(cid), 5)), cid
                )
            await trio.testing.wait_all_tasks_blocked()
            assert len(conn.batches()) == 1 and len(conn.batches()[0]) == 3  # in flight
            cancel.cancel()
            await trio.testing.wait_all_tasks_blocked()
            conn.gate.set()
    assert out["gone"] == "cancelled"
    assert out["a"]["mid"] == "mid-alice-a" and out["b"]["mid"] == "mid-alice-b"


async def test_a_send_cancelled_while_queued_is_never_sent() -> None:
    conn = FakeConn()
    conn.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery, max_calls=1)  # type: ignore[arg-type]
        cancel = trio.CancelScope()

        async def queued() -> None:
            with cancel:
                await coalescer.send(params("queued"), 5.0)

        async with trio.open_nursery() as senders:
            senders.start_soon(coalescer.send, params("first"), 5.0)
            await trio.testing.wait_all_tasks_blocked()
            senders.start_soon(queued)  # the one call slot is busy: it waits in the queue
            senders.start_soon(coalescer.send, params("later"), 5.0)
            await trio.testing.wait_all_tasks_blocked()
            cancel.cancel()
            await trio.testing.wait_all_tasks_blocked()
            conn.gate.set()
    assert conn.batches() == [["first"], ["later"]]


async def test_a_core_without_send_batch_gets_single_sends() -> None:
    conn = FakeConn(has_batch=False)
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out = await send_all(coalescer, ["a", "b", "c"])
        assert not coalescer.batching
        assert {c: r["mid"] for c, r in out.items()} == {c: f"mid-alice-{c}" for c in "abc"}
        assert [m for m, _ in conn.calls] == ["send_batch", "send", "send", "send"]
        # From now on every send on this connection is a single call.
        await coalescer.send(params("d"), 5.0)
        assert [m for m, _ in conn.calls][-1:] == ["send"]
        assert len(conn.batches()) == 1


async def test_other_bad_requests_are_not_taken_for_an_old_core() -> None:
    conn = FakeConn()
    conn.call_error = BadRequest("at most 1000 items per call", field="items")
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out = await send_all(coalescer, ["a", "b"])
    assert coalescer.batching
    assert all(isinstance(e, BadRequest) for e in out.values())


@pytest.mark.parametrize("reply", [None, {"r": "nope"}, {"r": [{"mid": "m", "ts": 1}]}])
async def test_a_malformed_answer_is_an_unknown_outcome(reply: Any) -> None:
    conn = FakeConn()

    async def answer(method: str, params: dict[str, Any], *, timeout: float) -> Any:
        await trio.lowlevel.checkpoint()
        return reply

    conn.call = answer  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        coalescer = SendCoalescer(conn, nursery)  # type: ignore[arg-type]
        out = await send_all(coalescer, ["a", "b"])
    assert all(isinstance(e, UnknownOutcome) for e in out.values())
