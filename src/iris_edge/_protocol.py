"""The client protocol ``iris.v1``: WebSocket messages in, frames out; frames in, bytes out.

Theory of operation
-------------------
This module is pure: no sockets, no clock, no randomness. The edge's shell
hands every WebSocket message it receives to :func:`parse_message` and acts on
the one outcome it gets back:

* a *client frame* (:class:`Auth`, :class:`Send`, :class:`Ack`,
  :class:`Ping`): the frame was valid; handle it;
* a :class:`FrameError`: send ``encode_error(err.code, err.id, err.message)``
  (or ``err.encode()``) and keep the connection open (``bad_frame``,
  ``unknown_type``, ``bad_request`` of ``protocol-v1.md``);
* a :class:`CloseRequest`: close the WebSocket with ``code`` and ``reason``
  (text message 1003, larger than ``max_frame`` 1009, not exactly one CBOR
  map 1007). Nothing is sent before the close.

Server frames are built by the ``encode_*`` functions; each returns the bytes
of one binary WebSocket message (one CBOR map, ``"type"`` first).

What a frame may contain
------------------------
A frame is exactly one well-formed CBOR data item (RFC 8949), a map, with no
bytes after it. Hostile input is checked by :func:`_skip_item`, an iterative
scanner that walks the encoding without building any object, *before* cbor2
decodes anything, so its cost is linear in the frame size and it cannot
recurse, allocate per declared length, or be made to build odd objects. It
accepts every well-formed item, with these limits, and rejects the rest with
1007:

* nesting: arrays, maps and tags each count one level; the frame map is level
  1; at most :data:`MAX_DEPTH` (64) levels;
* text strings (also each chunk of an indefinite-length one) must be valid
  UTF-8; the two-byte simple values 0..31 and the reserved additional
  information 28..30 are not well-formed; indefinite-length items are
  accepted;
* tags are never interpreted by the edge (no dates, bignums, regular
  expressions, sets ...): a tagged value is relayed as it came. The tags that
  make a value depend on context outside it or turn the tree into a graph are
  refused: string references (25, 256) and shared references (28, 29);
* duplicate text keys in the frame map are refused (the frame would be
  ambiguous). Maps *inside* ``body`` and ``data`` are not checked for
  duplicates: the body is the application's, and the edge relays it.

Then only the values of the known keys are decoded, each from its own slice:
``type``, ``id``, ``to``, ``token``, ``user`` must be untagged text,
``mids`` an array of untagged text. These are decoded by cbor2 with every tag
kept opaque and map keys limited to text and byte strings, so hash-flooding a
map with colliding integer keys cannot cost quadratic time. Unknown keys are
skipped (forward compatibility).

The ``body`` of a ``send`` is never decoded: :attr:`Send.body` is the exact
encoding the client sent (one validated item). The edge stores those bytes
and :func:`encode_msg` splices them unchanged into ``msg`` frames, so the
recipient gets the very same CBOR value, byte for byte. The ``data`` of a
``ping`` is decoded for the shell (it is echoed by ``pong``); when it cannot
be decoded under the rules above (a map with non-string keys, duplicate
keys), it is kept as :class:`RawCBOR` and echoed byte for byte.

Cost: the scan is pure Python, about 0.15-0.2 µs per CBOR item: a small
frame takes microseconds, a 50 KB map of 2000 entries about 1.5 ms, and the
worst case, a 64 KiB frame of one-byte items, 10-15 ms (2 GHz-class core).
Long strings are checked at C speed. The shell should rate-limit every
frame, not only sends, if it must bound what one client can cost.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import cbor2

#: The WebSocket subprotocol the server selects; a handshake offering other
#: subprotocols but not this one is refused.
SUBPROTOCOL: Final = "iris.v1"
#: Default largest WebSocket message, in bytes (configurable).
DEFAULT_MAX_FRAME: Final = 65536
#: Deepest nesting of arrays, maps and tags in a frame, the frame map included.
MAX_DEPTH: Final = 64
#: Largest ``send.id``, in UTF-8 bytes.
MAX_ID_BYTES: Final = 64
#: Largest user id (``send.to``, ``auth.user``), in UTF-8 bytes.
MAX_USER_BYTES: Final = 256
#: Largest message id in an ``ack``, in UTF-8 bytes.
MAX_MID_BYTES: Final = 128
#: Most message ids in one ``ack`` frame.
MAX_ACK_MIDS: Final = 1000
#: Largest ``auth.token``, in UTF-8 bytes.
MAX_TOKEN_BYTES: Final = 8192


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame (``protocol-v1.md``, Error codes)."""

    #: The frame map has no text ``"type"`` key.
    BAD_FRAME = "bad_frame"
    #: The ``"type"`` is not one a client may send.
    UNKNOWN_TYPE = "unknown_type"
    #: A frame other than ``auth`` arrived before authentication.
    NOT_AUTHENTICATED = "not_authenticated"
    #: The token (or the refresh) was refused; a close 4001 follows.
    AUTH_FAILED = "auth_failed"
    #: The token had expired when it was presented; a close 4001 follows.
    TOKEN_EXPIRED = "token_expired"
    #: The token was revoked; a close follows.
    TOKEN_REVOKED = "token_revoked"
    #: A value is larger than the server accepts (for example a stored body).
    TOO_LARGE = "too_large"
    #: A key is missing or has the wrong type or size.
    BAD_REQUEST = "bad_request"
    #: The client sends too fast; back off.
    RATE_LIMITED = "rate_limited"
    #: The recipient's inbox is at a limit; nothing was stored.
    INBOX_FULL = "inbox_full"
    #: This side of a network partition cannot write safely; retry later.
    WRITE_BLOCKED = "write_blocked"
    #: The core did not answer in time; retry with the same id.
    UNAVAILABLE = "unavailable"
    #: An unexpected error in the server.
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    """WebSocket close codes the edge uses (``protocol-v1.md``, Close codes)."""

    #: Normal closure.
    NORMAL = 1000
    #: The server is going away (shutdown); reconnect, possibly elsewhere.
    GOING_AWAY = 1001
    #: A text message was received; frames are binary.
    UNSUPPORTED_DATA = 1003
    #: The message was not exactly one CBOR map.
    INVALID_PAYLOAD = 1007
    #: The message was larger than the maximum frame size.
    TOO_LARGE = 1009
    #: Authentication failed or missing.
    AUTH_FAILED = 4001
    #: The token expired (after the leeway) without a refresh.
    TOKEN_EXPIRED = 4002
    #: The token was revoked.
    TOKEN_REVOKED = 4003
    #: Rate limit or policy violation repeated.
    POLICY = 4008


