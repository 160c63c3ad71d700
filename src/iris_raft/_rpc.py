"""RPC between edges, tools and core nodes: CBOR frames over TCP, authenticated
and encrypted with the cluster secret.

Theory of operation
-------------------
The module has a pure, sans-I/O core (:class:`FrameBuffer`, :class:`RpcCodec`:
bytes in, events out, no sockets, clock or random source inside) and a thin
trio shell (:func:`serve_rpc`, :func:`open_rpc_connection`).

Wire format. A frame is a 4-byte big-endian length and a body. The length is
checked as soon as the header arrives, so a peer cannot make us buffer more
than ``max_frame`` bytes (4 KiB until the handshake is done).

Handshake. The server speaks first::

    S->C  {"v": 1, "auth": bool, "nonce": Ns}
    C->S  {"v": 1, "auth": bool, "nonce": Nc, "proof": HMAC(secret, "iris-rpc-client" Ns Nc)}
    S->C  {"ok": true, "proof": HMAC(secret, "iris-rpc-server" Ns Nc)}
          or {"ok": false, "error": code}, then the server closes

Both sides prove the secret without sending it, and each proof covers both
fresh nonces, so a recorded handshake cannot be replayed. ``auth`` says
whether the sender has a secret: a side with a secret refuses a side without
one, whichever speaks first. With no secret (dev mode) the hellos carry no
proof and frames are plaintext CBOR.

Encryption. After the handshake every body is AES-256-GCM; the key of each
direction is HKDF-SHA256(secret, salt=Ns+Nc, info="iris-rpc c2s"/"iris-rpc
s2c") and the GCM nonce is the 12-byte big-endian count of frames already
sent in that direction. Keys are fresh per connection and per direction, and
the receiver expects the next count, so a replayed, reordered, reflected or
altered frame fails authentication: that is a :class:`ProtocolError` and the
connection must be closed (a codec that failed stays failed).

Messages (CBOR maps): request ``{"id", "m", "p"}``, response ``{"id", "r"}``
or ``{"id", "e": IrisError.to_wire()}``, server push ``{"push", "d"}``.
Requests on one connection may be answered in any order (match by ``id``);
pushes and responses sent by one server task reach the client in the order
they were sent.

The shell. The server runs each request in its own task, at most
``max_concurrent_requests`` per connection: when they are all busy it stops
reading that connection (TCP backpressure). Each side of a connection has
one writer task: senders encode and queue frames synchronously, so the wire
order is the frame-counter order, and the writer sends whatever has piled up
in one write (pipelined calls share syscalls). Senders wait while more than
1 MiB is queued; a piece the peer does not accept within ``send_timeout``
closes that connection, so a peer that stops reading never blocks anything
else, and no caller's timeout can cut a frame in half. The client matches
responses to pending calls by id; a call that times out, or whose
connection is lost before its answer arrives, raises :class:`UnknownOutcome`,
because the request may have run.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import logging
import secrets
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

import cbor2
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._exceptions import (
    AuthFailed,
    BadRequest,
    InternalError,
    IrisError,
    ProtocolError,
    Unavailable,
    UnknownOutcome,
    error_from_code,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAX_FRAME",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "CodecState",
    "ErrorResponse",
    "Event",
    "FrameBuffer",
    "HandshakeDone",
    "Message",
    "Push",
    "Request",
    "Response",
    "Role",
    "RpcClientConnection",
    "RpcCodec",
    "RpcHandler",
    "RpcServerConnection",
    "encode_frame",
    "open_rpc_connection",
    "parse_address",
    "serve_rpc",
]

_log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: Bytes of each side's handshake nonce.
NONCE_SIZE = 32
#: Default largest frame body accepted or sent once the handshake is done.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
#: Largest frame body accepted during the handshake (the peer is not yet trusted).
HANDSHAKE_MAX_FRAME = 4096
#: Smallest ``max_frame`` a codec accepts (a handshake frame must fit).
_MIN_MAX_FRAME = 256

_HEADER = struct.Struct(">I")
_GCM_TAG_SIZE = 16
_GCM_NONCE_SIZE = 12
_MAX_COUNTER = 2 ** (8 * _GCM_NONCE_SIZE) - 1
_CLIENT_PROOF_LABEL = b"iris-rpc-client"
_SERVER_PROOF_LABEL = b"iris-rpc-server"
_C2S_INFO = b"iris-rpc c2s"
_S2C_INFO = b"iris-rpc s2c"
_RECEIVE_SIZE = 65536

DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_SEND_TIMEOUT = 10.0
DEFAULT_MAX_CONCURRENT_REQUESTS = 1024
DEFAULT_PUSH_BUFFER = 10_000


# ---------------------------------------------------------------------------
# Sans-I/O core
# ---------------------------------------------------------------------------


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its 4-byte big-endian length."""
    return _HEADER.pack(len(body)) + body


