"""A client that does not read (``protocol-v1.md``: close 4008; at-least-once delivery).

The edges run with ``max_queue_per_connection = 20`` and no practical send
rate limit. The slow client is a real trio-websocket client that stops
reading after ``welcome``: its library buffers one message, then TCP
back-pressure fills the socket buffers and the edge's outgoing queue.
Bodies of 30 KB make that happen after a few dozen messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
from edge_helpers import Client, Closed, ClusterThread, login, running_cluster, unique

from iris_raft import open_client

pytestmark = pytest.mark.cluster

QUEUE = 20
COUNT = 200
BODY_BYTES = 30_000

SLOW_CONSUMER_BUG = (
    "iris_edge/_server.py: Connection.close() cancels conn.scope, which cancels _writer in "
    "the middle of ws.send_message() (trio's send_all leaves part of the frame written); "
    "_close() then writes the 4008 close frame after that truncated frame, so the client "
    "reads the close frame as payload of the cut message, never sees 4008, and the edge "
    "waits in ws.aclose() forever (no timeout) with the TCP connection open"
)


STORED_INBOX_BUG = (
    "iris_edge/_server.py: _sync() hands every stored message to _deliver()/_enqueue() in "
    "one synchronous loop (no checkpoint, so the writer cannot drain meanwhile); with more "
    "stored messages than max_queue_per_connection, send_nowait() raises WouldBlock and "
    "the connection is closed 4008 as a 'slow consumer' right after welcome, on every "
    "login: such a user can never receive its inbox (defaults: queue 1,000, inbox 10,000)"
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
        async with (
            login(cluster.url(0), cluster.token(bob)) as slow,
            login(cluster.url(1), cluster.token(alice)) as sender,
        ):
            assert slow.welcome is not None  # ... and it reads nothing more
            sent = await flood(sender, bob, COUNT)
            assert await stored_mids(cluster, bob) == [s["mid"] for s in sent]


@pytest.mark.xfail(strict=True, reason=STORED_INBOX_BUG)
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


@pytest.mark.xfail(strict=True, reason=SLOW_CONSUMER_BUG)
async def test_a_client_that_does_not_read_is_closed_with_4008(cluster: ClusterThread) -> None:
    alice, bob = unique("alice"), unique("bob")
    with trio.fail_after(60):
        async with (
            login(cluster.url(0), cluster.token(bob)) as slow,
            login(cluster.url(1), cluster.token(alice)) as sender,
        ):
            sent = await flood(sender, bob, COUNT)
            # Now read what reached the socket: some messages, then the close.
            received: list[dict[str, Any]] = []
            code: int | None = None
            with trio.move_on_after(10):
                try:
                    while True:
                        received.append(await slow.recv())
                except Closed as closed:
                    code = closed.code
            assert code == 4008, (
                f"no close 4008 within 10 s after {len(received)} of {len(sent)} messages "
                f"(close {code}, connection state {slow.ws.closed})"
            )
            assert len(received) < COUNT
            mids = [s["mid"] for s in sent]
            assert [m["mid"] for m in received] == mids[: len(received)]
        # Everything is still stored: the next connection gets all of it, in order.
        async with login(cluster.url(1), cluster.token(bob)) as again:
            got = await again.messages(COUNT)
        assert [m["mid"] for m in got] == mids
