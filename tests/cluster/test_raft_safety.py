"""Raft log safety under ordinary load: a follower must never drop committed entries.

Raft (§5.3) lets a follower delete log entries only when they conflict with
the leader's (same index, different term); committed entries never conflict.
PySyncObj logs ``truncating already-applied log entries ... state machine may
have diverged`` at CRITICAL whenever a follower deletes entries it has already
applied, i.e. committed ones. With the fsynced journal such a deletion is
durable: a crash in the window before the leader re-sends them leaves that
follower without entries it acknowledged, and an election won without the old
leader then drops acknowledged writes (seen as lost sends in
``test_kill_all_at_once_then_restart``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import Workload, open_cluster, running_workload

pytestmark = pytest.mark.cluster

DELETED_COMMITTED = "truncating already-applied log entries"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "product bug: with appendEntriesUseBatch=False (src/iris_raft/_raft.py, RaftHost._build) "
        "the leader pipelines one AppendEntries per entry; every success reply rewinds nextIndex "
        "to just past the acknowledged entry (pysyncobj syncobj.py, 'next_node_idx' handler), so "
        "entries the follower already holds are re-sent, and the follower deletes everything after "
        "prevLogIdx before re-adding (syncobj.py, 'if len(prevEntries) > 1': no term check), "
        "through ChecksummedJournal.deleteEntriesFrom, fsynced"
    ),
)
async def test_followers_never_delete_committed_entries_under_load(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            wl = Workload(tag="safety", writers=20)
            async with running_workload(cluster, wl):
                await wl.wait_acks(1000, timeout=30)
            logs = {
                core.log_path: Path(core.log_path).read_text(errors="replace")
                for core in cluster.cores
            }
    offending = {
        path: [line for line in text.splitlines() if DELETED_COMMITTED in line][:3]
        for path, text in logs.items()
        if DELETED_COMMITTED in text
    }
    assert not offending, f"followers deleted committed (already applied) entries: {offending}"
