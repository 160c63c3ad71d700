"""kill -9 of every core at once while writers are busy, then a restart of all.

Every send acknowledged before (or answered during) the crash must be stored
exactly once after the restart, the writers' in-hand sends (retried with the
same client id across the outage) must not duplicate, and the three cores must
end with identical inboxes and identical state counters. A canary run on the
test-only unsafe-ack build proves the check catches lost acknowledgements.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import (
    Workload,
    check_inboxes,
    converged_inboxes,
    kill_all_at_once,
    open_cluster,
    running_workload,
    start_many,
    wait_identical_state,
)
from jepsen_like.cluster import LocalCluster

pytestmark = pytest.mark.cluster


async def _crash_all_under_writes(
    cluster: LocalCluster, *, order_fence: float = 30.0
) -> tuple[Workload, float]:
    """Writers busy; every core killed at once; all restarted; the sends in hand
    finish. Returns the workload and the time of the crash."""
    wl = Workload(tag="ka", writers=20, order_fence=order_fence)
    async with running_workload(cluster, wl):
        await wl.wait_acks(300, timeout=20)
        await kill_all_at_once(cluster)
        crashed_at = trio.current_time()
        # No new client ids from here on; the sends in hand keep retrying
        # (same client id) until the cores are back.
        wl.stop.set()
        await start_many(cluster, range(3))
    assert not wl.unresolved, sorted(wl.unresolved)[:10]
    return wl, crashed_at


@pytest.mark.parametrize("mode", ["cp", "hardened_ap"])
async def test_kill_all_at_once_then_restart(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path), nodes=3, mode=mode) as cluster:
            wl, crashed_at = await _crash_all_under_writes(cluster)
            inboxes = await converged_inboxes(cluster, wl.inboxes)
            check_inboxes(
                wl,
                inboxes,
                where=f"{mode}, after kill -9 of all cores and restart",
                mid_may_differ_after=crashed_at if mode == "hardened_ap" else None,
            )
            assert sum(len(v) for v in inboxes.values()) == len(wl.acks)
            await wait_identical_state(cluster)


async def test_canary_acks_before_fsync_are_caught(tmp_path: Path) -> None:
    """The same scenario on the test-only build that acknowledges a send a second
    before it reaches the WAL (``IRIS_TEST_UNSAFE_ACK=1``): the check must report
    lost acknowledged sends, or it could not catch a real durability bug."""
    with trio.fail_after(120):
        async with open_cluster(
            str(tmp_path), nodes=3, mode="hardened_ap", env={"IRIS_TEST_UNSAFE_ACK": "1"}
        ) as cluster:
            # The lost acknowledged sends never reach the log, so the clients'
            # order fence would hold each writer's next send back for its full
            # 30 s; a short fence lets the writers finish within their deadline.
            wl, crashed_at = await _crash_all_under_writes(cluster, order_fence=3.0)
            inboxes = await converged_inboxes(cluster, wl.inboxes)
            with pytest.raises(AssertionError, match="acknowledged sends lost"):
                check_inboxes(wl, inboxes, where="canary", mid_may_differ_after=crashed_at)
