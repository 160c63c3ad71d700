"""The checksummed Raft journal: list model, torn tails, bit flips, meta, snapshots, PySyncObj."""

from __future__ import annotations

import errno
import functools
import gzip
import logging
import os
import pickle
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

import pysyncobj.syncobj
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal, MemoryJournal
from pysyncobj.transport import Transport

from iris_raft import _journal
from iris_raft._exceptions import CorruptFile
from iris_raft._journal import ChecksummedJournal, install_journal, verify_dump
from iris_raft._records import HEADER_SIZE

Entry = tuple[bytes, int, int]
P = ParamSpec("P")


def _without_fsync(test: Callable[P, None]) -> Callable[P, None]:
    """For property tests, which simulate crashes by editing files: syncs only cost time there.

    Durability itself (what is synced, and when) has its own tests below.
    """

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", lambda fd: None)
            patch.setattr(os, "fdatasync", lambda fd: None)
            test(*args, **kwargs)

    return wrapper


def _record_size(command: bytes) -> int:
    return HEADER_SIZE + 16 + len(command)


def _fill(path: str, entries: list[Entry], **kw: Any) -> ChecksummedJournal:
    journal = ChecksummedJournal(path, dump_path=kw.pop("dump_path", None), **kw)
    for entry in entries:
        journal.add(*entry)
    return journal


def _entries(commands: list[bytes], first_idx: int = 1, term: int = 1) -> list[Entry]:
    return [(c, first_idx + i, term) for i, c in enumerate(commands)]


# ------------------------------------------------------------------ model test

