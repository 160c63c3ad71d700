"""Unit tests for iris_raft._ops: operation values, their CBOR encoding, ids, text checks.

Pure: no sockets, no threads. Codec round trips are Hypothesis properties over a
strategy per operation type; malformed input must raise ``BadRequest`` and
nothing else (apply turns that into an error result, anything else would stall
the Raft log).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iris_raft._exceptions import BadRequest
from iris_raft._ops import (
    BATCH_VERSION,
    MAX_CLIENT_ID_BYTES,
    MAX_ID_BYTES,
    Ack,
    Announce,
    Barrier,
    Batch,
    Cas,
    CloseSession,
    Forget,
    Limits,
    OpenSession,
    Put,
    RenewLease,
    RevokeToken,
    RevokeUser,
    Send,
    check_text,
    decode_batch,
    decode_batch_header,
    decode_op,
    encode_batch,
    encode_op,
    mid_for,
    new_op_id,
    op_from_wire,
    op_to_wire,
    send_op_id,
)

FAST = settings(max_examples=100, deadline=None)
PER_TYPE = settings(max_examples=30, deadline=None)  # runs once per op type
ALL_OPS = (
    Send,
    Ack,
    RevokeToken,
    RevokeUser,
    OpenSession,
    CloseSession,
    RenewLease,
    Put,
    Cas,
    Announce,
    Forget,
    Barrier,
)

# ------------------------------------------------------------------ strategies

texts = st.text(max_size=12)
# CBOR carries integers of any size (bignums past 64 bits); keep both kinds.
ints = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**80), 2**80))
cbor_scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.binary(max_size=10),
)
#: Values CBOR gives back unchanged (lists stay lists, maps have text keys).
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)

OP_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Send: st.builds(Send, texts, texts, texts, st.binary(max_size=64), texts, ints),
    Ack: st.builds(Ack, texts, texts, st.lists(texts, max_size=5).map(tuple)),
    RevokeToken: st.builds(RevokeToken, texts, texts, ints),
    RevokeUser: st.builds(RevokeUser, texts, texts, ints, ints),
    OpenSession: st.builds(OpenSession, texts, texts, texts, texts, texts, ints, ints),
    CloseSession: st.builds(CloseSession, texts, texts, st.booleans()),
    RenewLease: st.builds(RenewLease, texts, texts, ints),
    Put: st.builds(Put, texts, texts, cbor_values),
    Cas: st.builds(Cas, texts, texts, cbor_values, cbor_values),
    Announce: st.builds(Announce, texts, texts, texts),
    Forget: st.builds(Forget, texts, texts),
    Barrier: st.builds(Barrier, texts),
}
any_op = st.one_of(*OP_STRATEGIES.values())
limits = st.builds(
    Limits,
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
    st.integers(0, 2**40),
)
batches = st.builds(Batch, ints, texts, limits, st.lists(any_op, max_size=8).map(tuple))

# Field kinds, written out here (not imported) so a change in the codec's
# validation table shows up as a failing test.
S, B, I, F, L, A = "text", "bytes", "int", "flag", "text-list", "any"  # noqa: E741
KINDS: dict[type[Any], tuple[str, ...]] = {
    Send: (S, S, S, B, S, I),
    Ack: (S, S, L),
    RevokeToken: (S, S, I),
    RevokeUser: (S, S, I, I),
    OpenSession: (S, S, S, S, S, I, I),
    CloseSession: (S, S, F),
    RenewLease: (S, S, I),
    Put: (S, S, A),
    Cas: (S, S, A, A),
    Announce: (S, S, S),
    Forget: (S, S),
    Barrier: (S,),
}
WRONG: dict[str, tuple[Any, ...]] = {
    S: (1, b"text", None, ["a"], True, 1.5, {"a": "b"}),
    B: ("bytes", 1, None, [1, 2], True),
    I: (True, False, "1", 1.0, None, b"\x01", [1]),
    F: (1, 0, "true", None, [True]),
    L: ("m1", [1], ["m", b"m"], [None], None, 3, {"m": "m"}),
}
EXAMPLE_OPS: dict[type[Any], Any] = {
    Send: Send("op", "alice", "bob", b"hi", "mid", 5),
    Ack: Ack("op", "bob", ("m1", "m2")),
    RevokeToken: RevokeToken("op", "jti", 10),
    RevokeUser: RevokeUser("op", "bob", 1, 2),
    OpenSession: OpenSession("op", "s1", "bob", "edge", "jti", 1, 2),
    CloseSession: CloseSession("op", "s1", True),
    RenewLease: RenewLease("op", "edge", 9),
    Put: Put("op", "k", {"a": [1, 2]}),
    Cas: Cas("op", "k", None, 3),
    Announce: Announce("op", "n1:7001", "n1:7101"),
    Forget: Forget("op", "n1:7001"),
    Barrier: Barrier("op"),
}


def _decodes_or_bad_request(decode: Any, payload: Any) -> Any:
    """Call ``decode``; BadRequest is fine, any other exception fails the test."""
    try:
        return decode(payload)
    except BadRequest as exc:
        assert exc.code == "bad_request"
        assert isinstance(exc.message, str) and exc.message
        return None


# ----------------------------------------------------------------- round trips


def test_every_op_type_has_a_strategy_and_a_kind_table() -> None:
    assert set(OP_STRATEGIES) == set(KINDS) == set(EXAMPLE_OPS) == set(ALL_OPS)
    for cls, kinds in KINDS.items():
        assert len(dataclasses.fields(cls)) == len(kinds), cls.__name__


def test_tags_are_distinct_integers() -> None:
    tags = [op_to_wire(op)[0] for op in EXAMPLE_OPS.values()]
    assert all(type(tag) is int for tag in tags)
    assert len(set(tags)) == len(ALL_OPS)


@pytest.mark.parametrize("cls", ALL_OPS, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_op_round_trip(cls: type[Any], data: st.DataObject) -> None:
    op = data.draw(OP_STRATEGIES[cls])
    payload = encode_op(op)
    decoded = decode_op(payload)
    assert type(decoded) is cls
    assert decoded == op
    assert op_from_wire(op_to_wire(op)) == op
    # The wire form is a plain list: tag first, then the fields in order.
    wire = cbor2.loads(payload)
    assert isinstance(wire, list)
    assert len(wire) == 1 + len(dataclasses.fields(cls))


@FAST
@given(batches)
def test_batch_round_trip(batch: Batch) -> None:
    payload = encode_batch(batch)
    assert decode_batch(payload) == batch
    now_ms, origin, lim, raw_ops = decode_batch_header(payload)
    assert (now_ms, origin, lim) == (batch.now_ms, batch.origin, batch.limits)
    assert [op_from_wire(raw) for raw in raw_ops] == list(batch.ops)


def test_batch_wire_layout() -> None:
    batch = Batch(123, "n1", Limits(1, 2, 3, 4), (Barrier("x"),))
    assert cbor2.loads(encode_batch(batch)) == [BATCH_VERSION, 123, "n1", [1, 2, 3, 4], [[12, "x"]]]


def test_ack_mids_come_back_as_a_tuple() -> None:
    op = decode_op(cbor2.dumps([op_to_wire(EXAMPLE_OPS[Ack])[0], "op", "bob", ["a", "b"]]))
    assert isinstance(op, Ack)
    assert op.mids == ("a", "b")


# -------------------------------------------------------------------- garbage


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_decode_to_an_op_or_bad_request(payload: bytes) -> None:
    op = _decodes_or_bad_request(decode_op, payload)
    assert op is None or isinstance(op, ALL_OPS)


@FAST
@given(st.binary(max_size=64))
def test_random_bytes_decode_to_a_batch_or_bad_request(payload: bytes) -> None:
    batch = _decodes_or_bad_request(decode_batch, payload)
    assert batch is None or isinstance(batch, Batch)


@FAST
@given(cbor_values)
def test_random_cbor_values_decode_to_an_op_or_bad_request(value: Any) -> None:
    op = _decodes_or_bad_request(decode_op, cbor2.dumps(value))
    assert op is None or isinstance(op, ALL_OPS)
    op = _decodes_or_bad_request(op_from_wire, value)
    assert op is None or isinstance(op, ALL_OPS)


@FAST
@given(cbor_values)
def test_random_cbor_values_decode_to_a_batch_or_bad_request(value: Any) -> None:
    batch = _decodes_or_bad_request(decode_batch, cbor2.dumps(value))
    assert batch is None or isinstance(batch, Batch)


@FAST
@given(st.integers(0, 255), st.lists(cbor_values, max_size=8))
def test_ops_with_random_tag_and_fields(tag: int, fields: list[Any]) -> None:
    op = _decodes_or_bad_request(op_from_wire, [tag, *fields])
    assert op is None or isinstance(op, ALL_OPS)
    if tag not in {op_to_wire(o)[0] for o in EXAMPLE_OPS.values()}:
        assert op is None


@pytest.mark.parametrize(
    "raw",
    [
        None,
        7,
        "send",
        b"\x01",
        [],
        {},
        {"tag": 1},
        ["1", "op"],
        [1.0, "op"],
        [None],
        [99, "op"],
        [-1, "op"],
        [0],
    ],
    ids=repr,
)
def test_malformed_op_shapes_are_bad_requests(raw: Any) -> None:
    with pytest.raises(BadRequest):
        op_from_wire(raw)
    with pytest.raises(BadRequest):
        decode_op(cbor2.dumps(raw))


def test_undecodable_cbor_is_a_bad_request() -> None:
    for payload in (b"", b"\xff", b"\x9f", b"\x1c", b"\x5a\x00\x00\x00\x10ab"):
        with pytest.raises(BadRequest):
            decode_op(payload)
        with pytest.raises(BadRequest):
            decode_batch(payload)


@pytest.mark.parametrize("cls", ALL_OPS, ids=lambda c: c.__name__)
@PER_TYPE
@given(data=st.data())
def test_wrong_field_count_is_a_bad_request(cls: type[Any], data: st.DataObject) -> None:
    wire = op_to_wire(data.draw(OP_STRATEGIES[cls]))
    fields = wire[1:]
    if data.draw(st.booleans()) and fields:
        fields = fields[: data.draw(st.integers(0, len(fields) - 1))]
    else:
        fields = fields + data.draw(st.lists(cbor_values, min_size=1, max_size=3))
    with pytest.raises(BadRequest, match="fields"):
        op_from_wire([wire[0], *fields])


def _wrong_type_cases() -> list[Any]:
    cases = []
    for cls, kinds in KINDS.items():
        for index, kind in enumerate(kinds):
            for value in WRONG.get(kind, ()):
                cases.append(
                    pytest.param(cls, index, value, id=f"{cls.__name__}-{index}-{value!r}")
                )
    return cases


@pytest.mark.parametrize(("cls", "index", "value"), _wrong_type_cases())
def test_wrong_field_type_is_a_bad_request(cls: type[Any], index: int, value: Any) -> None:
    wire = op_to_wire(EXAMPLE_OPS[cls])
    wire[1 + index] = value
    with pytest.raises(BadRequest):
        op_from_wire(wire)
    with pytest.raises(BadRequest):
        decode_op(cbor2.dumps(wire))


def test_bool_where_int_expected_is_a_bad_request() -> None:
    send = op_to_wire(EXAMPLE_OPS[Send])
    send[6] = True
    with pytest.raises(BadRequest, match="integer"):
        op_from_wire(send)
    revoke = op_to_wire(EXAMPLE_OPS[RevokeUser])
    revoke[3] = False
    with pytest.raises(BadRequest, match="integer"):
        op_from_wire(revoke)


def test_bool_tag_is_a_bad_request() -> None:
    # Regression: True (== 1) used to decode as a Send.
    for tag in (True, False):
        wire = op_to_wire(EXAMPLE_OPS[Send])
        wire[0] = tag
        with pytest.raises(BadRequest, match="tag"):
            op_from_wire(wire)
        with pytest.raises(BadRequest):
            decode_op(cbor2.dumps(wire))


def _good_header() -> list[Any]:
    return [BATCH_VERSION, 10, "n1", [1, 2, 3, 4], []]


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 2),
        (0, 0),
        (0, "1"),
        (0, None),
        (1, "10"),
        (1, 1.5),
        (1, None),
        (2, 1),
        (2, None),
        (3, [1, 2, 3]),
        (3, [1, 2, 3, 4, 5]),
        (3, [1, 2, -3, 4]),
        (3, [1, 2, "3", 4]),
        (3, {"a": 1}),
        (4, {}),
        (4, "ops"),
        (4, None),
    ],
    ids=repr,
)
def test_malformed_batch_header_is_a_bad_request(index: int, value: Any) -> None:
    raw = _good_header()
    raw[index] = value
    with pytest.raises(BadRequest):
        decode_batch_header(cbor2.dumps(raw))
    with pytest.raises(BadRequest):
        decode_batch(cbor2.dumps(raw))


@pytest.mark.parametrize("raw", [[], [1], _good_header()[:4], [*_good_header(), "x"], {"v": 1}, 1])
def test_batch_of_the_wrong_shape_is_a_bad_request(raw: Any) -> None:
    with pytest.raises(BadRequest):
        decode_batch(cbor2.dumps(raw))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, True),
        (0, 1.0),
        (1, True),
        (1, 10.0),
        (3, [True, 2, 3, 4]),
        (3, [1, 2, 3, False]),
        (3, [1, 2.0, 3, 4]),
    ],
    ids=repr,
)
def test_bool_or_float_in_batch_header_is_a_bad_request(index: int, value: Any) -> None:
    # Regression: bool (and float) passed the integer checks of the header.
    raw = _good_header()
    raw[index] = value
    with pytest.raises(BadRequest):
        decode_batch_header(cbor2.dumps(raw))


def test_one_bad_op_fails_the_whole_decode_batch() -> None:
    raw = _good_header()
    raw[4] = [op_to_wire(EXAMPLE_OPS[Put]), [99, "x"]]
    with pytest.raises(BadRequest, match="unknown operation tag"):
        decode_batch(cbor2.dumps(raw))
    # The header alone still decodes: apply validates ops one by one.
    assert len(decode_batch_header(cbor2.dumps(raw))[3]) == 2


# ------------------------------------------------------------------------ ids


@FAST
@given(texts, texts)
def test_send_op_id_is_a_stable_function_of_sender_and_client_id(sender: str, client: str) -> None:
    op_id = send_op_id(sender, client)
    assert op_id == send_op_id(sender, client)
    assert op_id.startswith("send")
    assert sender in op_id and client in op_id


# Separator-like characters make collisions likely if the encoding is not injective.
_tricky = st.text(st.sampled_from("ab:\x1f0123456789|"), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(_tricky, _tricky, _tricky, _tricky)
def test_send_op_id_is_injective(a: str, b: str, c: str, d: str) -> None:
    assert (send_op_id(a, b) == send_op_id(c, d)) == ((a, b) == (c, d))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("alice", "x\x1fy"), ("alice\x1fx", "y")),  # the old separator
        (("alice", "x:y"), ("alice:x", "y")),
        (("a", "1:b:c"), ("a:1:b", "c")),
        (("1", "2"), ("12", "")),
    ],
)
def test_send_op_id_collisions_of_joined_text(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    # Regression: sender and client id joined with \x1f collided for texts containing it.
    assert send_op_id(*first) != send_op_id(*second)


def test_new_op_id_is_random_hex() -> None:
    ids = {new_op_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


@FAST
@given(st.text(min_size=1), st.text(min_size=1))
def test_mid_for_is_deterministic_and_short(sender: str, client_id: str) -> None:
    op_id = send_op_id(sender, client_id)
    mid = mid_for(op_id)
    assert re.fullmatch(r"[0-9a-f]{26}", mid)
    assert mid == mid_for(op_id)


def test_mid_for_differs_per_operation() -> None:
    mids = {mid_for(send_op_id("alice", f"m{i}")) for i in range(1000)}
    mids |= {mid_for(send_op_id("bob", f"m{i}")) for i in range(1000)}
    assert len(mids) == 2000


# ------------------------------------------------------------------ check_text


def test_check_text_returns_the_value() -> None:
    assert check_text("user", "alice") == "alice"
    assert check_text("user", "x" * MAX_ID_BYTES) == "x" * MAX_ID_BYTES


@pytest.mark.parametrize("value", ["", None, 1, b"alice", ["a"], True])
def test_check_text_rejects_empty_and_non_text(value: object) -> None:
    with pytest.raises(BadRequest, match="non-empty text") as info:
        check_text("user", value)
    assert info.value.data == {"field": "user"}


def test_check_text_limit_counts_utf8_bytes() -> None:
    assert check_text("k", "é" * (MAX_ID_BYTES // 2)) == "é" * (MAX_ID_BYTES // 2)
    with pytest.raises(BadRequest, match=f"longer than {MAX_ID_BYTES} bytes") as info:
        check_text("k", "é" * (MAX_ID_BYTES // 2) + "x")
    assert info.value.data == {"field": "k"}
    with pytest.raises(BadRequest):
        check_text("k", "x" * (MAX_ID_BYTES + 1))
    # Four-byte characters: 64 fit in 256 bytes, 65 do not.
    check_text("k", "😀" * 64)
    with pytest.raises(BadRequest):
        check_text("k", "😀" * 65)


def test_check_text_custom_limit() -> None:
    assert check_text("client_id", "c" * MAX_CLIENT_ID_BYTES, max_bytes=MAX_CLIENT_ID_BYTES)
    with pytest.raises(BadRequest, match="client_id"):
        check_text("client_id", "c" * (MAX_CLIENT_ID_BYTES + 1), max_bytes=MAX_CLIENT_ID_BYTES)


def test_check_text_counts_lone_surrogates_without_crashing() -> None:
    # A lone surrogate is 3 bytes under surrogatepass: 85 fit, 86 do not.
    assert check_text("k", "\ud800" * 85)
    with pytest.raises(BadRequest):
        check_text("k", "\ud800" * 86)


@FAST
@given(st.text(max_size=80), st.integers(1, 300))
def test_check_text_accepts_exactly_the_short_non_empty_texts(value: str, limit: int) -> None:
    size = len(value.encode("utf-8", "surrogatepass"))
    if value and size <= limit:
        assert check_text("f", value, max_bytes=limit) == value
    else:
        with pytest.raises(BadRequest):
            check_text("f", value, max_bytes=limit)
