"""The WAL against a list-of-records model: replay, torn tails, bit flips, group commit."""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ParamSpec

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_raft._exceptions import CorruptFile
from iris_raft._records import HEADER_SIZE
from iris_raft._wal import (
    DurableLog,
    WriteAheadLog,
    filesystem_type,
    filesystem_type_from_mounts,
    is_volatile_filesystem,
    open_wal,
    segment_name,
)

Record = tuple[int, bytes]
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


batches_strategy = st.lists(
    st.lists(st.binary(max_size=24), min_size=1, max_size=4), min_size=1, max_size=6
)


def _open(directory: str, **kw: object) -> tuple[WriteAheadLog, list[Record]]:
    wal = WriteAheadLog(directory, **kw)  # type: ignore[arg-type]
    return wal, wal.open()


def _build(
    directory: str, batches: Sequence[Sequence[bytes]], *, segment_bytes: int, drain_to: int = 0
) -> list[Record]:
    """Write ``batches`` (synced), mark ``drain_to`` drained; return every record written."""
    wal, pending = _open(directory, segment_bytes=segment_bytes)
    assert pending == []
    records: list[Record] = []
    for batch in batches:
        last = wal.append(batch)
        wal.sync()
        records.extend(zip(range(last - len(batch) + 1, last + 1), batch, strict=True))
    if drain_to:
        wal.mark_drained(drain_to)
    wal.close()
    return records


def _segments(directory: str) -> list[tuple[int, str]]:
    """``(first lsn, path)`` of each segment, in order."""
    return sorted(
        (int(name[4:24]), os.path.join(directory, name))
        for name in os.listdir(directory)
        if name.startswith("wal-") and name.endswith(".log")
    )


def _layout(directory: str, records: list[Record]) -> list[tuple[str, list[tuple[int, int, int]]]]:
    """From the model: per segment on disk, ``(path, [(lsn, start, end) of each record])``."""
    by_lsn = dict(records)
    segments = _segments(directory)
    last_lsn = records[-1][0] if records else 0
    layout = []
    for i, (first, path) in enumerate(segments):
        stop = segments[i + 1][0] if i + 1 < len(segments) else last_lsn + 1
        offset, spans = 0, []
        for lsn in range(first, stop):
            end = offset + HEADER_SIZE + 8 + len(by_lsn[lsn])
            spans.append((lsn, offset, end))
            offset = end
        layout.append((path, spans))
    return layout


# ------------------------------------------------------------------ model tests


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.lists(st.binary(max_size=16), max_size=4)),
            st.tuples(st.just("drain"), st.floats(min_value=0, max_value=1)),
            st.tuples(st.just("reopen"), st.none()),
        ),
        max_size=25,
    ),
    st.sampled_from([40, 120, 1 << 20]),
)
@settings(max_examples=60, deadline=None)
@_without_fsync
def test_replay_matches_model(ops: list[tuple[str, object]], segment_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "wal")
        records: list[Record] = []
        drained = 0
        wal, pending = _open(directory, segment_bytes=segment_bytes)
        assert pending == []
        try:
            for op, arg in ops:
                if op == "append":
                    assert isinstance(arg, list)
                    last = wal.append(arg)
                    wal.sync()
                    first = (records[-1][0] if records else 0) + 1
                    assert last == first + len(arg) - 1
                    records.extend(zip(range(first, last + 1), arg, strict=True))
                elif op == "drain":
                    assert isinstance(arg, float)
                    lsn = int(arg * (records[-1][0] if records else 0))
                    wal.mark_drained(lsn)
                    drained = max(drained, lsn)
                else:
                    wal.close()
                    wal, pending = _open(directory, segment_bytes=segment_bytes)
                    assert pending == [r for r in records if r[0] > drained]
                assert wal.backlog == sum(1 for r in records if r[0] > drained)
                assert wal.last_lsn == (records[-1][0] if records else 0)
                if op != "append":
                    # After mark_drained or open only the segment being written may
                    # hold nothing but drained records.
                    segments = _segments(directory)
                    assert len(segments) == 1 or segments[1][0] - 1 > drained
        finally:
            wal.close()
        wal, pending = _open(directory, segment_bytes=segment_bytes)
        assert pending == [r for r in records if r[0] > drained]
        assert wal.append([b"next"]) == (records[-1][0] if records else 0) + 1
        wal.close()


