"""The write-ahead log of the ``hardened_ap`` mode: a durable batcher in front of Raft.

Theory of operation
-------------------
A write is *acknowledged* once its record is fsynced here. A background drainer
(elsewhere) submits records into Raft in LSN order and calls
:meth:`WriteAheadLog.mark_drained` once they are applied. After a crash every
record not known to be drained is handed back by :meth:`WriteAheadLog.open` for
replay. Replay is idempotent upstream (by operation id), so handing back a record
that was in fact drained is fine; losing one is not.

Layout: a directory of segments ``wal-<first LSN, 20 digits>.log`` plus a small
checksummed file ``drained``. A segment is a run of records framed by
:mod:`._records` whose payload is ``<u64 LSN> <user payload>``. LSNs start at 1,
are strictly consecutive within and across segments, and continue across
restarts (an empty segment still carries its first LSN in its name).

Invariants and ordering rules:

* persist before acknowledge: :meth:`WriteAheadLog.sync` returns only after the
  records and, for a new segment, the directory entry are durable;
  :meth:`DurableLog.append` returns only after that sync;
* only the tail of the *last* segment can be torn (it is the only one written
  since the last sync); a torn tail anywhere else, a failed checksum or an LSN out
  of sequence is corruption: :class:`~iris_raft._exceptions.CorruptFile`, or with
  ``allow_nuke`` the segment is moved aside, the records before the bad spot are
  rewritten under the same name and later segments are kept (the lost records
  are logged);
* whole segments are deleted only once every record in them is drained, never
  the segment being written; the ``drained`` mark is an optimisation: losing it
  means re-replaying records, which is safe, so an unreadable mark only warns;
* after an fsync error nothing more is acknowledged (the kernel may have dropped
  the dirty pages): the log refuses appends until it is reopened.

:class:`DurableLog` (from :func:`open_wal`) adds group commit for trio: appends
queue into a batch, one of the waiting callers writes the whole batch with one
``write`` and one ``fdatasync`` in a worker thread and wakes the others, so N
concurrent appends cost about one fsync. The queue is bounded (``max_pending``);
above it appends wait.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import trio

from ._exceptions import CorruptFile
from ._records import (
    HEADER_SIZE,
    atomic_write,
    encode_record,
    fsync_dir,
    iter_records,
    move_aside,
    scan_records,
    write_all,
)

log = logging.getLogger("iris_raft.wal")

#: Default size at which the log starts a new segment.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: Default bound on records queued for group commit.
DEFAULT_MAX_PENDING = 10_000

_SEGMENT_NAME = re.compile(r"^wal-(\d{20})\.log$")
_RECOVERED_SUFFIX = ".recovered"
_DRAINED_FILE = "drained"
_LSN = struct.Struct("<Q")
_VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has LSN ``first_lsn``."""
    return f"wal-{first_lsn:020d}.log"


@dataclass(slots=True)
class _Segment:
    first_lsn: int
    path: str
    count: int
    size: int

    @property
    def end_lsn(self) -> int:
        """LSN the next record of this segment would get."""
        return self.first_lsn + self.count

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.count - 1


