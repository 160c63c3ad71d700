"""Record framing: round trips, torn tails and bit flips against a list-of-payloads model."""

from __future__ import annotations

import os
import struct
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_raft._exceptions import CorruptFile
from iris_raft._records import (
    HEADER_SIZE,
    atomic_write,
    encode_record,
    move_aside,
    scan_records,
)

payload_lists = st.lists(st.binary(max_size=40), max_size=8)


def _frame(payloads: list[bytes]) -> tuple[bytes, list[int]]:
    """The file for ``payloads`` and the end offset of each record."""
    ends: list[int] = []
    data = b""
    for payload in payloads:
        data += encode_record(payload)
        ends.append(len(data))
    return data, ends


def test_header_layout() -> None:
    record = encode_record(b"hello")
    length, crc, header_crc = struct.unpack("<III", record[:HEADER_SIZE])
    assert (length, crc) == (5, zlib.crc32(b"hello"))
    assert header_crc == zlib.crc32(record[:8])
    assert record[HEADER_SIZE:] == b"hello"


@given(payload_lists)
@settings(max_examples=200, deadline=None)
def test_round_trip(payloads: list[bytes]) -> None:
    data, ends = _frame(payloads)
    scan = scan_records(data, "f")
    assert [p for _, p in scan.records] == payloads
    assert [o for o, _ in scan.records] == [0, *ends][: len(payloads)]
    assert scan.valid_end == len(data)
    assert not scan.torn_tail


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=4))
@settings(max_examples=30, deadline=None)
def test_truncation_at_every_offset_is_a_torn_tail(payloads: list[bytes]) -> None:
    data, ends = _frame(payloads)
    for cut in range(len(data) + 1):
        scan = scan_records(memoryview(data)[:cut], "f")
        complete = [e for e in ends if e <= cut]
        assert [p for _, p in scan.records] == payloads[: len(complete)]
        assert scan.valid_end == (complete[-1] if complete else 0)
        assert scan.torn_tail == (cut != scan.valid_end)


@given(st.lists(st.binary(max_size=20), min_size=1, max_size=4), st.data())
@settings(max_examples=60, deadline=None)
def test_bit_flip_never_yields_a_different_record(
    payloads: list[bytes], data_strategy: st.DataObject
) -> None:
    data, _ = _frame(payloads)
    cut = data_strategy.draw(st.integers(min_value=1, max_value=len(data)), label="cut")
    buf = bytearray(data[:cut])
    for bit in range(len(buf) * 8):
        flipped = bytearray(buf)
        flipped[bit // 8] ^= 1 << (bit % 8)
        try:
            scan = scan_records(bytes(flipped), "f")
        except CorruptFile as exc:
            assert exc.offset is not None and exc.offset <= bit // 8
            continue
        got = [p for _, p in scan.records]
        assert got == payloads[: len(got)]
        # Only a flip inside the torn tail (past every complete record) goes unnoticed.
        assert bit // 8 >= scan.valid_end
        assert scan.torn_tail


def test_every_flip_in_a_complete_file_is_detected() -> None:
    data, _ = _frame([b"alpha", b"", b"gamma" * 10])
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptFile):
            scan_records(bytes(flipped), "f")


def test_corrupt_file_names_path_offset_and_remedy() -> None:
    data = bytearray(encode_record(b"one") + encode_record(b"two"))
    data[len(encode_record(b"one")) + HEADER_SIZE] ^= 0xFF
    with pytest.raises(CorruptFile) as info:
        scan_records(bytes(data), "/data/raft/journal")
    err = info.value
    assert err.path == "/data/raft/journal"
    assert err.offset == len(encode_record(b"one"))
    assert "/data/raft/journal" in err.message
    assert f"byte {err.offset}" in err.message
    assert "allow_table_nuke = true" in err.message
    assert "backup" in err.message


def test_bad_header_checksum_is_corruption_not_torn_tail() -> None:
    # A length field pointing past the end with a wrong header CRC must not be
    # mistaken for an interrupted append.
    record = bytearray(encode_record(b"x" * 10))
    record[0] = 200
    with pytest.raises(CorruptFile):
        scan_records(bytes(record), "f")


def test_move_aside_renames_and_never_deletes(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b"evidence")
    now = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    first = move_aside(str(path), now=now)
    assert first == f"{path}.corrupt-20240506T070809.123456Z"
    assert not path.exists()
    assert Path(first).read_bytes() == b"evidence"
    path.write_bytes(b"second")
    second = move_aside(str(path), now=now)
    assert second != first
    assert Path(first).read_bytes() == b"evidence"
    assert Path(second).read_bytes() == b"second"


def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = str(tmp_path / "meta")
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert Path(path).read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["meta"]
