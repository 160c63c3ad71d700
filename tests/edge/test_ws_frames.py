"""Framing on an authenticated connection (``protocol-v1.md``: Transport; docs: Framing).

What closes the connection (1003, 1007, 1009) and what is answered with an
error frame that leaves it open (``bad_frame``, ``unknown_type``,
``bad_request``), checked with a ``ping`` afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
import trio
from edge_helpers import ClusterThread, decode, login, running_cluster, unique

pytestmark = pytest.mark.cluster

MAX_FRAME = 65536


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterThread]:
    with running_cluster(tmp_path_factory.mktemp("frames"), nodes=3, edges=1, mode="cp") as c:
        yield c


def nested(depth: int) -> bytes:
    """A frame map whose ``data`` nests arrays so the whole frame has ``depth`` levels."""
    inner = b"\x80"  # []
    for _ in range(depth - 2):
        inner = b"\x81" + inner  # [inner]
    return b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("data") + inner


def ping_of_size(size: int) -> bytes:
    """An encoded ``ping`` frame of exactly ``size`` bytes."""
    head = b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("data")
    payload = size - len(head)
    for header_len in (1, 2, 3, 5):
        length = payload - header_len
        encoded = cbor2.dumps(b"x" * length)
        if len(encoded) == payload:
            return head + encoded
    raise AssertionError(size)


async def test_text_message_closes_1003(cluster: ClusterThread) -> None:
    user = unique("text")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send('{"type": "ping"}')
            frames = await client.expect_close(1003)
    assert frames == [], "nothing is sent before the close"


NOT_ONE_MAP = {
    "invalid": b"\xff\xff\xff",
    "truncated_map": b"\xa2\x64type\x64ping\x64da",
    "empty": b"",
    "trailing_bytes": cbor2.dumps({"type": "ping"}) + b"\x00",
    "two_maps": cbor2.dumps({"type": "ping"}) * 2,
    "array": cbor2.dumps(["type", "ping"]),
    "number": cbor2.dumps(42),
    "negative": cbor2.dumps(-1),
    "text_string": cbor2.dumps("ping"),
    "tagged_map": cbor2.dumps(cbor2.CBORTag(55799, {"type": "ping"})),
    "duplicate_key": b"\xa2" + (cbor2.dumps("type") + cbor2.dumps("ping")) * 2,
    "invalid_utf8": b"\xa2\x64type\x64ping\x64data\x62\xc3\x28",
    "shared_reference_tag": b"\xa2\x64type\x64ping\x64data\xd8\x1c\x80",
    "string_reference_tag": b"\xa2\x64type\x64ping\x64data\xd8\x19\x00",
    "reserved_info": b"\xa2\x64type\x64ping\x64data\x1c",
    "too_deep": nested(65),
}


@pytest.mark.parametrize("data", NOT_ONE_MAP.values(), ids=NOT_ONE_MAP.keys())
async def test_not_exactly_one_cbor_map_closes_1007(cluster: ClusterThread, data: bytes) -> None:
    user = unique("cbor")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(data)
            frames = await client.expect_close(1007)
    assert frames == [], "nothing is sent before the close"


async def test_64_levels_of_nesting_are_accepted(cluster: ClusterThread) -> None:
    user = unique("deep")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(nested(64))
            pong = await client.expect("pong")
            depth, value = 1, pong["data"]
            while value:
                (value,) = value
                depth += 1
            assert depth == 63  # the frame map is level 1, `data` holds the other 63


async def test_frame_over_64_kib_closes_1009(cluster: ClusterThread) -> None:
    user = unique("big")
    frame = ping_of_size(MAX_FRAME + 1)
    assert len(frame) == MAX_FRAME + 1
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(frame)
            await client.expect_close(1009)


async def test_frame_of_exactly_64_kib_is_accepted(cluster: ClusterThread) -> None:
    user = unique("big")
    frame = ping_of_size(MAX_FRAME)
    assert len(frame) == MAX_FRAME
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(frame)
            pong = await client.expect("pong")
            assert pong["data"] == decode(frame)["data"]


async def _error_then_still_open(
    cluster: ClusterThread, frame: dict[str, Any] | bytes
) -> dict[str, Any]:
    user = unique("err")
    async with login(cluster.url(0), cluster.token(user)) as client:
        await client.send(frame)
        error = await client.expect("error")
        pong = await client.ping("alive")
        assert pong["data"] == "alive"
        assert client.stash == []
    return error


@pytest.mark.parametrize(
    "frame",
    [
        {"no": "type"},
        {},
        {"type": 5},
        {"type": b"ping"},
        {"type": None},
        {"type": cbor2.CBORTag(32, "ping")},
        {1: "ping"},
    ],
    ids=["no_type", "empty_map", "int_type", "bytes_type", "null_type", "tagged_type", "int_key"],
)
async def test_map_without_text_type_gets_bad_frame(
    cluster: ClusterThread, frame: dict[Any, Any]
) -> None:
    with trio.fail_after(10):
        error = await _error_then_still_open(cluster, cbor2.dumps(frame))
    assert error["code"] == "bad_frame"
    assert "id" not in error


@pytest.mark.parametrize(
    "type_", ["subscribe", "welcome", "sent", "msg", "pong", "error", "", "PING"]
)
async def test_unknown_type_gets_unknown_type(cluster: ClusterThread, type_: str) -> None:
    with trio.fail_after(10):
        error = await _error_then_still_open(cluster, {"type": type_, "id": "x"})
    assert error["code"] == "unknown_type"


BAD_REQUESTS: dict[str, tuple[dict[str, Any], str | None]] = {
    # name: (frame, the id the error must carry, None when the id was not valid)
    "send_without_id": ({"type": "send", "to": "bob", "body": 1}, None),
    "send_id_not_text": ({"type": "send", "id": 7, "to": "bob", "body": 1}, None),
    "send_id_empty": ({"type": "send", "id": "", "to": "bob", "body": 1}, None),
    "send_id_too_long": ({"type": "send", "id": "i" * 65, "to": "bob", "body": 1}, None),
    "send_id_tagged": (
        {"type": "send", "id": cbor2.CBORTag(32, "x"), "to": "bob", "body": 1},
        None,
    ),
    "send_without_to": ({"type": "send", "id": "with-id-1", "body": 1}, "with-id-1"),
    "send_to_not_text": (
        {"type": "send", "id": "with-id-2", "to": ["bob"], "body": 1},
        "with-id-2",
    ),
    "send_to_empty": ({"type": "send", "id": "with-id-3", "to": "", "body": 1}, "with-id-3"),
    "send_to_too_long": (
        {"type": "send", "id": "with-id-4", "to": "u" * 257, "body": 1},
        "with-id-4",
    ),
    "send_without_body": ({"type": "send", "id": "with-id-5", "to": "bob"}, "with-id-5"),
    "ack_without_mids": ({"type": "ack"}, None),
    "ack_mids_not_array": ({"type": "ack", "mids": "m1"}, None),
    "ack_mids_not_text": ({"type": "ack", "mids": ["m1", 2]}, None),
    "ack_mid_empty": ({"type": "ack", "mids": [""]}, None),
    "ack_mid_too_long": ({"type": "ack", "mids": ["m" * 129]}, None),
    "ack_too_many_mids": ({"type": "ack", "mids": [f"m{i}" for i in range(1001)]}, None),
    "auth_token_not_text": ({"type": "auth", "token": 5}, None),
    "auth_without_token": ({"type": "auth"}, None),
}


@pytest.mark.parametrize(("frame", "id_"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_missing_or_mistyped_keys_get_bad_request(
    cluster: ClusterThread, frame: dict[str, Any], id_: str | None
) -> None:
    with trio.fail_after(10):
        error = await _error_then_still_open(cluster, frame)
    assert error["code"] == "bad_request"
    assert error.get("id") == id_, error
    assert isinstance(error.get("message", ""), str)


async def test_limits_are_inclusive(cluster: ClusterThread) -> None:
    user = unique("limits")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            sent = await client.send_message("u" * 256, None, id="i" * 64)
            assert sent["id"] == "i" * 64
            await client.ack([f"m{i}" for i in range(1000)] + [])
            await client.ack(["m" * 128])
            await client.ack([])
            assert (await client.ping())["type"] == "pong"
            assert client.stash == []


async def test_unknown_keys_are_ignored(cluster: ClusterThread) -> None:
    user = unique("future")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(
                {
                    "type": "send",
                    "id": "f1",
                    "to": user,
                    "body": "hi",
                    "priority": 9,
                    "x": {"y": [1]},
                }
            )
            sent = await client.answer("f1", "sent")
            await client.send({"type": "ping", "data": 3, "trace": "abc", 7: "int key"})
            assert (await client.wait_for("pong"))["data"] == 3
            (msg,) = await client.messages(1)
            assert msg["mid"] == sent["mid"] and msg["body"] == "hi"
            await client.send({"type": "ack", "mids": [msg["mid"]], "extra": None})
            assert (await client.ping())["type"] == "pong"
            assert client.stash == []


PING_DATA: list[Any] = [
    None,
    0,
    -(2**64),
    2**64 + 1,
    1.5,
    float("inf"),
    "text ✓",
    b"\x00\xff",
    [],
    [1, [2, [3]]],
    {"k": [True, False, None]},
    {b"bytes key": 1},
    cbor2.CBORTag(1, 1735689600),
    cbor2.CBORTag(42, [b"x"]),
    cbor2.undefined,
]


@pytest.mark.parametrize("data", PING_DATA, ids=[repr(d)[:30] for d in PING_DATA])
async def test_ping_echoes_its_data(cluster: ClusterThread, data: Any) -> None:
    user = unique("ping")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send({"type": "ping", "data": data})
            pong = decode(await client.recv_raw())
    assert pong["type"] == "pong" and "data" in pong
    # The same CBOR value: both sides decoded by the same decoder (tag 1 becomes a datetime).
    assert pong["data"] == decode(cbor2.dumps(data))


async def test_ping_without_data_gets_pong_without_data(cluster: ClusterThread) -> None:
    user = unique("ping")
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send({"type": "ping"})
            pong = await client.expect("pong")
    assert pong == {"type": "pong"}


async def test_ping_data_map_with_duplicate_keys_is_echoed_byte_for_byte(
    cluster: ClusterThread,
) -> None:
    user = unique("ping")
    data = b"\xa2\x01\x02\x01\x03"  # {1: 2, 1: 3}: inside `data`, the application's business
    frame = b"\xa2" + cbor2.dumps("type") + cbor2.dumps("ping") + cbor2.dumps("data") + data
    with trio.fail_after(10):
        async with login(cluster.url(0), cluster.token(user)) as client:
            await client.send(frame)
            raw = await client.recv_raw()
    assert raw.endswith(cbor2.dumps("data") + data), raw
    assert decode(raw[: -len(data)] + b"\x00")["type"] == "pong"