# ---------------------------------------------------------------------------
# Outcomes of parsing one message
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawCBOR:
    """One well-formed CBOR data item kept as its encoding (spliced unchanged when encoded)."""

    encoded: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    """``{"type": "auth", "token": jwt}``, or ``{"type": "auth", "user": id}`` without auth.

    At least one of the two is set; each, when set, is valid text of the
    allowed size. Which one counts is the server's decision (``user`` only
    with ``auth_enabled = false``).
    """

    token: str | None
    user: str | None


@dataclass(frozen=True, slots=True)
class Send:
    """``{"type": "send", "id", "to", "body"}``.

    ``body`` is the exact CBOR encoding of the client's ``body`` value (one
    validated data item): store it, and give it to :func:`encode_msg`.
    """

    id: str
    to: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"type": "ack", "mids": [...]}``; repeats removed, order kept (may be empty)."""

    mids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping"}`` with optional ``data``; answer ``encode_pong(data, has_data)``.

    ``data`` is the decoded value (tags kept as ``cbor2.CBORTag``), or a
    :class:`RawCBOR` when it holds a map the edge does not decode (see the
    module docstring). ``has_data`` tells an absent ``data`` from ``null``.
    """

    data: Any = None
    has_data: bool = False


ClientFrame: TypeAlias = Auth | Send | Ack | Ping


