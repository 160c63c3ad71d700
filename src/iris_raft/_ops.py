"""Operations of the replicated state machine and their wire encoding.

Theory of operation
-------------------
Every change to the replicated state is an *operation* (a small frozen value).
Operations travel in *batches*: one PySyncObj replicated call carries one
encoded batch, so one Raft entry commits many operations (group commit).

A batch carries everything apply needs to be deterministic: the accepting
node's clock (``now_ms``), and the limits to enforce (``Limits``). Apply never
reads a clock, a random source or the node's configuration.

Every write carries an operation id (``op_id``). The state machine remembers
applied ids for the deduplication window and answers a repeated id with the
first result, so a caller that got an *unknown outcome* retries safely.

Encoding is CBOR: a batch is ``[1, now_ms, origin, limits, [op, ...]]`` and
each op is a list starting with its tag. ``decode_batch`` validates shapes;
``decode_op`` raises :class:`BadRequest` for a malformed op, which apply turns
into an error *result* (apply itself never raises).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, TypeAlias

import cbor2

from ._exceptions import BadRequest

BATCH_VERSION = 1
MAX_ID_BYTES = 256
MAX_CLIENT_ID_BYTES = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits that apply enforces; they travel in each batch so every replica agrees."""

    #: Messages per recipient before ``inbox_full``.
    max_inbox_messages: int = 10_000
    #: Bytes of message bodies per recipient before ``inbox_full``.
    max_inbox_bytes: int = 64 * 1024 * 1024
    #: How long a stored message lives, in milliseconds.
    message_ttl_ms: int = 7 * 24 * 3600 * 1000
    #: How long an applied operation id is remembered, in milliseconds.
    dedup_window_ms: int = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Send:
    """Store a message for ``recipient``; ``mid`` and ``ts`` were chosen by the accepting node."""

    op_id: str
    sender: str
    recipient: str
    body: bytes
    mid: str
    ts: int


@dataclass(frozen=True, slots=True)
class Ack:
    """``user`` has the messages ``mids``; forget them."""

    op_id: str
    user: str
    mids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RevokeToken:
    """Revoke one token by its ``jti``; remembered until ``exp_ms`` (the token's expiry)."""

    op_id: str
    jti: str
    exp_ms: int


@dataclass(frozen=True, slots=True)
class RevokeUser:
    """Revoke every token of ``user`` issued before ``before_ms``; remembered until ``until_ms``."""

    op_id: str
    user: str
    before_ms: int
    until_ms: int


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Register a live connection of ``user`` on ``edge``, living on that edge's lease."""

    op_id: str
    session: str
    user: str
    edge: str
    jti: str
    iat_ms: int
    since_ms: int


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Drop a session; ``kick`` asks the edge that holds it to close the connection."""

    op_id: str
    session: str
    kick: bool


@dataclass(frozen=True, slots=True)
class RenewLease:
    """The edge is alive until ``until_ms``; its sessions expire with the lease."""

    op_id: str
    edge: str
    until_ms: int


@dataclass(frozen=True, slots=True)
class Put:
    """Set a register (a small replicated key-value entry)."""

    op_id: str
    key: str
    value: Any


@dataclass(frozen=True, slots=True)
class Cas:
    """Set register ``key`` to ``new`` only if it currently equals ``expected``."""

    op_id: str
    key: str
    expected: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Announce:
    """Record a core's Raft address and RPC address (discovery for edges and tools)."""

    op_id: str
    node: str
    rpc: str


@dataclass(frozen=True, slots=True)
class Forget:
    """Remove a core from the announced membership."""

    op_id: str
    node: str


@dataclass(frozen=True, slots=True)
class Barrier:
    """No effect: a marker whose commit orders a linearizable read after it."""

    op_id: str = ""


Op: TypeAlias = (
    Send
    | Ack
    | RevokeToken
    | RevokeUser
    | OpenSession
    | CloseSession
    | RenewLease
    | Put
    | Cas
    | Announce
    | Forget
    | Barrier
)

_TAGS: dict[type[Any], int] = {
    Send: 1,
    Ack: 2,
    RevokeToken: 3,
    RevokeUser: 4,
    OpenSession: 5,
    CloseSession: 6,
    RenewLease: 7,
    Put: 8,
    Cas: 9,
    Announce: 10,
    Forget: 11,
    Barrier: 12,
}
_BY_TAG: dict[int, type[Any]] = {tag: cls for cls, tag in _TAGS.items()}
# Field types, in order, for validation on decode.
_FIELDS: dict[type[Any], tuple[type[Any] | None, ...]] = {
    Send: (str, str, str, bytes, str, int),
    Ack: (str, str, tuple),
    RevokeToken: (str, str, int),
    RevokeUser: (str, str, int, int),
    OpenSession: (str, str, str, str, str, int, int),
    CloseSession: (str, str, bool),
    RenewLease: (str, str, int),
    Put: (str, str, None),
    Cas: (str, str, None, None),
    Announce: (str, str, str),
    Forget: (str, str),
    Barrier: (str,),
}


