"""kill -9 of every core at once while writers are busy, then a restart of all.

Every send acknowledged before (or answered during) the crash must be stored
exactly once after the restart, the writers' in-hand sends (retried with the
same client id across the outage) must not duplicate, and the three cores must
end with identical inboxes and identical state counters.
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

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("mode", ["cp", "hardened_ap"])
async def test_kill_all_at_once_then_restart(tmp_path: Path, mode: str) -> None:
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path), nodes=3, mode=mode) as cluster:
            await cluster.wait_leader()
            wl = Workload(tag="ka", writers=20)
            async with running_workload(cluster, wl):
                await wl.wait_acks(300, timeout=20)
                await kill_all_at_once(cluster)
                crashed_at = trio.current_time()
                acked_before_crash = dict(wl.acks)
                # No new client ids from here on; the sends in hand keep retrying
                # (same client id) until the cores are back.
                wl.stop.set()
                await start_many(cluster, range(3))
            assert not wl.unresolved, sorted(wl.unresolved)[:10]
            assert acked_before_crash.keys() <= wl.acks.keys()
            inboxes = await converged_inboxes(cluster, wl.inboxes)
            check_inboxes(
                wl,
                inboxes,
                where=f"{mode}, after kill -9 of all cores and restart",
                mid_may_differ_after=crashed_at if mode == "hardened_ap" else None,
            )
            assert sum(len(v) for v in inboxes.values()) == len(wl.acks)
            await wait_identical_state(cluster)