@dataclass(frozen=True, slots=True)
class FrameError:
    """The frame was one CBOR map but not a valid request; answer with an error frame.

    ``id`` is the ``send`` id when it was valid, so the client can match the
    error to its request. The connection stays open.
    """

    code: ErrorCode
    id: str | None = None
    message: str = ""

    def encode(self) -> bytes:
        """The ``error`` frame to send."""
        return encode_error(self.code, self.id, self.message or None)


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """The message breaks the framing: close the WebSocket with ``code`` and ``reason``.

    ``reason`` is short ASCII (well under the 123 bytes a close frame allows).
    """

    code: CloseCode
    reason: str


ParseResult: TypeAlias = ClientFrame | FrameError | CloseRequest


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


class _Malformed(Exception):
    """The bytes are not acceptable CBOR (the reason is the message)."""


#: Tags refused anywhere: string references (25, 256) and shared references (28, 29).
_REFUSED_TAGS: Final = frozenset({25, 28, 29, 256})

# Stack entries of _skip_item: a positive count of items still to read in a
# definite-length container (or 1 for a tag's content), or one of these.
_INDEFINITE_ARRAY: Final = -1
_INDEFINITE_MAP_EVEN: Final = -2  # an indefinite map that has read whole pairs
_INDEFINITE_MAP_ODD: Final = -3  # ... that has read a key and waits for its value
_BREAK: Final = 0xFF


def _read_argument(data: bytes, pos: int, info: int) -> tuple[int, int]:
    """The argument of a head whose additional information is ``info``, and the next offset.

    The argument is -1 for an indefinite length (``info`` 31).
    """
    if info < 24:
        return info, pos
    if info <= 27:
        end = pos + (1 << (info - 24))
        if end > len(data):
            raise _Malformed("truncated")
        return int.from_bytes(data[pos:end], "big"), end
    if info == 31:
        return -1, pos
    raise _Malformed("reserved additional information")