class WriteAheadLog:
    """The blocking WAL core. Methods are thread-safe; file I/O happens in the caller's thread."""

    def __init__(
        self,
        directory: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        allow_nuke: bool = False,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.allow_nuke = allow_nuke
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._retired: list[int] = []
        self._dirty = False
        self._dir_dirty = False
        self._next_lsn = 1
        self._drained = 0
        self._persisted_drained = 0
        self._fsyncs = 0
        self._failed: OSError | None = None
        self._state = "new"

    # ----------------------------------------------------------------- open

    def open(self) -> list[tuple[int, bytes]]:
        """Recover the log and return the undrained records as ``(lsn, payload)``, in order.

        Raises :class:`CorruptFile` if a segment fails its checks and ``allow_nuke``
        is false: the operator restores from a backup or enables the nuke.
        Raises :class:`OSError` on I/O errors.
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError("a WriteAheadLog can be opened once")
            self._state = "open"
            try:
                return self._open()
            except BaseException:
                self._close_fds()
                self._state = "closed"
                raise

    def _open(self) -> list[tuple[int, bytes]]:
        directory = self.directory
        if not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
            fsync_dir(os.path.dirname(os.path.abspath(directory)))
        if is_volatile_filesystem(directory):
            log.warning(
                "WAL directory %s is on %s: acknowledged writes will not survive a reboot",
                directory,
                filesystem_type(directory),
            )
        self._finish_interrupted_recovery()
        drained = self._read_drained()
        self._drained = self._persisted_drained = drained

        names = sorted(
            (int(m.group(1)), name)
            for name in os.listdir(directory)
            if (m := _SEGMENT_NAME.match(name)) is not None
        )
        pending: list[tuple[int, bytes]] = []
        for i, (first_lsn, name) in enumerate(names):
            path = os.path.join(directory, name)
            segment, records = self._load_segment(path, first_lsn, is_last=i == len(names) - 1)
            if self._segments:
                self._check_continuity(self._segments[-1], segment)
            self._segments.append(segment)
            pending.extend(record for record in records if record[0] > drained)

        self._next_lsn = max(self._segments[-1].end_lsn if self._segments else 1, drained + 1)
        if not self._segments or self._segments[-1].end_lsn != self._next_lsn:
            self._start_segment()
        else:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_CLOEXEC)
        removed = False
        while len(self._segments) > 1 and self._segments[0].last_lsn <= drained:
            os.unlink(self._segments.pop(0).path)
            removed = True
        if removed or self._dir_dirty:
            fsync_dir(directory)
            self._dir_dirty = False
        return pending

    def _finish_interrupted_recovery(self) -> None:
        """Complete or discard a nuke that a crash interrupted (see :meth:`_nuke_segment`)."""
        changed = False
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.endswith(_RECOVERED_SUFFIX):
                original = path[: -len(_RECOVERED_SUFFIX)]
                if os.path.exists(original):
                    os.unlink(path)
                else:
                    os.rename(path, original)
                changed = True
            elif name == _DRAINED_FILE + ".tmp":
                os.unlink(path)
                changed = True
        if changed:
            fsync_dir(self.directory)

    def _read_drained(self) -> int:
        path = os.path.join(self.directory, _DRAINED_FILE)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        try:
            scan = scan_records(data, path)
        except CorruptFile:
            scan = None
        if scan is None or scan.torn_tail or len(scan.records) != 1:
            log.warning("drained mark %s is unreadable; replaying every record in the WAL", path)
            return 0
        payload = scan.records[0][1]
        if len(payload) != _LSN.size:
            log.warning("drained mark %s is malformed; replaying every record in the WAL", path)
            return 0
        value: int = _LSN.unpack(payload)[0]
        return value

    def _load_segment(
        self, path: str, first_lsn: int, *, is_last: bool
    ) -> tuple[_Segment, list[tuple[int, bytes]]]:
        with open(path, "rb") as f:
            data = f.read()
        records: list[tuple[int, bytes]] = []
        valid_end = 0
        problem: CorruptFile | None = None
        try:
            for offset, payload in iter_records(data, path):
                expected = first_lsn + len(records)
                lsn = _LSN.unpack_from(payload)[0] if len(payload) >= _LSN.size else None
                if lsn != expected:
                    raise CorruptFile(
                        f"{path}: record at byte {offset} has LSN {lsn}, expected {expected}; "
                        "the segment was altered or mixed up with another; restore from a "
                        "backup, or set allow_table_nuke = true to move it aside",
                        path=path,
                        offset=offset,
                    )
                records.append((expected, bytes(payload[_LSN.size :])))
                valid_end = offset + HEADER_SIZE + len(payload)
        except CorruptFile as exc:
            problem = exc
        if problem is None and valid_end < len(data):
            if is_last:
                log.warning(
                    "%s: truncating a torn tail at byte %d (%d bytes of an append that never "
                    "completed; it was not acknowledged)",
                    path,
                    valid_end,
                    len(data) - valid_end,
                )
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, valid_end)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                problem = CorruptFile(
                    f"{path}: incomplete record at byte {valid_end} in a segment that is not "
                    "the last one; restore from a backup, or set allow_table_nuke = true to "
                    "move it aside",
                    path=path,
                    offset=valid_end,
                )
        if problem is not None:
            if not self.allow_nuke:
                raise problem
            self._nuke_segment(path, data[:valid_end], problem, kept=len(records))
        return _Segment(first_lsn, path, count=len(records), size=valid_end), records

    def _nuke_segment(self, path: str, good: bytes, problem: CorruptFile, *, kept: int) -> None:
        """Move a corrupt segment aside and put its intact prefix back under the same name.

        The prefix is written and fsynced *before* the move, so after a crash in
        between, :meth:`_finish_interrupted_recovery` can finish the job.
        """
        recovered = path + _RECOVERED_SUFFIX
        fd = os.open(recovered, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, good)
            os.fsync(fd)
        finally:
            os.close(fd)
        aside = move_aside(path)
        os.rename(recovered, path)
        fsync_dir(self.directory)
        log.warning(
            "allow_nuke: %s; moved the segment to %s and kept its first %d records; "
            "later records of this segment are lost",
            problem.message,
            aside,
            kept,
        )

    def _check_continuity(self, prev: _Segment, segment: _Segment) -> None:
        if segment.first_lsn == prev.end_lsn:
            return
        if segment.first_lsn < prev.end_lsn:
            message = (
                f"{segment.path} starts at LSN {segment.first_lsn} but the previous segment "
                f"already holds records up to {prev.last_lsn}"
            )
        elif segment.first_lsn - 1 <= self._drained:
            return  # the missing records were drained; nothing is lost
        else:
            message = (
                f"records {prev.end_lsn}..{segment.first_lsn - 1} are missing before "
                f"{segment.path} and were not drained"
            )
        if not self.allow_nuke:
            raise CorruptFile(
                message + "; restore from a backup, or set allow_table_nuke = true to accept "
                "the loss",
                path=segment.path,
                offset=0,
            )
        log.warning("allow_nuke: %s; continuing without them", message)

    # ---------------------------------------------------------------- write

    def _start_segment(self) -> None:
        path = os.path.join(self.directory, segment_name(self._next_lsn))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if self._fd is not None:
            if self._dirty:
                self._retired.append(self._fd)
            else:
                os.close(self._fd)
        self._fd = fd
        self._dirty = False
        self._dir_dirty = True
        self._segments.append(_Segment(self._next_lsn, path, count=0, size=0))

    def _check_writable(self) -> int:
        if self._state != "open" or self._fd is None:
            raise RuntimeError("the write-ahead log is not open")
        if self._failed is not None:
            raise OSError(
                self._failed.errno,
                f"the write-ahead log failed earlier and must be reopened: {self._failed}",
            )
        return self._fd

    def append(self, payloads: Sequence[bytes]) -> int:
        """Write ``payloads`` as consecutive records, without syncing; return the last LSN.

        Nothing is durable (or may be acknowledged) until :meth:`sync` returns.
        Raises :class:`OSError` (after an earlier fsync failure too) and
        :class:`RuntimeError` if the log is not open.
        """
        with self._lock:
            self._check_writable()
            if not payloads:
                return self._next_lsn - 1
            current = self._segments[-1]
            if current.size >= self.segment_bytes and current.count > 0:
                self._start_segment()
                current = self._segments[-1]
            fd = self._check_writable()
            first = self._next_lsn
            data = b"".join(
                encode_record(_LSN.pack(first + i) + bytes(payload))
                for i, payload in enumerate(payloads)
            )
            try:
                write_all(fd, data, current.size)
            except OSError as exc:
                try:
                    os.ftruncate(fd, current.size)
                except OSError:
                    self._failed = exc
                raise
            current.count += len(payloads)
            current.size += len(data)
            self._next_lsn += len(payloads)
            self._dirty = True
            return self._next_lsn - 1

    def sync(self) -> None:
        """Make every appended record durable (``fdatasync``, plus the directory after a rotation).

        Raises :class:`OSError`; the log then refuses appends until reopened,
        because the kernel may have dropped the unwritten pages.
        """
        with self._lock:
            fd = self._check_writable()
            try:
                while self._retired:
                    os.fdatasync(self._retired[0])
                    self._fsyncs += 1
                    os.close(self._retired.pop(0))
                if self._dirty:
                    os.fdatasync(fd)
                    self._fsyncs += 1
                    self._dirty = False
                if self._dir_dirty:
                    fsync_dir(self.directory)
                    self._dir_dirty = False
            except OSError as exc:
                self._failed = exc
                raise

    # ---------------------------------------------------------------- drain

    def mark_drained(self, lsn: int) -> None:
        """Record that every record up to ``lsn`` is applied; delete fully drained segments.

        Lower marks than the current one are ignored. Raises :class:`ValueError`
        if ``lsn`` was never appended, :class:`OSError` if the mark cannot be
        persisted (harmless: the records are replayed again after a restart).
        """
        with self._lock:
            if self._state != "open":
                raise RuntimeError("the write-ahead log is not open")
            if lsn < 0 or lsn >= self._next_lsn:
                raise ValueError(f"cannot mark LSN {lsn} drained: the last LSN is {self.last_lsn}")
            self._drained = max(self._drained, lsn)
            doomed: list[_Segment] = []
            while len(self._segments) > 1 and self._segments[0].last_lsn <= self._drained:
                doomed.append(self._segments.pop(0))
        with self._persist_lock:
            target = self._drained
            if target > self._persisted_drained:
                atomic_write(
                    os.path.join(self.directory, _DRAINED_FILE), encode_record(_LSN.pack(target))
                )
                self._persisted_drained = target
            for segment in doomed:
                with suppress(FileNotFoundError):
                    os.unlink(segment.path)
            if doomed:
                fsync_dir(self.directory)

    # ---------------------------------------------------------------- state

    @property
    def last_lsn(self) -> int:
        """LSN of the last appended record (0 if none ever was)."""
        return self._next_lsn - 1

    @property
    def drained_lsn(self) -> int:
        """Highest LSN marked drained."""
        return self._drained

    @property
    def backlog(self) -> int:
        """Number of appended records not yet marked drained."""
        with self._lock:
            return sum(
                max(0, seg.last_lsn - max(seg.first_lsn - 1, self._drained))
                for seg in self._segments
            )

    def statistics(self) -> dict[str, int]:
        """Counters: segments, bytes, backlog, last_lsn, drained_lsn, fsyncs (data syncs)."""
        backlog = self.backlog
        with self._lock:
            return {
                "segments": len(self._segments),
                "bytes": sum(seg.size for seg in self._segments),
                "backlog": backlog,
                "last_lsn": self._next_lsn - 1,
                "drained_lsn": self._drained,
                "fsyncs": self._fsyncs,
            }

    def close(self) -> None:
        """Close the files. Appends not yet synced are not durable. Idempotent."""
        with self._lock:
            self._close_fds()
            self._state = "closed"

    def _close_fds(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------ filesystem checks


def _unescape_mount_field(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def filesystem_type_from_mounts(mounts: str, path: str) -> str:
    """The type of the filesystem holding absolute ``path``, given ``/proc/mounts`` text."""
    best_length, best_type = -1, "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = _unescape_mount_field(fields[1])
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        # ">=": a later mount on the same point hides the earlier one.
        if inside and len(mount_point) >= best_length:
            best_length, best_type = len(mount_point), fields[2]
    return best_type


def filesystem_type(path: str) -> str:
    """The filesystem type of ``path`` from ``/proc/mounts``; ``"unknown"`` if unreadable."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            mounts = f.read()
    except OSError:
        return "unknown"
    return filesystem_type_from_mounts(mounts, os.path.realpath(path))


def is_volatile_filesystem(path: str) -> bool:
    """True if ``path`` is on tmpfs or ramfs, where fsync gives no durability."""
    return filesystem_type(path) in _VOLATILE_FILESYSTEMS


# ------------------------------------------------------------ trio group commit


@dataclass(slots=True, eq=False)
class _Batch:
    payloads: list[bytes] = field(default_factory=list)
    last_lsn: int = 0
    done: bool = False
    error: BaseException | None = None


def _raise_batch_error(error: BaseException) -> None:
    if isinstance(error, trio.ClosedResourceError):
        raise trio.ClosedResourceError(
            "the write-ahead log was closed before these records were written"
        )
    if isinstance(error, OSError):
        raise OSError(
            error.errno, f"write-ahead log sync failed: {error.strerror or error}"
        ) from error
    raise RuntimeError(f"write-ahead log failed: {error!r}") from error


class DurableLog:
    """Group-committing trio front end of a :class:`WriteAheadLog`; see :func:`open_wal`."""

    def __init__(
        self,
        wal: WriteAheadLog,
        pending: list[tuple[int, bytes]],
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if max_pending <= 0:
            raise ValueError("max_pending must be positive")
        #: Undrained records found by :meth:`WriteAheadLog.open`, to replay.
        self.pending = pending
        self._wal = wal
        self._max_pending = max_pending
        self._filling = _Batch()
        self._queued = 0
        self._writing = False
        self._changed = trio.lowlevel.ParkingLot()
        self._failed: BaseException | None = None
        self._closed = False

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the write-ahead log is closed")
        if self._failed is not None:
            _raise_batch_error(self._failed)

    async def append(self, payloads: Sequence[bytes]) -> int:
        """Append ``payloads``; return the last LSN once they are fsynced.

        Waits while more than ``max_pending`` records are queued. Raises
        :class:`OSError` if the sync failed (then this log refuses further appends
        until reopened: treat the outcome as unknown, the records may be replayed
        after a reopen) and :class:`trio.ClosedResourceError` after close.
        A cancelled append may or may not have been written.
        """
        batch_payloads = [bytes(p) for p in payloads]
        count = len(batch_payloads)
        self._check_usable()
        if count == 0:
            await trio.lowlevel.checkpoint()
            return self._wal.last_lsn
        await self._wait_until(
            lambda: self._queued == 0 or self._queued + count <= self._max_pending
        )
        self._check_usable()
        batch = self._filling
        start = len(batch.payloads)
        batch.payloads.extend(batch_payloads)
        self._queued += count
        await self._wait_until(lambda: batch.done)
        if not batch.done:
            self._check_usable()
        if batch.error is not None:
            _raise_batch_error(batch.error)
        return batch.last_lsn - len(batch.payloads) + start + count

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        """Park until ``ready()``; meanwhile become the writer whenever a batch waits for one.

        Returns early (with ``ready()`` still false) once the log is closed or failed
        and no write is in flight.
        """
        while not ready():
            usable = not self._closed and self._failed is None
            if usable and not self._writing and self._filling.payloads:
                await self._write_filling_batch()
            elif usable or self._writing:
                await self._changed.park()
            else:
                return

    async def _write_filling_batch(self) -> None:
        batch = self._filling
        self._filling = _Batch()
        self._writing = True
        try:
            with trio.CancelScope(shield=True):
                batch.last_lsn = await trio.to_thread.run_sync(
                    self._append_and_sync, batch.payloads
                )
        except Exception as exc:
            self._failed = exc
            batch.error = exc
            self._filling.error = exc
            self._filling.done = True
            self._queued -= len(self._filling.payloads)
        finally:
            batch.done = True
            self._queued -= len(batch.payloads)
            self._writing = False
            self._changed.unpark_all()

    def _append_and_sync(self, payloads: list[bytes]) -> int:
        last = self._wal.append(payloads)
        self._wal.sync()
        return last

    async def mark_drained(self, lsn: int) -> None:
        """See :meth:`WriteAheadLog.mark_drained`; the file work runs in a worker thread."""
        await trio.to_thread.run_sync(self._wal.mark_drained, lsn)

    @property
    def backlog(self) -> int:
        """Number of fsynced records not yet marked drained."""
        return self._wal.backlog

    def statistics(self) -> dict[str, int]:
        """:meth:`WriteAheadLog.statistics` plus ``queued`` (records waiting for group commit)."""
        return {**self._wal.statistics(), "queued": self._queued}

    async def aclose(self) -> None:
        """Wait for an in-flight write, fail the queued appends (ClosedResourceError), close."""
        self._closed = True
        while self._writing:
            await self._changed.park()
        if self._filling.payloads:
            self._filling.error = trio.ClosedResourceError()
            self._filling.done = True
            self._queued = 0
        self._changed.unpark_all()
        await trio.to_thread.run_sync(self._wal.close)


@asynccontextmanager
async def open_wal(
    directory: str,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    allow_nuke: bool = False,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> AsyncIterator[DurableLog]:
    """Open (recover) the WAL in ``directory`` and yield a :class:`DurableLog`.

    Replay ``log.pending`` before relying on the drained mark. Raises
    :class:`CorruptFile` (see :meth:`WriteAheadLog.open`) and :class:`OSError`.
    """
    wal = WriteAheadLog(directory, segment_bytes=segment_bytes, allow_nuke=allow_nuke)
    pending = await trio.to_thread.run_sync(wal.open)
    durable = DurableLog(wal, pending, max_pending=max_pending)
    try:
        yield durable
    finally:
        with trio.CancelScope(shield=True):
            await durable.aclose()
