"""Backup files: a consistent, checksummed copy of the replicated state.

Theory of operation
-------------------
``iris backup`` asks a running core for its state after a read barrier (in
``cp``; the local replica in ``hardened_ap``), so the copy reflects every
write committed before the backup started. The file is::

    b"IRISBAK1" + record(CBOR header) + record(pickle of the state tables)

where each record carries CRC32 checksums (``_records``). A damaged backup is
refused with the file's name, never half-restored.

``iris restore`` is an offline, whole-cluster operation: with every core
stopped, it runs on each core's data folder, moves the old Raft files and
WAL aside (never deleting them), and writes a PySyncObj snapshot holding the
backed-up state at log index 2. Every core then starts from the identical
snapshot, so they agree from the first entry on.
"""

from __future__ import annotations

import gzip
import os
import pickle
import time
from typing import Any

import cbor2

from ._exceptions import CorruptFile
from ._raft import consumer_snapshot
from ._records import encode_record, move_aside, scan_records
from ._state import IrisState

MAGIC = b"IRISBAK1"
FORMAT = 1
# PySyncObj's command type byte for a no-op log entry.
_NO_OP = b"\x00"


def dump_state(state: IrisState, *, node: str = "", mode: str = "") -> bytes:
    """Serialise ``state`` into backup-file bytes (call under the state lock)."""
    blob = pickle.dumps(state.to_snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    header = cbor2.dumps(
        {
            "format": FORMAT,
            "created_ms": int(time.time() * 1000),
            "node": node,
            "mode": mode,
            "applied_batches": state.applied_batches,
            "messages": state.message_count,
        }
    )
    return MAGIC + encode_record(header) + encode_record(blob)


def load_backup(data: bytes, path: str) -> tuple[dict[str, Any], IrisState]:
    """Parse and verify a backup; raises :class:`CorruptFile` naming ``path``."""
    if not data.startswith(MAGIC):
        raise CorruptFile("not an Iris backup file (bad magic)", path=path, offset=0)
    scan = scan_records(memoryview(data)[len(MAGIC) :], path)
    if scan.torn_tail or len(scan.records) != 2:
        raise CorruptFile("the backup file is truncated or incomplete", path=path)
    try:
        header = cbor2.loads(scan.records[0][1])
        state = IrisState.from_snapshot(pickle.loads(scan.records[1][1]))
    except Exception as exc:
        raise CorruptFile(f"the backup cannot be decoded: {exc}", path=path) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptFile("unsupported backup format", path=path)
    return header, state


def write_backup(path: str, data: bytes) -> None:
    """Write backup bytes durably (tmp file, fsync, rename)."""
    from ._records import atomic_write

    atomic_write(path, data)


def restore_into(
    data_dir: str, wal_dir: str | None, state: IrisState, cluster: list[str]
) -> list[str]:
    """Prepare a stopped core's data folder to start from ``state``.

    Returns the paths that were moved aside.
    """
    raft_dir = os.path.join(data_dir, "raft")
    moved: list[str] = []
    if os.path.isdir(raft_dir):
        for name in sorted(os.listdir(raft_dir)):
            moved.append(move_aside(os.path.join(raft_dir, name)))
    if wal_dir and os.path.isdir(wal_dir):
        for name in sorted(os.listdir(wal_dir)):
            if ".corrupt-" not in name:
                moved.append(move_aside(os.path.join(wal_dir, name)))
    os.makedirs(raft_dir, exist_ok=True)
    consumer_data = consumer_snapshot(state)
    entry0 = (_NO_OP, 1, 0)
    entry1 = (_NO_OP, 2, 0)
    dump = ([{}, consumer_data], entry1, entry0, list(cluster))
    tmp = os.path.join(raft_dir, "raft.snapshot.tmp")
    with open(tmp, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb") as g:
            pickle.dump(dump, g, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(raft_dir, "raft.snapshot"))
    fd = os.open(raft_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return moved
