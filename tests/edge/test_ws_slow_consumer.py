"""A client that does not read (``protocol-v1.md``: close 4008; at-least-once delivery).

The edges run with ``max_queue_per_connection = 20`` and no practical send
rate limit. The slow client is a WebSocket client written over a bare TCP socket
(``RawWebSocket``) that reads nothing after the handshake, so TCP
back-pressure fills the socket buffers and then the edge's outgoing queue.
Bodies of 30 KB make that happen after a few dozen messages. What the edge
wrote is then read as raw bytes and parsed frame by frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
from edge_helpers import (
    Client,
    ClusterThread,
    RawWebSocket,
    decode,
    login,
    parse_server_frames,
    running_cluster,
    unique,
)

from iris_raft import open_client

pytestmark = pytest.mark.cluster

QUEUE = 20
COUNT = 200
BODY_BYTES = 30_000

SLOW_CONSUMER_BUG = (
    "iris_edge/_server.py: Connection.close() cancels conn.scope, which cancels _writer in "
    "the middle of ws.send_message() (trio's send_all leaves part of the frame written); "
    "_close() then writes the 4008 close frame after that truncated frame, so the client "
    "reads the close frame as payload of the cut message and never sees 4008 (the edge "
    "then waits in ws.aclose() with no timeout, keeping the TCP connection open)"
)


STORED_INBOX_BUG = (
    "iris_edge/_server.py: _sync() hands every stored message to _deliver()/_enqueue() in "
    "one synchronous loop (no checkpoint, so the writer cannot drain meanwhile); with more "
    "than max_queue_per_connection + 1 stored messages, out_send.send_nowait() raises "
    "WouldBlock and the connection is closed 4008 right after welcome with no msg at all "
    "(queued frames are dropped on 4008), on every login: the user can never get its inbox "
    "(also with the defaults: queue 1,000, inbox cap 10,000; seen with 1,100 stored)"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(
        tmp_path_factory.mktemp("slow"),
        nodes=3,
        edges=2,
        mode="cp",
        edge_options={
            "max_queue_per_connection": QUEUE,
            "rate_limit_per_second": 100000,
            "rate_limit_burst": 100000,
        },
    ) as c:
        yield c


async def flood(sender: Client, recipient: str, count: int) -> list[dict[str, Any]]:
    """Send ``count`` large messages, at most 50 unanswered; every one must get ``sent``."""
    sent: list[dict[str, Any]] = []
    window = trio.Semaphore(50)

    async def collect() -> None:
        for i in range(count):
            sent.append(await sender.answer(f"{recipient}-{i}", "sent"))
            window.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        for i in range(count):
            await window.acquire()
            body = [i, b"x" * BODY_BYTES]
            await sender.send(
                {"type": "send", "id": f"{recipient}-{i}", "to": recipient, "body": body}
            )
    return sent


async def stored_mids(cluster: ClusterThread, user: str) -> list[str]:
    """The mids stored for ``user``, asked of the cores directly (``iris_raft`` client)."""
    cores = cluster.cluster.rpc_addresses
    async with open_client(cores, secret=cluster.cluster.secret, timeout=10) as core:
        return [m.mid for m in await core.fetch_inbox(user)]


async def test_messages_of_a_slow_consumer_stay_stored(cluster: ClusterThread) -> None:
    alice, bob = unique("alice"), unique("bob")
    with trio.fail_after(60):
        slow = await RawWebSocket.connect(cluster.url(0), cluster.token(bob))
        try:
            async with login(cluster.url(1), cluster.token(alice)) as sender:
                sent = await flood(sender, bob, COUNT)
            assert await stored_mids(cluster, bob) == [s["mid"] for s in sent]
        finally:
            await slow.aclose()


async def test_login_delivers_a_stored_inbox_larger_than_the_queue(cluster: ClusterThread) -> None:
    alice, bob = unique("alice"), unique("bob")
    count = 3 * QUEUE
    with trio.fail_after(30):
        async with login(cluster.url(1), cluster.token(alice)) as sender:
            sent = [await sender.send_message(bob, i) for i in range(count)]
        # A client that reads everything, at once, as fast as it can.
        async with login(cluster.url(0), cluster.token(bob)) as reader:
            got = await reader.messages(count)
    assert [m["mid"] for m in got] == [s["mid"] for s in sent]


async def test_a_client_that_does_not_read_is_closed_with_4008(cluster: ClusterThread) -> None:
    alice, bob = unique("alice"), unique("bob")
    with trio.fail_after(60):
        slow = await RawWebSocket.connect(cluster.url(0), cluster.token(bob))
        try:
            async with login(cluster.url(1), cluster.token(alice)) as sender:
                sent = await flood(sender, bob, COUNT)
            # Now read what the edge wrote: welcome, some messages, then the close.
            data = await slow.read_all(timeout=5)
        finally:
            await slow.aclose()
    frames, cut = parse_server_frames(data)
    opcodes = [opcode for opcode, _ in frames]
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    close_inside = cut.find(b"\x88")
    assert not cut, (
        f"a frame is cut short: header {cut[:10].hex()}, only {len(cut)} bytes follow, after "
        f"{len(frames)} whole frames; a close frame may hide inside it at {close_inside}: "
        f"{cut[close_inside : close_inside + 40]!r}"
    )
    assert closes and int.from_bytes(closes[0][:2], "big") == 4008, opcodes
    messages = [decode(p) for op, p in frames if op == 0x2]
    assert messages[0]["type"] == "welcome"
    mids = [s["mid"] for s in sent]
    assert [m["mid"] for m in messages[1:]] == mids[: len(messages) - 1]
    # Everything is still stored.
    assert await stored_mids(cluster, bob) == mids
