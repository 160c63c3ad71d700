"""A checksummed, fsynced Raft journal for PySyncObj, and a check of its snapshot file.

Theory of operation
-------------------
PySyncObj's own ``FileJournal`` never fsyncs and has no checksums: a power loss
can drop entries the node already acknowledged, and one flipped byte makes the
node fail to apply forever. :class:`ChecksummedJournal` implements the same
``pysyncobj.journal.Journal`` interface with these rules:

* one file of records framed by :mod:`._records`; a record's payload is
  ``<u64 idx> <u64 term> <command>``; Raft indexes are consecutive;
* persist before acknowledge: :meth:`~ChecksummedJournal.add` writes the record
  and ``fdatasync`` s before it returns, because PySyncObj acknowledges an entry
  (and counts itself toward a commit) as soon as ``add`` returns; an entry is
  removed from the file only when Raft requires it (``deleteEntriesFrom``: see
  "conflicts" below; ``clear``: see "loading a snapshot" below);
* conflicts (Raft §5.3: "if an existing entry conflicts with a new one (same
  index but different terms), delete the existing entry and all that follow
  it"): PySyncObj's follower calls ``deleteEntriesFrom(prevLogIdx + 1)``
  whenever it holds entries after ``prevLogIdx``, without comparing terms, and
  then ``add`` s the leader's entries. With ``appendEntriesUseBatch=False`` the
  leader routinely re-sends entries the follower already has (a delayed success
  reply moves its next index back), so an eager truncation would make the
  follower durably forget entries it had acknowledged, which may already count
  toward a commit; a crash of every node in that window then loses committed
  writes. ``deleteEntriesFrom`` therefore only records a cursor. Each following
  ``add`` of the entry at the cursor with the same index and term is the same
  entry (log matching) and is kept without any write; the first ``add`` at the
  cursor with another term (or command length) truncates there (ftruncate,
  fsync) and appends. An ``add`` right after the last entry, any other change
  (``clear``, ``deleteEntriesTo``, ``deleteEntriesFrom``) and closing end the
  walk and keep the remaining entries, as Raft does when no conflict shows up
  (e.g. a heartbeat). Reads always show every entry still in the log.
  PySyncObj copes with a log longer than the entries just added: its reply
  (``nextNodeIdx``) counts only those, which is merely conservative. Its commit
  index is ``min(leaderCommit, last log index)`` where Raft says "index of last
  new entry"; that could mark a kept entry committed that conflicts with the
  leader's log only if an append_entries matched up to just before such an entry
  and ended there while the leader had committed past it. PySyncObj's leader
  sends from its next index for the node to the end of its log (in batches),
  that index starts at or past the follower's first conflicting index k (a new
  leader appends a no-op of its own term) and is lowered only to the follower's
  log end, to a rejected index (both >= k) or to just after entries the follower
  accepted (below k only if they were sent from below k); by induction it stays
  >= k, so an append_entries is either rejected (``prevLogIdx`` >= k has another
  term) or has ``prevLogIdx`` = k - 1 and starts with entry k, whose ``add``
  truncates, while the conflicting entry is there.
  Exceptions: ``deleteEntriesFrom(0)`` (no anchoring entry; PySyncObj
  never calls it) truncates at once, and so does a membership change
  (``_COMMAND_TYPE.MEMBERSHIP``) at or after the cursor: PySyncObj has already
  rolled back the effect of every entry after ``prevLogIdx`` and re-applies only
  those it adds, so the log is cut at the first such entry, keeping the
  in-memory membership in step with the log (it is re-appended when re-sent);
* ``currentTerm`` and ``votedForNodeId`` are written (atomically, fsynced) in
  ``setCurrentTerm`` before PySyncObj sends the vote or message that reflects
  them; the commit index is only an optimisation and is written lazily once a
  second. They live in ``<path>.meta`` as one checksummed JSON record;
* compaction: PySyncObj calls ``deleteEntriesTo`` right after its snapshot
  (``fullDumpFile``) was renamed into place, without fsyncing it. We fsync the
  snapshot and its directory first, then write the remaining entries to
  ``<path>.compact``, fsync, rename it over the journal and fsync the directory,
  so after a crash either the old or the new journal is there, never a mix;
* loading a snapshot: PySyncObj (``__loadDumpFile``, at start-up and when a
  follower installs the leader's snapshot) calls ``clear()`` and then ``add``
  with the snapshot's last two entries. ``clear`` therefore only *stages* an
  empty log and leaves the file alone. If the next two ``add`` s are
  consecutive and the second one's (index, term) is an entry of the old log,
  the entries after it are kept (Raft §7: "if an existing log entry has the
  same index and term as the snapshot's last included entry, retain the log
  entries following it"); otherwise the log becomes just those two entries.
  Either way the new log is written through ``<path>.compact`` like a
  compaction (the snapshot is fsynced first), so a crash at any point leaves
  the old or the new log. This matters after a crash between the snapshot's
  rename and ``deleteEntriesTo``: the journal still starts before the
  snapshot, and without this the committed entries after it would be thrown
  away. Any other call after ``clear()`` first makes the staged log (empty or
  one entry) the real one, exactly as an immediate clear would have; closing
  with one staged entry leaves the old log, as a crash there would;
* on open, a torn tail (an append a crash cut short; never acknowledged) is
  truncated with a warning; a failed checksum raises
  :class:`~iris_raft._exceptions.CorruptFile`, or with ``allow_nuke`` the journal
  and its meta are moved aside and the node starts empty and catches up from
  its peers (the term and vote are carried over when the meta is readable, so
  the node cannot vote twice in one term);
* after an fsync error nothing more is written (the kernel may have dropped the
  pages): every later write raises until the process restarts and re-reads the
  file.

Memory: entries are indexed by five compact integer arrays (offset, length, idx,
term, membership flag); commands are read back with ``os.pread`` (checksum
verified again), and the most recent ones, which replication and apply read, are kept in a bounded
cache, so a long log does not live in RAM twice.

PySyncObj builds its journal itself, in ``SyncObj.__init__``, by calling the
module-level name ``pysyncobj.syncobj.createJournal(journalFile)``; there is no
parameter to pass one in. :func:`install_journal` therefore replaces that name
once with a function that hands out the journal registered for that exact path
and otherwise falls back to the original.

Threading: PySyncObj calls the journal from its constructor and then only from
its tick thread; the journal itself takes no locks.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import operator
import os
import struct
import threading
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex, overload

import pysyncobj.syncobj as syncobj_module
from pysyncobj.journal import Journal

from ._exceptions import CorruptFile
from ._records import (
    HEADER_SIZE,
    OPERATOR_ADVICE,
    atomic_write,
    encode_record,
    fsync_dir,
    iter_records,
    move_aside,
    scan_records,
    write_all,
)

log = logging.getLogger("iris_raft.journal")

#: One journal entry as PySyncObj sees it: ``(command, idx, term)``.
Entry = tuple[bytes, int, int]

_ENTRY = struct.Struct("<QQ")
#: First command byte of a PySyncObj membership change (add or remove a node).
_MEMBERSHIP = bytes([syncobj_module._COMMAND_TYPE.MEMBERSHIP])
_META_VERSION = 1
_COPY_CHUNK = 1 << 20
#: Default number and total size of recent commands kept in memory.
DEFAULT_CACHE_ENTRIES = 4096
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024


def _is_membership(command: bytes | memoryview) -> int:
    return 1 if bytes(command[:1]) == _MEMBERSHIP else 0


def _as_bytes(command: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(command, str):
        return command.encode("utf-8")
    return bytes(command)


class ChecksummedJournal(Journal):  # type: ignore[misc]
    """A durable ``pysyncobj.journal.Journal``; see the module comment for the rules.

    Opening raises :class:`CorruptFile` (unless ``allow_nuke``) and :class:`OSError`.
    """

    def __init__(
        self,
        path: str,
        *,
        dump_path: str | None,
        allow_nuke: bool = False,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.path = path
        self.dump_path = dump_path
        self.allow_nuke = allow_nuke
        self._meta_path = path + ".meta"
        self._compact_path = path + ".compact"
        self._directory = os.path.dirname(os.path.abspath(path))
        self._cache_limit = cache_entries
        self._cache_byte_limit = cache_bytes
        # Per entry: offset of its record, payload length, Raft idx and term, and
        # 1 for a membership change (else 0).
        self._offsets = array("q")
        self._lengths = array("q")
        self._idxs = array("q")
        self._terms = array("q")
        self._membership = array("B")
        self._end = 0
        # Commands of the last len(self._cache) entries.
        self._cache: deque[bytes] = deque()
        self._cache_size = 0
        self._current_term = 0
        self._voted_for: Any = None
        self._commit_index = 1
        self._meta_dirty = False
        self._failed: OSError | None = None
        self._fd: int | None = None
        # After clear(): the entries added since, which are not on disk yet (the
        # file still holds the old log); None otherwise. See _resolve_pair.
        self._staged: list[Entry] | None = None
        # After deleteEntriesFrom(): the position of the next entry an add() may
        # confirm (kept) or replace (truncated from there); None otherwise. See _walk.
        self._pending_from: int | None = None
        self._open()

    # ----------------------------------------------------------------- open

    def _open(self) -> None:
        for leftover in (self._compact_path, self._meta_path + ".tmp"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        meta: tuple[int, Any, int] | None = None
        meta_problem: CorruptFile | None = None
        try:
            meta = self._read_meta()
        except CorruptFile as exc:
            meta_problem = exc
        journal_problem: CorruptFile | None = None
        try:
            self._load()
        except CorruptFile as exc:
            journal_problem = exc
        if journal_problem is None and meta_problem is None:
            assert meta is not None
            self._current_term, self._voted_for, self._commit_index = meta
            self._clamp_commit_index()
            return
        problem = journal_problem or meta_problem
        assert problem is not None
        if not self.allow_nuke:
            self._close_fd()
            raise problem
        self._nuke(journal_problem, meta_problem, meta)

    def _load(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        existed = os.path.exists(self.path)
        self._fd = fd = os.open(self.path, flags, 0o644)
        if not existed:
            fsync_dir(self._directory)
        size = os.fstat(fd).st_size
        data = _pread_exact(fd, size, 0)
        end = 0
        for offset, payload in iter_records(data, self.path):
            if len(payload) < _ENTRY.size:
                raise CorruptFile(
                    f"{self.path}: record at byte {offset} is too short for a journal entry; "
                    f"{OPERATOR_ADVICE}",
                    path=self.path,
                    offset=offset,
                )
            idx, term = _ENTRY.unpack_from(payload)
            if self._idxs and idx != self._idxs[-1] + 1:
                raise CorruptFile(
                    f"{self.path}: entry at byte {offset} has index {idx}, expected "
                    f"{self._idxs[-1] + 1}; {OPERATOR_ADVICE}",
                    path=self.path,
                    offset=offset,
                )
            self._offsets.append(offset)
            self._lengths.append(len(payload))
            self._idxs.append(idx)
            self._terms.append(term)
            self._membership.append(_is_membership(payload[_ENTRY.size : _ENTRY.size + 1]))
            end = offset + HEADER_SIZE + len(payload)
        if end < size:
            log.warning(
                "%s: truncating a torn tail at byte %d (%d bytes of an append that never "
                "completed; it was not acknowledged)",
                self.path,
                end,
                size - end,
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
        self._end = end

    def _nuke(
        self,
        journal_problem: CorruptFile | None,
        meta_problem: CorruptFile | None,
        meta: tuple[int, Any, int] | None,
    ) -> None:
        self._close_fd()
        moved: list[str] = []
        if journal_problem is not None:
            moved.append(move_aside(self.path))
            self._reset_index()
        if os.path.exists(self._meta_path):
            moved.append(move_aside(self._meta_path))
        if journal_problem is not None and meta is not None:
            # A forgotten vote could let this node vote twice in one term.
            self._current_term, self._voted_for = meta[0], meta[1]
        self._commit_index = 1
        log.error(
            "allow_nuke: %s; moved %s aside; %s",
            "; ".join(p.message for p in (journal_problem, meta_problem) if p is not None),
            ", ".join(moved),
            "starting with an empty journal, this node will catch up from its peers"
            if journal_problem is not None
            else "the vote of the current term is forgotten; the term is taken from the log",
        )
        if journal_problem is not None:
            self._load()
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self._write_meta()

    def _columns(self) -> tuple[array[int], ...]:
        return self._offsets, self._lengths, self._idxs, self._terms, self._membership

    def _reset_index(self) -> None:
        for column in self._columns():
            del column[:]
        self._pending_from = None
        self._end = 0
        self._cache.clear()
        self._cache_size = 0

    def _read_meta(self) -> tuple[int, Any, int]:
        path = self._meta_path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0, None, 1
        scan = scan_records(data, path)
        if scan.torn_tail or len(scan.records) != 1:
            raise CorruptFile(
                f"{path}: the Raft meta file is incomplete; {OPERATOR_ADVICE}", path=path, offset=0
            )
        try:
            meta = json.loads(scan.records[0][1])
            term, voted_for, commit = (
                meta["currentTerm"],
                meta["votedForNodeId"],
                meta["raftCommitIndex"],
            )
            if not (isinstance(term, int) and isinstance(commit, int)) or term < 0:
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptFile(
                f"{path}: the Raft meta record does not parse ({exc}); {OPERATOR_ADVICE}",
                path=path,
                offset=0,
            ) from exc
        return term, voted_for, commit

    def _clamp_commit_index(self) -> None:
        """Keep the stored commit index within the log, written at once.

        Left above the end of a log that later grows again, it would mark entries
        committed that never were.
        """
        limit = max(1, self._idxs[-1] if self._idxs else 1)
        if self._commit_index > limit:
            self._commit_index = limit
            self._write_meta()

    def _write_meta(self) -> None:
        record = {
            "version": _META_VERSION,
            "currentTerm": self._current_term,
            "votedForNodeId": self._voted_for,
            "raftCommitIndex": self._commit_index,
        }
        payload = json.dumps(record, sort_keys=True, default=str).encode("utf-8")
        atomic_write(self._meta_path, encode_record(payload))
        self._meta_dirty = False

    # ---------------------------------------------------------------- write

    def _writable_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"journal {self.path} is closed")
        if self._failed is not None:
            raise OSError(
                self._failed.errno,
                f"journal {self.path} failed to sync earlier; restart the node: {self._failed}",
            )
        return self._fd

    def add(self, command: bytes, idx: int, term: int) -> None:
        """Append entry ``(command, idx, term)`` and fdatasync it before returning.

        After :meth:`deleteEntriesFrom`, the entry at its cursor with the same index
        and term is kept instead (nothing is written), and one with another term
        first truncates the log there (see :meth:`_walk`).

        Raises :class:`ValueError` if ``idx`` does not follow the last entry (or,
        after ``deleteEntriesFrom``, the last entry before the cursor) and
        :class:`OSError` on I/O errors (after a failed sync the journal refuses
        all further writes).
        """
        fd = self._writable_fd()
        if self._staged is not None:
            self._add_after_clear((_as_bytes(command), idx, term))
            return
        data = _as_bytes(command)
        if self._pending_from is not None and self._walk(data, idx, term):
            return
        if self._idxs and idx != self._idxs[-1] + 1:
            raise ValueError(f"journal entry {idx} does not follow entry {self._idxs[-1]}")
        payload = _ENTRY.pack(idx, term) + data
        record = encode_record(payload)
        try:
            write_all(fd, record, self._end)
        except OSError:
            try:
                os.ftruncate(fd, self._end)
            except OSError as exc:
                self._failed = exc
            raise
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._failed = exc
            raise
        self._offsets.append(self._end)
        self._lengths.append(len(payload))
        self._idxs.append(idx)
        self._terms.append(term)
        self._membership.append(_is_membership(data))
        self._end += len(record)
        self._cache.append(data)
        self._cache_size += len(data)
        self._trim_cache()

    def _trim_cache(self) -> None:
        while self._cache and (
            len(self._cache) > self._cache_limit or self._cache_size > self._cache_byte_limit
        ):
            self._cache_size -= len(self._cache.popleft())

    def _walk(self, data: bytes, idx: int, term: int) -> bool:
        """Handle ``add(data, idx, term)`` after :meth:`deleteEntriesFrom`; True if kept.

        At the cursor, an entry with the same index, term and command (its length;
        its bytes too when cached) is kept and the cursor moves on; another one
        (Raft §5.3: a conflict) truncates the log at the cursor and returns False
        for the caller to append. An ``add`` right after the last entry ends the
        walk, keeping every entry. Raises :class:`ValueError` for any other index,
        leaving the log and the cursor as they were; :class:`OSError` from the
        truncation.
        """
        position = self._pending_from
        assert position is not None
        count = len(self._idxs)
        if idx != self._idxs[position]:
            if idx == self._idxs[-1] + 1:
                self._pending_from = None
                return False
            raise ValueError(
                f"journal entry {idx} does not follow entry {self._idxs[position - 1]}"
            )
        if term == self._terms[position]:
            if self._same_command(position, data):
                position += 1
                self._pending_from = position if position < count else None
                return True
            log.error(
                "%s: the entry sent for index %d, term %d differs from the one stored; "
                "replacing it and the entries after it",
                self.path,
                idx,
                term,
            )
        if idx <= self._commit_index:
            # Committed entries never conflict (Raft §5.4): a bug or a damaged meta file.
            log.critical(
                "%s: entry %d (term %d) conflicts with the leader's (term %d) although the "
                "commit index is %d: removing committed entries",
                self.path,
                idx,
                self._terms[position],
                term,
                self._commit_index,
            )
        self._truncate(position)
        self._pending_from = None
        return False

    def _same_command(self, position: int, data: bytes) -> bool:
        if self._lengths[position] != _ENTRY.size + len(data):
            return False
        cached_from = len(self._offsets) - len(self._cache)
        if position >= cached_from:
            return self._cache[position - cached_from] == data
        return True

    def _truncate(self, position: int) -> None:
        """Drop entries ``position`` and later from the file (fsynced) and from memory."""
        fd = self._writable_fd()
        self._pending_from = None
        if position >= len(self._offsets):
            return
        new_end = self._offsets[position]
        try:
            os.ftruncate(fd, new_end)
            os.fsync(fd)
        except OSError as exc:
            self._failed = exc
            raise
        removed = len(self._offsets) - position
        for column in self._columns():
            del column[position:]
        self._end = new_end
        for _ in range(min(removed, len(self._cache))):
            self._cache_size -= len(self._cache.pop())
        self._clamp_commit_index()

    def clear(self) -> None:
        """Remove every entry, but keep the old ones on disk until the next ``add`` s show
        whether they are a snapshot's last two entries (see :meth:`_resolve_pair`).

        Until then the journal reads as empty (plus what was added since) and the
        file is untouched: a crash restores the old log.
        """
        self._writable_fd()
        self._settle()
        self._pending_from = None
        self._staged = []

    def _add_after_clear(self, entry: Entry) -> None:
        staged = self._staged
        assert staged is not None
        if not staged:
            _ENTRY.pack(entry[1], entry[2])  # raises now, as an append would, if out of range
            staged.append(entry)
            return
        if entry[1] != staged[-1][1] + 1:
            raise ValueError(f"journal entry {entry[1]} does not follow entry {staged[-1][1]}")
        self._resolve_pair(staged[0], entry)

    def _resolve_pair(self, entry0: Entry, entry1: Entry) -> None:
        """Replace the old log by ``[entry0, entry1]`` and, when ``entry1`` has the index and
        term of an old entry, the old entries after it (Raft §7), atomically.

        ``clear(); add(entry0); add(entry1)`` is how PySyncObj loads a snapshot whose
        last included entries are ``entry0`` and ``entry1``. The old entries before
        ``entry1`` are covered by the snapshot, so it is fsynced first (when it exists).
        Raises :class:`OSError`, leaving the old log and ``[entry0]`` staged.
        """
        _, idx, term = entry1
        count = len(self._idxs)
        keep_from = count
        if count:
            position = idx - self._idxs[0]
            if 0 <= position < count and self._terms[position] == term:
                keep_from = position + 1
        with contextlib.suppress(FileNotFoundError):  # no snapshot: a plain clear() and 2 adds
            self._sync_dump()
        self._rewrite([entry0, entry1], keep_from)
        self._staged = None
        kept = count - keep_from
        if kept:
            log.info(
                "%s: kept %d entries after the snapshot's last entry (index %d, term %d)",
                self.path,
                kept,
                idx,
                term,
            )
        self._clamp_commit_index()

    def _settle(self) -> None:
        """Make the log staged after ``clear()`` (empty or one entry) the real one, on disk."""
        staged = self._staged
        if staged is None:
            return
        self._rewrite(staged, len(self._idxs))
        self._staged = None
        self._clamp_commit_index()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Mark entries at positions ``entryFrom`` and later as replaceable (Raft §5.3).

        Nothing is removed yet: the following :meth:`add` s keep those that the
        leader sends again with the same term and truncate at the first one that
        conflicts (see :meth:`_walk`); without such an ``add`` all stay. Removed at
        once (truncated, fsynced): everything for ``entryFrom == 0``, and the entries
        from the first membership change at or after ``entryFrom`` (see the module
        comment). Replaces the cursor of an earlier call. Raises :class:`OSError`.
        """
        self._writable_fd()
        self._settle()
        self._pending_from = None
        position = max(0, entryFrom)
        if position >= len(self._offsets):
            return
        if position == 0:
            self._truncate(0)
            return
        try:
            membership_change = self._membership.index(1, position)
        except ValueError:
            pass
        else:
            idx = self._idxs[membership_change]
            log.log(
                logging.WARNING if idx <= self._commit_index else logging.INFO,
                "%s: removing the entries from index %d (commit index %d), a membership "
                "change whose effect PySyncObj has just undone, until the leader sends "
                "them again",
                self.path,
                idx,
                self._commit_index,
            )
            self._truncate(membership_change)
        if position < len(self._offsets):
            self._pending_from = position

    def deleteEntriesTo(self, entryTo: int) -> None:
        """Remove entries before position ``entryTo``: compaction after a snapshot.

        Fsyncs the snapshot file and its directory first, then rewrites the journal
        via ``<path>.compact``. Raises :class:`OSError` (for instance when the
        snapshot is missing), leaving the journal unchanged.
        """
        self._writable_fd()
        self._settle()
        self._pending_from = None
        position = min(max(0, entryTo), len(self._offsets))
        if position == 0:
            return
        self._sync_dump()
        self._rewrite([], position)

    def _rewrite(self, head: Sequence[Entry], keep_from: int) -> None:
        """Replace the journal by ``head`` followed by its entries from position ``keep_from``.

        Writes ``<path>.compact``, fsyncs it, renames it over the journal and fsyncs
        the directory, so a crash leaves the old or the new log. Raises
        :class:`OSError`; before the rename the journal is unchanged, a failure of the
        directory sync afterwards makes every later write fail.
        """
        fd = self._writable_fd()
        count = len(self._offsets)
        keep_from = min(max(0, keep_from), count)
        start = self._offsets[keep_from] if keep_from < count else self._end
        head_records = [encode_record(_ENTRY.pack(idx, term) + cmd) for cmd, idx, term in head]
        head_size = sum(len(r) for r in head_records)
        new_fd = os.open(
            self._compact_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            write_all(new_fd, b"".join(head_records), 0)
            offset = start
            while offset < self._end:
                chunk = os.pread(fd, min(_COPY_CHUNK, self._end - offset), offset)
                if not chunk:
                    raise OSError(f"{self.path} is shorter than expected")
                write_all(new_fd, chunk, head_size + offset - start)
                offset += len(chunk)
            os.fsync(new_fd)
            os.replace(self._compact_path, self.path)
        except BaseException:
            os.close(new_fd)
            raise
        self._fd = new_fd
        os.close(fd)
        offsets, position = array("q"), 0
        for record in head_records:
            offsets.append(position)
            position += len(record)
        offsets.extend(o - start + head_size for o in self._offsets[keep_from:])
        lengths = array("q", (len(r) - HEADER_SIZE for r in head_records))
        lengths.extend(self._lengths[keep_from:])
        idxs = array("q", (idx for _, idx, _ in head))
        idxs.extend(self._idxs[keep_from:])
        terms = array("q", (term for _, _, term in head))
        terms.extend(self._terms[keep_from:])
        membership = array("B", (_is_membership(command) for command, _, _ in head))
        membership.extend(self._membership[keep_from:])
        self._offsets, self._lengths, self._idxs, self._terms = offsets, lengths, idxs, terms
        self._membership = membership
        self._end += head_size - start
        # The cache holds the commands of the last len(cache) entries: those of the
        # kept entries that were cached, and the head's if all kept entries were.
        kept = count - keep_from
        cache = deque(list(self._cache)[max(0, len(self._cache) - kept) :])
        if len(cache) == kept:
            cache.extendleft(command for command, _, _ in reversed(head))
        self._cache = cache
        self._cache_size = sum(len(command) for command in cache)
        self._trim_cache()
        try:
            fsync_dir(self._directory)
        except OSError as exc:
            self._failed = exc
            raise

    def _sync_dump(self) -> None:
        if self.dump_path is None:
            return
        dump_fd = os.open(self.dump_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dump_fd)
        finally:
            os.close(dump_fd)
        fsync_dir(os.path.dirname(os.path.abspath(self.dump_path)))

    # ----------------------------------------------------------------- read

    def __len__(self) -> int:
        if self._staged is not None:
            return len(self._staged)
        return len(self._offsets)

    @overload
    def __getitem__(self, item: SupportsIndex) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: SupportsIndex | slice) -> Entry | list[Entry]:
        if self._staged is not None:
            if isinstance(item, slice):
                return self._staged[item]
            try:
                return self._staged[item]
            except IndexError:
                raise IndexError("journal index out of range") from None
        count = len(self._offsets)
        if isinstance(item, slice):
            start, stop, step = item.indices(count)
            if step == 1:
                return self._read_range(start, max(start, stop))
            return [self._read_range(i, i + 1)[0] for i in range(start, stop, step)]
        position = operator.index(item)
        if position < 0:
            position += count
        if not 0 <= position < count:
            raise IndexError("journal index out of range")
        return self._read_range(position, position + 1)[0]

    def _read_range(self, start: int, stop: int) -> list[Entry]:
        """Entries at positions ``start`` to ``stop`` (exclusive), from the cache or the file."""
        if self._fd is None:
            raise RuntimeError(f"journal {self.path} is closed")
        cached_from = len(self._offsets) - len(self._cache)
        entries: list[Entry] = []
        disk_stop = min(stop, max(start, cached_from))
        if start < disk_stop:
            base = self._offsets[start]
            last = disk_stop - 1
            size = self._offsets[last] + HEADER_SIZE + self._lengths[last] - base
            data = _pread_exact(self._fd, size, base)
            try:
                for i, (_, payload) in enumerate(iter_records(data, self.path)):
                    position = start + i
                    idx, term = _ENTRY.unpack_from(payload)
                    if (idx, term) != (self._idxs[position], self._terms[position]):
                        raise CorruptFile(
                            f"{self.path}: entry at byte {self._offsets[position]} changed on "
                            f"disk; {OPERATOR_ADVICE}",
                            path=self.path,
                            offset=self._offsets[position],
                        )
                    entries.append((bytes(payload[_ENTRY.size :]), idx, term))
            except CorruptFile as exc:
                raise CorruptFile(
                    f"{exc.message} (read back at journal byte {base + (exc.offset or 0)})",
                    path=self.path,
                    offset=base + (exc.offset or 0),
                ) from exc
            if len(entries) != disk_stop - start:
                raise CorruptFile(
                    f"{self.path}: journal entries at bytes {base}..{base + size} are "
                    f"incomplete on disk; {OPERATOR_ADVICE}",
                    path=self.path,
                    offset=base,
                )
        for position in range(max(start, cached_from), stop):
            entries.append(
                (
                    self._cache[position - cached_from],
                    self._idxs[position],
                    self._terms[position],
                )
            )
        return entries

    # ----------------------------------------------------------------- meta

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        """Remember the commit index; written lazily by :meth:`onOneSecondTimer`."""
        if raftCommitIndex != self._commit_index:
            self._commit_index = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return self._commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        """Store the term and vote durably before returning (Raft §5.1, Figure 2).

        Raises :class:`OSError`; the caller must then not send the vote or reply.
        """
        self._writable_fd()
        self._current_term = term
        self._voted_for = votedForNodeId
        self._write_meta()

    def getCurrentTerm(self) -> int:
        return self._current_term

    def getVotedForNodeId(self) -> Any:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        """Write a changed commit index (an optimisation: failures only log)."""
        self.flush()

    def flush(self) -> None:
        """Write pending meta; entries are durable already. Failures only log."""
        if not self._meta_dirty or self._fd is None:
            return
        try:
            self._write_meta()
        except OSError:
            log.warning("could not write %s; will retry", self._meta_path, exc_info=True)

    def _destroy(self) -> None:
        """Write pending meta and close the file. Idempotent.

        After ``clear()`` with nothing added since, the journal is emptied on disk
        first. With one entry added since, the old log stays (the pair that decides
        what to keep is incomplete, as if the node had crashed here). After
        ``deleteEntriesFrom`` every entry still in the log stays.
        """
        if self._fd is None:
            return
        if self._staged is not None and not self._staged:
            try:
                self._settle()
            except OSError:
                log.error(
                    "could not empty %s after clear(); it keeps its old entries",
                    self.path,
                    exc_info=True,
                )
        self.flush()
        self._close_fd()

    def close(self) -> None:
        """Same as ``_destroy`` (for use outside PySyncObj)."""
        self._destroy()

    def _close_fd(self) -> None:
        self._staged = None
        self._pending_from = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