@given(batches_strategy, st.sampled_from([60, 1 << 20]), st.data())
@settings(max_examples=12, deadline=None)
@_without_fsync
def test_truncating_last_segment_at_every_offset(
    batches: list[list[bytes]], segment_bytes: int, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        origin = os.path.join(tmp, "origin")
        records = _build(origin, batches, segment_bytes=segment_bytes)
        drain_to = data.draw(st.integers(0, len(records)), label="drain_to")
        if drain_to:
            wal, _ = _open(origin, segment_bytes=segment_bytes)
            wal.mark_drained(drain_to)
            wal.close()
        last_path, spans = _layout(origin, records)[-1]
        size = os.path.getsize(last_path)
        for cut in range(size + 1):
            directory = os.path.join(tmp, f"cut{cut}")
            shutil.copytree(origin, directory)
            target = os.path.join(directory, os.path.basename(last_path))
            os.truncate(target, cut)
            complete = [(lsn, end) for lsn, _, end in spans if end <= cut]
            lost = {lsn for lsn, _, end in spans if end > cut}
            expected = [r for r in records if r[0] > drain_to and r[0] not in lost]
            wal, pending = _open(directory, segment_bytes=segment_bytes)
            assert pending == expected
            if os.path.exists(target):
                assert os.path.getsize(target) == (complete[-1][1] if complete else 0)
            else:  # a segment holding only drained records is deleted
                assert all(lsn <= drain_to for lsn, _ in complete)
            new_lsn = wal.append([b"after"])
            assert new_lsn == max(spans[0][0] + len(complete), drain_to + 1)
            wal.sync()
            wal.close()
            _, pending = _open(directory, segment_bytes=segment_bytes)
            assert pending == [*expected, (new_lsn, b"after")]
            shutil.rmtree(directory)


@given(
    st.lists(st.lists(st.binary(max_size=24), min_size=1, max_size=4), min_size=2, max_size=4),
    st.data(),
)
@settings(max_examples=12, deadline=None)
@_without_fsync
def test_truncating_an_earlier_segment_is_corruption(
    batches: list[list[bytes]], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        origin = os.path.join(tmp, "origin")
        records = _build(origin, batches, segment_bytes=1)  # one segment per batch
        layout = _layout(origin, records)
        assert len(layout) == len(batches)
        path, spans = layout[0]
        drain_to = data.draw(st.integers(0, spans[-1][0]), label="drain_to")
        if drain_to:
            wal, _ = _open(origin)
            wal.mark_drained(drain_to)
            wal.close()
        if not os.path.exists(path):
            return
        size = os.path.getsize(path)
        for cut in range(size):
            directory = os.path.join(tmp, f"cut{cut}")
            shutil.copytree(origin, directory)
            os.truncate(os.path.join(directory, os.path.basename(path)), cut)
            at_boundary = cut in {0} | {end for _, _, end in spans}
            lost = [lsn for lsn, _, end in spans if end > cut]
            if at_boundary and all(lsn <= drain_to for lsn in lost):
                _, pending = _open(directory)
                assert pending == [r for r in records if r[0] > drain_to]
            else:
                with pytest.raises(CorruptFile):
                    _open(directory)
            shutil.rmtree(directory)


@given(
    batches_strategy,
    st.sampled_from([1, 50, 1 << 20]),
    st.booleans(),
    st.booleans(),
    st.data(),
)
@settings(max_examples=150, deadline=None)
@_without_fsync
def test_bit_flip_never_yields_a_different_record(
    batches: list[list[bytes]],
    segment_bytes: int,
    torn: bool,
    allow_nuke: bool,
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "wal")
        records = _build(directory, batches, segment_bytes=segment_bytes)
        drain_to = data.draw(st.integers(0, len(records)), label="drain_to")
        if drain_to:
            wal, _ = _open(directory)
            wal.mark_drained(drain_to)
            wal.close()
        layout = _layout(directory, records)
        on_disk = {lsn for _, spans in layout for lsn, _, _ in spans}
        last_path, last_spans = layout[-1]
        cut = os.path.getsize(last_path)
        if torn and cut:
            cut = data.draw(st.integers(0, cut - 1), label="cut")
            os.truncate(last_path, cut)
        lost = {lsn for lsn, _, end in last_spans if end > cut}

        files = [path for path, _ in layout if os.path.getsize(path)]
        drained_file = os.path.join(directory, "drained")
        if os.path.exists(drained_file):
            files.append(drained_file)
        if not files:
            return
        target = data.draw(st.sampled_from(files), label="file")
        raw = bytearray(Path(target).read_bytes())
        position = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
        raw[position // 8] ^= 1 << (position % 8)
        Path(target).write_bytes(bytes(raw))
        byte = position // 8

        if target == drained_file:
            # The mark is only an optimisation: everything on disk is replayed.
            _, pending = _open(directory, allow_nuke=allow_nuke)
            assert pending == [r for r in records if r[0] in on_disk and r[0] not in lost]
            return

        spans = dict(layout)[target]
        hit = next(span for span in spans if span[1] <= byte < span[2])
        torn_record = target == last_path and hit[0] in lost
        header_complete = cut >= hit[1] + HEADER_SIZE
        detected = not torn_record or (byte < hit[1] + HEADER_SIZE and header_complete)
        survivors = [r for r in records if r[0] > drain_to and r[0] in on_disk and r[0] not in lost]
        if not detected:
            _, pending = _open(directory, allow_nuke=allow_nuke)
            assert pending == survivors
            return
        if not allow_nuke:
            with pytest.raises(CorruptFile) as info:
                _open(directory)
            assert info.value.path == target
            assert info.value.offset == hit[1]
            return
        gone = {lsn for lsn, start, _ in spans if start >= hit[1]}
        _, pending = _open(directory, allow_nuke=True)
        assert pending == [r for r in survivors if r[0] not in gone]
        assert any(".corrupt-" in name for name in os.listdir(directory))


# ------------------------------------------------------------------ blocking core


def test_lsns_continue_across_restarts_and_drained_segments(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"a", b"b"], [b"c"]], segment_bytes=1)
    assert [lsn for lsn, _ in records] == [1, 2, 3]
    wal, pending = _open(directory, segment_bytes=1)
    assert pending == records
    wal.mark_drained(3)
    assert wal.backlog == 0
    assert len(_segments(directory)) == 1
    wal.close()
    wal, pending = _open(directory, segment_bytes=1)
    assert pending == []
    assert wal.append([b"d"]) == 4
    wal.sync()
    wal.close()
    _, pending = _open(directory)
    assert pending == [(4, b"d")]


def test_mark_drained_deletes_only_whole_drained_segments(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    wal, _ = _open(directory, segment_bytes=100)
    for i in range(30):
        wal.append([b"%02d" % i])
    wal.sync()
    before = _segments(directory)
    assert len(before) >= 4
    stats = wal.statistics()
    assert stats["backlog"] == 30 and stats["last_lsn"] == 30 and stats["segments"] == len(before)
    second_first = before[1][0]
    wal.mark_drained(second_first - 2)  # one record of the first segment stays undrained
    assert _segments(directory) == before
    wal.mark_drained(second_first - 1)
    assert _segments(directory) == before[1:]
    assert wal.backlog == 30 - (second_first - 1)
    wal.mark_drained(30)
    assert _segments(directory) == before[-1:]  # never the segment being written
    assert wal.statistics()["drained_lsn"] == 30
    with pytest.raises(ValueError):
        wal.mark_drained(31)
    wal.close()
    _, pending = _open(directory)
    assert pending == []


def test_reopen_returns_undrained_records(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"one", b"two"], [b"three"], [b"four"]], segment_bytes=1 << 20)
    wal, pending = _open(directory)
    assert pending == records
    wal.mark_drained(2)
    wal.mark_drained(1)  # lower marks are ignored
    assert wal.drained_lsn == 2
    wal.close()
    _, pending = _open(directory)
    assert pending == [(3, b"three"), (4, b"four")]


