"""Per-sender order across cores in ``hardened_ap`` (the client's order fence).

A core cut off from the others can acknowledge a send from its WAL before its
partition guard notices; that send reaches Raft only after the heal. A later
send from the same sender must not be committed elsewhere before it, whether
it comes through the same client (which remembers what the cut-off core
acknowledged) or through another client, like a second edge (which asks the
blocked core whose sends it still holds). Until the earlier send is applied,
the later one fails with ``write_blocked``; after the heal it goes through
and the inbox holds both in order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import (
    converged_inboxes,
    core_call,
    core_status,
    open_cluster,
    secret_of,
    wait_safe,
)

import iris_raft
from iris_raft import WriteBlocked
from iris_raft._ops import send_op_id

pytestmark = pytest.mark.cluster

SENDER = "fence-sender"
INBOX = "fence-inbox"


async def test_later_send_waits_for_cut_off_cores_earlier_send(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_cluster(
            str(tmp_path), nodes=3, mode="hardened_ap", proxies=True
        ) as cluster:
            assert cluster.links is not None
            leader = await cluster.wait_leader()
            x = (leader + 1) % 3  # a follower: its WAL drains through the leader
            secret = secret_of(cluster)
            x_rpc = cluster.cores[x].rpc
            async with (
                iris_raft.open_client(
                    [x_rpc], secret=secret, timeout=3.0, prefer_leader=False
                ) as first,
                iris_raft.open_client(
                    [x_rpc], secret=secret, timeout=3.0, prefer_leader=False
                ) as second,
            ):
                await first.send(SENDER, "warm-up", INBOX, b"warm-up")
                await second.status()  # connected to x, knows the mode
                assert first.connected_to == x_rpc and second.connected_to == x_rpc

                cluster.links.isolate(cluster.cores[x].node)
                # Within the guard's detection window x still acknowledges from
                # its WAL; the send cannot reach Raft until the heal.
                early = await first.send(SENDER, "early", INBOX, b"early")
                await wait_safe(cluster, x, False, 5)
                assert (await core_status(cluster, x))["wal_backlog"] >= 1
                assert await core_call(cluster, x, "undrained_senders", {}) == {
                    SENDER: send_op_id(SENDER, "early")
                }

                # Same client: x refuses (write_blocked), the client moves on,
                # and the other cores have not applied "early": held back.
                with pytest.raises(WriteBlocked):
                    await first.send(SENDER, "later-1", INBOX, b"later-1")
                # Another client that never sent through x for this sender
                # learns it from x itself when x refuses.
                with pytest.raises(WriteBlocked):
                    await second.send(SENDER, "later-2", INBOX, b"later-2")
                # Other senders are not held back: only x's own refusal can stop
                # them (the client may still be on x, or come back to it).
                with trio.fail_after(15):
                    while True:
                        try:
                            await second.send("someone-else", "free", INBOX, b"free")
                            break
                        except WriteBlocked as exc:
                            assert "PARTITION DETECTED" in str(exc), exc
                            await trio.sleep(0.1)

                cluster.links.heal()
                await wait_safe(cluster, x, True, 10)
                later1 = await first.send(SENDER, "later-1", INBOX, b"later-1")
                later2 = await second.send(SENDER, "later-2", INBOX, b"later-2")

            inbox = (await converged_inboxes(cluster, [INBOX]))[INBOX]
            order = [bytes(m.body).decode() for m in inbox if m.sender == SENDER]
            assert order == ["warm-up", "early", "later-1", "later-2"], order
            mids = {bytes(m.body).decode(): m.mid for m in inbox}
            assert mids["early"] == early.mid
            assert mids["later-1"] == later1.mid and mids["later-2"] == later2.mid