# ----------------------------------------------------------------- snapshot


def verify_dump(path: str, *, allow_nuke: bool) -> None:
    """Check PySyncObj's snapshot (gzip of a pickle) without unpickling it.

    Reads the whole file through gzip, whose CRC-32 and length trailer catch
    corruption. A missing file is fine. Raises :class:`CorruptFile` unless
    ``allow_nuke``, in which case the file is moved aside with a warning (the node
    then rebuilds from its journal and peers). Run this before building the
    ``SyncObj``: PySyncObj logs a failed snapshot load and carries on with an
    empty state.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; the missing case returns early)
    except FileNotFoundError:
        return
    problem: str | None = None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            problem = "the file is empty"
        else:
            try:
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    while g.read(_COPY_CHUNK):
                        pass
            except (EOFError, zlib.error, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
    if problem is None:
        return
    error = CorruptFile(
        f"{path}: the Raft snapshot is damaged ({problem}); {OPERATOR_ADVICE}",
        path=path,
        offset=None,
    )
    if not allow_nuke:
        raise error
    aside = move_aside(path)
    log.error("allow_nuke: %s; moved it to %s", error.message, aside)


# ----------------------------------------------------------------- hooking


_registry: dict[str, ChecksummedJournal] = {}
_registry_lock = threading.Lock()
_original_create_journal: Callable[..., Any] | None = None


def _create_journal(journalFile: str | None = None) -> Any:
    if journalFile is not None:
        with _registry_lock:
            journal = _registry.pop(journalFile, None)
        if journal is not None:
            return journal
    assert _original_create_journal is not None
    return _original_create_journal(journalFile)


def install_journal(path: str, journal: ChecksummedJournal) -> None:
    """Make the next ``SyncObj`` built with ``journalFile=path`` use ``journal``.

    Hooks ``pysyncobj.syncobj.createJournal`` on first use (idempotent,
    thread-safe); other paths still get PySyncObj's own journals. A journal
    registered earlier for the same path and never taken is closed.
    """
    global _original_create_journal
    with _registry_lock:
        if syncobj_module.createJournal is not _create_journal:
            _original_create_journal = syncobj_module.createJournal
            syncobj_module.createJournal = _create_journal
        displaced = _registry.get(path)
        _registry[path] = journal
    if displaced is not None and displaced is not journal:
        displaced.close()