def test_lost_drained_mark_replays_everything(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"x", b"y", b"z"]], segment_bytes=1 << 20, drain_to=2)
    os.unlink(os.path.join(directory, "drained"))
    _, pending = _open(directory)
    assert pending == records


def test_allow_nuke_moves_aside_and_keeps_what_precedes_the_bad_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"r%d" % i] for i in range(1, 7)], segment_bytes=1 << 20)
    ((_, path),) = _segments(directory)
    spans = _layout(directory, records)[0][1]
    raw = bytearray(Path(path).read_bytes())
    raw[spans[3][1] + HEADER_SIZE + 9] ^= 0x01  # payload of LSN 4
    Path(path).write_bytes(bytes(raw))

    with pytest.raises(CorruptFile) as info:
        _open(directory)
    assert info.value.offset == spans[3][1]
    assert "allow_table_nuke" in info.value.message

    with caplog.at_level(logging.WARNING, logger="iris_raft.wal"):
        wal, pending = _open(directory, allow_nuke=True)
    assert pending == records[:3]
    assert any("moved the segment" in r.getMessage() for r in caplog.records)
    aside = [n for n in os.listdir(directory) if ".corrupt-" in n]
    assert len(aside) == 1
    assert Path(directory, aside[0]).read_bytes() == bytes(raw)
    assert wal.append([b"fresh"]) == 4
    wal.sync()
    wal.close()
    _, pending = _open(directory)  # no nuke needed any more
    assert pending == [*records[:3], (4, b"fresh")]