@dataclass(frozen=True, slots=True)
class Batch:
    """One replicated call: operations applied in order, with the time and limits to use."""

    now_ms: int
    origin: str
    limits: Limits
    ops: tuple[Op, ...]


def op_to_wire(op: Op) -> list[Any]:
    """The op as a CBOR-able list ``[tag, field, ...]``."""
    cls = type(op)
    fields = [getattr(op, name) for name in op.__slots__]
    if cls is Ack:
        fields[2] = list(fields[2])
    return [_TAGS[cls], *fields]


def op_from_wire(raw: Any) -> Op:
    """Validate and build an op from its wire list; raises :class:`BadRequest`."""
    if not isinstance(raw, list) or not raw or type(raw[0]) is not int:
        raise BadRequest("operation must be a list starting with its tag")
    cls = _BY_TAG.get(raw[0])
    if cls is None:
        raise BadRequest(f"unknown operation tag {raw[0]!r}")
    kinds = _FIELDS[cls]
    values = raw[1:]
    if len(values) != len(kinds):
        raise BadRequest(f"{cls.__name__} takes {len(kinds)} fields, got {len(values)}")
    out: list[Any] = []
    for value, kind in zip(values, kinds, strict=True):
        if kind is tuple:
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise BadRequest(f"{cls.__name__}: expected a list of text")
            value = tuple(value)
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest(f"{cls.__name__}: expected an integer, got {type(value).__name__}")
        elif kind is not None and not isinstance(value, kind):
            raise BadRequest(
                f"{cls.__name__}: expected {kind.__name__}, got {type(value).__name__}"
            )
        out.append(value)
    op: Op = cls(*out)
    return op


def encode_batch(batch: Batch) -> bytes:
    """Encode a batch for one replicated call (and for the WAL)."""
    lim = batch.limits
    return cbor2.dumps(
        [
            BATCH_VERSION,
            batch.now_ms,
            batch.origin,
            [
                lim.max_inbox_messages,
                lim.max_inbox_bytes,
                lim.message_ttl_ms,
                lim.dedup_window_ms,
            ],
            [op_to_wire(op) for op in batch.ops],
        ]
    )


def decode_batch_header(payload: bytes) -> tuple[int, str, Limits, list[Any]]:
    """Decode a batch's header and raw ops; raises :class:`BadRequest` if malformed."""
    try:
        raw = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for garbage
        raise BadRequest(f"batch is not valid CBOR: {exc}") from None
    if not (
        isinstance(raw, list) and len(raw) == 5 and type(raw[0]) is int and raw[0] == BATCH_VERSION
    ):
        raise BadRequest("batch has the wrong shape or version")
    _, now_ms, origin, lim, ops = raw
    if not (
        type(now_ms) is int
        and isinstance(origin, str)
        and isinstance(lim, list)
        and len(lim) == 4
        and all(type(x) is int and x >= 0 for x in lim)
        and isinstance(ops, list)
    ):
        raise BadRequest("batch header is malformed")
    return now_ms, origin, Limits(*lim), ops


def decode_batch(payload: bytes) -> Batch:
    """Decode a whole batch, validating every op; raises :class:`BadRequest`."""
    now_ms, origin, limits, ops = decode_batch_header(payload)
    return Batch(now_ms, origin, limits, tuple(op_from_wire(o) for o in ops))


def encode_op(op: Op) -> bytes:
    """One op as CBOR bytes (the WAL record payload)."""
    return cbor2.dumps(op_to_wire(op))


def decode_op(payload: bytes) -> Op:
    """Inverse of :func:`encode_op`; raises :class:`BadRequest`."""
    try:
        raw = cbor2.loads(payload)
    except Exception as exc:
        raise BadRequest(f"operation is not valid CBOR: {exc}") from None
    return op_from_wire(raw)


def send_op_id(sender: str, client_id: str) -> str:
    """The operation id of a send: the deduplication key ``(sender, client id)``."""
    return f"send:{len(sender)}:{sender}:{client_id}"


def new_op_id() -> str:
    """A fresh random operation id for writes that have no natural key."""
    return os.urandom(12).hex()


def mid_for(op_id: str) -> str:
    """The message id of a send: derived from its operation id, 26 hex characters.

    Every core computes the same mid for the same ``(sender, client id)``, so
    a retry answered by another core (even in hardened_ap, before the first
    core's WAL record reached Raft) reports the mid that will be stored.
    """
    return hashlib.blake2b(op_id.encode("utf-8", "surrogatepass"), digest_size=13).hexdigest()


def check_text(name: str, value: object, *, max_bytes: int = MAX_ID_BYTES) -> str:
    """Validate a non-empty text field of at most ``max_bytes`` UTF-8 bytes."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be non-empty text", field=name)
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadRequest(f"{name} is longer than {max_bytes} bytes", field=name)
    return value
