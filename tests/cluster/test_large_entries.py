"""Raft entries between 64 KiB and 1 MiB reach a lagging follower whole.

PySyncObj sends an entry at least ``appendEntriesBatchSizeBytes`` long in
chunks and marks the wrong chunk as the last one when the pickled entry is
longer than the command (bodies with many bytes >= 0x80 make it so). The
follower then fails to unpickle, logs "failed _onTick" with a traceback and
waits for the next chunk. Iris raises that limit to 1 MiB
(``RaftSettings.append_entries_batch_bytes``), so such batches travel whole.
Here a follower is paused while large batches of random bodies are committed,
then resumed: it catches up to the same state without a single failed tick.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from cluster_helpers import open_cluster, wait_identical_state

import iris_raft

pytestmark = pytest.mark.cluster


async def test_a_lagging_follower_gets_large_entries_whole(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with open_cluster(str(tmp_path), nodes=3, mode="cp") as cluster:
            leader = await cluster.wait_leader()
            lagging = (leader + 1) % 3
            cluster.signal(lagging, signal.SIGSTOP)
            try:
                async with iris_raft.open_client(
                    cluster.rpc_addresses, secret=cluster.secret, timeout=30
                ) as client:

                    async def one(i: int) -> None:
                        await client.send(f"big-{i % 5}", f"b{i}", f"to-{i % 7}", os.urandom(3000))

                    for round_ in range(4):  # batches of ~60-100 sends: 200-400 KB entries
                        async with trio.open_nursery() as nursery:
                            for i in range(100):
                                nursery.start_soon(one, round_ * 100 + i)
            finally:
                cluster.signal(lagging, signal.SIGCONT)
            await wait_identical_state(cluster, timeout=60)
            log = Path(cluster.cores[lagging].log_path).read_text()
            assert "failed _onTick" not in log, log[-3000:]
