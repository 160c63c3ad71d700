"""Sans-I/O tests of the client protocol codec (``iris_edge._protocol``): no sockets."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iris_edge import _protocol
from iris_edge._protocol import (
    DEFAULT_MAX_FRAME,
    MAX_ACK_MIDS,
    MAX_DEPTH,
    SUBPROTOCOL,
    Ack,
    Auth,
    CloseCode,
    CloseRequest,
    ErrorCode,
    FrameError,
    Ping,
    RawCBOR,
    Send,
    encode_error,
    encode_msg,
    encode_pong,
    encode_sent,
    encode_welcome,
    is_cbor_item,
    parse_message,
)

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "protocol-v1.md"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def opaque_loads(data: bytes) -> Any:
    """Decode like the edge does: every tag kept as ``CBORTag``."""
    return cbor2.loads(data, semantic_decoders=_protocol._OPAQUE_TAGS)


def frame(**keys: Any) -> bytes:
    return cbor2.dumps(keys)


def raw_map(*pairs: bytes) -> bytes:
    """A definite-length map from already-encoded keys and values."""
    assert len(pairs) % 2 == 0
    return bytes((0xA0 | len(pairs) // 2,)) + b"".join(pairs)


def enc(value: Any) -> bytes:
    return cbor2.dumps(value)


def send_with_body(body: bytes) -> bytes:
    return raw_map(
        enc("type"), enc("send"), enc("id"), enc("i1"), enc("to"), enc("bob"), enc("body"), body
    )


def closes(result: object, code: CloseCode) -> bool:
    return isinstance(result, CloseRequest) and result.code == code


def bad_request(result: object, id: str | None = None) -> bool:
    return (
        isinstance(result, FrameError) and result.code is ErrorCode.BAD_REQUEST and result.id == id
    )


# ---------------------------------------------------------------------------
# Constants against the normative spec
# ---------------------------------------------------------------------------


def test_constants() -> None:
    assert SUBPROTOCOL == "iris.v1"
    assert DEFAULT_MAX_FRAME == 65536
    assert {(c.name, int(c)) for c in CloseCode} == {
        ("NORMAL", 1000),
        ("GOING_AWAY", 1001),
        ("UNSUPPORTED_DATA", 1003),
        ("INVALID_PAYLOAD", 1007),
        ("TOO_LARGE", 1009),
        ("AUTH_FAILED", 4001),
        ("TOKEN_EXPIRED", 4002),
        ("TOKEN_REVOKED", 4003),
        ("POLICY", 4008),
    }


def test_error_codes_are_the_specs() -> None:
    spec = SPEC.read_text() if SPEC.exists() else None
    expected = {
        "bad_frame",
        "unknown_type",
        "not_authenticated",
        "auth_failed",
        "token_expired",
        "token_revoked",
        "too_large",
        "bad_request",
        "rate_limited",
        "inbox_full",
        "write_blocked",
        "unavailable",
        "internal",
    }
    if spec is not None:
        section = spec.split("## Error codes", 1)[1].split("##", 1)[0]
        assert set(re.findall(r"`([a-z_]+)`", section)) == expected
    assert {code.value for code in ErrorCode} == expected
    assert isinstance(ErrorCode.BAD_REQUEST, str)
    assert str(ErrorCode.BAD_REQUEST) == "bad_request"  # a str enum: usable as text


# ---------------------------------------------------------------------------
# Valid client frames
# ---------------------------------------------------------------------------


def test_auth_frames() -> None:
    assert parse_message(frame(type="auth", token="a.b.c")) == Auth(token="a.b.c", user=None)
    assert parse_message(frame(type="auth", user="alice")) == Auth(token=None, user="alice")
    assert parse_message(frame(type="auth", token="t", user="u")) == Auth(token="t", user="u")
    assert parse_message(frame(type="auth", token="x" * 8192)) == Auth(token="x" * 8192, user=None)


def test_send_frame_keeps_the_body_bytes() -> None:
    body = {"text": "hi", "n": [1, 2.5, None, b"\x00"], "t": cbor2.CBORTag(1, 0)}
    result = parse_message(frame(type="send", id="c-1", to="bob", body=body))
    assert result == Send(id="c-1", to="bob", body=enc(body))


def test_send_body_is_relayed_byte_for_byte() -> None:
    # Non-shortest integer, indefinite-length text and array, a tag cbor2 would
    # turn into a datetime, a bignum and a huge tag number: all kept as sent.
    bodies = [
        bytes.fromhex("1a00000001"),
        bytes.fromhex("7f626869626f77ff"),
        bytes.fromhex("9f0102ff"),
        bytes.fromhex("c11a5f000000"),
        bytes.fromhex("c249010000000000000000"),
        bytes.fromhex("dbffffffffffffffff00"),
        bytes.fromhex("d9d9f7a0"),
        bytes.fromhex("a2000100f6"),  # duplicate keys inside the body: the application's business
        bytes.fromhex("f7"),  # undefined
        bytes.fromhex("f863"),  # simple value 99
        bytes.fromhex("f97e00"),  # NaN
    ]
    for body in bodies:
        result = parse_message(send_with_body(body))
        assert result == Send(id="i1", to="bob", body=body), body.hex()


def test_ack_frame() -> None:
    assert parse_message(frame(type="ack", mids=["m1", "m2"])) == Ack(mids=("m1", "m2"))
    assert parse_message(frame(type="ack", mids=["b", "a", "b"])) == Ack(mids=("b", "a"))
    assert parse_message(frame(type="ack", mids=[])) == Ack(mids=())
    many = [f"m{i}" for i in range(MAX_ACK_MIDS)]
    assert parse_message(frame(type="ack", mids=many)) == Ack(mids=tuple(many))


def test_ping_frame() -> None:
    assert parse_message(frame(type="ping")) == Ping(data=None, has_data=False)
    assert parse_message(frame(type="ping", data=None)) == Ping(data=None, has_data=True)
    assert parse_message(frame(type="ping", data={"x": [1]})) == Ping(
        data={"x": [1]}, has_data=True
    )
    tagged = parse_message(frame(type="ping", data=cbor2.CBORTag(1, 5)))
    assert tagged == Ping(data=cbor2.CBORTag(1, 5), has_data=True)  # tags stay opaque


def test_ping_data_with_integer_keys_is_echoed_as_raw_bytes() -> None:
    data = bytes.fromhex("a2010203a0")  # {1: 2, 3: {}}
    message = raw_map(enc("type"), enc("ping"), enc("data"), data)
    result = parse_message(message)
    assert result == Ping(data=RawCBOR(data), has_data=True)
    assert encode_pong(result.data, result.has_data) == raw_map(
        enc("type"), enc("pong"), enc("data"), data
    )


def test_unknown_keys_are_ignored() -> None:
    extra = raw_map(
        enc("type"),
        enc("ack"),
        enc("mids"),
        enc(["m"]),
        enc(7),
        enc({"deep": [[[]]]}),
        enc(b"k"),
        bytes.fromhex("c11a00000000"),
        enc("future"),
        bytes.fromhex("a201020304"),  # a map with integer keys in an unknown key
    )
    assert parse_message(extra) == Ack(mids=("m",))


def test_indefinite_length_frame_map() -> None:
    message = b"\xbf" + enc("type") + enc("ping") + enc("data") + enc(1) + b"\xff"
    assert parse_message(message) == Ping(data=1, has_data=True)
    chunked_type = b"\xa1" + enc("type") + b"\x7f" + enc("pi") + enc("ng") + b"\xff"
    assert parse_message(chunked_type) == Ping()


def test_accepts_bytearray_and_memoryview() -> None:
    message = frame(type="ping")
    assert parse_message(bytearray(message)) == Ping()
    assert parse_message(memoryview(message)) == Ping()


# ---------------------------------------------------------------------------
# FrameError outcomes (the connection stays open)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        frame(),
        frame(id="x", to="y"),
        frame(type=1),
        frame(type=b"send"),
        frame(type=None),
        frame(type=["send"]),
        raw_map(enc("type"), bytes.fromhex("d9d9f7") + enc("send")),  # a tagged text is not text
        frame(TYPE="send"),
        raw_map(enc(b"type"), enc("send")),
    ],
)
def test_bad_frame(message: bytes) -> None:
    result = parse_message(message)
    assert isinstance(result, FrameError)
    assert result.code is ErrorCode.BAD_FRAME
    assert result.id is None


@pytest.mark.parametrize(
    "type_", ["welcome", "sent", "msg", "pong", "error", "", "SEND", "x" * 500]
)
def test_unknown_type(type_: str) -> None:
    result = parse_message(frame(type=type_, id="i"))
    assert isinstance(result, FrameError)
    assert result.code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    ("keys", "error_id"),
    [
        ({"to": "bob", "body": 1}, None),
        ({"id": "", "to": "bob", "body": 1}, None),
        ({"id": "x" * 65, "to": "bob", "body": 1}, None),
        ({"id": "é" * 33, "to": "bob", "body": 1}, None),  # 66 UTF-8 bytes
        ({"id": 7, "to": "bob", "body": 1}, None),
        ({"id": b"i", "to": "bob", "body": 1}, None),
        ({"id": "i", "body": 1}, "i"),
        ({"id": "i", "to": "", "body": 1}, "i"),
        ({"id": "i", "to": "u" * 257, "body": 1}, "i"),
        ({"id": "i", "to": ["bob"], "body": 1}, "i"),
        ({"id": "i", "to": "bob"}, "i"),
        ({"id": "é" * 32, "to": "bob"}, "é" * 32),  # 64 UTF-8 bytes: a valid id
    ],
)
def test_send_bad_request(keys: dict[str, Any], error_id: str | None) -> None:
    result = parse_message(frame(type="send", **keys))
    assert bad_request(result, error_id), result


def test_send_limits_are_inclusive() -> None:
    result = parse_message(frame(type="send", id="x" * 64, to="u" * 256, body=None))
    assert result == Send(id="x" * 64, to="u" * 256, body=b"\xf6")


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"mids": "m1"},
        {"mids": None},
        {"mids": {"m": 1}},
        {"mids": [1]},
        {"mids": ["ok", b"m"]},
        {"mids": [""]},
        {"mids": ["x" * 129]},
        {"mids": [["m"]]},
        {"mids": [cbor2.CBORTag(1, "m")]},
        {"mids": [{1: 2}]},
        {"mids": [f"m{i}" for i in range(MAX_ACK_MIDS + 1)]},
    ],
)
def test_ack_bad_request(keys: dict[str, Any]) -> None:
    assert bad_request(parse_message(frame(type="ack", **keys)))


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"token": None},
        {"token": ""},
        {"token": 5},
        {"token": b"a.b.c"},
        {"token": "x" * 8193},
        {"user": ""},
        {"user": "u" * 257},
        {"user": 1},
        {"token": "t", "user": 2},
    ],
)
def test_auth_bad_request(keys: dict[str, Any]) -> None:
    assert bad_request(parse_message(frame(type="auth", **keys)))


def test_frame_error_encodes_as_error_frame() -> None:
    err = FrameError(ErrorCode.BAD_REQUEST, id="i", message="why")
    assert cbor2.loads(err.encode()) == {
        "type": "error",
        "code": "bad_request",
        "id": "i",
        "message": "why",
    }
    assert cbor2.loads(FrameError(ErrorCode.BAD_FRAME).encode()) == {
        "type": "error",
        "code": "bad_frame",
    }


# ---------------------------------------------------------------------------
# CloseRequest outcomes
# ---------------------------------------------------------------------------


def test_text_message_closes_1003() -> None:
    assert closes(parse_message('{"type": "ping"}'), CloseCode.UNSUPPORTED_DATA)
    assert closes(parse_message(""), CloseCode.UNSUPPORTED_DATA)


def test_size_limit_closes_1009() -> None:
    body = b"\x5a" + (DEFAULT_MAX_FRAME).to_bytes(4, "big") + bytes(DEFAULT_MAX_FRAME)
    assert closes(parse_message(send_with_body(body)), CloseCode.TOO_LARGE)
    exact = frame(type="ping", data="x" * 100)
    assert parse_message(exact, max_frame=len(exact)) == Ping(data="x" * 100, has_data=True)
    assert closes(parse_message(exact, max_frame=len(exact) - 1), CloseCode.TOO_LARGE)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x00",
        b"\x18\x2a",
        enc([{"type": "ping"}]),
        enc("ping"),
        enc(b"\xa1"),
        enc(None),
        enc(1.5),
        enc(cbor2.CBORTag(55799, {"type": "ping"})),  # a tagged map is not a map
        frame(type="ping") + b"\x00",  # trailing bytes
        frame(type="ping") + frame(type="ping"),  # two frames in one message
        frame(type="ping")[:-1],  # truncated
        b"\xa1",
        b"\xbf" + enc("type") + enc("ping"),  # indefinite map without its break
        b"\xbf" + enc("type") + b"\xff",  # odd number of items
        b"\xff",
        b"\xa1\xff\x00",
        b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff",  # declares 2**64-1 pairs
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x5b" + b"\xff" * 8),  # huge string
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x9b" + b"\xff" * 8),  # huge array
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x61\xff"),  # invalid UTF-8
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x62\xed\xa0"),  # lone surrogate
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x7f\x61\xc3\x61\xa9\xff"),  # split char
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x7f\x41\x00\xff"),  # bytes chunk in text
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x5f\x5f\xff\xff"),  # nested indefinite
        raw_map(enc("type"), enc("ping"), enc("data"), b"\xf8\x10"),  # 2-byte simple < 32
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x1c"),  # reserved info
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x1f"),  # indefinite integer
        raw_map(enc("type"), enc("ping"), enc("data"), b"\xdf\x00"),  # indefinite tag
        raw_map(enc("type"), enc("ping"), enc("data"), b"\x82\x00\xff"),  # break in definite
        raw_map(enc("type"), enc("ping"), enc("data"), b"\xc1\xff"),  # break as tag content
        raw_map(enc("type"), enc("ping"), enc("type"), enc("ack")),  # duplicate key
    ],
)
def test_not_one_cbor_map_closes_1007(message: bytes) -> None:
    assert closes(parse_message(message), CloseCode.INVALID_PAYLOAD), message.hex()


@pytest.mark.parametrize(
    "tagged",
    [
        bytes.fromhex("d81c81d81d00"),  # shared reference: a cycle for a naive decoder
        bytes.fromhex("d81d00"),
        bytes.fromhex("d90100826361626364d81900"),  # string references
        bytes.fromhex("d81900"),
        bytes.fromhex("81d81c00"),
    ],
)
def test_reference_tags_are_refused_anywhere(tagged: bytes) -> None:
    for message in (
        send_with_body(tagged),
        raw_map(enc("type"), enc("ping"), enc("data"), tagged),
        raw_map(enc("type"), enc("ping"), enc("unknown"), tagged),
        raw_map(enc("type"), enc("ping"), tagged, enc(1)),
    ):
        assert closes(parse_message(message), CloseCode.INVALID_PAYLOAD), message.hex()


def nested(depth: int, opener: bytes, closer: bytes = b"") -> bytes:
    return opener * depth + b"\x00" + closer * depth


@pytest.mark.parametrize(
    ("opener", "closer"),
    [
        (b"\x81", b""),
        (b"\x9f", b"\xff"),
        (b"\xa1\x00", b""),
        (b"\xbf\x00", b"\xff"),
        (b"\xc6", b""),
    ],
)
def test_nesting_limit(opener: bytes, closer: bytes) -> None:
    # The frame map is level 1: a body may nest 63 more levels, not 64.
    ok = parse_message(send_with_body(nested(MAX_DEPTH - 1, opener, closer)))
    assert isinstance(ok, Send)
    too_deep = parse_message(send_with_body(nested(MAX_DEPTH, opener, closer)))
    assert closes(too_deep, CloseCode.INVALID_PAYLOAD)
    assert closes(
        parse_message(
            raw_map(enc("type"), enc("ping"), enc("x"), nested(MAX_DEPTH, opener, closer))
        ),
        CloseCode.INVALID_PAYLOAD,
    )


def test_hostile_nesting_does_not_recurse() -> None:
    for opener in (b"\x81", b"\x9f", b"\xc6", b"\xa1\x00", b"\xd8\x1c"):
        message = send_with_body(opener * 30000)
        assert closes(parse_message(message), CloseCode.INVALID_PAYLOAD)


def test_cbor2_failures_never_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("simulated")

    monkeypatch.setattr(cbor2, "loads", broken)
    long_head_key = b"\x78\x04type"  # a text key the codec hands to cbor2
    assert closes(parse_message(raw_map(long_head_key, enc("ping"))), CloseCode.INVALID_PAYLOAD)
    # Data that cbor2 cannot decode is echoed as it came, not lost.
    data = enc([1, 2])
    result = parse_message(raw_map(enc("type"), enc("ping"), enc("data"), data))
    assert result == Ping(data=RawCBOR(data), has_data=True)


def test_the_body_is_never_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A body map with many integer keys must not reach a hash table (hash
    # flooding); only the frame's known keys are decoded.
    body = b"\xb9\x10\x00" + b"".join(enc(i << 61) + b"\xf6" for i in range(4096))
    seen: list[bytes] = []
    real_loads = cbor2.loads

    def spy(data: bytes, **kwargs: Any) -> Any:
        seen.append(bytes(data))
        return real_loads(data, **kwargs)

    monkeypatch.setattr(cbor2, "loads", spy)
    assert parse_message(send_with_body(body)) == Send(id="i1", to="bob", body=body)
    assert body not in seen
    assert all(len(item) < 10 for item in seen)


# ---------------------------------------------------------------------------
# Server frames
# ---------------------------------------------------------------------------


def keys_of(message: bytes) -> list[Any]:
    return list(cbor2.loads(message))


def test_server_frames() -> None:
    welcome = encode_welcome("alice", "s1", "edge-a")
    assert cbor2.loads(welcome) == {
        "type": "welcome",
        "user": "alice",
        "session": "s1",
        "edge": "edge-a",
    }
    sent = encode_sent("c-1", "m-1", 1_700_000_000_123)
    assert cbor2.loads(sent) == {"type": "sent", "id": "c-1", "mid": "m-1", "ts": 1_700_000_000_123}
    msg = encode_msg("m-1", "alice", enc({"x": 1}), 5)
    assert cbor2.loads(msg) == {
        "type": "msg",
        "mid": "m-1",
        "from": "alice",
        "body": {"x": 1},
        "ts": 5,
    }
    assert cbor2.loads(encode_pong()) == {"type": "pong"}
    assert cbor2.loads(encode_pong(None, True)) == {"type": "pong", "data": None}
    assert cbor2.loads(encode_pong([1, "a"], True)) == {"type": "pong", "data": [1, "a"]}
    assert cbor2.loads(encode_error(ErrorCode.INBOX_FULL, "c-1")) == {
        "type": "error",
        "code": "inbox_full",
        "id": "c-1",
    }
    assert cbor2.loads(encode_error(ErrorCode.INTERNAL, message="oops")) == {
        "type": "error",
        "code": "internal",
        "message": "oops",
    }
    for message in (welcome, sent, msg, encode_pong(), encode_error(ErrorCode.INTERNAL)):
        assert keys_of(message)[0] == "type"


def test_encode_msg_needs_a_body() -> None:
    with pytest.raises(ValueError):
        encode_msg("m", "a", b"", 1)


def test_is_cbor_item() -> None:
    assert is_cbor_item(enc({"a": [1, 2]}))
    assert not is_cbor_item(b"")
    assert not is_cbor_item(enc(1) + enc(2))
    assert not is_cbor_item(b"\x81")
    assert not is_cbor_item(bytes.fromhex("d81d00"))
    assert is_cbor_item(nested(MAX_DEPTH, b"\x81"))
    assert not is_cbor_item(nested(MAX_DEPTH + 1, b"\x81"))


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

texts = st.text(max_size=20)
ids = st.text(min_size=1, max_size=16)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64 - 1),
    st.floats(allow_nan=False),
    texts,
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(texts, children, max_size=5),
        st.dictionaries(st.integers(-5, 5), children, max_size=3),
        st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 3, 32, 258, 55799, 2**40]), children),
    ),
    max_leaves=20,
)
text_keyed = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(texts, children, max_size=5)
    ),
    max_leaves=20,
)


@FAST
@given(ids, ids, values, ids, ids, st.integers(0, 2**53))
def test_send_round_trip_and_splice(
    send_id: str, to: str, body: Any, mid: str, sender: str, ts: int
) -> None:
    result = parse_message(frame(type="send", id=send_id, to=to, body=body, extra=[1]))
    assert result == Send(id=send_id, to=to, body=enc(body))
    delivered = encode_msg(mid, sender, result.body, ts)
    # The splice is the normal encoding of the same map, byte for byte ...
    assert delivered == enc({"type": "msg", "mid": mid, "from": sender, "body": body, "ts": ts})
    # ... and decodes to the value that was sent.
    assert opaque_loads(delivered) == {
        "type": "msg",
        "mid": mid,
        "from": sender,
        "body": body,
        "ts": ts,
    }


@FAST
@given(text_keyed)
def test_ping_pong_round_trip(data: Any) -> None:
    result = parse_message(frame(type="ping", data=data))
    assert result == Ping(data=data, has_data=True)
    assert encode_pong(result.data, result.has_data) == enc({"type": "pong", "data": data})


@FAST
@given(values)
def test_pong_echoes_any_data_exactly(data: Any) -> None:
    result = parse_message(frame(type="ping", data=data))
    assert isinstance(result, Ping)
    assert opaque_loads(encode_pong(result.data, result.has_data)) == {"type": "pong", "data": data}


@FAST
@given(st.lists(st.text(min_size=1, max_size=10), max_size=50))
def test_ack_round_trip(mids: list[str]) -> None:
    assert parse_message(frame(type="ack", mids=mids)) == Ack(mids=tuple(dict.fromkeys(mids)))


@FAST
@given(st.sampled_from(list(ErrorCode)), st.none() | ids, st.none() | texts)
def test_error_round_trip(code: ErrorCode, error_id: str | None, message: str | None) -> None:
    expected: dict[str, Any] = {"type": "error", "code": code.value}
    if error_id is not None:
        expected["id"] = error_id
    if message is not None:
        expected["message"] = message
    assert cbor2.loads(encode_error(code, error_id, message)) == expected


# A byte-level generator of CBOR items, well-formed or nearly: every width of
# argument, indefinite lengths, tags (reference tags included), odd simple values.


def _head(major: int, arg: int, width: int) -> bytes:
    if arg < 24 and width == 0:
        return bytes((major << 5 | arg,))
    for size, info in ((1, 24), (2, 25), (4, 26), (8, 27)):
        if size >= width and arg < 1 << (8 * size):
            return bytes((major << 5 | info,)) + arg.to_bytes(size, "big")
    raise AssertionError("argument too large")


_widths = st.sampled_from([0, 0, 0, 1, 2, 4, 8])
_args = st.integers(0, 30) | st.integers(0, 2**64 - 1)
_payloads = st.text(max_size=6).map(str.encode) | st.binary(max_size=6)


def _heads(major: int) -> st.SearchStrategy[bytes]:
    return st.builds(lambda arg, width: _head(major, arg, width), _args, _widths)


def _strings(major: int) -> st.SearchStrategy[bytes]:
    return st.builds(lambda p, width: _head(major, len(p), width) + p, _payloads, _widths)


def _indefinite_strings(major: int) -> st.SearchStrategy[bytes]:
    return st.lists(_strings(major), max_size=3).map(
        lambda chunks: bytes((major << 5 | 31,)) + b"".join(chunks) + b"\xff"
    )


_leaves = st.one_of(
    _heads(0),
    _heads(1),
    _strings(2),
    _strings(3),
    _indefinite_strings(2),
    _indefinite_strings(3),
    st.integers(0, 255).map(lambda n: bytes((0xE0 | n,)) if n < 24 else b"\xf8" + bytes((n,))),
    st.binary(min_size=2, max_size=2).map(lambda b: b"\xf9" + b),
    st.binary(min_size=8, max_size=8).map(lambda b: b"\xfb" + b),
    st.sampled_from([b"\xff", b"\x1c", b"\x1f", b"\xdf\x00", b"\xfc", b"\x5f\x01\xff"]),
)
_tags = st.sampled_from([0, 1, 2, 24, 25, 28, 29, 35, 256, 258, 55799]) | _args


def _containers(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(
            lambda xs, w: _head(4, len(xs), w) + b"".join(xs),
            st.lists(children, max_size=4),
            _widths,
        ),
        st.lists(children, max_size=4).map(lambda xs: b"\x9f" + b"".join(xs) + b"\xff"),
        st.builds(
            lambda kvs, w: _head(5, len(kvs), w) + b"".join(k + v for k, v in kvs),
            st.lists(st.tuples(children, children), max_size=3),
            _widths,
        ),
        st.lists(children, max_size=5).map(lambda xs: b"\xbf" + b"".join(xs) + b"\xff"),
        st.builds(lambda t, w, x: _head(6, t, w) + x, _tags, _widths, children),
    )


cbor_items = st.recursive(_leaves, _containers, max_leaves=25)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    for kind, where, byte in edits:
        at = where % (len(data) + 1)
        if kind == 0:
            data = data[:at]
        elif kind == 1:
            data = data[:at] + bytes((byte,)) + data[at:]
        else:
            data = data[:at] + bytes((byte,)) + data[at + 1 :]
    return data


mutated_items = st.builds(
    _mutate,
    cbor_items,
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
)


def reference_accepts(data: bytes) -> bool:
    """cbor2 as the reference model of "one well-formed item, depth <= 64, no reference tags"."""
    stream = io.BytesIO(data)
    try:
        cbor2.CBORDecoder(
            stream,
            semantic_decoders=_protocol._OPAQUE_TAGS,
            max_depth=MAX_DEPTH,
            allow_duplicate_keys=True,
        ).decode()
    except Exception:
        return False
    return stream.tell() == len(data)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(cbor_items | mutated_items | st.binary(max_size=24))
def test_scanner_agrees_with_cbor2(data: bytes) -> None:
    assert is_cbor_item(data) == reference_accepts(data), data.hex()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(cbor_items | mutated_items)
def test_any_item_in_any_key_gives_the_specs_outcome(item: bytes) -> None:
    for message in (
        send_with_body(item),
        raw_map(enc("type"), enc("ping"), enc("data"), item),
        raw_map(enc("type"), enc("ack"), enc("mids"), item),
        raw_map(enc("type"), item),
        raw_map(enc("type"), enc("auth"), enc("token"), item),
        b"\x9f" + item + b"\xff",
    ):
        result = parse_message(message)
        if message[0] == 0x9F or not is_cbor_item(item, max_depth=MAX_DEPTH - 1):
            assert closes(result, CloseCode.INVALID_PAYLOAD)
        else:
            assert not isinstance(result, CloseRequest)

        if isinstance(result, Send):
            assert result.body == item
        if isinstance(result, Ping) and result.has_data:
            assert _same(opaque_loads(encode_pong(result.data, True))["data"], opaque_loads(item))
    # As a key: unknown, so ignored, unless it is the text "type" a second time.
    as_key = parse_message(raw_map(enc("type"), enc("ping"), item, enc(0)))
    if is_cbor_item(item, max_depth=MAX_DEPTH - 1):
        key = opaque_loads(item) if item[0] >> 5 == 3 else None
        if key == "type":
            assert closes(as_key, CloseCode.INVALID_PAYLOAD)
        elif key == "data":
            assert as_key == Ping(data=0, has_data=True)
        else:
            assert as_key == Ping()


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to itself."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, cbor2.CBORTag) and isinstance(b, cbor2.CBORTag):
        return a.tag == b.tag and _same(a.value, b.value)
    return bool(a == b)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200) | mutated_items.map(lambda x: b"\xa1" + enc("type") + x))
def test_random_bytes_never_raise(data: bytes) -> None:
    result = parse_message(data)
    assert isinstance(result, Auth | Send | Ack | Ping | FrameError | CloseRequest)
    if isinstance(result, CloseRequest):
        assert result.code == CloseCode.INVALID_PAYLOAD
        assert len(result.reason.encode()) <= 123
    if not data or data[0] >> 5 != 5:
        assert closes(result, CloseCode.INVALID_PAYLOAD)


@FAST
@given(
    st.dictionaries(st.text(max_size=8), values, max_size=6),
    st.sampled_from(["send", "ack", "auth", "ping", "nope"]),
)
def test_random_frames_never_raise(keys: dict[str, Any], type_: str) -> None:
    keys["type"] = type_
    result = parse_message(enc(keys))
    assert isinstance(result, Auth | Send | Ack | Ping | FrameError)
    if type_ == "nope":
        assert isinstance(result, FrameError) and result.code is ErrorCode.UNKNOWN_TYPE


def test_huge_frames_are_bounded() -> None:
    # Large frames of tiny items: linear, never more than the frame size.
    zeros = b"\x9a" + (60000).to_bytes(4, "big") + bytes(60000)
    assert parse_message(send_with_body(zeros)) == Send(id="i1", to="bob", body=zeros)
    empty_maps = b"\x9f" + b"\xa0" * 60000 + b"\xff"
    assert isinstance(parse_message(send_with_body(empty_maps)), Send)
    text = enc("é" * 30000)
    assert parse_message(send_with_body(text)) == Send(id="i1", to="bob", body=text)