class FrameBuffer:
    """Reassembles length-prefixed frames from bytes that arrive in any split.

    ``max_frame`` may be changed between frames (the codec raises it after the
    handshake).
    """

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the peer."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def next_frame(self) -> bytes | None:
        """The next complete frame body, or None until more data arrives.

        Raises :class:`ProtocolError` as soon as a header announces more than
        ``max_frame`` bytes; the connection must then be closed.
        """
        available = len(self._buf) - self._pos
        if available < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_frame:
            raise ProtocolError(
                f"peer announced a frame of {length} bytes; the limit is {self.max_frame}",
                size=length,
                limit=self.max_frame,
            )
        if available < _HEADER.size + length:
            return None
        start = self._pos + _HEADER.size
        body = bytes(self._buf[start : start + length])
        self._pos = start + length
        return body


class Role(enum.Enum):
    """Which end of a connection a codec is."""

    #: Dials, answers the server's hello with its proof, sends requests.
    CLIENT = "client"
    #: Accepts, speaks first, checks the client's proof, answers requests and pushes.
    SERVER = "server"


class CodecState(enum.Enum):
    """Where a codec is in the life of a connection."""

    #: Waiting for the peer's hello (the server has queued its own).
    AWAIT_HELLO = "await_hello"
    #: Client only: hello sent, waiting for the server's verdict and proof.
    AWAIT_VERDICT = "await_verdict"
    #: Handshake done: messages flow (encrypted when there is a secret).
    OPEN = "open"
    #: A protocol or authentication error happened; close the connection.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """The handshake succeeded; ``authenticated`` is False only in dev mode."""

    authenticated: bool


@dataclass(frozen=True, slots=True)
class Request:
    """A client's call: ``method`` with ``params``, answered under ``id``."""

    id: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    """A successful answer to request ``id``."""

    id: int
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """A failed answer to request ``id``, in :meth:`IrisError.to_wire` form."""

    id: int
    code: str
    message: str
    data: dict[str, Any]

    @classmethod
    def from_error(cls, request_id: int, error: IrisError) -> ErrorResponse:
        wire = error.to_wire()
        return cls(request_id, wire["code"], wire["message"], wire["data"])

    def to_error(self) -> IrisError:
        """The error to raise in the caller (see :func:`error_from_code`)."""
        return error_from_code(self.code, self.message, self.data)


@dataclass(frozen=True, slots=True)
class Push:
    """Data the server sends on ``channel`` without a request."""

    channel: str
    data: Any


Message: TypeAlias = Request | Response | ErrorResponse | Push
Event: TypeAlias = HandshakeDone | Message


def _reject_shared_reference(decoder: Any, immutable: bool) -> Any:
    raise cbor2.CBORDecodeError("shared references (tags 28/29) are not accepted")


_SEMANTIC_DECODERS: dict[int, Any] = {28: _reject_shared_reference, 29: _reject_shared_reference}


