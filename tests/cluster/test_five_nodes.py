"""A 5-core cp cluster survives kill -9 of a minority (the leader and one more).

Writes go on through the client, every surviving core answers linearizable
reads with the latest committed value, and with a third core gone (no
majority left) writes stop being acknowledged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import converged_inboxes, core_call, open_cluster

import iris_raft
from iris_raft import Unavailable, UnknownOutcome

pytestmark = pytest.mark.cluster

INBOX = "five-inbox"


async def test_five_cores_survive_losing_two(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=5, mode="cp") as cluster:
            leader = await cluster.wait_leader()
            async with iris_raft.open_client(
                cluster.rpc_addresses, secret=cluster.secret, timeout=10
            ) as client:
                acked = {}
                for n in range(20):
                    acked[f"a-{n}"] = (
                        await client.send("five", f"a-{n}", INBOX, f"a-{n}".encode())
                    ).mid
                await client.put("k", 1)

                doomed = [leader, (leader + 1) % 5]
                await cluster.kill(doomed[0])
                await cluster.kill(doomed[1])
                alive = [i for i in range(5) if i not in doomed]

                for n in range(20):
                    acked[f"b-{n}"] = (
                        await client.send("five", f"b-{n}", INBOX, f"b-{n}".encode())
                    ).mid
                await client.put("k", 2)
                assert await client.cas("k", 2, 3) is True
                for i in alive:
                    assert (
                        await core_call(cluster, i, "get", {"key": "k", "linearizable": True}) == 3
                    )
                    assert await core_call(cluster, i, "get", {"key": "k"}) == 3
                inboxes = await converged_inboxes(cluster, [INBOX], indexes=alive)
                stored = {bytes(m.body).decode(): m.mid for m in inboxes[INBOX]}
                assert stored == acked

                # A third loss leaves 2 of 5: nothing may be acknowledged any more.
                await cluster.kill(alive[0])
                with pytest.raises((Unavailable, UnknownOutcome)):
                    await core_call(
                        cluster,
                        alive[1],
                        "put",
                        {"key": "k", "value": 4, "op_id": "put-4"},
                        timeout=3,
                    )
                with pytest.raises((Unavailable, UnknownOutcome)):
                    await core_call(
                        cluster, alive[2], "get", {"key": "k", "linearizable": True}, timeout=3
                    )
