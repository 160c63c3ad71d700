"""The checksummed Raft journal: list model, torn tails, bit flips, meta, snapshots, PySyncObj."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import pickle
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal, MemoryJournal

from iris_raft import _journal
from iris_raft._exceptions import CorruptFile
from iris_raft._journal import ChecksummedJournal, install_journal, verify_dump
from iris_raft._records import HEADER_SIZE

Entry = tuple[bytes, int, int]


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

operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.binary(max_size=12), st.integers(1, 50)),
        st.tuples(st.just("from"), st.floats(0, 1), st.none()),
        st.tuples(st.just("to"), st.floats(0, 1), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
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
@settings(max_examples=60, deadline=None)
def test_journal_matches_list_model(ops: list[tuple[str, Any, Any]], cache_entries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal")
        dump = os.path.join(tmp, "dump")
        Path(dump).write_bytes(b"snapshot")
        model: list[Entry] = []
        term, vote, commit, persisted_commit = 0, None, 1, 1

        def open_journal() -> ChecksummedJournal:
            return ChecksummedJournal(path, dump_path=dump, cache_entries=cache_entries)

        def clamp(value: int) -> int:
            return max(1, min(value, model[-1][1] if model else 1))

        journal = open_journal()
        try:
            for op, a, b in ops:
                if op == "add":
                    idx = model[-1][1] + 1 if model else b
                    entry_term = max([term] + [e[2] for e in model[-1:]])
                    journal.add(a, idx, entry_term)
                    model.append((a, idx, entry_term))
                elif op == "from":
                    position = int(a * len(model))
                    journal.deleteEntriesFrom(position)
                    del model[position:]
                    if commit != clamp(commit):  # lowered and written at once
                        commit = persisted_commit = clamp(commit)
                elif op == "to":
                    position = int(a * len(model))
                    journal.deleteEntriesTo(position)
                    del model[:position]
                elif op == "clear":
                    journal.clear()
                    model.clear()
                    if commit != clamp(commit):
                        commit = persisted_commit = clamp(commit)
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
                        persisted_commit = commit
                    else:  # crash: nothing more is written
                        journal._close_fd()
                    journal = open_journal()
                    commit = persisted_commit = clamp(persisted_commit)
                assert journal.getRaftCommitIndex() == commit
                if op in ("reopen", "crash"):
                    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (term, vote)
                _check_reads(journal, model)
        finally:
            journal._destroy()
        assert os.path.getsize(path) == sum(_record_size(c) for c, _, _ in model)
        assert not os.path.exists(path + ".compact")


def test_add_rejects_a_gap_in_indexes(tmp_path: Path) -> None:
    journal = _fill(str(tmp_path / "j"), _entries([b"a", b"b"]))
    with pytest.raises(ValueError):
        journal.add(b"c", 5, 1)
    assert len(journal) == 2
    journal.close()


# ------------------------------------------------------------------ torn tails and bit flips


@given(st.lists(st.binary(max_size=16), min_size=1, max_size=4), st.integers(1, 100))
@settings(max_examples=15, deadline=None)
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
    journal.close()
    journal = ChecksummedJournal(path, dump_path=None)
    assert journal.getRaftCommitIndex() == 1
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