def _decode(body: bytes) -> Any:
    try:
        return cbor2.loads(body, semantic_decoders=_SEMANTIC_DECODERS, allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises several types on hostile input
        raise ProtocolError(f"frame is not valid CBOR: {exc}") from exc


def _encode(value: Any) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception as exc:
        raise ValueError(f"cannot encode as CBOR: {exc}") from exc


def _proof(secret: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, label + server_nonce + client_nonce, hashlib.sha256).digest()


def _derive_key(secret: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


class _FrameCipher:
    """AES-GCM for one direction; the nonce is the count of frames so far."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, plaintext: bytes) -> bytes:
        if self._counter > _MAX_COUNTER:  # pragma: no cover - 2**96 frames
            raise RuntimeError("frame counter exhausted; reconnect")
        nonce = self._counter.to_bytes(_GCM_NONCE_SIZE, "big")
        self._counter += 1
        return self._aead.encrypt(nonce, plaintext, None)

    def open(self, ciphertext: bytes) -> bytes:
        nonce = self._counter.to_bytes(_GCM_NONCE_SIZE, "big")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, None)
        except InvalidTag:
            raise ProtocolError(
                f"frame {self._counter} failed authentication (altered, replayed or reordered)"
            ) from None
        self._counter += 1
        return plaintext


def _field(msg: dict[Any, Any], key: str, kind: type, what: str) -> Any:
    value = msg.get(key)
    # bool is an int subclass; an id or version must be a real int.
    if type(value) is not kind and not (kind is dict and isinstance(value, dict)):
        raise ProtocolError(f"{what}: field {key!r} must be {kind.__name__}, got {value!r:.80}")
    return value


def _require_map(value: Any, what: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a CBOR map, got {type(value).__name__}")
    return value


class RpcCodec:
    """The RPC protocol of one connection, without I/O.

    Feed received bytes to :meth:`receive_data`, then call :meth:`next_event`
    until it returns None. Write :meth:`data_to_send` after each call that
    may produce handshake output (the server's hello is queued at
    construction; handshake replies and rejections are queued by
    :meth:`next_event`). After :class:`HandshakeDone`, :meth:`send` turns a
    message into the bytes to write; write them in the order they were made.

    ``nonce`` is this side's 32 fresh random bytes (the caller draws them, so
    the codec is deterministic). ``secret=None`` is dev mode.
    """

    def __init__(
        self,
        role: Role,
        *,
        secret: bytes | None,
        nonce: bytes,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if secret is not None and not secret:
            raise ValueError("the cluster secret must not be empty (use None for dev mode)")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        if max_frame < _MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {_MIN_MAX_FRAME}, got {max_frame}")
        self.role = role
        self._secret = secret
        self._nonce = bytes(nonce)
        self._max_frame = max_frame
        self._frames = FrameBuffer(min(HANDSHAKE_MAX_FRAME, max_frame))
        self._state = CodecState.AWAIT_HELLO
        self._outbox = bytearray()
        self._server_nonce = b""
        self._sealer: _FrameCipher | None = None
        self._opener: _FrameCipher | None = None
        if role is Role.SERVER:
            self._queue({"v": PROTOCOL_VERSION, "auth": secret is not None, "nonce": self._nonce})

    @property
    def state(self) -> CodecState:
        return self._state

    @property
    def authenticated(self) -> bool:
        """True when the connection is (or will be) authenticated and encrypted."""
        return self._secret is not None

    def data_to_send(self) -> bytes:
        """Handshake bytes queued for the peer (empty when none); clears the queue."""
        data = bytes(self._outbox)
        self._outbox.clear()
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the peer, split anywhere. Ignored once FAILED."""
        if self._state is not CodecState.FAILED:
            self._frames.receive_data(data)

    def next_event(self) -> Event | None:
        """The next event, or None until more data arrives.

        Raises :class:`ProtocolError` (malformed, oversized or unauthentic
        frame, wrong protocol version) or :class:`AuthFailed` (wrong secret,
        or one side has a secret and the other has none). After either, the
        codec is FAILED: send :meth:`data_to_send` (a server queues its
        rejection there) and close the connection.
        """
        if self._state is CodecState.FAILED:
            raise ProtocolError("the connection already failed; close it")
        try:
            body = self._frames.next_frame()
            if body is None:
                return None
            if self._state is CodecState.OPEN:
                return self._receive_message(body)
            if self.role is Role.SERVER:
                return self._server_receive_hello(body)
            if self._state is CodecState.AWAIT_HELLO:
                self._client_receive_hello(body)
                return None if self._frames.buffered == 0 else self.next_event()
            return self._client_receive_verdict(body)
        except (ProtocolError, AuthFailed) as exc:
            if self.role is Role.SERVER and self._state is CodecState.AWAIT_HELLO:
                self._queue({"ok": False, "error": exc.code})
            self._state = CodecState.FAILED
            raise

    def send(self, message: Message) -> bytes:
        """The frame that carries ``message``; write it before any later one.

        Raises ``RuntimeError`` before the handshake is done or after a
        failure, ``ValueError`` if this role cannot send that message, a
        field has the wrong type, the message cannot be encoded as CBOR or it
        is larger than ``max_frame``. A ``ValueError`` leaves the codec
        usable (nothing was consumed).
        """
        if self._state is not CodecState.OPEN:
            raise RuntimeError(f"cannot send while the codec is {self._state.value}")
        plaintext = _encode(self._wire_form(message))
        size = len(plaintext) + (_GCM_TAG_SIZE if self._sealer is not None else 0)
        if size > self._max_frame:
            raise ValueError(f"message of {size} bytes exceeds max_frame ({self._max_frame})")
        if self._sealer is not None:
            return encode_frame(self._sealer.seal(plaintext))
        return encode_frame(plaintext)

    # -- handshake --------------------------------------------------------

    def _queue(self, message: dict[str, Any]) -> None:
        self._outbox += encode_frame(cbor2.dumps(message))

    def _parse_hello(self, body: bytes) -> tuple[bytes, bool, dict[Any, Any]]:
        msg = _require_map(_decode(body), "hello")
        version = msg.get("v")
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise ProtocolError(f"unsupported RPC protocol version {version!r:.40}")
        nonce = _field(msg, "nonce", bytes, "hello")
        if len(nonce) != NONCE_SIZE:
            raise ProtocolError(f"hello nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        peer_auth = _field(msg, "auth", bool, "hello")
        return nonce, peer_auth, msg

    def _server_receive_hello(self, body: bytes) -> HandshakeDone:
        client_nonce, client_auth, msg = self._parse_hello(body)
        if self._secret is None:
            if client_auth:
                raise AuthFailed("client has a cluster secret but this server runs without one")
            self._queue({"ok": True})
            self._open(client_nonce)
            return HandshakeDone(authenticated=False)
        if not client_auth:
            raise AuthFailed("client has no cluster secret and this server requires one")
        proof = _field(msg, "proof", bytes, "client hello")
        expected = _proof(self._secret, _CLIENT_PROOF_LABEL, self._nonce, client_nonce)
        if not hmac.compare_digest(proof, expected):
            raise AuthFailed("client failed to prove the cluster secret (wrong secret?)")
        self._queue(
            {
                "ok": True,
                "proof": _proof(self._secret, _SERVER_PROOF_LABEL, self._nonce, client_nonce),
            }
        )
        self._open(client_nonce)
        return HandshakeDone(authenticated=True)

    def _client_receive_hello(self, body: bytes) -> None:
        server_nonce, server_auth, _ = self._parse_hello(body)
        self._server_nonce = server_nonce
        hello: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "auth": self._secret is not None,
            "nonce": self._nonce,
        }
        if self._secret is not None:
            hello["proof"] = _proof(self._secret, _CLIENT_PROOF_LABEL, server_nonce, self._nonce)
        # Sent even when refusing below, so that the server logs the mismatch too.
        self._queue(hello)
        if self._secret is not None and not server_auth:
            raise AuthFailed("server runs without a cluster secret (dev mode); refusing it")
        if self._secret is None and server_auth:
            raise AuthFailed("server requires the cluster secret and none is configured")
        self._state = CodecState.AWAIT_VERDICT

    def _client_receive_verdict(self, body: bytes) -> HandshakeDone:
        msg = _require_map(_decode(body), "handshake verdict")
        if not _field(msg, "ok", bool, "handshake verdict"):
            error = msg.get("error")
            if error == AuthFailed.code:
                raise AuthFailed("server refused our proof of the cluster secret (wrong secret?)")
            raise ProtocolError(f"server refused the handshake: {error!r:.80}")
        if self._secret is not None:
            proof = _field(msg, "proof", bytes, "handshake verdict")
            expected = _proof(self._secret, _SERVER_PROOF_LABEL, self._server_nonce, self._nonce)
            if not hmac.compare_digest(proof, expected):
                raise AuthFailed("server failed to prove the cluster secret (wrong secret?)")
        self._open(self._nonce)
        return HandshakeDone(authenticated=self._secret is not None)

    def _open(self, client_nonce: bytes) -> None:
        server_nonce = self._nonce if self.role is Role.SERVER else self._server_nonce
        if self._secret is not None:
            salt = server_nonce + client_nonce
            c2s = _FrameCipher(_derive_key(self._secret, salt, _C2S_INFO))
            s2c = _FrameCipher(_derive_key(self._secret, salt, _S2C_INFO))
            self._sealer, self._opener = (c2s, s2c) if self.role is Role.CLIENT else (s2c, c2s)
        self._frames.max_frame = self._max_frame
        self._state = CodecState.OPEN

    # -- messages ---------------------------------------------------------

    def _receive_message(self, body: bytes) -> Message:
        if self._opener is not None:
            body = self._opener.open(body)
        msg = _require_map(_decode(body), "message")
        if self.role is Role.SERVER:
            if "m" not in msg:
                raise ProtocolError("a client may only send requests")
            params = _field(msg, "p", dict, "request")
            if not all(type(k) is str for k in params):
                raise ProtocolError("request params must be a map with text keys")
            return Request(
                _field(msg, "id", int, "request"), _field(msg, "m", str, "request"), params
            )
        if "push" in msg:
            if "d" not in msg:
                raise ProtocolError("push without data")
            return Push(_field(msg, "push", str, "push"), msg["d"])
        request_id = _field(msg, "id", int, "response")
        if "r" in msg:
            return Response(request_id, msg["r"])
        if "e" in msg:
            error = _require_map(msg["e"], "error")
            data = error.get("data", {})
            return ErrorResponse(
                request_id,
                _field(error, "code", str, "error"),
                _field(error, "message", str, "error"),
                _require_map(data, "error data"),
            )
        raise ProtocolError("response has neither a result nor an error")

    def _wire_form(self, message: Message) -> dict[str, Any]:
        if self.role is Role.CLIENT:
            if not isinstance(message, Request):
                raise ValueError(f"a client cannot send {type(message).__name__}")
            if not isinstance(message.params, dict):
                raise ValueError(f"params must be a map, got {type(message.params).__name__}")
            if not isinstance(message.method, str):
                raise ValueError("method must be a str")
            return {"id": message.id, "m": message.method, "p": message.params}
        if isinstance(message, Response):
            return {"id": message.id, "r": message.result}
        if isinstance(message, ErrorResponse):
            error = {"code": message.code, "message": message.message, "data": message.data}
            return {"id": message.id, "e": error}
        if isinstance(message, Push):
            if not isinstance(message.channel, str):
                raise ValueError("push channel must be a str")
            return {"push": message.channel, "d": message.data}
        raise ValueError(f"a server cannot send {type(message).__name__}")


# ---------------------------------------------------------------------------
# trio shell
# ---------------------------------------------------------------------------

#: Queued outgoing bytes above which senders wait for the writer (backpressure).
_HIGH_WATER = 1024 * 1024
#: The writer hands the stream at most this much at a time; ``send_timeout``
#: bounds each piece, so a peer that reads slowly but steadily is not dropped.
_WRITE_CHUNK = 256 * 1024


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or ``(host, port)`` as ``(host, port)``.

    Raises ``ValueError`` naming the bad address.
    """
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"RPC address must look like host:port, got {address!r}")
        port = int(port_text)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    if not 0 < port < 65536:
        raise ValueError(f"RPC port must be 1..65535, got {port} in {address!r}")
    return host, port


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_name(stream: trio.abc.Stream) -> str:
    transport: Any = stream
    while isinstance(transport, trio.SSLStream):
        transport = transport.transport_stream
    try:
        peer = transport.socket.getpeername()
        return _format_address(str(peer[0]), int(peer[1]))
    except (AttributeError, OSError, IndexError, TypeError):
        return "<unknown peer>"


async def _close_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, ssl.SSLError)


class _FrameWriter:
    """Owns the sending half of a stream.

    Frames are queued synchronously, so their order on the wire is the order
    the codec made them (the frame counter depends on it), and one task
    writes whatever has accumulated in one go. Nothing can cancel a write
    half-way except the end of the connection. A piece the peer does not
    accept within ``send_timeout`` fails the writer, and ``on_failure`` closes
    the connection.
    """

    def __init__(
        self,
        stream: trio.abc.SendStream,
        *,
        send_timeout: float,
        on_failure: Callable[[str, bool], None],
    ) -> None:
        self._stream = stream
        self._send_timeout = send_timeout
        self._on_failure = on_failure
        self._buffer = bytearray()
        self._wakeup = trio.Event()
        self._drained = trio.Event()
        self.failure: str | None = None

    def queue(self, frame: bytes) -> None:
        if self.failure is not None:
            raise trio.ClosedResourceError(self.failure)
        self._buffer += frame
        self._wakeup.set()

    async def wait_writable(self) -> None:
        """Wait while too much is queued (returns at once after a failure)."""
        while len(self._buffer) > _HIGH_WATER and self.failure is None:
            await self._drained.wait()

    async def run(self) -> None:
        try:
            while True:
                while not self._buffer:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                # Let the tasks that are runnable now queue their frames first,
                # so that one write carries all of them (one syscall for a whole
                # batch of answers instead of one each).
                await trio.lowlevel.cancel_shielded_checkpoint()
                data, self._buffer = self._buffer, bytearray()
                self._drained.set()
                self._drained = trio.Event()
                view = memoryview(data)
                for start in range(0, len(view), _WRITE_CHUNK):
                    with trio.move_on_after(self._send_timeout) as timer:
                        await self._stream.send_all(view[start : start + _WRITE_CHUNK])
                    if timer.cancelled_caught:
                        self._fail(f"peer did not read for {self._send_timeout}s", timed_out=True)
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(f"send failed: {exc!r}", timed_out=False)

    def close(self, reason: str) -> None:
        """Refuse further frames and wake the senders waiting for room."""
        if self.failure is None:
            self.failure = reason
        self._drained.set()

    def _fail(self, reason: str, *, timed_out: bool) -> None:
        self.close(reason)
        self._on_failure(reason, timed_out)


#: ``handler(conn, method, params)``: the server awaits it for each request.
RpcHandler: TypeAlias = Callable[["RpcServerConnection", str, dict[str, Any]], Awaitable[Any]]


class RpcServerConnection:
    """One client's connection, as the request handler sees it.

    ``state`` is free for the handler (e.g. the client's subscriptions);
    ``cleanup_callbacks`` are called (synchronously, each once, errors
    logged) when the connection ends, whatever the reason; ``closed`` is set
    once it has ended and they have run.
    """

    def __init__(
        self, stream: trio.abc.Stream, codec: RpcCodec, peer: str, send_timeout: float
    ) -> None:
        #: The client's address, ``host:port``.
        self.peer = peer
        #: Per-connection storage for the handler.
        self.state: dict[str, Any] = {}
        #: Called with no argument when the connection ends.
        self.cleanup_callbacks: list[Callable[[], object]] = []
        #: Set when the connection has ended and the callbacks have run.
        self.closed = trio.Event()
        self._stream = stream
        self._codec = codec
        self._writer = _FrameWriter(stream, send_timeout=send_timeout, on_failure=self._send_failed)
        self._scope = trio.CancelScope()
        self._closing = False

    def __repr__(self) -> str:
        return f"<RpcServerConnection {self.peer}{' closed' if self._closing else ''}>"

    async def push(self, channel: str, data: Any) -> None:
        """Send ``data`` on ``channel`` to this client, after anything sent before.

        Returns once the push is queued, in order, behind earlier responses
        and pushes; waits first while more than 1 MiB is queued for this
        client. Raises ``trio.ClosedResourceError`` if the connection is
        closed, or gets closed because the client read nothing for
        ``send_timeout`` seconds (drop the subscription; the client
        re-subscribes elsewhere), and ``ValueError`` if ``data`` cannot be
        encoded as CBOR or makes a frame larger than ``max_frame``.
        """
        await self._send(Push(channel, data))

    async def wait_closed(self) -> None:
        """Return once the connection has ended."""
        await self.closed.wait()

    async def aclose(self) -> None:
        """Close the connection (e.g. the client lost its rights).

        In-flight requests are cancelled, including the caller when it is
        one of them.
        """
        self._abort()
        await self.closed.wait()

    def _abort(self) -> None:
        self._mark_closing()
        self._scope.cancel()

    def _mark_closing(self) -> None:
        self._closing = True
        self._writer.close(f"connection from {self.peer} is closed")

    def _send_failed(self, reason: str, timed_out: bool) -> None:
        if timed_out:
            _log.warning("rpc client %s: %s; closing its connection", self.peer, reason)
        else:
            _log.debug("rpc client %s: %s", self.peer, reason)
        self._abort()

    async def _send(self, message: Message) -> None:
        await self._writer.wait_writable()
        if self._closing:
            raise trio.ClosedResourceError(f"connection from {self.peer} is closed")
        self._writer.queue(self._codec.send(message))

    async def _run(self, handler: RpcHandler, max_concurrent: int) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer.run)
            await self._serve_requests(handler, max_concurrent)
            nursery.cancel_scope.cancel()

    async def _serve_requests(self, handler: RpcHandler, max_concurrent: int) -> None:
        async with trio.open_nursery() as nursery:
            slots = trio.Semaphore(max_concurrent)
            try:
                while True:
                    while (event := self._codec.next_event()) is not None:
                        if not isinstance(event, Request):  # pragma: no cover - codec checks
                            raise ProtocolError(f"unexpected {type(event).__name__}")
                        # Backpressure: no more reading until a slot is free
                        # (no yield per request while slots are free).
                        try:
                            slots.acquire_nowait()
                        except trio.WouldBlock:
                            await slots.acquire()
                        nursery.start_soon(self._run_request, handler, event, slots)
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        _log.debug("rpc client %s disconnected", self.peer)
                        break
                    self._codec.receive_data(data)
            except ProtocolError as exc:
                _log.warning("rpc protocol error from %s: %s; closing", self.peer, exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                _log.debug("rpc connection from %s lost: %r", self.peer, exc)
            # Answers can no longer be delivered: cancel what is in flight.
            self._mark_closing()
            nursery.cancel_scope.cancel()

    async def _run_request(
        self, handler: RpcHandler, request: Request, slots: trio.Semaphore
    ) -> None:
        try:
            reply: Message
            try:
                result = await handler(self, request.method, request.params)
                reply = Response(request.id, result)
            except IrisError as exc:
                reply = ErrorResponse.from_error(request.id, exc)
            except Exception as exc:
                _log.exception("rpc handler failed on %r from %s", request.method, self.peer)
                reply = self._internal_error(request, exc)
            try:
                try:
                    await self._send(reply)
                except ValueError as exc:  # unencodable or oversized answer
                    _log.error("rpc answer to %r for %s: %s", request.method, self.peer, exc)
                    await self._send(self._internal_error(request, exc))
            except trio.ClosedResourceError:
                pass
        finally:
            slots.release()

    @staticmethod
    def _internal_error(request: Request, exc: Exception) -> ErrorResponse:
        error = InternalError(
            f"internal error while handling {request.method!r}: {type(exc).__name__} "
            "(details in the core's log)"
        )
        return ErrorResponse.from_error(request.id, error)

    async def _finish(self) -> None:
        self._mark_closing()
        await _close_quietly(self._stream)
        for callback in self.cleanup_callbacks:
            try:
                callback()
            except Exception:
                _log.exception("rpc cleanup callback for %s failed", self.peer)
        self.closed.set()


async def _server_handshake(
    stream: trio.abc.Stream, codec: RpcCodec, peer: str, timeout: float
) -> bool:
    with trio.move_on_after(timeout):
        try:
            await stream.send_all(codec.data_to_send())
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    _log.info("rpc peer %s closed the connection during the handshake", peer)
                    return False
                codec.receive_data(data)
                if codec.next_event() is not None:
                    await stream.send_all(codec.data_to_send())
                    return True
        except AuthFailed as exc:
            _log.warning("rpc authentication failed for %s: %s; closing", peer, exc)
        except ProtocolError as exc:
            _log.warning("rpc handshake with %s failed: %s; closing", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            level = logging.WARNING if _is_tls_failure(exc) else logging.INFO
            _log.log(level, "rpc handshake with %s broke off: %r", peer, exc.__cause__ or exc)
            return False
        # Tell the peer why (best effort), then close.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(codec.data_to_send())
        return False
    _log.warning("rpc handshake with %s timed out after %.1fs; closing", peer, timeout)
    return False


async def serve_rpc(
    handler: RpcHandler,
    host: str | None,
    port: int,
    *,
    secret: bytes | None,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> NoReturn:
    """Serve RPC on ``host:port`` until cancelled (``port=0``: any free port).

    Use with ``nursery.start``: it returns the bound ``trio.SocketListener``
    list (``listeners[0].socket.getsockname()[1]`` is the port). Each request
    runs ``await handler(conn, method, params)`` in its own task, at most
    ``max_concurrent_requests`` at once per connection; an
    :class:`IrisError` it raises is sent as an error response, any other
    exception is logged and sent as ``internal``. ``secret=None`` is dev
    mode: no authentication, no encryption. ``ssl_context`` adds TLS under
    the handshake. A client that reads nothing for ``send_timeout`` seconds
    while answers or pushes wait is disconnected.

    Raises ``OSError`` naming the address if it cannot listen (port in use,
    bad host), ``ValueError`` for a bad argument; nothing a client does
    makes it raise.
    """
    if secret is not None and not secret:
        raise ValueError("the cluster secret must not be empty (use None for dev mode)")
    if max_frame < _MIN_MAX_FRAME:
        raise ValueError(f"max_frame must be at least {_MIN_MAX_FRAME}, got {max_frame}")
    if max_concurrent_requests < 1:
        raise ValueError("max_concurrent_requests must be at least 1")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        where = _format_address(host or "*", port)
        raise OSError(
            exc.errno, f"cannot listen for RPC on {where}: {exc.strerror or exc}"
        ) from exc

    async def serve_connection(stream: trio.abc.Stream) -> None:
        peer = _peer_name(stream)
        codec = RpcCodec(
            Role.SERVER, secret=secret, nonce=secrets.token_bytes(NONCE_SIZE), max_frame=max_frame
        )
        conn = RpcServerConnection(stream, codec, peer, send_timeout)
        try:
            with conn._scope:
                if await _server_handshake(stream, codec, peer, handshake_timeout):
                    _log.debug("rpc client %s connected", peer)
                    await conn._run(handler, max_concurrent_requests)
        except Exception:
            _log.exception("rpc connection from %s failed unexpectedly", peer)
        finally:
            await conn._finish()

    wrapped: list[trio.abc.Listener[trio.abc.Stream]]
    if ssl_context is not None:
        wrapped = [trio.SSLListener(listener, ssl_context) for listener in listeners]
    else:
        wrapped = list(listeners)
    for listener in listeners:
        _log.info("rpc listening on %s", _format_address(*listener.socket.getsockname()[:2]))
    task_status.started(listeners)
    await trio.serve_listeners(serve_connection, wrapped)


class _PendingCall:
    __slots__ = ("done", "error", "method", "result")

    def __init__(self, method: str) -> None:
        self.method = method
        self.done = trio.Event()
        self.result: Any = None
        self.error: IrisError | None = None

    def finish(self, result: Any = None, error: IrisError | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class RpcClientConnection:
    """A connection to a core's RPC port; many calls may run on it at once.

    Made by :func:`open_rpc_connection`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        codec: RpcCodec,
        address: str,
        *,
        push_buffer: int,
        send_timeout: float,
    ) -> None:
        #: The server's address, ``host:port``.
        self.address = address
        self._stream = stream
        self._codec = codec
        self._push_buffer = push_buffer
        self._writer = _FrameWriter(stream, send_timeout=send_timeout, on_failure=self._send_failed)
        self._pending: dict[int, _PendingCall] = {}
        self._subscribers: dict[str, list[trio.MemorySendChannel[Any]]] = {}
        self._next_id = 1
        self._closed = False
        self._close_reason = "closed"
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    def __repr__(self) -> str:
        return f"<RpcClientConnection {self.address}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost; make a new one."""
        return self._closed

    async def call(self, method: str, params: dict[str, Any], *, timeout: float) -> Any:
        """Call ``method`` on the server and return its result.

        Raises:
          the :class:`IrisError` the server answered with (rebuilt by
            :func:`error_from_code`): a definite answer;
          :class:`UnknownOutcome` if no answer came within ``timeout``
            seconds, or the connection was lost while it was pending: the
            request may have run; retry with the same operation id;
          :class:`Unavailable` if the connection was already closed (nothing
            was sent; use another connection);
          :class:`BadRequest` if ``params`` cannot be encoded or exceed the
            frame limit (nothing was sent; the connection stays usable).
        """
        self._check_open(method)
        request_id = self._next_id
        self._next_id += 1
        pending = _PendingCall(method)
        try:
            with trio.move_on_after(timeout):
                await self._writer.wait_writable()
                self._check_open(method)
                try:
                    frame = self._codec.send(Request(request_id, method, params))
                except ValueError as exc:
                    raise BadRequest(f"cannot send {method!r}: {exc}") from exc
                self._pending[request_id] = pending
                self._writer.queue(frame)
                await pending.done.wait()
            if not pending.done.is_set():
                raise UnknownOutcome(
                    f"no answer to {method!r} from {self.address} within {timeout}s; "
                    "it may have been applied",
                    method=method,
                )
        finally:
            self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.result

    def pushes(self, channel: str) -> trio.MemoryReceiveChannel[Any]:
        """A new receiver of the server's pushes on ``channel``, in the order sent.

        Subscribe here *before* asking the server to push, or early pushes
        are dropped. The receiver ends (``trio.EndOfChannel``) when the
        connection closes; if it falls ``push_buffer`` items behind, the
        connection is closed with a logged error rather than dropping data.
        Either way, subscribe again on a new connection. Closing the receiver
        unsubscribes it.
        """
        send, receive = trio.open_memory_channel[Any](self._push_buffer)
        if self._closed:
            send.close()
        else:
            self._subscribers.setdefault(channel, []).append(send)
        return receive

    async def wait_closed(self) -> None:
        """Return once the connection has ended (closed by either side, or lost)."""
        await self._done.wait()

    async def aclose(self) -> None:
        """Close the connection; pending calls raise :class:`UnknownOutcome`."""
        self._abort("closed by the client")
        with trio.CancelScope(shield=True):
            await self._done.wait()

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise Unavailable(
                f"connection to {self.address} is closed ({self._close_reason}); "
                f"{method!r} was not sent"
            )

    def _abort(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._close_reason = reason
        self._writer.close(reason)
        self._scope.cancel()

    def _send_failed(self, reason: str, timed_out: bool) -> None:
        if timed_out:
            _log.warning("rpc server %s: %s; closing the connection", self.address, reason)
        self._abort(reason)

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer.run)
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # pragma: no cover - _read_loop catches its errors
            _log.exception("rpc connection to %s failed unexpectedly", self.address)
            self._abort(f"internal error: {exc!r}")
        finally:
            self._abort(self._close_reason)
            for request_id, pending in list(self._pending.items()):
                pending.finish(
                    error=UnknownOutcome(
                        f"connection to {self.address} ended before the answer to "
                        f"{pending.method!r} ({self._close_reason}); it may have been applied",
                        method=pending.method,
                        request_id=request_id,
                    )
                )
            for senders in self._subscribers.values():
                for sender in senders:
                    sender.close()
            self._subscribers.clear()
            await _close_quietly(self._stream)
            self._done.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    self._abort("the server closed the connection")
                    return
                self._codec.receive_data(data)
                while (event := self._codec.next_event()) is not None:
                    self._dispatch(event)
                    if self._closed:
                        return
        except ProtocolError as exc:
            _log.error("rpc protocol error from %s: %s; closing", self.address, exc)
            self._abort(f"protocol error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._abort(f"connection lost: {exc!r}")

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Push):
            self._deliver(event)
        elif isinstance(event, Response | ErrorResponse):
            pending = self._pending.get(event.id)
            if pending is None:
                _log.debug("rpc answer to unknown or abandoned request %d", event.id)
            elif isinstance(event, Response):
                pending.finish(result=event.result)
            else:
                pending.finish(error=event.to_error())

    def _deliver(self, push: Push) -> None:
        senders = self._subscribers.get(push.channel)
        if not senders:
            _log.debug("rpc push on %r with no subscriber dropped", push.channel)
            return
        for sender in list(senders):
            try:
                sender.send_nowait(push.data)
            except trio.WouldBlock:
                _log.error(
                    "rpc push subscriber of %r on %s fell %d items behind; closing the connection",
                    push.channel,
                    self.address,
                    self._push_buffer,
                )
                self._abort(f"push subscriber of {push.channel!r} overflowed")
                return
            except trio.BrokenResourceError:
                senders.remove(sender)
                sender.close()


async def _connect(
    host: str,
    port: int,
    name: str,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    connect_timeout: float,
) -> trio.abc.Stream:
    try:
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise Unavailable(f"connecting to {name} timed out after {connect_timeout}s") from None
    except OSError as exc:
        raise Unavailable(f"cannot connect to {name}: {exc}") from exc
    if ssl_context is None:
        return tcp
    return trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)


