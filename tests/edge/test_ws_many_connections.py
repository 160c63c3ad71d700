"""Smoke: 1,000 concurrent authenticated connections through one edge.

Every connection authenticates, waits until all are in, then sends one
message to the next user (in a ring) and receives one from the previous.
No timing assertions: everything must be delivered, that is all.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from edge_helpers import ClusterThread, login, running_cluster, unique

pytestmark = pytest.mark.cluster

CONNECTIONS = 1000
CONCURRENT_HANDSHAKES = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(tmp_path_factory.mktemp("many"), nodes=3, edges=1, mode="cp") as c:
        yield c


@pytest.fixture
def open_files() -> Iterator[None]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (1,000 sockets and more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < CONNECTIONS + 200:
        pytest.skip(f"the open-files hard limit {hard} is too low for {CONNECTIONS} connections")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("open_files")
async def test_a_thousand_connections_exchange_messages(cluster: ClusterThread) -> None:
    prefix = unique("ring")
    users = [f"{prefix}-{i}" for i in range(CONNECTIONS)]
    tokens = [cluster.token(u) for u in users]
    sent: dict[int, dict[str, Any]] = {}
    received: dict[int, dict[str, Any]] = {}
    handshakes = trio.Semaphore(CONCURRENT_HANDSHAKES)
    all_in = trio.Event()
    done = trio.Event()
    welcomed = 0

    async def one(i: int) -> None:
        nonlocal welcomed
        await handshakes.acquire()
        released = False
        try:
            async with login(cluster.url(0), tokens[i], connect_timeout=60) as client:
                handshakes.release()
                released = True
                assert client.welcome is not None and client.welcome["user"] == users[i]
                welcomed += 1
                if welcomed == CONNECTIONS:
                    all_in.set()
                await all_in.wait()
                to = users[(i + 1) % CONNECTIONS]
                sent[i] = await client.send_message(to, {"from": i})
                (received[i],) = await client.messages(1)
                if len(received) == CONNECTIONS:
                    done.set()
                await done.wait()  # every connection stays open until all are served
        finally:
            if not released:
                handshakes.release()

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for i in range(CONNECTIONS):
                nursery.start_soon(one, i)
    assert len(sent) == len(received) == CONNECTIONS
    for i in range(CONNECTIONS):
        previous = (i - 1) % CONNECTIONS
        msg = received[i]
        assert msg["from"] == users[previous] and msg["body"] == {"from": previous}
        assert msg["mid"] == sent[previous]["mid"]
