"""Graceful shutdown of an edge (``protocol-v1.md``: close 1001; idempotent send).

Edge 0 is sent SIGTERM while a client streams sends through it; so this
module has its own cluster (3 cores, 2 edges, ``cp``) and one test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from edge_helpers import Client, Closed, ClusterThread, login, running_cluster, unique
from trio_websocket import ConnectionClosed

pytestmark = pytest.mark.cluster

COUNT = 80  # below the default burst of 200 sends


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(tmp_path_factory.mktemp("shutdown"), nodes=3, edges=2, mode="cp") as c:
        yield c


async def test_sigterm_closes_1001_and_unconfirmed_sends_are_retried_elsewhere(
    cluster: ClusterThread,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    ids = [f"{alice}-{i}" for i in range(COUNT)]
    answers: dict[str, dict[str, Any]] = {}
    close_code: list[int | None] = []
    with trio.fail_after(60):
        async with login(cluster.url(1), cluster.token(bob)) as receiver:
            async with (
                login(cluster.url(0), cluster.token(alice)) as sender,
                login(cluster.url(0), cluster.token(unique("idle"))) as idle,
            ):
                first_sent = trio.Event()

                async def read_answers(client: Client) -> None:
                    try:
                        while True:
                            frame = await client.recv()
                            if frame["type"] in ("sent", "error"):
                                answers[frame["id"]] = frame
                                first_sent.set()
                    except Closed as closed:
                        close_code.append(closed.code)

                async def stream_sends() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        for i, id_ in enumerate(ids):
                            await sender.send({"type": "send", "id": id_, "to": bob, "body": i})
                            await trio.sleep(0.005)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_answers, sender)
                    nursery.start_soon(stream_sends)
                    await first_sent.wait()
                    await cluster.acall(cluster.cluster.stop_edge, 0)
                idle_code, _ = await idle.closed()
            assert close_code == [1001], close_code
            assert idle_code == 1001
            edge = cluster.cluster.edges[0]
            assert edge.process is not None and edge.process.returncode == 0, "a clean exit"

            confirmed = {i: a["mid"] for i, a in answers.items() if a["type"] == "sent"}
            refused = {a["code"] for a in answers.values() if a["type"] == "error"}
            assert refused <= {"unavailable"}, answers
            assert confirmed, "some sends were confirmed before the shutdown"

            # The client retries every send without `sent`, same id, on the other edge.
            async with login(cluster.url(1), cluster.token(alice)) as retrier:
                for i, id_ in enumerate(ids):
                    if id_ not in confirmed:
                        sent = await retrier.send_message(bob, i, id=id_)
                        confirmed[id_] = sent["mid"]
                    else:  # a retry of a confirmed one is harmless: same mid
                        again = await retrier.send_message(bob, i, id=id_)
                        assert again["mid"] == confirmed[id_]

                got = await receiver.messages(COUNT)
                assert sorted(m["body"] for m in got) == list(range(COUNT)), "each exactly once"
                assert {m["mid"] for m in got} == set(confirmed.values())
                marker = await retrier.send_message(bob, "marker")
                (last,) = await receiver.messages(1)
                assert last["mid"] == marker["mid"], "nothing is delivered twice"
