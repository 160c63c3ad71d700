"""A ``cp`` client that prefers the leader but sits on a follower moves to the leader.

The client is opened on a follower with ``prefer_leader=False`` (so it stays
there), then switched to preferring the leader, as a client is that connected
while the cluster had no reachable leader. Its periodic check
(``LEADER_CHECK_INTERVAL``) must move it to the leader, and writes go on
without an error across the move; calls in flight on the old connection
finish there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import converged_inboxes, open_cluster

import iris_raft
from iris_raft._client import LEADER_CHECK_INTERVAL

pytestmark = pytest.mark.cluster


async def test_a_cp_client_on_a_follower_moves_to_the_leader(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            leader = await cluster.wait_leader()
            follower = (leader + 1) % 3
            async with iris_raft.open_client(
                [cluster.cores[follower].rpc], secret=cluster.secret, prefer_leader=False
            ) as client:
                await client.send("follow", "m-first", "box", b"x")
                assert client.connected_to == cluster.cores[follower].rpc
                client._prefer_leader = True
                sent = 1
                with trio.fail_after(LEADER_CHECK_INTERVAL * 5 + 5):
                    while client.connected_to != cluster.cores[leader].rpc:
                        await client.send("follow", f"m{sent}", "box", b"x")
                        sent += 1
                        await trio.sleep(0.02)
                await client.send("follow", "m-last", "box", b"x")
            inbox = (await converged_inboxes(cluster, ["box"]))["box"]
            assert len(inbox) == sent + 1  # every send stored once, none lost in the move
