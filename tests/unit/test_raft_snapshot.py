"""The consumer's snapshot data: packed tables (format 2), format 1 still read.

PySyncObj pickles snapshots with protocol 2, which turns every ``bytes`` into a
latin-1 text plus a call; the state's tables therefore travel as one
protocol-5 pickle inside it. These tests go through PySyncObj's own pickle
module and, at the end, through a real single-node PySyncObj that writes its
snapshot in a forked child and loads it after a restart.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
import pytest
import trio

from iris_raft._ops import Batch, Limits, Send, encode_batch, mid_for, send_op_id
from iris_raft._raft import (
    SNAPSHOT_FORMAT,
    RaftHost,
    RaftSettings,
    _StateConsumer,
    consumer_snapshot,
)
from iris_raft._state import IrisState

LIMITS = Limits(1_000, 1 << 20, 10**9, 10**9)


def _batch(start: int, count: int, now: int) -> bytes:
    ops = []
    for i in range(start, start + count):
        op_id = send_op_id(f"sender-{i % 3}", f"c{i}")
        ops.append(
            Send(
                op_id,
                f"sender-{i % 3}",
                f"user-{i % 5}",
                bytes([i % 256]) * 100,
                mid_for(op_id),
                now,
            )
        )
    return encode_batch(Batch(now, "test", LIMITS, ops))


def _state(messages: int) -> IrisState:
    state = IrisState()
    for start in range(0, messages, 100):
        state.apply(_batch(start, min(100, messages - start), 1_000 + start))
    return state


def _through_pysyncobj_pickle(consumer_data: Any) -> tuple[bytes, Any]:
    """Write and read ``consumer_data`` the way PySyncObj's serializer does."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as g:
        pysyncobj_pickle.dump(([{}, consumer_data], None, None, []), g)
    with gzip.GzipFile(fileobj=io.BytesIO(raw.getvalue())) as g:
        loaded = pysyncobj_pickle.load(g)
    return raw.getvalue(), loaded[0][1]


def test_packed_tables_round_trip_through_protocol_2() -> None:
    state = _state(500)
    compressed, data = _through_pysyncobj_pickle(consumer_snapshot(state))
    assert data["format"] == SNAPSHOT_FORMAT
    consumer = _StateConsumer()
    consumer._deserialize(data)
    assert consumer.restored_from_snapshot
    assert consumer.state.fingerprint() == state.fingerprint()
    # One latin-1 detour for the whole blob, not one per stored record.
    assert gzip.decompress(compressed).count(b"_codecs") == 1


def test_format_1_consumer_data_is_still_read() -> None:
    state = _state(50)
    _, data = _through_pysyncobj_pickle({"format": 1, "state": state.to_snapshot()})
    consumer = _StateConsumer()
    consumer._deserialize(data)
    assert consumer.state.fingerprint() == state.fingerprint()


@pytest.mark.parametrize("bad", [None, {"format": 99, "state": {}}, {"state": {}}])
def test_unknown_consumer_data_is_refused_and_recorded(bad: Any) -> None:
    consumer = _StateConsumer()
    with pytest.raises(ValueError):
        consumer._deserialize(bad)
    assert consumer.snapshot_error is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _host(data_dir: Path, node: str) -> RaftHost:
    # A 1 s compaction period: PySyncObj's per-node compaction window (30 % of
    # the period) then comes round within a second.
    settings = RaftSettings(
        node, (), str(data_dir), password="snapshot-test-secret", log_compaction_min_time=1.0
    )
    host = RaftHost(settings)
    host.start()
    return host


async def test_a_single_node_restarts_from_its_own_snapshot(tmp_path: Path) -> None:
    node = f"127.0.0.1:{_free_port()}"
    host = _host(tmp_path, node)
    try:
        with trio.fail_after(20):
            while not host.is_leader():
                await trio.sleep(0.02)
            for start in range(0, 300, 100):
                results = await host.call(_batch(start, 100, 1_000 + start), timeout=5)
                assert all(r[0] for r in results)
            expected = host.read_state(lambda s: s.fingerprint())
            host.force_snapshot()
            dump = tmp_path / "raft.snapshot"
            while not dump.exists():
                await trio.sleep(0.02)
    finally:
        host.stop()
    assert os.path.getsize(dump) > 0

    host = _host(tmp_path, node)
    try:
        with trio.fail_after(20):  # PySyncObj loads its snapshot on its first ticks
            while not host.consumer.restored_from_snapshot:
                await trio.sleep(0.02)
        assert host.consumer.snapshot_error is None
        assert host.read_state(lambda s: s.fingerprint()) == expected
        assert host.read_state(lambda s: s.message_count) == 300
    finally:
        host.stop()


_CORE = """
import os, socket, stat, sys, threading, time
import iris_raft._raft  # installs the at-fork hook

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()

def forker():
    pid = os.fork()
    if pid == 0:  # the child: count its sockets, then outlive the parent if it can
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += stat.S_ISSOCK(os.fstat(int(fd)).st_mode)
            except OSError:
                pass
        print(pid or os.getpid(), count, flush=True)
        time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    os.kill(os.getpid(), 9)  # the core dies, as with kill -9

threading.Thread(target=forker, name=sys.argv[1]).start()
"""


def _child_after_parent_death(thread_name: str) -> tuple[int, int]:
    """Run a stand-in core that forks from ``thread_name`` and is then killed."""
    with subprocess.Popen(
        [sys.executable, "-c", _CORE, thread_name], stdout=subprocess.PIPE, text=True
    ) as core:
        assert core.stdout is not None
        out = core.stdout.readline().split()  # not to EOF: a surviving child holds the pipe
        core.wait(timeout=30)
    return int(out[0]), int(out[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_soon(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_snapshot_child_drops_its_sockets_and_dies_with_the_core() -> None:
    child, sockets = _child_after_parent_death("Thread-7 (_autoTickThread)")
    assert sockets == 0  # the Raft port is not held by the child
    assert _gone_soon(child)  # it does not go on writing under a restarted core


def test_other_forks_are_left_alone() -> None:
    child, sockets = _child_after_parent_death("worker")
    try:
        assert sockets >= 1
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)