def test_allow_nuke_keeps_later_segments(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"r%d" % i] for i in range(1, 9)], segment_bytes=40)
    layout = _layout(directory, records)
    assert len(layout) >= 3
    path, spans = layout[1]
    raw = bytearray(Path(path).read_bytes())
    raw[spans[0][1] + 1] ^= 0x80  # header of the first record of the second segment
    Path(path).write_bytes(bytes(raw))
    _, pending = _open(directory, allow_nuke=True)
    lost = {lsn for lsn, _, _ in spans}
    assert pending == [r for r in records if r[0] not in lost]
    # Without the nuke the gap it left is reported, not silently skipped.
    with pytest.raises(CorruptFile, match="missing"):
        _open(directory)


def test_interrupted_nuke_is_completed(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    records = _build(directory, [[b"a", b"b"]], segment_bytes=1 << 20)
    ((_, path),) = _segments(directory)
    # State after a crash between moving the bad segment aside and renaming its
    # fsynced good prefix into place.
    prefix = Path(path).read_bytes()[: HEADER_SIZE + 8 + 1]
    os.rename(path, path + ".corrupt-20240101T000000.000000Z")
    Path(path + ".recovered").write_bytes(prefix)
    _, pending = _open(directory)
    assert pending == records[:1]
    assert not os.path.exists(path + ".recovered")


def test_empty_append_and_misuse(tmp_path: Path) -> None:
    wal = WriteAheadLog(str(tmp_path / "wal"))
    with pytest.raises(RuntimeError):
        wal.append([b"x"])
    assert wal.open() == []
    assert wal.append([]) == 0
    assert wal.append([b"x"]) == 1
    with pytest.raises(RuntimeError):
        wal.open()
    wal.close()
    wal.close()
    with pytest.raises(RuntimeError):
        wal.append([b"y"])


def test_segment_names_carry_the_first_lsn(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    _build(directory, [[b"a"], [b"b"], [b"c"]], segment_bytes=1)
    assert sorted(os.listdir(directory)) == [segment_name(1), segment_name(2), segment_name(3)]
    assert segment_name(2) == "wal-00000000000000000002.log"


def test_sync_failure_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal, _ = _open(str(tmp_path / "wal"))
    wal.append([b"a"])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(OSError):
        wal.sync()
    monkeypatch.undo()
    with pytest.raises(OSError, match="reopened"):
        wal.append([b"b"])
    with pytest.raises(OSError):
        wal.sync()
    wal.close()


# ------------------------------------------------------------------ filesystem


def test_filesystem_type_from_mounts_picks_longest_mount_point() -> None:
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        "tmpfs /run/user/1000 tmpfs rw 0 0\n"
        "/dev/vdb /data xfs rw 0 0\n"
        "/dev/vdc /mnt/my\\040disk btrfs rw 0 0\n"
        "garbage\n"
    )
    assert filesystem_type_from_mounts(mounts, "/data/wal") == "xfs"
    assert filesystem_type_from_mounts(mounts, "/database") == "ext4"
    assert filesystem_type_from_mounts(mounts, "/run/user/1000/x") == "tmpfs"
    assert filesystem_type_from_mounts(mounts, "/mnt/my disk/wal") == "btrfs"
    assert filesystem_type_from_mounts("", "/x") == "unknown"
    assert filesystem_type_from_mounts(mounts + "tmpfs /data tmpfs rw 0 0\n", "/data/w") == "tmpfs"


def test_filesystem_type_of_real_paths(tmp_path: Path) -> None:
    assert filesystem_type(str(tmp_path)) != "unknown"
    if filesystem_type("/dev/shm") == "tmpfs":
        assert is_volatile_filesystem("/dev/shm/iris-wal")
    assert is_volatile_filesystem(str(tmp_path)) == (
        filesystem_type(str(tmp_path)) in {"tmpfs", "ramfs"}
    )


# ------------------------------------------------------------------ trio front end


async def test_group_commit_coalesces_concurrent_appends(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    got: dict[int, bytes] = {}
    with trio.fail_after(10):
        async with open_wal(directory) as log:
            assert log.pending == []

            async def one(i: int) -> None:
                payload = b"p%d" % i
                got[await log.append([payload])] = payload

            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(one, i)
            stats = log.statistics()
            assert sorted(got) == list(range(1, 301))
            assert stats["last_lsn"] == 300
            assert stats["fsyncs"] <= 10, stats
            assert log.backlog == 300
        async with open_wal(directory) as log:
            assert log.pending == sorted(got.items())


async def test_multi_record_appends_get_their_own_lsns(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    results: list[tuple[int, list[bytes]]] = []
    with trio.fail_after(10):
        async with open_wal(directory, segment_bytes=200) as log:

            async def one(i: int) -> None:
                batch = [b"%d-%d" % (i, k) for k in range(i % 4 + 1)]
                results.append((await log.append(batch), batch))

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(one, i)
            assert await log.append([]) == log.statistics()["last_lsn"]
        async with open_wal(directory) as log:
            replay = dict(log.pending)
    for last, batch in results:
        assert [replay[lsn] for lsn in range(last - len(batch) + 1, last + 1)] == batch


async def test_backpressure_bounds_each_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    original = WriteAheadLog.append

    def recording_append(self: WriteAheadLog, payloads: Sequence[bytes]) -> int:
        sizes.append(len(payloads))
        return original(self, payloads)

    monkeypatch.setattr(WriteAheadLog, "append", recording_append)
    with trio.fail_after(10):
        async with open_wal(str(tmp_path / "wal"), max_pending=5) as log:
            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(log.append, [b"%d" % i])
            assert await log.append([b"big"] * 8) == 68  # one oversized call still passes
            assert log.statistics()["queued"] == 0
    assert sum(sizes) == 68
    assert max(sizes[:-1]) <= 5
    assert len(sizes) >= 60 // 5


async def test_fsync_failure_fails_every_waiting_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(tmp_path / "wal")
    outcomes: list[BaseException | int] = []

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with trio.fail_after(10):
        async with open_wal(directory) as log:
            assert await log.append([b"durable"]) == 1
            monkeypatch.setattr(os, "fdatasync", broken)

            async def one(i: int) -> None:
                try:
                    outcomes.append(await log.append([b"lost %d" % i]))
                except OSError as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            assert len(outcomes) == 20
            assert all(isinstance(o, OSError) and o.errno == errno.EIO for o in outcomes)
            with pytest.raises(OSError):
                await log.append([b"after"])
            monkeypatch.undo()
            with pytest.raises(OSError):  # still refused until reopened
                await log.append([b"after"])
        async with open_wal(directory) as log:
            assert log.pending[0] == (1, b"durable")
            assert await log.append([b"again"]) == log.statistics()["last_lsn"]


async def test_mark_drained_through_the_trio_front_end(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    with trio.fail_after(10):
        async with open_wal(directory, segment_bytes=64) as log:
            for i in range(12):
                await log.append([b"record %d" % i])
            segments_before = log.statistics()["segments"]
            assert log.backlog == 12
            await log.mark_drained(10)
            assert log.backlog == 2
            assert log.statistics()["segments"] < segments_before
        async with open_wal(directory) as log:
            assert [lsn for lsn, _ in log.pending] == [11, 12]


async def test_append_after_close_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_wal(str(tmp_path / "wal")) as log:
            assert isinstance(log, DurableLog)
        with pytest.raises(trio.ClosedResourceError):
            await log.append([b"x"])


async def test_open_wal_reports_corruption(tmp_path: Path) -> None:
    directory = str(tmp_path / "wal")
    _build(directory, [[b"a", b"b"]], segment_bytes=1 << 20)
    ((_, path),) = _segments(directory)
    raw = bytearray(Path(path).read_bytes())
    raw[-1] ^= 0x10
    Path(path).write_bytes(bytes(raw))
    with trio.fail_after(10), pytest.raises(CorruptFile):
        async with open_wal(directory):
            pass  # pragma: no cover