#: Commands; some are PySyncObj membership changes (first byte 2), which a
#: deleteEntriesFrom truncates at once.
_command = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"", b"\x00a", b"\x00bb", b"\x00ccc", b"\x01", b"\x02rem"]),
)
#: Several (distinct) strategies, to weight appends over the other operations.
_adds = [
    st.tuples(st.just("add"), st.lists(_command, min_size=1, max_size=size), st.integers(1, 50))
    for size in range(3, 9)
]
operations = st.lists(
    st.one_of(
        *_adds,
        # PySyncObj's follower: deleteEntriesFrom, then the leader's entries from
        # there on, each the same entry (0), another term (1) or the same index and
        # term with another command (2); none for a heartbeat.
        st.tuples(
            st.just("from"),
            st.integers(-1, 3),
            st.lists(st.sampled_from([0, 0, 0, 1, 2]), max_size=4),
        ),
        st.tuples(st.just("from"), st.integers(-1, 3), st.just([0] * 6)),  # all sent again
        st.tuples(st.just("from"), st.integers(-1, 3), st.just([])),  # a heartbeat
        st.tuples(st.just("to"), st.floats(0, 1), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
        # PySyncObj loading a snapshot: clear() and add() its last two entries.
        st.tuples(st.just("snapshot"), st.floats(0, 1), st.booleans()),
        st.tuples(st.just("term"), st.integers(0, 3), st.sampled_from([None, "a:1", "b:2"])),
        st.tuples(st.just("commit"), st.floats(0, 1), st.none()),
        st.tuples(st.just("tick"), st.none(), st.none()),
        st.tuples(st.just("reopen"), st.none(), st.none()),
        st.tuples(st.just("crash"), st.none(), st.none()),
    ),
    max_size=30,
)


def _check_reads(journal: ChecksummedJournal, model: list[Entry]) -> None:
    assert len(journal) == len(model)
    assert journal[:] == model
    for i in range(len(model)):
        assert journal[i] == model[i]
        assert journal[i - len(model)] == model[i - len(model)]
        assert journal[i:] == model[i:]
        assert journal[i : i + 2] == model[i : i + 2]
    assert journal[::2] == model[::2]
    assert journal[len(model) + 3 :] == []
    with pytest.raises(IndexError):
        journal[len(model)]
    with pytest.raises(IndexError):
        journal[-len(model) - 1]


@given(operations, st.sampled_from([1, 3, 1000]))
@settings(max_examples=250, deadline=None)
@_without_fsync
def test_journal_matches_list_model(ops: list[tuple[str, Any, Any]], cache_entries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal")
        dump = os.path.join(tmp, "dump")
        Path(dump).write_bytes(b"snapshot")
        model: list[Entry] = []
        # After clear(): the log still on disk (None otherwise). The journal then
        # reads as `model` (empty, or one entry added since) and decides at the
        # second add, or at the next other change, what becomes of the old log.
        on_disk: list[Entry] | None = None
        # After deleteEntriesFrom: the position of the next entry an add can
        # confirm or replace (None otherwise). Entries from there on stay until an
        # add conflicts.
        pending: int | None = None
        term, vote, commit, persisted_commit = 0, None, 1, 1

        def open_journal() -> ChecksummedJournal:
            return ChecksummedJournal(path, dump_path=dump, cache_entries=cache_entries)

        def clamp(value: int) -> int:
            return max(1, min(value, model[-1][1] if model else 1))

        def lower_commit() -> None:  # lowered and written at once
            nonlocal commit, persisted_commit
            if commit != clamp(commit):
                commit = persisted_commit = clamp(commit)

        def settle() -> None:  # the staged log (empty or one entry) becomes the log
            nonlocal on_disk, pending
            pending = None
            if on_disk is not None:
                on_disk = None
                lower_commit()

        def clear() -> None:
            nonlocal on_disk
            journal.clear()
            settle()
            on_disk = list(model)
            model.clear()

        def add(entry: Entry) -> None:
            nonlocal on_disk, pending
            journal.add(*entry)
            pending = None  # an add after the last entry ends a walk, keeping all
            model.append(entry)
            if on_disk is not None and len(model) == 2:
                # Raft §7: an old entry with the index and term of the snapshot's last
                # entry keeps the old entries after it.
                _, idx, entry_term = entry
                match = [i for i, e in enumerate(on_disk) if e[1:] == (idx, entry_term)]
                kept = on_disk[match[0] + 1 :] if match else []
                model.extend(kept)
                event("snapshot pair: " + ("kept entries" if kept else "no entries kept"))
                on_disk = None
                lower_commit()

        journal = open_journal()
        try:
            for op, a, b in ops:
                if op == "add":
                    for command in a:
                        idx = model[-1][1] + 1 if model else b
                        add((command, idx, max([term] + [e[2] for e in model[-1:]])))
                elif op == "snapshot":
                    if len(model) >= 2:
                        position = int(a * (len(model) - 2))
                        entry0, (cmd, idx, entry_term) = model[position : position + 2]
                        entry1 = (cmd, idx, entry_term if b else entry_term + 1)
                    else:
                        entry0, entry1 = (b"s0", 7, term), (b"s1", 8, term)
                    clear()
                    add(entry0)
                    add(entry1)
                elif op == "from":  # a entries before the last one (-1: after it)
                    position = max(0, len(model) - 1 - a)
                    journal.deleteEntriesFrom(position)
                    settle()
                    if position == 0:  # nothing anchors the new entries: immediate
                        model.clear()
                    membership = [
                        i for i in range(position, len(model)) if model[i][0][:1] == b"\x02"
                    ]
                    if membership:  # PySyncObj rolled it back: truncated at once
                        del model[membership[0] :]
                        event("from: truncated at a membership change")
                    lower_commit()
                    pending = position if position < len(model) else None
                    for kind in b:
                        if pending is None:
                            break
                        command, idx, entry_term = model[pending]
                        if kind == 0:
                            journal.add(command, idx, entry_term)
                            pending = pending + 1 if pending + 1 < len(model) else None
                            event("resend: kept")
                            continue
                        if kind == 1:
                            entry = (command, idx, entry_term + 1)
                        else:
                            entry = (command + b"+", idx, entry_term)
                        journal.add(*entry)
                        del model[pending:]
                        model.append(entry)
                        pending = None
                        lower_commit()
                        event("resend: conflict")
                elif op == "to":
                    position = int(a * len(model))
                    journal.deleteEntriesTo(position)
                    settle()
                    del model[:position]
                elif op == "clear":
                    clear()
                elif op == "term":
                    term, vote = max(term, a), b
                    journal.setCurrentTerm(term, vote)
                    persisted_commit = commit
                elif op == "commit":  # PySyncObj never commits past the end of its log
                    commit = clamp(int(a * (model[-1][1] if model else 1)))
                    journal.setRaftCommitIndex(commit)
                elif op == "tick":
                    journal.onOneSecondTimer()
                    persisted_commit = commit
                else:
                    if op == "reopen":
                        journal._destroy()
                        if on_disk is not None and not model:
                            settle()  # a bare clear() empties the journal on close
                        persisted_commit = commit
                    else:  # crash: nothing more is written
                        journal._close_fd()
                    pending = None
                    if on_disk is not None:  # the old log is still on disk
                        model[:], on_disk = on_disk, None
                    journal = open_journal()
                    commit = persisted_commit = clamp(persisted_commit)
                assert journal.getRaftCommitIndex() == commit
                if op in ("reopen", "crash"):
                    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (term, vote)
                _check_reads(journal, model)
        finally:
            journal._destroy()
        if on_disk is not None and model:
            model[:] = on_disk
        assert os.path.getsize(path) == sum(_record_size(c) for c, _, _ in model)
        assert not os.path.exists(path + ".compact")


@pytest.mark.parametrize("cache_entries", [0, 2, 3, 10])
def test_truncating_entries_that_are_cached(tmp_path: Path, cache_entries: int) -> None:
    entries = _entries([b"a", b"b", b"c", b"d", b"e"])
    journal = _fill(str(tmp_path / "j"), entries, cache_entries=cache_entries)
    journal.deleteEntriesFrom(3)
    assert journal[:] == entries  # nothing conflicts yet
    journal.add(b"x", 4, 2)
    assert journal[:] == [*entries[:3], (b"x", 4, 2)]
    assert journal[-1] == (b"x", 4, 2)
    journal.close()


def test_add_rejects_a_gap_in_indexes(tmp_path: Path) -> None:
    journal = _fill(str(tmp_path / "j"), _entries([b"a", b"b"]))
    with pytest.raises(ValueError):
        journal.add(b"c", 5, 1)
    assert len(journal) == 2
    journal.close()


# ------------------------------------------------------------------ torn tails and bit flips


@given(st.lists(st.binary(max_size=16), min_size=1, max_size=4), st.integers(1, 100))
@settings(max_examples=15, deadline=None)
@_without_fsync
def test_truncation_at_every_offset(commands: list[bytes], first_idx: int) -> None:
    entries = _entries(commands, first_idx)
    with tempfile.TemporaryDirectory() as tmp:
        origin = os.path.join(tmp, "origin")
        _fill(origin, entries).close()
        ends: list[int] = []
        for c in commands:
            ends.append((ends[-1] if ends else 0) + _record_size(c))
        for cut in range(ends[-1] + 1):
            path = os.path.join(tmp, f"cut{cut}")
            shutil.copyfile(origin, path)
            os.truncate(path, cut)
            kept = sum(1 for end in ends if end <= cut)
            journal = ChecksummedJournal(path, dump_path=None)
            assert journal[:] == entries[:kept]
            assert os.path.getsize(path) == (ends[kept - 1] if kept else 0)
            next_idx = entries[kept - 1][1] + 1 if kept else 7
            journal.add(b"after", next_idx, 2)
            journal.close()
            journal = ChecksummedJournal(path, dump_path=None)
            assert journal[:] == [*entries[:kept], (b"after", next_idx, 2)]
            journal.close()


@given(
    st.lists(st.binary(max_size=16), min_size=1, max_size=4),
    st.booleans(),
    st.booleans(),
    st.data(),
)
@settings(max_examples=150, deadline=None)
@_without_fsync
def test_bit_flip_never_yields_a_different_entry(
    commands: list[bytes], torn: bool, allow_nuke: bool, data: st.DataObject
) -> None:
    entries = _entries(commands, first_idx=10, term=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal")
        journal = _fill(path, entries)
        journal.setCurrentTerm(4, "peer:1")
        journal.close()
        size = os.path.getsize(path)
        cut = data.draw(st.integers(1, size - 1), label="cut") if torn else size
        os.truncate(path, cut)
        spans, start = [], 0
        for c in commands:
            spans.append((start, start + _record_size(c)))
            start += _record_size(c)
        raw = bytearray(Path(path).read_bytes())
        bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
        raw[bit // 8] ^= 1 << (bit % 8)
        Path(path).write_bytes(bytes(raw))
        byte = bit // 8
        position = next(i for i, (s, e) in enumerate(spans) if s <= byte < e)
        rec_start, rec_end = spans[position]
        in_torn_record = rec_end > cut
        detected = not in_torn_record or (
            byte < rec_start + HEADER_SIZE and cut >= rec_start + HEADER_SIZE
        )
        complete = sum(1 for _, e in spans if e <= cut)
        if not detected:
            journal = ChecksummedJournal(path, dump_path=None, allow_nuke=allow_nuke)
            assert journal[:] == entries[:complete]
            journal.close()
            return
        if not allow_nuke:
            with pytest.raises(CorruptFile) as info:
                ChecksummedJournal(path, dump_path=None)
            assert info.value.offset == rec_start
            assert info.value.path == path
            return
        journal = ChecksummedJournal(path, dump_path=None, allow_nuke=True)
        assert len(journal) == 0
        assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (4, "peer:1")
        moved = sorted(n for n in os.listdir(tmp) if ".corrupt-" in n)
        assert [n.split(".corrupt-")[0] for n in moved] == ["journal", "journal.meta"]
        journal.add(b"fresh", 1, 5)
        journal.close()
        journal = ChecksummedJournal(path, dump_path=None)
        assert journal[:] == [(b"fresh", 1, 5)]
        assert journal.getCurrentTerm() == 4
        journal.close()


def test_corruption_message_tells_the_operator_what_to_do(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    _fill(path, _entries([b"one", b"two"])).close()
    raw = bytearray(Path(path).read_bytes())
    raw[_record_size(b"one") + HEADER_SIZE + 16] ^= 0x04
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(CorruptFile) as info:
        ChecksummedJournal(path, dump_path=None)
    assert path in info.value.message
    assert "allow_table_nuke = true" in info.value.message
    assert info.value.offset == _record_size(b"one")


def test_torn_tail_is_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "journal")
    _fill(path, _entries([b"one", b"two"])).close()
    os.truncate(path, os.path.getsize(path) - 1)
    with caplog.at_level(logging.WARNING, logger="iris_raft.journal"):
        journal = ChecksummedJournal(path, dump_path=None)
    assert journal[:] == _entries([b"one"])
    assert any("torn tail" in r.getMessage() for r in caplog.records)
    journal.close()


def test_disk_rot_after_open_is_detected_on_read(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _entries([b"old", b"new"]), cache_entries=1)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 16)
        f.write(b"OLD")
    with pytest.raises(CorruptFile):
        journal[0]
    assert journal[1] == (b"new", 2, 1)  # served from the cache
    journal.close()


# ------------------------------------------------------------------ durability


def test_each_add_is_fdatasynced_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "journal")
    journal = ChecksummedJournal(path, dump_path=None)
    synced_sizes: list[int] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced_sizes.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    journal.add(b"a", 1, 1)
    journal.add(b"bb", 2, 1)
    assert synced_sizes == [_record_size(b"a"), _record_size(b"a") + _record_size(b"bb")]
    journal.close()


def test_sync_failure_refuses_further_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = _fill(str(tmp_path / "journal"), _entries([b"a"]))

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError):
        journal.add(b"b", 2, 1)
    monkeypatch.undo()
    assert journal[:] == _entries([b"a"])
    with pytest.raises(OSError, match="restart"):
        journal.add(b"b", 2, 1)
    with pytest.raises(OSError):
        journal.setCurrentTerm(9, None)
    journal.close()


def test_delete_entries_to_fsyncs_the_snapshot_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, dump = str(tmp_path / "journal"), str(tmp_path / "snap" / "dump")
    os.mkdir(tmp_path / "snap")
    Path(dump).write_bytes(b"snapshot")
    journal = _fill(path, _entries([b"a", b"b", b"c", b"d"]), dump_path=dump)
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    journal.deleteEntriesTo(2)
    assert synced[:3] == [dump, str(tmp_path / "snap"), path + ".compact"]
    assert synced[-1] == str(tmp_path)
    assert journal[:] == [(b"c", 3, 1), (b"d", 4, 1)]
    journal.add(b"e", 5, 1)
    journal.close()
    journal = ChecksummedJournal(path, dump_path=dump)
    assert journal[:] == [(b"c", 3, 1), (b"d", 4, 1), (b"e", 5, 1)]
    journal.deleteEntriesTo(99)
    assert journal[:] == []
    journal.close()
    assert sorted(os.listdir(tmp_path)) == ["journal", "snap"]


def test_delete_entries_to_without_the_snapshot_changes_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _entries([b"a", b"b"]), dump_path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        journal.deleteEntriesTo(1)
    assert journal[:] == _entries([b"a", b"b"])
    journal.close()


def test_leftover_compact_file_is_ignored(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    _fill(path, _entries([b"a"])).close()
    Path(path + ".compact").write_bytes(b"half written")
    journal = ChecksummedJournal(path, dump_path=None)
    assert journal[:] == _entries([b"a"])
    assert not os.path.exists(path + ".compact")
    journal.close()


# ------------------------------------------------------------------ loading a snapshot
#
# PySyncObj's __loadDumpFile (start-up, or a follower installing the leader's
# snapshot) does clear(); add(entry0); add(entry1) with the snapshot's last two
# entries. The journal keeps the old entries after an old entry with entry1's
# index and term (Raft §7), and never leaves a log without them on disk.


def _log(count: int = 10) -> list[Entry]:
    """Entries 1..count; term 1 up to index 4, term 2 after."""
    return [(f"cmd{i}".encode(), i, 1 if i <= 4 else 2) for i in range(1, count + 1)]


def _snapshot_setup(tmp_path: Path, **kw: Any) -> tuple[str, str, ChecksummedJournal]:
    path, dump = str(tmp_path / "journal"), str(tmp_path / "dump")
    Path(dump).write_bytes(b"snapshot")
    journal = _fill(path, _log(), dump_path=dump, **kw)
    journal.setRaftCommitIndex(9)
    journal.onOneSecondTimer()
    return path, dump, journal


def _reopened(path: str) -> tuple[list[Entry], int]:
    journal = ChecksummedJournal(path, dump_path=None)
    try:
        return journal[:], journal.getRaftCommitIndex()
    finally:
        journal.close()


@pytest.mark.parametrize("cache_entries", [0, 1, 3, 1000])
def test_snapshot_pair_matching_an_entry_keeps_the_entries_after_it(
    tmp_path: Path, cache_entries: int
) -> None:
    path, _, journal = _snapshot_setup(tmp_path, cache_entries=cache_entries)
    old = _log()
    journal.clear()
    assert len(journal) == 0
    assert journal[:] == []
    journal.add(*old[4])
    assert journal[:] == [old[4]]
    assert journal[-1] == old[4]
    journal.add(*old[5])
    assert journal[:] == old[4:]  # entries 5..10
    _check_reads(journal, old[4:])
    assert journal.getRaftCommitIndex() == 9
    journal.add(b"cmd11", 11, 2)
    assert journal[-2:] == [old[9], (b"cmd11", 11, 2)]
    journal.close()
    assert _reopened(path) == ([*old[4:], (b"cmd11", 11, 2)], 9)
    assert not os.path.exists(path + ".compact")


@pytest.mark.parametrize(
    ("entry0", "entry1"),
    [
        ((b"x5", 5, 2), (b"x6", 6, 3)),  # entry 6 has another term
        ((b"x3", 3, 1), (b"x4", 4, 2)),  # entry 4 has another term
        ((b"s11", 11, 2), (b"s12", 12, 2)),  # past the end of the log
        ((b"s0", 0, 0), (b"s1", 1, 0)),
    ],
)
def test_snapshot_pair_matching_nothing_leaves_only_the_pair(
    tmp_path: Path, entry0: Entry, entry1: Entry
) -> None:
    path, _, journal = _snapshot_setup(tmp_path)
    journal.clear()
    journal.add(*entry0)
    journal.add(*entry1)
    assert journal[:] == [entry0, entry1]
    commit = min(9, max(1, entry1[1]))  # lowered to the end of the log, and written
    assert journal.getRaftCommitIndex() == commit
    assert _reopened(path) == ([entry0, entry1], commit)
    journal.close()


def test_snapshot_pair_before_the_start_of_the_log_matches_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _log()[5:])  # entries 6..10
    journal.clear()
    journal.add(*_log()[2])
    journal.add(*_log()[3])
    assert journal[:] == _log()[2:4]
    journal.close()
    assert _reopened(path)[0] == _log()[2:4]


def test_snapshot_pair_matching_the_first_or_the_last_entry(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _log()[5:])  # entries 6..10
    journal.clear()
    journal.add(*_log()[4])  # entry 5 is not in this log; entry 6 is
    journal.add(*_log()[5])
    assert journal[:] == _log()[4:]
    journal.clear()
    journal.add(*_log()[8])
    journal.add(*_log()[9])
    assert journal[:] == _log()[8:]
    journal.close()
    assert _reopened(path)[0] == _log()[8:]


def test_other_calls_after_clear_behave_as_an_immediate_clear(tmp_path: Path) -> None:
    path, _, journal = _snapshot_setup(tmp_path)
    # A plain add of index 1 (a new term): nothing matches, as before.
    journal.clear()
    journal.add(b"x", 1, 5)
    journal.add(b"y", 2, 5)
    assert journal[:] == [(b"x", 1, 5), (b"y", 2, 5)]
    assert journal.getRaftCommitIndex() == 2
    journal.add(b"z", 3, 5)
    journal.close()
    assert _reopened(path) == ([(b"x", 1, 5), (b"y", 2, 5), (b"z", 3, 5)], 2)

    # clear() and close: empty.
    journal = ChecksummedJournal(path, dump_path=None)
    journal.clear()
    journal.close()
    assert _reopened(path) == ([], 1)

    # One add, then another change: the staged entry is the log.
    changes: list[tuple[Callable[[ChecksummedJournal], None], list[Entry]]] = [
        (lambda j: j.deleteEntriesFrom(1), [_log()[1]]),
        (lambda j: j.deleteEntriesTo(0), [_log()[1]]),
        (lambda j: j.deleteEntriesFrom(0), []),
        (lambda j: j.clear(), []),
    ]
    for change, expected in changes:
        journal = _fill(path, _log()[:3])
        journal.clear()
        journal.add(*_log()[1])
        journal.setCurrentTerm(3, "a:1")  # the meta alone decides nothing
        journal.onOneSecondTimer()
        assert journal[:] == [_log()[1]]
        change(journal)
        assert journal[:] == expected
        journal.close()
        assert _reopened(path)[0] == expected
        os.unlink(path)

    # A gap after the first add is refused, as before; the pair can still follow.
    journal = _fill(path, _log())
    journal.clear()
    journal.add(*_log()[4])
    with pytest.raises(ValueError):
        journal.add(*_log()[6])
    assert journal[:] == [_log()[4]]
    journal.add(*_log()[5])
    assert journal[:] == _log()[4:]
    # An entry that cannot be stored is refused at once, as an append would be.
    journal.clear()
    with pytest.raises(struct.error):
        journal.add(b"bad", -1, 1)
    assert journal[:] == []
    journal.add(*_log()[4])
    journal.add(*_log()[5])
    assert journal[:] == _log()[4:]
    journal.close()


def test_close_between_the_two_adds_keeps_the_old_log(tmp_path: Path) -> None:
    path, _, journal = _snapshot_setup(tmp_path)
    journal.clear()
    journal.add(*_log()[4])
    journal.close()  # as a crash would: the pair is incomplete
    assert _reopened(path) == (_log(), 9)


def test_failed_snapshot_pair_keeps_the_old_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, journal = _snapshot_setup(tmp_path)
    journal.clear()
    journal.add(*_log()[4])
    real = os.fsync

    def broken(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".compact"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        journal.add(*_log()[5])
    monkeypatch.undo()
    assert journal[:] == [_log()[4]]
    assert _reopened(path) == (_log(), 9)
    journal.add(*_log()[5])  # a retry completes the pair
    assert journal[:] == _log()[4:]
    journal.close()
    assert _reopened(path) == (_log()[4:], 9)


def test_snapshot_pair_fsyncs_the_snapshot_before_replacing_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, dump, journal = _snapshot_setup(tmp_path)
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync " + os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        calls.append(f"replace {src}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    journal.clear()
    journal.add(*_log()[4])
    assert calls == []  # nothing is written before the pair is complete
    journal.add(*_log()[5])
    assert calls == [
        f"fsync {dump}",
        f"fsync {tmp_path}",
        f"fsync {path}.compact",
        f"replace {path}.compact",
        f"fsync {tmp_path}",
    ]
    journal.close()


@given(
    st.integers(1, 8),
    st.integers(1, 30),
    st.lists(st.integers(0, 1), min_size=8, max_size=8),
    st.integers(-2, 9),
    st.booleans(),
    st.sampled_from([0, 2, 1000]),
)
@settings(max_examples=60, deadline=None)
@_without_fsync
def test_snapshot_pair_property(
    count: int,
    first_idx: int,
    term_steps: list[int],
    offset: int,
    same_term: bool,
    cache_entries: int,
) -> None:
    terms = [1 + sum(term_steps[: i + 1]) for i in range(count)]
    old = [(f"c{i}".encode(), first_idx + i, terms[i]) for i in range(count)]
    idx = max(1, first_idx + offset)  # entry1's index: inside the log, or around it
    position = idx - first_idx
    term = (terms[position] if 0 <= position < count else 1) + (0 if same_term else 1)
    entry0, entry1 = (b"snap0", idx - 1, term), (b"snap1", idx, term)
    keeps = 0 <= position < count and same_term
    expected = [entry0, entry1, *(old[position + 1 :] if keeps else [])]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal")
        journal = _fill(path, old, cache_entries=cache_entries)
        journal.setRaftCommitIndex(old[-1][1])
        journal.clear()
        journal.add(*entry0)
        journal.add(*entry1)
        _check_reads(journal, expected)
        assert journal.getRaftCommitIndex() == max(1, min(old[-1][1], expected[-1][1]))
        journal.add(b"next", expected[-1][1] + 1, term + 1)
        expected.append((b"next", expected[-1][1] + 1, term + 1))
        _check_reads(journal, expected)
        journal.close()
        assert _reopened(path)[0] == expected
        assert os.path.getsize(path) == sum(_record_size(c) for c, _, _ in expected)


# Crash simulation: the files as they are at a given moment are copied to a fresh
# directory and opened there, as a restarted node would.


def _disk_state(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _open_state(state: dict[str, bytes], directory: Path) -> list[Entry]:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    for name, data in state.items():
        (directory / name).write_bytes(data)
    journal = ChecksummedJournal(str(directory / "journal"), dump_path=None)
    try:
        return journal[:]
    finally:
        journal.close()


@pytest.mark.parametrize("same_term", [True, False])
def test_crash_at_each_step_of_a_snapshot_load(tmp_path: Path, same_term: bool) -> None:
    live = tmp_path / "live"
    live.mkdir()
    old = _log()
    entry0, entry1 = old[4], old[5] if same_term else (b"other6", 6, 3)
    new = [entry0, entry1, *(old[6:] if same_term else [])]
    journal = _fill(str(live / "journal"), old, dump_path=str(live / "dump"))
    (live / "dump").write_bytes(b"snapshot")
    after: dict[str, list[Entry]] = {}
    journal.clear()
    after["clear"] = _open_state(_disk_state(live), tmp_path / "crashed")
    journal.add(*entry0)
    after["add entry0"] = _open_state(_disk_state(live), tmp_path / "crashed")
    journal.add(*entry1)
    after["add entry1"] = _open_state(_disk_state(live), tmp_path / "crashed")
    journal.close()
    assert after == {"clear": old, "add entry0": old, "add entry1": new}
    if same_term:
        assert all(log[-4:] == old[6:] for log in after.values())  # 7..10 never lost


@pytest.mark.parametrize(
    "scenario", ["matching pair", "other pair", "clear and add", "clear and close"]
)
def test_crash_at_every_write_of_a_snapshot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    """Every state the files pass through (after each write, sync, rename or truncate)
    opens as the old or the new log; the old journal file is never written in place."""
    live = tmp_path / "live"
    live.mkdir()
    path = str(live / "journal")
    old = _log()
    (live / "dump").write_bytes(b"snapshot")
    journal = _fill(path, old, dump_path=str(live / "dump"))
    journal.setRaftCommitIndex(9)
    journal.onOneSecondTimer()
    old_bytes = Path(path).read_bytes()
    old_inode = os.stat(path).st_ino
    states = [_disk_state(live)]

    def recording(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kw: Any) -> Any:
            result = real(*args, **kw)
            states.append(_disk_state(live))
            if os.stat(path).st_ino == old_inode:
                assert Path(path).read_bytes() == old_bytes
            return result

        return call

    for name in ("open", "write", "pwrite", "fsync", "fdatasync", "replace", "rename"):
        monkeypatch.setattr(os, name, recording(name))
    monkeypatch.setattr(os, "ftruncate", lambda *a: pytest.fail("truncated in place"))
    if scenario == "matching pair":
        journal.clear()
        journal.add(*old[4])
        journal.add(*old[5])
        new = old[4:]
    elif scenario == "other pair":
        journal.clear()
        journal.add(*old[4])
        journal.add(b"other6", 6, 3)
        new = [old[4], (b"other6", 6, 3)]
    elif scenario == "clear and add":
        journal.clear()
        journal.add(b"x", 1, 5)
        journal.deleteEntriesFrom(1)
        new = [(b"x", 1, 5)]
    else:
        journal.clear()
        journal._destroy()
        new = []
    if scenario != "clear and close":
        assert journal[:] == new
    monkeypatch.undo()
    journal.close()
    assert len(states) > 5
    seen = [_open_state(state, tmp_path / "crashed") for state in states]
    assert all(log in (old, new) for log in seen), seen
    assert seen[0] == old
    assert seen[-1] == new
    # The step from the old log to the new one is the rename, nothing before it.
    switch = seen.index(new)
    assert "journal.compact" in states[switch - 1]
    assert "journal.compact" not in states[switch]
    assert all(log == old for log in seen[:switch])
    assert all(log == new for log in seen[switch:])


# ------------------------------------------------------------------ conflicts (Raft §5.3)
#
# PySyncObj's follower, on append_entries(prevLogIdx, entries), calls
# deleteEntriesFrom(position of prevLogIdx + 1) whenever its log goes on after
# prevLogIdx, without looking at terms, and then add()s the entries. The leader
# (appendEntriesUseBatch=False) often sends entries again that the follower has
# acknowledged already. Only a conflicting entry (same index, another term) may
# remove entries.

_COMMAND_TYPE = pysyncobj.syncobj._COMMAND_TYPE
_NO_OP = bytes([_COMMAND_TYPE.NO_OP])


def _regular(i: int) -> bytes:
    return bytes([_COMMAND_TYPE.REGULAR]) + pickle.dumps(("set", f"k{i}", i))


def _membership(change: str, node: str) -> bytes:
    return bytes([_COMMAND_TYPE.MEMBERSHIP]) + pickle.dumps([change, node])


def _no_writes(patch: pytest.MonkeyPatch) -> None:
    """Fail the test on any change to a file."""
    for name in ("write", "pwrite", "fsync", "fdatasync", "ftruncate", "truncate", "replace"):

        def refuse(*args: Any, _name: str = name) -> None:
            pytest.fail(f"os.{_name} was called")

        patch.setattr(os, name, refuse)


@pytest.mark.parametrize("cache_entries", [0, 3, 1000])
def test_entries_sent_again_are_kept_without_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_entries: int
) -> None:
    path = str(tmp_path / "journal")
    old = _log()
    journal = _fill(path, old, cache_entries=cache_entries)
    with monkeypatch.context() as patch:
        _no_writes(patch)
        journal.deleteEntriesFrom(6)  # prevLogIdx 6
        _check_reads(journal, old)  # nothing conflicts yet
        journal.add(*old[6])  # entry 7 again
        journal.add(*old[7])  # entry 8 again
        _check_reads(journal, old)
        journal.deleteEntriesFrom(8)  # prevLogIdx 8, then the rest again: the walk ends
        journal.add(*old[8])
        journal.add(*old[9])
        _check_reads(journal, old)
        assert _reopened(path)[0] == old  # a crash here loses nothing
    journal.add(b"cmd11", 11, 2)  # past the end: appended
    assert journal[-2:] == [old[9], (b"cmd11", 11, 2)]
    journal.close()
    assert _reopened(path)[0] == [*old, (b"cmd11", 11, 2)]


@pytest.mark.parametrize("cache_entries", [0, 1000])
def test_a_conflicting_entry_truncates_the_log_from_there(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cache_entries: int,
) -> None:
    path = str(tmp_path / "journal")
    old = _log()  # term 1 up to index 4, term 2 after
    journal = _fill(path, old, cache_entries=cache_entries)
    journal.setRaftCommitIndex(5)
    journal.onOneSecondTimer()
    journal.deleteEntriesFrom(3)  # prevLogIdx 3
    journal.add(*old[3])  # entry 4: the same, kept
    calls: list[tuple[str, int]] = []
    for name in ("ftruncate", "fsync", "fdatasync"):
        real = getattr(os, name)

        def call(fd: int, *args: Any, _name: str = name, _real: Any = real) -> None:
            _real(fd, *args)
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                calls.append((_name, os.fstat(fd).st_size))

        monkeypatch.setattr(os, name, call)
    with caplog.at_level(logging.INFO, logger="iris_raft.journal"):
        journal.add(b"new5", 5, 3)  # entry 5 in another term: 5..10 go
    monkeypatch.undo()
    # The commit index said 5: a committed entry cannot conflict, so this is loud.
    assert [r.levelname for r in caplog.records] == ["CRITICAL"]
    assert "removing committed entries" in caplog.records[0].getMessage()
    kept = sum(_record_size(c) for c, _, _ in old[:4])
    assert calls == [
        ("ftruncate", kept),
        ("fsync", kept),
        ("fdatasync", kept + _record_size(b"new5")),
    ]
    assert journal[:] == [*old[:4], (b"new5", 5, 3)]
    assert journal.getRaftCommitIndex() == 4  # lowered with the truncation, and written
    assert _reopened(path) == ([*old[:4], (b"new5", 5, 3)], 4)
    journal.add(b"new6", 6, 3)  # the walk is over: a plain append
    journal.close()
    assert _reopened(path)[0] == [*old[:4], (b"new5", 5, 3), (b"new6", 6, 3)]


@pytest.mark.parametrize(
    ("cache_entries", "command"),
    [(1000, b"cmdX"), (0, b"another length")],  # compared in full only when cached
)
def test_an_entry_sent_again_with_another_command_replaces_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cache_entries: int, command: bytes
) -> None:
    path = str(tmp_path / "journal")
    old = _log()
    journal = _fill(path, old, cache_entries=cache_entries)
    journal.deleteEntriesFrom(6)
    with caplog.at_level(logging.ERROR, logger="iris_raft.journal"):
        journal.add(command, 7, 2)
    assert any("differs from the one stored" in r.getMessage() for r in caplog.records)
    assert journal[:] == [*old[:6], (command, 7, 2)]
    journal.close()
    assert _reopened(path)[0] == [*old[:6], (command, 7, 2)]


def test_without_a_conflict_every_entry_stays(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    old = _log()
    journal = _fill(path, old)
    journal.deleteEntriesFrom(2)  # a heartbeat: no entries follow
    assert journal[:] == old
    journal.close()
    assert _reopened(path)[0] == old

    journal = ChecksummedJournal(path, dump_path=None)
    journal.deleteEntriesFrom(2)
    journal.add(b"cmd11", 11, 2)  # the next append_entries (prevLogIdx 10) appends
    assert journal[:] == [*old, (b"cmd11", 11, 2)]
    with pytest.raises(ValueError):  # the walk is over: entry 3 is not replaced
        journal.add(b"x", 3, 9)
    # Another deleteEntriesFrom replaces the cursor, earlier or later.
    journal.deleteEntriesFrom(8)
    journal.deleteEntriesFrom(4)
    journal.add(*old[4])  # entry 5: kept
    with pytest.raises(ValueError):  # a gap is refused and changes nothing
        journal.add(b"x", 7, 3)
    assert journal[:] == [*old, (b"cmd11", 11, 2)]
    journal.add(b"x6", 6, 3)  # the walk goes on: a conflict at 6
    assert journal[:] == [*old[:5], (b"x6", 6, 3)]
    # Past the end nothing is pending; from position 0 (nothing anchors the new
    # entries; PySyncObj never does it) the log is emptied at once.
    journal.deleteEntriesFrom(6)
    journal.deleteEntriesFrom(99)
    journal.add(b"x7", 7, 3)
    assert journal[:] == [*old[:5], (b"x6", 6, 3), (b"x7", 7, 3)]
    assert _reopened(path)[0] == journal[:]
    journal.deleteEntriesFrom(0)
    assert journal[:] == []
    assert _reopened(path)[0] == []
    journal.add(b"y", 20, 4)
    journal.close()
    assert _reopened(path)[0] == [(b"y", 20, 4)]


def test_pending_conflict_check_and_snapshot_loads(tmp_path: Path) -> None:
    path, _, journal = _snapshot_setup(tmp_path)
    old = _log()
    # A walk, then PySyncObj loads the leader's snapshot (6, 7): the walk ends, and
    # the entries after 7 stay (Raft §7).
    journal.deleteEntriesFrom(3)
    journal.add(*old[3])
    journal.clear()
    assert journal[:] == []
    journal.add(*old[5])
    journal.add(*old[6])
    assert journal[:] == old[5:]
    # A cursor, then compaction: the walk ends, every entry stays.
    journal.deleteEntriesFrom(2)  # entry 8
    journal.deleteEntriesTo(1)
    assert journal[:] == old[6:]
    with pytest.raises(ValueError):
        journal.add(b"x", 8, 3)
    journal.add(b"cmd11", 11, 2)
    # A walk over a log that a snapshot load has just replaced.
    journal.clear()
    journal.add(*old[8])
    journal.add(*old[9])  # entry 10 matches: 11 stays
    assert journal[:] == [*old[8:], (b"cmd11", 11, 2)]
    journal.deleteEntriesFrom(1)  # prevLogIdx 9
    journal.add(*old[9])
    journal.add(b"y11", 11, 3)
    assert journal[:] == [*old[8:], (b"y11", 11, 3)]
    # clear() and one add, then deleteEntriesFrom: the staged entry is the log.
    journal.clear()
    journal.add(*old[9])
    journal.deleteEntriesFrom(1)
    assert journal[:] == [old[9]]
    journal.add(b"z", 11, 3)
    journal.close()
    assert _reopened(path)[0] == [old[9], (b"z", 11, 3)]


def test_a_membership_change_after_the_cursor_is_truncated_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    log = [(_regular(i), i, 1) for i in range(1, 11)]
    log[6] = (_membership("add", "10.0.0.4:4321"), 7, 1)
    journal = _fill(path, log)
    journal.deleteEntriesFrom(7)  # prevLogIdx 7: only entries after the change
    journal.add(*log[7])
    assert journal[:] == log
    # prevLogIdx 3: PySyncObj has rolled back what entries 4.. did, 7 among them.
    journal.deleteEntriesFrom(3)
    assert journal[:] == log[:6]
    assert _reopened(path)[0] == log[:6]
    for entry in log[3:]:  # sent again: 4..6 are kept, 7.. appended
        journal.add(*entry)
    assert journal[:] == log
    journal.close()
    # The flags are read back from the file and survive a compaction.
    journal = ChecksummedJournal(path, dump_path=None)
    journal.deleteEntriesTo(2)
    journal.deleteEntriesFrom(1)  # prevLogIdx 3
    assert journal[:] == log[2:6]
    journal.close()
    assert _reopened(path)[0] == log[2:6]


@given(
    st.lists(st.integers(0, 2), min_size=1, max_size=8),
    st.integers(1, 8),
    st.lists(st.sampled_from(["same", "same", "term", "command"]), max_size=10),
    st.sampled_from([0, 2, 1000]),
)
@settings(max_examples=60, deadline=None)
@_without_fsync
def test_conflict_walk_property(
    term_steps: list[int], cursor: int, walk: list[str], cache_entries: int
) -> None:
    """After every call the journal, and the file as a crash leaves it, hold the old
    entries up to the first conflict (all of them if there is none)."""
    terms = [1 + sum(term_steps[: i + 1]) for i in range(len(term_steps))]
    old = [(f"c{i}".encode(), i + 1, term) for i, term in enumerate(terms)]
    position = min(cursor, len(old))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal")
        journal = _fill(path, old, cache_entries=cache_entries)
        journal.deleteEntriesFrom(position)
        expected = list(old)
        at: int | None = position if position < len(old) else None
        conflict: int | None = None
        for kind in walk:
            if at is None:  # the walk is over: a plain append
                _, idx, term = expected[-1]
                entry = (b"n", idx + 1, term + (kind == "term"))
                journal.add(*entry)
                expected.append(entry)
            elif kind == "same":
                journal.add(*expected[at])
                at = at + 1 if at + 1 < len(expected) else None
            else:
                command, idx, term = expected[at]
                entry = (command, idx, term + 1) if kind == "term" else (command + b"!", idx, term)
                journal.add(*entry)
                del expected[at:]
                expected.append(entry)
                conflict, at = idx, None
            _check_reads(journal, expected)
            assert _reopened(path)[0] == expected
            first_changed = conflict if conflict is not None else len(old) + 1
            assert expected[: first_changed - 1] == old[: first_changed - 1]
        journal.close()


@pytest.mark.parametrize("conflict", [False, True])
def test_crash_at_every_write_of_a_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conflict: bool
) -> None:
    """Every state the file passes through holds every entry before the conflict, and
    the entries after it until the truncation that replaces them."""
    live = tmp_path / "live"
    live.mkdir()
    path = str(live / "journal")
    old = _log()
    journal = _fill(path, old)
    states = [_disk_state(live)]

    def recording(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any, **kw: Any) -> Any:
            result = real(*args, **kw)
            states.append(_disk_state(live))
            return result

        return call

    for name in ("open", "write", "pwrite", "fsync", "fdatasync", "ftruncate", "replace"):
        monkeypatch.setattr(os, name, recording(name))
    journal.deleteEntriesFrom(4)  # prevLogIdx 4
    journal.add(*old[4])  # entry 5 again
    if conflict:
        journal.add(b"new6", 6, 3)
        journal.add(b"new7", 7, 3)
        new = [*old[:5], (b"new6", 6, 3), (b"new7", 7, 3)]
    else:
        journal.add(*old[5])
        new = old
    monkeypatch.undo()
    journal.close()
    seen = [_open_state(state, tmp_path / "crashed") for state in states]
    if not conflict:
        assert len(states) == 1  # nothing was written at all
        assert seen == [old]
        return
    assert seen[0] == old
    assert seen[-1] == new
    allowed = [old, old[:5], new[:6], new]
    assert all(log in allowed for log in seen), seen
    assert [allowed.index(log) for log in seen] == sorted(allowed.index(log) for log in seen)


def test_replay_of_the_lost_write_bug_keeps_the_acknowledged_entry(tmp_path: Path) -> None:
    """The journal calls PySyncObj made in the bug (3 lost writes in 69 stress runs).

    A follower holds and has acknowledged entries 1..N+2. A delayed success reply
    moved the leader's next index for it back to N+1, so the leader sends entry N+1
    again with prevLogIdx N. PySyncObj calls __deleteEntriesFrom(N + 1), that is
    deleteEntriesFrom(N) (positions count from the first entry, index 1), then
    add(entry N+1). kill -9 of every node right then: entry N+2 must still be on
    disk, or a leader elected among the followers may not have it.
    """
    n = 20
    log = [(_NO_OP, 1, 1), *((_regular(i), i, 1) for i in range(2, n + 3))]
    live = tmp_path / "live"
    live.mkdir()
    journal = _fill(str(live / "journal"), log)
    journal.setCurrentTerm(1, None)
    journal.setRaftCommitIndex(n + 2)
    journal.deleteEntriesFrom(n)
    journal.add(*log[n])
    crashed = _open_state(_disk_state(live), tmp_path / "crashed")  # the files as they are
    assert crashed == log
    assert crashed[-1][1] == n + 2
    journal.close()


# ------------------------------------------------------------------ meta


def test_term_and_vote_are_durable_before_set_current_term_returns(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = ChecksummedJournal(path, dump_path=None)
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (0, None)
    assert journal.getRaftCommitIndex() == 1
    journal.setCurrentTerm(7, "10.0.0.2:4321")
    # A second reader (as after a crash) sees it without any close or flush.
    other = ChecksummedJournal(path, dump_path=None)
    assert (other.getCurrentTerm(), other.getVotedForNodeId()) == (7, "10.0.0.2:4321")
    other.close()
    journal.close()


def test_commit_index_is_written_lazily(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _entries([b"a", b"b", b"c"]))
    journal.setRaftCommitIndex(3)
    crashed = ChecksummedJournal(path, dump_path=None)
    assert crashed.getRaftCommitIndex() == 1
    crashed.close()
    journal.onOneSecondTimer()
    reopened = ChecksummedJournal(path, dump_path=None)
    assert reopened.getRaftCommitIndex() == 3
    reopened.close()
    journal.close()


def test_commit_index_is_clamped_to_the_log(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _entries([b"a", b"b", b"c"]))
    journal.setRaftCommitIndex(3)
    journal.deleteEntriesFrom(1)
    assert journal.getRaftCommitIndex() == 3  # nothing removed yet
    journal.add(b"x", 2, 2)  # a conflict: entries 2 and 3 go
    crashed = ChecksummedJournal(path, dump_path=None)  # lowered and written at once
    assert crashed.getRaftCommitIndex() == 1
    crashed.close()
    journal.close()
    journal = ChecksummedJournal(path, dump_path=None)
    assert journal.getRaftCommitIndex() == 1
    assert journal[:] == [(b"a", 1, 1), (b"x", 2, 2)]
    journal.close()


def test_failed_lazy_meta_write_only_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = _fill(str(tmp_path / "journal"), _entries([b"a", b"b"]))
    journal.setRaftCommitIndex(2)

    def broken(path: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_journal, "atomic_write", broken)
    with caplog.at_level(logging.WARNING, logger="iris_raft.journal"):
        journal.onOneSecondTimer()
    assert any("will retry" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError):
        journal.setCurrentTerm(2, None)  # the term must not be reported stored
    monkeypatch.undo()
    journal.close()


def test_corrupt_meta(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = _fill(path, _entries([b"a", b"b"], term=6))
    journal.setCurrentTerm(6, "x:1")
    journal.close()
    raw = bytearray(Path(path + ".meta").read_bytes())
    raw[-2] ^= 0x20
    Path(path + ".meta").write_bytes(bytes(raw))
    with pytest.raises(CorruptFile) as info:
        ChecksummedJournal(path, dump_path=None)
    assert info.value.path == path + ".meta"
    journal = ChecksummedJournal(path, dump_path=None, allow_nuke=True)
    assert journal[:] == _entries([b"a", b"b"], term=6)  # the log is intact and kept
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (0, None)
    assert any(".meta.corrupt-" in n for n in os.listdir(tmp_path))
    journal.close()
    ChecksummedJournal(path, dump_path=None).close()


# ------------------------------------------------------------------ snapshot


def _gzip_pickle(value: object) -> bytes:
    return gzip.compress(pickle.dumps(value))


def test_verify_dump_accepts_good_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "dump"
    verify_dump(str(path), allow_nuke=False)
    path.write_bytes(_gzip_pickle({"k": list(range(1000))}))
    verify_dump(str(path), allow_nuke=False)
    assert path.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b[:-1],
        lambda b: b"",
        lambda b: b"not gzip at all",
        lambda b: b[:20] + bytes([b[20] ^ 0xFF]) + b[21:],
        lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:],  # stored CRC
        lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:],  # stored length
    ],
)
def test_verify_dump_detects_damage(tmp_path: Path, damage: Any) -> None:
    path = tmp_path / "dump"
    damaged = damage(_gzip_pickle({"k": list(range(1000))}))
    path.write_bytes(damaged)
    with pytest.raises(CorruptFile) as info:
        verify_dump(str(path), allow_nuke=False)
    assert info.value.path == str(path)
    assert "allow_table_nuke" in info.value.message
    verify_dump(str(path), allow_nuke=True)
    assert not path.exists()
    (aside,) = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside.read_bytes() == damaged


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_verify_dump_bit_flips(data: st.DataObject) -> None:
    original = pickle.dumps({"k": list(range(200)), "s": "x" * 50})
    compressed = bytearray(gzip.compress(original))
    bit = data.draw(st.integers(0, len(compressed) * 8 - 1))
    compressed[bit // 8] ^= 1 << (bit % 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dump")
        Path(path).write_bytes(bytes(compressed))
        try:
            verify_dump(path, allow_nuke=False)
        except CorruptFile:
            return
        # Accepted only when the flip hit an unchecked header field (mtime, flags):
        # the content is still exactly the original.
        assert gzip.decompress(bytes(compressed)) == original


# ------------------------------------------------------------------ hooking into PySyncObj


def test_install_journal_hands_out_registered_journals_once(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    journal = ChecksummedJournal(path, dump_path=None)
    install_journal(path, journal)
    install_journal(path, journal)  # idempotent
    hook = pysyncobj.syncobj.createJournal
    assert pysyncobj.syncobj.createJournal(path) is journal
    # Not registered (any more): PySyncObj's own journals.
    other = pysyncobj.syncobj.createJournal(str(tmp_path / "plain"))
    assert isinstance(other, FileJournal)
    other._destroy()
    assert isinstance(pysyncobj.syncobj.createJournal(None), MemoryJournal)
    threads = [
        threading.Thread(
            target=install_journal,
            args=(
                str(tmp_path / f"j{i}"),
                ChecksummedJournal(str(tmp_path / f"j{i}"), dump_path=None),
            ),
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pysyncobj.syncobj.createJournal is hook
    for i in range(8):
        taken = pysyncobj.syncobj.createJournal(str(tmp_path / f"j{i}"))
        assert isinstance(taken, ChecksummedJournal)
        taken.close()
    journal.close()


def test_install_journal_closes_a_displaced_journal(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    first = ChecksummedJournal(path, dump_path=None)
    second = ChecksummedJournal(path, dump_path=None)
    install_journal(path, first)
    install_journal(path, second)
    with pytest.raises(RuntimeError):
        first.add(b"x", 1, 1)
    assert pysyncobj.syncobj.createJournal(path) is second
    second.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Counter(SyncObj):  # type: ignore[misc]
    # A class attribute, so that entries applied by the tick thread before
    # __init__ returns find it; the instance attribute is what gets snapshotted.
    _value = 0

    def __init__(self, journal_path: str, dump_path: str) -> None:
        conf = SyncObjConf(
            journalFile=journal_path,
            fullDumpFile=dump_path,
            appendEntriesUseBatch=False,
            autoTick=True,
            useFork=False,
            appendEntriesPeriod=0.02,
            raftMinTimeout=0.1,
            raftMaxTimeout=0.2,
        )
        super().__init__(f"127.0.0.1:{_free_port()}", [], conf)

    @replicated  # type: ignore[untyped-decorator]
    def incr(self, n: int) -> int:
        self._value += n
        return self._value


class _CompactionSpy(ChecksummedJournal):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.compacted = threading.Event()

    def deleteEntriesTo(self, entryTo: int) -> None:
        super().deleteEntriesTo(entryTo)
        self.compacted.set()


def _start(journal_path: str, dump_path: str, journal: ChecksummedJournal) -> _Counter:
    verify_dump(dump_path, allow_nuke=journal.allow_nuke)
    install_journal(journal_path, journal)
    return _Counter(journal_path, dump_path)


def _stop(node: _Counter) -> None:
    node.destroy()
    thread = node._SyncObj__thread
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_pysyncobj_restarts_from_the_checksummed_journal(tmp_path: Path) -> None:
    journal_path, dump_path = str(tmp_path / "journal"), str(tmp_path / "dump")
    journal = ChecksummedJournal(journal_path, dump_path=dump_path)
    node = _start(journal_path, dump_path, journal)
    try:
        for i in range(1, 31):
            assert node.incr(1, sync=True, timeout=5) == i
    finally:
        _stop(node)
    assert journal._fd is None  # PySyncObj closed it through _destroy
    assert not os.path.exists(dump_path)

    node = _start(journal_path, dump_path, ChecksummedJournal(journal_path, dump_path=dump_path))
    try:
        # A command through the log is applied after every earlier entry.
        assert node.incr(0, sync=True, timeout=5) == 30
        assert node.incr(1, sync=True, timeout=5) == 31
    finally:
        _stop(node)


def test_pysyncobj_restarts_after_log_compaction(tmp_path: Path) -> None:
    journal_path, dump_path = str(tmp_path / "journal"), str(tmp_path / "dump")
    journal = _CompactionSpy(journal_path, dump_path=dump_path)
    node = _start(journal_path, dump_path, journal)
    try:
        for _ in range(20):
            node.incr(1, sync=True, timeout=5)
        node.forceLogCompaction()
        assert journal.compacted.wait(5)
        for _ in range(5):
            node.incr(1, sync=True, timeout=5)
    finally:
        _stop(node)
    verify_dump(dump_path, allow_nuke=False)
    reopened = ChecksummedJournal(journal_path, dump_path=dump_path)
    assert 2 <= len(reopened) <= 10  # the snapshot's two entries and what followed
    reopened.close()

    node = _start(journal_path, dump_path, ChecksummedJournal(journal_path, dump_path=dump_path))
    try:
        assert node.incr(0, sync=True, timeout=5) == 25
    finally:
        _stop(node)

    # A corrupt journal with allow_nuke: the node comes back from the snapshot
    # alone (a single node has no peers to fetch the rest from).
    raw = bytearray(Path(journal_path).read_bytes())
    raw[HEADER_SIZE + 3] ^= 0x01
    Path(journal_path).write_bytes(bytes(raw))
    with pytest.raises(CorruptFile):
        ChecksummedJournal(journal_path, dump_path=dump_path)
    nuked = ChecksummedJournal(journal_path, dump_path=dump_path, allow_nuke=True)
    node = _start(journal_path, dump_path, nuked)
    try:
        assert node.incr(0, sync=True, timeout=5) == 20
    finally:
        _stop(node)


class _CrashWindow(ChecksummedJournal):
    """Keeps a copy of the journal as it is when PySyncObj is about to compact it: the
    new snapshot is in place, the journal still holds everything before it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.before_compaction = self.path + ".before-compaction"
        self.compacted = threading.Event()

    def deleteEntriesTo(self, entryTo: int) -> None:
        if not self.compacted.is_set():
            shutil.copyfile(self.path, self.before_compaction)
        super().deleteEntriesTo(entryTo)
        self.compacted.set()


def test_pysyncobj_crash_between_snapshot_and_compaction_loses_no_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal_path, dump_path = str(tmp_path / "journal"), str(tmp_path / "dump")
    journal = _CrashWindow(journal_path, dump_path=dump_path)
    node = _start(journal_path, dump_path, journal)
    try:
        for i in range(1, 21):
            assert node.incr(1, sync=True, timeout=5) == i
        node.forceLogCompaction()
        assert journal.compacted.wait(5)
        assert os.path.exists(dump_path)
        for i in range(21, 26):  # after the snapshot point
            assert node.incr(1, sync=True, timeout=5) == i
    finally:
        _stop(node)

    # The crash window: the snapshot is in place, the journal was never compacted,
    # and the entries after the snapshot point were appended to it.
    compacted = ChecksummedJournal(journal_path, dump_path=None)
    before = ChecksummedJournal(journal.before_compaction, dump_path=None)
    snapshot_end = before[-1][1]
    assert before[0][1] == 1
    assert compacted[0][1] < snapshot_end < compacted[-1][1]
    for entry in compacted[:]:
        if entry[1] > snapshot_end:
            before.add(*entry)
    restored = before[:]
    before.close()
    compacted.close()
    os.replace(journal.before_compaction, journal_path)

    caplog.set_level(logging.INFO)
    node = _start(journal_path, dump_path, ChecksummedJournal(journal_path, dump_path=dump_path))
    try:
        assert node.incr(0, sync=True, timeout=5) == 25  # every write survived
    finally:
        _stop(node)
    messages = [r.getMessage() for r in caplog.records]
    assert any("entries after the snapshot's last entry" in m for m in messages), messages
    assert not any("exceeds journal end" in m for m in messages), messages  # no clamp needed
    kept = [entry for entry in restored if entry[1] >= snapshot_end - 1]
    reopened = ChecksummedJournal(journal_path, dump_path=None)
    assert reopened[: len(kept)] == kept  # the snapshot's two entries and all that followed
    reopened.close()


# PySyncObj's own append_entries handler, driven message by message: a follower
# with a transport that only records what it sends (no sockets, no threads).


class _RecordingTransport(Transport):  # type: ignore[misc]
    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self.sent: list[dict[str, Any]] = []

    def send(self, node: Any, message: dict[str, Any]) -> bool:
        self.sent.append(message)
        return True

    def tryGetReady(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    def waitReady(self) -> None:
        pass

    def addNode(self, node: Any) -> None:
        pass

    def dropNode(self, node: Any) -> None:
        pass

    def destroy(self) -> None:
        pass


class _Follower:
    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        path = str(directory / "journal")
        self.journal = ChecksummedJournal(path, dump_path=None)
        install_journal(path, self.journal)
        conf = SyncObjConf(
            journalFile=path,
            appendEntriesUseBatch=False,
            autoTick=False,
            dynamicMembershipChange=True,
        )
        self.node = SyncObj(
            "127.0.0.1:1", ["127.0.0.1:2", "127.0.0.1:3"], conf, transportClass=_RecordingTransport
        )
        self.leader = next(n for n in self.node._SyncObj__otherNodes if n.id == "127.0.0.1:2")

    def append_entries(
        self, term: int, prev: tuple[int, int], entries: list[Entry], commit_index: int
    ) -> dict[str, Any]:
        self.node._SyncObj__onMessageReceived(
            self.leader,
            {
                "type": "append_entries",
                "term": term,
                "commit_index": commit_index,
                "entries": entries,
                "prevLogIdx": prev[0],
                "prevLogTerm": prev[1],
            },
        )
        reply: dict[str, Any] = self.node._SyncObj__transport.sent[-1]
        return reply

    @property
    def commit_index(self) -> int:
        index: int = self.node._SyncObj__raftCommitIndex
        return index

    @property
    def members(self) -> set[str]:
        return {n.id for n in self.node._SyncObj__otherNodes}

    def after_kill_9(self, scratch: Path) -> list[Entry]:
        return _open_state(_disk_state(self.directory), scratch)

    def close(self) -> None:
        self.node._doDestroy()
        notifier = getattr(self.node, "_SyncObj__pipeNotifier", None)
        if notifier is not None:  # the pipe that appendEntriesUseBatch=False adds
            os.close(notifier._PipeNotifier__pipeR)
            os.close(notifier._PipeNotifier__pipeW)


def test_pysyncobj_follower_keeps_acknowledged_entries_sent_again(tmp_path: Path) -> None:
    follower = _Follower(tmp_path / "live")
    try:
        log = [(_NO_OP, 1, 0), (_NO_OP, 2, 1), *((_regular(i), i, 1) for i in range(3, 9))]
        assert follower.journal[:] == log[:1]  # PySyncObj's first entry
        # One append_entries per entry, as appendEntriesUseBatch=False sends them.
        for entry in log[1:]:
            prev = log[entry[1] - 2][1:]
            reply = follower.append_entries(1, prev, [entry], commit_index=1)
            assert (reply["success"], reply["next_node_idx"]) == (True, entry[1] + 1)
        # A delayed reply moved the leader's next index back to 7: 7 comes again.
        reply = follower.append_entries(1, (6, 1), [log[6]], commit_index=8)
        assert (reply["success"], reply["next_node_idx"]) == (True, 8)  # counts what was sent
        assert follower.journal[:] == log  # 8 is still there...
        assert follower.commit_index == 8  # ...and within the commit index: the same entry
        assert follower.after_kill_9(tmp_path / "crashed") == log  # and on disk
        reply = follower.append_entries(1, (7, 1), [log[7]], commit_index=8)
        assert follower.journal[:] == log
        # A new leader (term 2) lacks 8 and appended its no-op there: a conflict.
        reply = follower.append_entries(2, (7, 1), [(_NO_OP, 8, 2)], commit_index=7)
        assert (reply["success"], reply["next_node_idx"]) == (True, 9)
        assert follower.journal[:] == [*log[:7], (_NO_OP, 8, 2)]
        assert follower.after_kill_9(tmp_path / "crashed") == follower.journal[:]
        reply = follower.append_entries(2, (8, 2), [], commit_index=8)  # heartbeat
        assert follower.commit_index == 8
    finally:
        follower.close()


def test_pysyncobj_follower_membership_stays_in_step_with_the_log(tmp_path: Path) -> None:
    follower = _Follower(tmp_path / "live")
    try:
        added = "127.0.0.1:4"
        log = [
            (_NO_OP, 1, 0),
            (_NO_OP, 2, 1),
            (_regular(3), 3, 1),
            (_membership("add", added), 4, 1),
            (_regular(5), 5, 1),
        ]
        follower.append_entries(1, (1, 0), log[1:], commit_index=1)
        assert added in follower.members
        # Entry 3 again: PySyncObj undoes what 3.. did (the node goes) and re-applies
        # only what it adds (3), so the journal drops the change and what follows.
        reply = follower.append_entries(1, (2, 1), [log[2]], commit_index=1)
        assert (reply["success"], reply["next_node_idx"]) == (True, 4)
        assert added not in follower.members
        assert follower.journal[:] == log[:3]
        follower.append_entries(1, (3, 1), log[3:], commit_index=1)
        assert added in follower.members
        assert follower.journal[:] == log
        # A re-send that starts after the change keeps it, and the node.
        follower.append_entries(1, (4, 1), [log[4]], commit_index=5)
        assert added in follower.members
        assert follower.journal[:] == log
    finally:
        follower.close()