async def _client_handshake(
    stream: trio.abc.Stream, codec: RpcCodec, name: str, timeout: float
) -> None:
    try:
        with trio.fail_after(timeout):
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise Unavailable(f"{name} closed the connection during the handshake")
                codec.receive_data(data)
                try:
                    event = codec.next_event()
                except (AuthFailed, ProtocolError):
                    # A refusing client still sends its hello, so the server logs why.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_all(codec.data_to_send())
                    raise
                outgoing = codec.data_to_send()
                if outgoing:
                    await stream.send_all(outgoing)
                if event is not None:
                    return
    except trio.TooSlowError:
        raise Unavailable(f"handshake with {name} timed out after {timeout}s") from None
    except AuthFailed as exc:
        raise AuthFailed(f"{name}: {exc.message}") from exc
    except ProtocolError as exc:
        raise Unavailable(f"{name} does not speak iris RPC: {exc.message}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise AuthFailed(f"TLS certificate of {name} rejected: {cause}") from exc
        raise Unavailable(
            f"connection to {name} failed during the handshake: {cause or exc!r}"
        ) from exc


@asynccontextmanager
async def open_rpc_connection(
    address: str | tuple[str, int],
    *,
    secret: bytes | None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame: int = DEFAULT_MAX_FRAME,
    push_buffer: int = DEFAULT_PUSH_BUFFER,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
) -> AsyncIterator[RpcClientConnection]:
    """Connect to a core's RPC port, run the handshake, and yield the connection.

    The connection is closed on exit. Raises :class:`Unavailable` if the
    server cannot be reached, does not finish the handshake within
    ``handshake_timeout`` or does not speak this protocol (try another
    core); :class:`AuthFailed` if either side fails to prove the cluster
    secret, only one side has a secret, or the server's TLS certificate is
    rejected (fix the configuration: retrying will not help); ``ValueError``
    for a malformed address or argument.
    """
    host, port = parse_address(address)
    name = _format_address(host, port)
    if push_buffer < 1:
        raise ValueError("push_buffer must be at least 1")
    codec = RpcCodec(
        Role.CLIENT, secret=secret, nonce=secrets.token_bytes(NONCE_SIZE), max_frame=max_frame
    )
    stream = await _connect(host, port, name, ssl_context, server_hostname, connect_timeout)
    try:
        await _client_handshake(stream, codec, name, handshake_timeout)
    except BaseException:
        await _close_quietly(stream)
        raise
    conn = RpcClientConnection(
        stream, codec, name, push_buffer=push_buffer, send_timeout=send_timeout
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn._run)
            try:
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        # conn._run never raises, so the group only wraps the caller's own
        # exception: re-raise it bare so that `except SomeError` works.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context
