"""Failover of the leader (kill -9) on real core processes.

* Under 20 concurrent writers, the leader is killed mid-stream and later
  restarted: acknowledgements must resume after the kill, and once the cluster
  has converged every acknowledged send is stored exactly once under its
  acknowledged mid, on every core, and no retried client id produced two
  messages.
* A send repeated with the same client id on another core after the core that
  acknowledged it was killed returns the same mid and stores one message.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import (
    Workload,
    check_inboxes,
    converged_inboxes,
    core_call,
    core_status,
    open_cluster,
    running_workload,
    wait_identical_state,
    wait_until,
)
from jepsen_like.cluster import LocalCluster
from jepsen_like.proxy import LinkMode

import iris_raft
from iris_raft import Unavailable, UnknownOutcome, WriteBlocked

pytestmark = pytest.mark.cluster

#: An election plus reconnects on this 2-core machine; the Raft timers are 0.15-0.3 s.
RESUME_WITHIN = 5.0


@pytest.mark.parametrize("mode", ["cp", "hardened_ap"])
async def test_leader_kill_under_concurrent_writes(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path), nodes=3, mode=mode) as cluster:
            wl = Workload(tag="fo", writers=20)
            first_kill = None
            async with running_workload(cluster, wl):
                await wl.wait_acks(200, timeout=20)
                for _ in range(2):  # the second round kills the leader the first one elected
                    leader = await cluster.wait_leader(timeout=15)
                    killed_at = trio.current_time()
                    first_kill = first_kill or killed_at
                    await cluster.kill(leader)
                    await wl.wait_acks(1, after=killed_at, timeout=RESUME_WITHIN)
                    await wl.wait_acks(100, after=killed_at, timeout=15)
                    await cluster.start(leader)
                    restarted_at = trio.current_time()
                    await wl.wait_acks(100, after=restarted_at, timeout=15)
            # Every writer finished the send in hand (acknowledged or given up).
            assert not wl.unresolved, (
                f"sends never acknowledged within 30 s: {sorted(wl.unresolved)[:10]}"
            )
            inboxes = await converged_inboxes(cluster, wl.inboxes)
            check_inboxes(
                wl,
                inboxes,
                where=f"{mode}, after converging",
                mid_may_differ_after=first_kill if mode == "hardened_ap" else None,
            )
            assert sum(len(v) for v in inboxes.values()) == len(wl.acks)
            if mode == "cp":
                async with iris_raft.open_client(
                    cluster.rpc_addresses, secret=cluster.secret
                ) as client:
                    for user in wl.inboxes:
                        assert await client.fetch_inbox(user) == inboxes[user]
            await wait_identical_state(cluster)


async def _send(cluster, index: int, client_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    params = {
        "sender": "idem",
        "client_id": client_id,
        "to": "idem-inbox",
        "body": client_id.encode(),
    }
    return dict(await core_call(cluster, index, "send", params, timeout=5.0))


async def _resend_until_answered(cluster, index: int, client_id: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    async def attempt() -> dict:  # type: ignore[type-arg]
        try:
            return await _send(cluster, index, client_id)
        except (UnknownOutcome, Unavailable, WriteBlocked):
            return {}

    result: dict = await wait_until(attempt, timeout=15, what=f"core {index} to answer the resend")  # type: ignore[type-arg]
    return result


@pytest.mark.parametrize("mode", ["cp", "hardened_ap"])
async def test_resend_after_killing_the_acknowledging_leader(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(60):
        async with open_cluster(str(tmp_path), nodes=3, mode=mode) as cluster:
            leader = await cluster.wait_leader()
            first = await _send(cluster, leader, "X")
            assert first["duplicate"] is False
            survivors = [i for i in range(3) if i != leader]
            if mode == "hardened_ap":
                # The ack only promises the record is in the leader's WAL; wait until
                # it is drained and applied on the survivors, so they can know it.
                async def known_everywhere() -> bool:
                    for i in survivors:
                        msgs = await core_call(cluster, i, "fetch", {"user": "idem-inbox"})
                        if [m[0] for m in msgs] != [first["mid"]]:
                            return False
                    return True

                await wait_until(known_everywhere, timeout=10, what="X applied on the survivors")
            await cluster.kill(leader)
            for i in survivors:
                again = await _resend_until_answered(cluster, i, "X")
                assert again["mid"] == first["mid"], (i, first, again)
                assert again["duplicate"] is True
            await cluster.start(leader)
            inboxes = await converged_inboxes(cluster, ["idem-inbox"])
            assert [m.mid for m in inboxes["idem-inbox"]] == [first["mid"]]


async def _resend_after_undrained_ack(cluster: LocalCluster) -> tuple[dict, dict, list]:  # type: ignore[type-arg]
    """Core V acknowledges send "Y" from its WAL, dies before draining it, and
    "Y" is resent on another core; returns (first answer, second answer, stored).

    The record cannot drain because V's Raft links are reset right before the
    send (its partition guard needs ~1 s to notice, so it still acknowledges).
    RESET, not BLACKHOLE: a blackholed proxy would hold V's forwarded batch and
    deliver it at the heal.
    """
    assert cluster.links is not None
    leader = await cluster.wait_leader()
    victim = (leader + 1) % 3
    cluster.links.isolate(cluster.cores[victim].node, LinkMode.RESET)
    first = await _send(cluster, victim, "Y")
    st = await core_status(cluster, victim)
    assert st["wal_backlog"] == 1, st["wal"]
    await cluster.kill(victim)
    cluster.links.heal()
    second = await _resend_until_answered(cluster, (victim + 1) % 3, "Y")
    await cluster.start(victim)
    inboxes = await converged_inboxes(cluster, ["idem-inbox"])
    return first, second, inboxes["idem-inbox"]


async def test_hardened_ap_resend_after_a_core_died_with_an_undrained_ack(tmp_path: Path) -> None:
    """After the dead core restarts and replays its WAL, dedup keeps one message."""
    with trio.fail_after(60):
        async with open_cluster(
            str(tmp_path), nodes=3, mode="hardened_ap", proxies=True
        ) as cluster:
            first, second, stored = await _resend_after_undrained_ack(cluster)
            assert len(stored) == 1, stored
            # The live core drained first, so its answer is the one stored.
            assert stored[0].mid == second["mid"], (first, second, stored)


async def test_hardened_ap_resend_on_another_core_returns_the_original_mid(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cluster(
            str(tmp_path), nodes=3, mode="hardened_ap", proxies=True
        ) as cluster:
            first, second, stored = await _resend_after_undrained_ack(cluster)
            assert [m.mid for m in stored] == [first["mid"]]
            assert second["mid"] == first["mid"]
