"""Checksummed record framing and the small file helpers the WAL and the journal share.

Theory of operation
-------------------
A file is a sequence of records, each a 12-byte header and a payload::

    <u32 payload length> <u32 crc32(payload)> <u32 crc32(first 8 header bytes)> <payload>

The header carries its own checksum so that a damaged length field is told apart
from a write that a crash cut short:

* fewer than 12 bytes left, or a header whose own CRC is valid but whose payload
  runs past the end of the file, is a *torn tail*: an append that was interrupted
  before its ``fsync`` returned. Nothing in it was ever acknowledged, so the caller
  truncates the file to :attr:`ScanResult.valid_end` and carries on;
* a header whose CRC fails, or a complete record whose payload CRC fails, is
  *corruption* (bit rot, a bad disk, someone editing the file). Scanning stops
  with :class:`~iris_raft._exceptions.CorruptFile`, which names the file and the
  byte offset and tells the operator what to do. A flipped bit never turns into
  a silently different record.

Durability rules used by the helpers below: data is fsynced before the rename
that publishes it, and the directory is fsynced after every create, rename or
unlink, because on Linux a new directory entry is not durable until its
directory is. Corrupt files are renamed aside, never deleted: they are evidence
and may hold data an operator can still recover.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from ._exceptions import CorruptFile

_HEADER = struct.Struct("<III")
_PREFIX = struct.Struct("<II")

#: Bytes of framing in front of every payload.
HEADER_SIZE = _HEADER.size

#: What the operator is told whenever a file fails its checksum.
OPERATOR_ADVICE = (
    "restore from a backup, or set allow_table_nuke = true to move the file aside "
    "and rebuild this node from its peers"
)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The outcome of :func:`scan_records` over a whole file."""

    #: ``(offset of the record header, payload)`` for every intact record, in order.
    records: list[tuple[int, bytes]]
    #: End of the last intact record; the file should be truncated to this.
    valid_end: int
    #: True when bytes after ``valid_end`` belong to an interrupted append.
    torn_tail: bool


def encode_record(payload: bytes) -> bytes:
    """Frame ``payload`` as one record (header and payload).

    Raises :class:`ValueError` if the payload does not fit a 32-bit length.
    """
    if len(payload) > 0xFFFFFFFF:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds 4 GiB")
    prefix = _PREFIX.pack(len(payload), zlib.crc32(payload))
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + payload


def iter_records(buf: bytes | memoryview, path: str) -> Iterator[tuple[int, memoryview]]:
    """Yield ``(offset, payload)`` for each intact record of ``buf``, stopping at a torn tail.

    The payloads are views into ``buf`` (no copies); release them before closing an
    mmap behind ``buf``. The end of the last yielded record is the valid end; if it
    is short of ``len(buf)`` the rest is a torn tail.

    Raises :class:`CorruptFile` (naming ``path`` and the offset) on a failed checksum.
    """
    view = memoryview(buf).cast("B")
    end = len(view)
    offset = 0
    while end - offset >= HEADER_SIZE:
        length, payload_crc, header_crc = _HEADER.unpack_from(view, offset)
        if zlib.crc32(view[offset : offset + 8]) != header_crc:
            raise CorruptFile(
                f"{path}: record header at byte {offset} fails its checksum; {OPERATOR_ADVICE}",
                path=path,
                offset=offset,
            )
        start = offset + HEADER_SIZE
        if start + length > end:
            return
        payload = view[start : start + length]
        if zlib.crc32(payload) != payload_crc:
            raise CorruptFile(
                f"{path}: record at byte {offset} ({length} bytes) fails its checksum; "
                f"{OPERATOR_ADVICE}",
                path=path,
                offset=offset,
            )
        yield offset, payload
        offset = start + length


def scan_records(buf: bytes | memoryview, path: str) -> ScanResult:
    """Check every record of ``buf`` (the whole content of the file at ``path``).

    Raises :class:`CorruptFile` on a failed checksum; a torn tail is reported, not raised.
    """
    records: list[tuple[int, bytes]] = []
    valid_end = 0
    for offset, payload in iter_records(buf, path):
        records.append((offset, bytes(payload)))
        valid_end = offset + HEADER_SIZE + len(payload)
    return ScanResult(records=records, valid_end=valid_end, torn_tail=valid_end != len(buf))


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write all of ``data`` to ``fd`` (at ``offset`` with pwrite, else at the file position)."""
    view = memoryview(data)
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]


def fsync_dir(path: str) -> None:
    """Make creates, renames and unlinks inside directory ``path`` durable.

    Raises :class:`OSError` if the directory cannot be opened or synced.
    """
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    Writes ``<path>.tmp``, fsyncs it, renames it over ``path`` and fsyncs the
    directory. Not safe for two concurrent writers of the same ``path``.
    Raises :class:`OSError`; ``path`` is then unchanged.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def move_aside(path: str, *, now: datetime | None = None) -> str:
    """Rename a corrupt file to ``<path>.corrupt-<UTC timestamp>`` and return the new name.

    The file is never deleted. Raises :class:`OSError` if the rename fails.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    target = f"{path}.corrupt-{stamp}"
    suffix = 0
    while os.path.lexists(target):
        suffix += 1
        target = f"{path}.corrupt-{stamp}-{suffix}"
    os.rename(path, target)
    fsync_dir(os.path.dirname(path))
    return target
