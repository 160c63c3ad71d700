"""The client's send coalescing over real sockets, against a scripted core.

The server here speaks the core's RPC (``send``, ``send_batch`` with per-item
answers, ``status``, ``undrained_senders``) but decides each answer itself, so
the client's reaction to per-item errors, to an old core without
``send_batch`` and to ``coalesce_sends=False`` is checked without starting
core processes (``tests/cluster/test_send_batch.py`` does that).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

import iris_raft
from iris_raft._exceptions import BadRequest, InboxFull, IrisError, WriteBlocked
from iris_raft._rpc import RpcServerConnection, serve_rpc

SECRET = b"0123456789abcdef0123456789abcdef"


class ScriptedCore:
    """Stores nothing; answers each send with a mid, or the error scripted for it."""

    def __init__(self, *, has_batch: bool = True, mode: str = "hardened_ap") -> None:
        self.has_batch = has_batch
        self.mode = mode
        self.methods: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.sent: Counter[str] = Counter()  # client id -> times answered with success
        #: client id -> errors to answer, one per attempt, before succeeding.
        self.fail: dict[str, list[IrisError]] = {}

    async def __call__(self, conn: RpcServerConnection, method: str, p: dict[str, Any]) -> Any:
        self.methods[method] += 1
        if method == "status":
            return {"mode": self.mode, "nodes": [], "leader_rpc": None}
        if method == "undrained_senders":
            await trio.sleep(0.05)  # slow enough that refused sends ask at the same time
            return {"fenced-sender": "send:x"}
        if method == "send":
            return self._send([p["sender"], p["client_id"], p["to"], p["body"]])
        if method == "send_batch" and self.has_batch:
            self.batch_sizes.append(len(p["items"]))
            out: list[Any] = []
            for item in p["items"]:
                try:
                    out.append(self._send(item))
                except IrisError as exc:
                    out.append({"e": exc.to_wire()})
            return {"r": out}
        raise BadRequest(f"unknown method {method!r}")

    def _send(self, item: list[Any]) -> dict[str, Any]:
        sender, client_id, _to, _body = item
        errors = self.fail.get(client_id)
        if errors:
            raise errors.pop(0)
        self.sent[client_id] += 1
        return {"mid": f"mid-{sender}-{client_id}", "ts": 7, "duplicate": False}


@asynccontextmanager
async def client_of(core: ScriptedCore, **kwargs: Any) -> AsyncIterator[iris_raft.Client]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(serve_rpc, core, "127.0.0.1", 0, secret=SECRET))
        address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        async with iris_raft.open_client([address], secret=SECRET, **kwargs) as client:
            yield client
        nursery.cancel_scope.cancel()


async def send_many(client: iris_raft.Client, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def one(cid: str) -> None:
        try:
            out[cid] = await client.send("alice", cid, "bob", cid.encode())
        except IrisError as exc:
            out[cid] = exc

    async with trio.open_nursery() as nursery:
        for cid in ids:
            nursery.start_soon(one, cid)
    return out


async def test_concurrent_sends_share_calls_and_get_their_own_answers() -> None:
    core = ScriptedCore()
    with trio.fail_after(10):
        async with client_of(core) as client:
            await client.status()  # connected: the sends below start in one pass
            ids = [f"c{i}" for i in range(300)]
            out = await send_many(client, ids)
            assert {c: r.mid for c, r in out.items()} == {c: f"mid-alice-{c}" for c in ids}
            assert client.send_batches.items == 300
            assert client.send_batches.calls == len(core.batch_sizes) <= 4
    assert core.methods["send"] == 0
    assert core.sent == Counter(ids)


async def test_an_items_error_goes_through_that_sends_own_retry_loop() -> None:
    core = ScriptedCore(mode="hardened_ap")
    core.fail["blocked-1"] = [WriteBlocked("PARTITION DETECTED - writes are blocked")]
    core.fail["blocked-2"] = [WriteBlocked("PARTITION DETECTED - writes are blocked")]
    core.fail["full"] = [InboxFull("inbox of 'bob' is full")]
    with trio.fail_after(10):
        async with client_of(core, timeout=5.0) as client:
            await client.status()
            ids = [f"ok{i}" for i in range(20)] + ["blocked-1", "blocked-2", "full"]
            out = await send_many(client, ids)
    # InboxFull is final for its caller; the write_blocked sends were retried
    # (after a reconnect) and succeeded; the others were never disturbed.
    assert isinstance(out.pop("full"), InboxFull)
    assert {c: r.mid for c, r in out.items()} == {c: f"mid-alice-{c}" for c in out}
    assert core.sent == Counter(c for c in ids if c != "full")
    # Both refusals came in one answer: the blocked core was asked once whose
    # sends it holds, not once per refused send.
    assert core.methods["undrained_senders"] == 1
    assert client._fence["fenced-sender"][1] == "send:x"


async def test_an_old_core_without_send_batch_gets_single_sends() -> None:
    core = ScriptedCore(has_batch=False)
    with trio.fail_after(10):
        async with client_of(core) as client:
            await client.status()
            ids = [f"c{i}" for i in range(30)]
            out = await send_many(client, ids)
            assert {c: r.mid for c, r in out.items()} == {c: f"mid-alice-{c}" for c in ids}
            again = await send_many(client, ["later"])
            assert again["later"].mid == "mid-alice-later"
    assert core.methods["send_batch"] <= 4  # one refused attempt per flusher at most
    assert core.methods["send"] == 31
    assert core.sent == Counter([*ids, "later"])


async def test_coalescing_can_be_switched_off() -> None:
    core = ScriptedCore()
    with trio.fail_after(10):
        async with client_of(core, coalesce_sends=False) as client:
            out = await send_many(client, ["a", "b", "c"])
            assert client.send_batches.calls == 0
    assert {c: r.mid for c, r in out.items()} == {c: f"mid-alice-{c}" for c in "abc"}
    assert core.methods["send_batch"] == 0 and core.methods["send"] == 3
