"""Raft log safety under ordinary load: a follower must never drop committed entries.

Raft (§5.3) lets a follower delete log entries only when they conflict with
the leader's (same index, different term); committed entries never conflict.
PySyncObj 0.3.17 asks its journal to delete every entry after the previous
index whenever the leader re-sends entries the follower already holds (no
term check), and logs ``truncating already-applied log entries`` at CRITICAL
when it does so. With a journal that obeyed, a crash before the leader re-sent
them would leave that follower without entries it acknowledged, and an
election won without the old leader would drop acknowledged writes.

``ChecksummedJournal`` makes that deletion lazy (Raft §5.3): re-sent entries
with the same index and term are kept, and only a real conflict truncates; it
logs ``removing committed entries`` at CRITICAL if a conflict ever reached
below the commit index. This test drives ordinary load and requires that the
journal never removed a committed entry (PySyncObj's own message is now a
false alarm on ordinary re-sends).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cluster_helpers import Workload, open_cluster, running_workload

pytestmark = pytest.mark.cluster

DELETED_COMMITTED = "removing committed entries"


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
