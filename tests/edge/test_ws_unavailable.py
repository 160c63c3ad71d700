"""The cores are unreachable (``protocol-v1.md``: error ``unavailable``; retry with the same id).

Every core is killed while clients stay connected to the edge, then all are
restarted; so this module has its own cluster (3 cores, 1 edge, ``cp``,
``request_timeout = 2`` s so ``unavailable`` comes quickly).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
from edge_helpers import Client, ClusterThread, login, running_cluster, unique

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(
        tmp_path_factory.mktemp("unavailable"),
        nodes=3,
        edges=1,
        mode="cp",
        cluster_options={"request_timeout": 2.0},
    ) as c:
        yield c


async def send_until_sent(
    client: Client, to: str, body: Any, id_: str, limit: float
) -> dict[str, Any]:
    """Retry ``id_`` (a client's back-off) until ``sent``; only retryable errors in between."""
    delay = 0.1
    with trio.fail_after(limit):
        while True:
            await client.send({"type": "send", "id": id_, "to": to, "body": body})
            answer = await client.answer(id_)
            if answer["type"] == "sent":
                return answer
            assert answer["code"] in ("unavailable", "write_blocked"), answer
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def test_unavailable_while_the_cores_are_down_then_the_retry_is_stored_once(
    cluster: ClusterThread,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    c = cluster.cluster
    with trio.fail_after(90):
        async with (
            login(cluster.url(0), cluster.token(alice)) as sender,
            login(cluster.url(0), cluster.token(bob)) as live,
        ):
            before = await sender.send_message(bob, "before the outage")
            assert (await live.messages(1))[0]["mid"] == before["mid"]
            for i in range(len(c.cores)):
                await cluster.acall(c.kill, i)

            await sender.send({"type": "send", "id": "during", "to": bob, "body": "during"})
            error = await sender.answer("during", "error")
            assert error["code"] == "unavailable" and error["id"] == "during", error
            # The connection stays open.
            assert (await sender.ping("still open"))["data"] == "still open"

            async def restart_all() -> None:
                async with trio.open_nursery() as nursery:
                    for i in range(len(c.cores)):
                        nursery.start_soon(c.start, i)

            await cluster.acall(restart_all)
            sent = await send_until_sent(sender, bob, "during", "during", limit=40)
            again = await sender.send_message(bob, "during", id="during")
            assert again["mid"] == sent["mid"]
            # The connection that stayed open through the outage gets it too; a repeat of
            # an unacked message after a core failover is allowed (clients drop it by mid).
            while (msg := await live.wait_for("msg"))["mid"] != sent["mid"]:
                assert msg["mid"] == before["mid"], msg

        async with login(cluster.url(0), cluster.token(bob)) as receiver:
            got = await receiver.messages(2)
            assert [m["mid"] for m in got] == [before["mid"], sent["mid"]]
            assert [m["body"] for m in got] == ["before the outage", "during"]
            async with login(cluster.url(0), cluster.token(alice)) as sender:
                marker = await sender.send_message(bob, "marker")
            (last,) = await receiver.messages(1)
            assert last["mid"] == marker["mid"], "the retried message is stored once"