def _skip_string(data: bytes, pos: int, length: int, text: bool) -> int:
    end = pos + length
    if end > len(data):
        raise _Malformed("truncated")
    if text:
        try:
            data[pos:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed("text is not valid UTF-8") from None
    return end


def _skip_item(data: bytes, pos: int, max_depth: int) -> int:
    """The offset just past the acceptable data item that starts at ``pos``.

    Walks the encoding iteratively (no recursion, no object built); raises
    :class:`_Malformed` for anything the module docstring does not accept.
    ``max_depth`` bounds the nesting inside this item.
    """
    size = len(data)
    stack: list[int] = []
    while True:
        if pos >= size:
            raise _Malformed("truncated")
        initial = data[pos]
        major = initial >> 5
        info = initial & 0x1F
        if info < 24:
            arg = info
            pos += 1
        else:
            arg, pos = _read_argument(data, pos + 1, info)
        if major <= 1:
            if arg < 0:
                raise _Malformed("indefinite-length integer")
        elif major <= 3:
            if arg >= 0:
                pos = _skip_string(data, pos, arg, major == 3)
            else:
                while True:
                    if pos >= size:
                        raise _Malformed("truncated")
                    chunk = data[pos]
                    if chunk == _BREAK:
                        pos += 1
                        break
                    if chunk >> 5 != major:
                        raise _Malformed("bad chunk in an indefinite-length string")
                    length, pos = _read_argument(data, pos + 1, chunk & 0x1F)
                    if length < 0:
                        raise _Malformed("nested indefinite-length string")
                    pos = _skip_string(data, pos, length, major == 3)
        elif major <= 5:
            if len(stack) >= max_depth:
                raise _Malformed("nested too deeply")
            if arg < 0:
                stack.append(_INDEFINITE_ARRAY if major == 4 else _INDEFINITE_MAP_EVEN)
                continue
            count = arg if major == 4 else 2 * arg
            if count:
                if count > size - pos:
                    raise _Malformed("truncated")
                stack.append(count)
                continue
        elif major == 6:
            if arg < 0:
                raise _Malformed("indefinite-length tag")
            if arg in _REFUSED_TAGS:
                raise _Malformed(f"tag {arg} (string or shared reference) is not accepted")
            if len(stack) >= max_depth:
                raise _Malformed("nested too deeply")
            stack.append(1)
            continue
        elif arg < 0:  # major 7, info 31: a break
            if not stack or stack[-1] not in (_INDEFINITE_ARRAY, _INDEFINITE_MAP_EVEN):
                raise _Malformed("unexpected break")
            stack.pop()
        elif info == 24 and arg < 32:
            raise _Malformed("two-byte simple value below 32")
        # One item is complete: count it in the enclosing containers.
        while stack:
            top = stack[-1]
            if top > 1:
                stack[-1] = top - 1
                break
            if top == 1:
                stack.pop()
                continue
            if top == _INDEFINITE_MAP_EVEN:
                stack[-1] = _INDEFINITE_MAP_ODD
            elif top == _INDEFINITE_MAP_ODD:
                stack[-1] = _INDEFINITE_MAP_EVEN
            break
        else:
            return pos


def is_cbor_item(data: bytes, *, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``data`` is exactly one data item this module accepts (see the docstring).

    For a shell that gets body bytes from somewhere it does not trust;
    :func:`parse_message` already checks every ``Send.body``.
    """
    try:
        return _skip_item(data, 0, max_depth) == len(data)
    except _Malformed:
        return False


def _opaque(tag: int) -> Callable[[Any, bool], Any]:
    def decode(value: Any, immutable: bool) -> Any:
        if tag in _REFUSED_TAGS:  # the scanner refuses them first; never trust one anyway
            raise cbor2.CBORDecodeError(f"tag {tag} is not accepted")
        return cbor2.CBORTag(tag, value)

    return decode


class _OpaqueTags(Mapping[int, Callable[[Any, bool], Any]]):
    """cbor2 ``semantic_decoders`` that keep every tag as ``CBORTag`` (none interpreted).

    Iterating lists the tags cbor2 knows, so a cbor2 that copies the mapping
    still keeps those opaque.
    """

    _KNOWN = (0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 52, 54, 256, 258, 260, 261)

    def __getitem__(self, tag: int) -> Callable[[Any, bool], Any]:
        if not isinstance(tag, int):
            raise KeyError(tag)
        return _opaque(tag)

    def __iter__(self) -> Iterator[int]:
        return iter(self._KNOWN)

    def __len__(self) -> int:
        return len(self._KNOWN)


_OPAQUE_TAGS: Final = _OpaqueTags()


def _decode(item: bytes) -> Any:
    """Decode one item already accepted by :func:`_skip_item`; raises on what cbor2 refuses."""
    return cbor2.loads(
        item,
        semantic_decoders=_OPAQUE_TAGS,
        max_depth=MAX_DEPTH,
        allow_duplicate_keys=False,
        strict_hashable_types=True,
    )


def _text(data: bytes, start: int, end: int) -> str:
    """The text string item ``data[start:end]`` (major type 3, already accepted by the scanner)."""
    if data[start] < 0x78:  # one-byte head: the UTF-8 bytes follow
        return data[start + 1 : end].decode()
    value = _decode(data[start:end])
    if not isinstance(value, str):
        raise _Malformed("text string expected")
    return value


_KNOWN_KEYS: Final = frozenset({"type", "id", "to", "body", "mids", "token", "user", "data"})


class _Frame:
    """The known keys of one scanned frame map, as slices of the message."""

    __slots__ = ("data", "spans")

    def __init__(self, data: bytes, spans: dict[str, tuple[int, int]]) -> None:
        self.data = data
        self.spans = spans

    def has(self, key: str) -> bool:
        return key in self.spans

    def raw(self, key: str) -> bytes:
        start, end = self.spans[key]
        return self.data[start:end]

    def text(self, key: str, min_bytes: int, max_bytes: int) -> str | None:
        """The value of ``key`` if it is untagged text of ``min_bytes..max_bytes`` UTF-8 bytes."""
        span = self.spans.get(key)
        if span is None or self.data[span[0]] >> 5 != 3:
            return None
        value = _text(self.data, *span)
        return value if min_bytes <= len(value.encode()) <= max_bytes else None


def _scan_frame(data: bytes) -> _Frame:
    """Check that ``data`` is exactly one acceptable CBOR map; find its known keys."""
    if not data:
        raise _Malformed("empty message")
    initial = data[0]
    if initial >> 5 != 5:
        raise _Malformed("a frame must be a CBOR map")
    count, pos = _read_argument(data, 1, initial & 0x1F)
    spans: dict[str, tuple[int, int]] = {}
    seen: set[str] = set()
    read = 0
    while True:
        if count >= 0:
            if read == count:
                break
        elif pos < len(data) and data[pos] == _BREAK:
            pos += 1
            break
        key_start = pos
        pos = _skip_item(data, pos, MAX_DEPTH - 1)
        key_end = pos
        pos = _skip_item(data, pos, MAX_DEPTH - 1)
        read += 1
        if data[key_start] >> 5 == 3:
            key = _text(data, key_start, key_end)
            if key in seen:
                raise _Malformed("duplicate key in the frame map")
            seen.add(key)
            if key in _KNOWN_KEYS:
                spans[key] = (key_end, pos)
    if pos != len(data):
        raise _Malformed("bytes after the frame map")
    return _Frame(data, spans)


def _parse_auth(frame: _Frame) -> Auth | FrameError:
    token = user = None
    if frame.has("token"):
        token = frame.text("token", 1, MAX_TOKEN_BYTES)
        if token is None:
            return FrameError(
                ErrorCode.BAD_REQUEST,
                message=f"auth.token must be text of 1..{MAX_TOKEN_BYTES} bytes",
            )
    if frame.has("user"):
        user = frame.text("user", 1, MAX_USER_BYTES)
        if user is None:
            return FrameError(
                ErrorCode.BAD_REQUEST,
                message=f"auth.user must be text of 1..{MAX_USER_BYTES} bytes",
            )
    if token is None and user is None:
        return FrameError(ErrorCode.BAD_REQUEST, message="auth needs a token")
    return Auth(token=token, user=user)


def _parse_send(frame: _Frame) -> Send | FrameError:
    send_id = frame.text("id", 1, MAX_ID_BYTES)
    if send_id is None:
        return FrameError(
            ErrorCode.BAD_REQUEST, message=f"send.id must be text of 1..{MAX_ID_BYTES} bytes"
        )
    to = frame.text("to", 1, MAX_USER_BYTES)
    if to is None:
        return FrameError(
            ErrorCode.BAD_REQUEST,
            id=send_id,
            message=f"send.to must be text of 1..{MAX_USER_BYTES} bytes",
        )
    if not frame.has("body"):
        return FrameError(ErrorCode.BAD_REQUEST, id=send_id, message="send.body is missing")
    return Send(id=send_id, to=to, body=frame.raw("body"))


def _parse_ack(frame: _Frame) -> Ack | FrameError:
    bad = FrameError(
        ErrorCode.BAD_REQUEST,
        message=f"ack.mids must be an array of at most {MAX_ACK_MIDS} texts "
        f"of 1..{MAX_MID_BYTES} bytes",
    )
    if not frame.has("mids"):
        return bad
    raw = frame.raw("mids")
    if raw[0] >> 5 != 4:
        return bad
    try:
        mids = _decode(raw)
    except Exception:  # a map with non-string keys inside: not an array of text anyway
        return bad
    if not isinstance(mids, list) or len(mids) > MAX_ACK_MIDS:
        return bad
    for mid in mids:
        if not isinstance(mid, str) or not 1 <= len(mid.encode()) <= MAX_MID_BYTES:
            return bad
    return Ack(mids=tuple(dict.fromkeys(mids)))


def _parse_ping(frame: _Frame) -> Ping:
    if not frame.has("data"):
        return Ping()
    raw = frame.raw("data")
    try:
        return Ping(data=_decode(raw), has_data=True)
    except Exception:  # non-string or duplicate map keys: echo the bytes as they came
        return Ping(data=RawCBOR(raw), has_data=True)


def parse_message(
    data: bytes | bytearray | memoryview | str, *, max_frame: int = DEFAULT_MAX_FRAME
) -> ParseResult:
    """Parse one WebSocket message from a client.

    Returns a client frame, a :class:`FrameError` (send the error frame, keep
    the connection) or a :class:`CloseRequest` (close the connection with its
    code). Never raises: any failure to decode, whatever its kind, is a
    :class:`CloseRequest` with :attr:`CloseCode.INVALID_PAYLOAD`.
    """
    if isinstance(data, str):
        return CloseRequest(CloseCode.UNSUPPORTED_DATA, "text message; frames are binary CBOR")
    if len(data) > max_frame:
        return CloseRequest(CloseCode.TOO_LARGE, f"frame larger than {max_frame} bytes")
    try:
        frame = _scan_frame(bytes(data))
        type_ = frame.text("type", 0, max_frame)
        if type_ is None:
            return FrameError(ErrorCode.BAD_FRAME, message="the frame has no text key 'type'")
        if type_ == "send":
            return _parse_send(frame)
        if type_ == "ack":
            return _parse_ack(frame)
        if type_ == "ping":
            return _parse_ping(frame)
        if type_ == "auth":
            return _parse_auth(frame)
    except _Malformed as exc:
        return CloseRequest(CloseCode.INVALID_PAYLOAD, f"not one CBOR map: {exc}")
    except Exception as exc:  # cbor2 or anything else on hostile input: never crash the shell
        return CloseRequest(CloseCode.INVALID_PAYLOAD, f"not one CBOR map ({type(exc).__name__})")
    return FrameError(ErrorCode.UNKNOWN_TYPE, message=f"unknown frame type {type_[:64]!r}")


# ---------------------------------------------------------------------------
# Server frames
# ---------------------------------------------------------------------------


_MSG_HEAD: Final = b"\xa5" + cbor2.dumps("type") + cbor2.dumps("msg")
_PONG_HEAD: Final = b"\xa2" + cbor2.dumps("type") + cbor2.dumps("pong")
_KEY_MID: Final = cbor2.dumps("mid")
_KEY_FROM: Final = cbor2.dumps("from")
_KEY_BODY: Final = cbor2.dumps("body")
_KEY_TS: Final = cbor2.dumps("ts")
_KEY_DATA: Final = cbor2.dumps("data")


def encode_welcome(user: str, session: str, edge: str) -> bytes:
    """``{"type": "welcome", "user", "session", "edge"}``: the connection is authenticated."""
    return cbor2.dumps({"type": "welcome", "user": user, "session": session, "edge": edge})


def encode_sent(id: str, mid: str, ts: int) -> bytes:
    """``{"type": "sent", "id", "mid", "ts"}``: the message ``id`` is durable as ``mid``.

    ``ts`` is integer milliseconds since the epoch (when the message was accepted).
    """
    return cbor2.dumps({"type": "sent", "id": id, "mid": mid, "ts": ts})


def encode_msg(mid: str, sender: str, body_cbor: bytes, ts: int) -> bytes:
    """``{"type": "msg", "mid", "from", "body", "ts"}`` with ``body_cbor`` spliced in as is.

    ``body_cbor`` must be exactly one CBOR data item (a :attr:`Send.body`, or
    bytes checked with :func:`is_cbor_item`); it is not decoded here, so a
    stored body costs one copy to deliver. Raises ``ValueError`` for empty
    ``body_cbor``.
    """
    if not body_cbor:
        raise ValueError("body_cbor must be one encoded CBOR item")
    return b"".join(
        (
            _MSG_HEAD,
            _KEY_MID,
            cbor2.dumps(mid),
            _KEY_FROM,
            cbor2.dumps(sender),
            _KEY_BODY,
            body_cbor,
            _KEY_TS,
            cbor2.dumps(ts),
        )
    )


def encode_pong(data: Any = None, has_data: bool = False) -> bytes:
    """``{"type": "pong"}``, with ``"data": data`` when ``has_data`` (echo of a :class:`Ping`)."""
    if not has_data:
        return cbor2.dumps({"type": "pong"})
    if isinstance(data, RawCBOR):
        return b"".join((_PONG_HEAD, _KEY_DATA, data.encoded))
    return cbor2.dumps({"type": "pong", "data": data})


def encode_error(code: ErrorCode, id: str | None = None, message: str | None = None) -> bytes:
    """``{"type": "error", "code"}``, with ``id`` (the request's) and ``message`` when given."""
    frame: dict[str, str] = {"type": "error", "code": ErrorCode(code).value}
    if id is not None:
        frame["id"] = id
    if message is not None:
        frame["message"] = message
    return cbor2.dumps(frame)
