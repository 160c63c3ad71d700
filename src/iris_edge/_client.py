"""A trio client for Iris edges (protocol v1): reconnecting, retrying, deduplicating.

Theory of operation
-------------------
:func:`open_iris` yields an :class:`IrisClient` once the first connection is
authenticated (``welcome``). A background task owns the connection: it
offers the subprotocol ``iris.v1``, sends ``{"type": "auth", "token": ...}``
as the first frame, waits for ``welcome``, then reads frames until the
connection ends. It then reconnects on its own with capped, jittered
exponential backoff, except after close 4001/4002/4003: a token that failed
once fails again, so the client ends with :class:`AuthError`, raised from
every pending and later operation and from :meth:`IrisClient.messages`.

Sends (:meth:`IrisClient.send`) carry an id fixed before the first attempt.
An attempt writes the ``send`` frame on the current connection and waits for
the ``sent`` or ``error`` frame with that id. The same id is written again
after a reconnect, after ``unavailable``/``rate_limited``/``write_blocked``
(with backoff) and when no answer came within :data:`ATTEMPT_TIMEOUT`; the
server deduplicates by id, so a retry never stores twice. Only ``sent``
promises durability. When ``send_timeout`` passes first, :class:`SendTimeout`
says whether the message *may* have been stored (an attempt reached the
wire and was not refused outright): an unknown outcome, not a failure; send
again with the same id to find out. Other error codes are definite:
:class:`IrisClientError`. Once started, the client retries everything but
the auth closes, even a refused handshake (a proxy in the middle of a deploy).

Delivery is at least once: the server redelivers unacked messages on every
new connection. The client remembers the last :data:`DEDUP_MEMORY` mids it
handed to the application and drops repeats, so within one process each
message reaches the application once. The server's inbox limit (10,000
messages by default) is far below that memory. Acks are not answered by the
server; when an already acked mid is delivered again (an ack lost with its
connection), the client acks it again on its own.

Incoming messages are queued without bound so that the connection's reader
never stops reading (it also carries ``sent`` and ``pong`` answers): the
application must consume :meth:`IrisClient.messages`.

The wire format (one CBOR map per binary WebSocket message) and the backoff
and dedup rules are plain functions and classes with no I/O
(:func:`encode_frame`, :func:`decode_frame`, :class:`Backoff`,
:class:`RecentIds`); :class:`IrisClient` is the I/O shell around them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import secrets
import ssl
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import cbor2
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

logger = logging.getLogger("iris_edge.client")

#: The WebSocket subprotocol of protocol v1.
SUBPROTOCOL = "iris.v1"
#: How long one send attempt waits for its ``sent``/``error`` before writing the frame again.
ATTEMPT_TIMEOUT = 5.0
#: How many delivered mids the client remembers to drop repeats.
DEDUP_MEMORY = 100_000
#: Mids per ``ack`` frame (keeps ack frames far below the 64 KiB frame limit).
ACK_CHUNK = 500
#: Largest server frame accepted (the server's own limit applies to client frames).
MAX_INCOMING_FRAME = 16 * 1024 * 1024
#: A connection that lived this long resets the reconnect backoff.
STABLE_CONNECTION = 10.0
#: First reconnect delay (before jitter) and first retry delay after a retryable error.
INITIAL_BACKOFF = 0.1

#: Error codes after which a send is retried with the same id (with backoff).
RETRYABLE_CODES = frozenset({"unavailable", "rate_limited", "write_blocked"})
#: Close codes that end the client (the token is bad, expired or revoked).
AUTH_CLOSE_CODES = {4001: "auth_failed", 4002: "token_expired", 4003: "token_revoked"}
CLOSE_TOO_LARGE = 1009


# ------------------------------------------------------------------ errors


class IrisClientError(Exception):
    """Root of the client's errors. ``code`` is a protocol error code (or one of the client's own).

    Raised as such for a definite refusal by the server (``inbox_full``,
    ``bad_request``, ``too_large``, ``internal``...): nothing was stored;
    fix the request or give up.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class SendTimeout(IrisClientError):
    """``send_timeout`` passed without a ``sent``: an unknown outcome, not a failure.

    When ``may_be_stored`` is true an attempt reached the wire and the
    message may be stored (and delivered); send again with the same ``id``
    to learn its ``mid`` without storing it twice. ``last_error`` is the last
    retryable error code the server gave, if any.
    """

    def __init__(self, id: str, *, may_be_stored: bool, last_error: str | None) -> None:
        outcome = "may or may not be stored" if may_be_stored else "was not sent"
        detail = f" (last error: {last_error})" if last_error else ""
        super().__init__(
            "unknown_outcome", f"no answer for send {id!r}: the message {outcome}{detail}"
        )
        self.id = id
        self.may_be_stored = may_be_stored
        self.last_error = last_error


class AuthError(IrisClientError):
    """The server closed for the token: 4001 (refused), 4002 (expired), 4003 (revoked).

    The client has stopped; open a new one with a valid token. ``code`` is the
    protocol error code sent before the close (``auth_failed``,
    ``token_expired``, ``token_revoked``...). A send in flight when this is
    raised may or may not have been stored.
    """

    def __init__(self, close_code: int, code: str, message: str = "") -> None:
        super().__init__(code, message or f"connection closed with {close_code}")
        self.close_code = close_code


class ConnectFailed(IrisClientError):
    """No authenticated connection within ``connect_timeout`` (or the handshake was refused)."""


class ClientClosed(IrisClientError):
    """The client was closed (its ``open_iris`` block ended); nothing more can be sent."""

    def __init__(self) -> None:
        super().__init__("closed", "the client is closed")


class PingTimeout(IrisClientError):
    """No ``pong`` arrived in time."""

    def __init__(self, timeout: float) -> None:
        super().__init__("timeout", f"no pong within {timeout} s")


# -------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class Sent:
    """The server's promise that the message is durable: ``sent``."""

    id: str
    mid: str
    #: When the message was accepted, integer milliseconds since the epoch.
    ts: int


@dataclass(frozen=True, slots=True)
class Message:
    """A message for this user: ``msg``. Ack it with :meth:`IrisClient.ack` once handled."""

    mid: str
    sender: str
    body: Any
    #: When the message was accepted, integer milliseconds since the epoch.
    ts: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """``welcome``: the connection is authenticated."""

    user: str
    session: str
    edge: str


@dataclass(frozen=True, slots=True)
class Pong:
    """``pong``, carrying the ``data`` of its ``ping`` (None when absent)."""

    data: Any


@dataclass(frozen=True, slots=True)
class ServerError:
    """``error``: a request failed (``id`` names the send), or a close follows."""

    code: str
    id: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class OtherFrame:
    """A frame of a type this client does not know (ignored: forward compatibility)."""

    type: str


ServerFrame: TypeAlias = Welcome | Sent | Message | Pong | ServerError | OtherFrame


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """Counters since the client was opened."""

    #: Connections that reached ``welcome`` (the first one included).
    connections: int
    #: ``msg`` frames handed to the application.
    messages_received: int
    #: ``msg`` frames dropped because their mid was already delivered.
    duplicates_dropped: int
    #: Send attempts after the first (all causes).
    send_retries: int


# ------------------------------------------------------------ pure protocol


class FrameError(ValueError):
    """A server frame that is not one CBOR map with the keys its type needs."""


def encode_frame(frame: dict[str, Any]) -> bytes:
    """One client frame as CBOR. Raises ``ValueError``/``TypeError`` for values CBOR cannot hold."""
    return bytes(cbor2.dumps(frame))


def decode_frame(data: bytes | str) -> ServerFrame:
    """Parse one server frame. Raises :class:`FrameError` for anything malformed."""
    if isinstance(data, str):
        raise FrameError("text message (frames are binary CBOR)")
    stream = io.BytesIO(data)
    try:
        frame = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several types for bad input
        raise FrameError(f"not CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise FrameError(
            f"{len(data) - stream.tell()} bytes after the frame map (not exactly one CBOR item)"
        )
    if not isinstance(frame, dict):
        raise FrameError(f"a frame is a CBOR map, got {type(frame).__name__}")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise FrameError("frame without a text 'type'")
    if kind == "msg":
        return Message(
            _text(frame, "mid"), _text(frame, "from"), frame.get("body"), _int(frame, "ts")
        )
    if kind == "sent":
        return Sent(_text(frame, "id"), _text(frame, "mid"), _int(frame, "ts"))
    if kind == "error":
        return ServerError(
            _text(frame, "code"), _opt_text(frame, "id"), _opt_text(frame, "message")
        )
    if kind == "pong":
        return Pong(frame.get("data"))
    if kind == "welcome":
        return Welcome(_text(frame, "user"), _text(frame, "session"), _text(frame, "edge"))
    return OtherFrame(kind)


def _text(frame: dict[Any, Any], key: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str):
        raise FrameError(f"{frame.get('type')!r} frame: {key!r} must be text, got {value!r}")
    return value


def _opt_text(frame: dict[Any, Any], key: str) -> str | None:
    value = frame.get(key)
    if value is not None and not isinstance(value, str):
        raise FrameError(f"{frame.get('type')!r} frame: {key!r} must be text, got {value!r}")
    return value


def _int(frame: dict[Any, Any], key: str) -> int:
    value = frame.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FrameError(f"{frame.get('type')!r} frame: {key!r} must be an integer, got {value!r}")
    return value


def new_send_id() -> str:
    """A fresh random send id (22 URL-safe characters)."""
    return secrets.token_urlsafe(16)


class Backoff:
    """Capped exponential backoff with jitter: each delay is in [d/2, d], d doubling to ``cap``."""

    def __init__(
        self, initial: float, cap: float, rng: Callable[[], float] = random.random
    ) -> None:
        self.initial = min(initial, cap)
        self.cap = cap
        self._rng = rng
        self._next = self.initial

    def next(self) -> float:
        """The next delay (seconds)."""
        base = self._next
        self._next = min(self.cap, base * 2)
        return base / 2 + self._rng() * base / 2

    def reset(self) -> None:
        self._next = self.initial


class RecentIds:
    """The last ``capacity`` ids seen, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, item: object) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item: str) -> None:
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def auth_error_for_close(
    close_code: int, error_code: str | None, reason: str | None
) -> AuthError | None:
    """The :class:`AuthError` a close code means, or None when the client should reconnect."""
    default = AUTH_CLOSE_CODES.get(close_code)
    if default is None:
        return None
    return AuthError(close_code, error_code or default, reason or "")


# ------------------------------------------------------------------ client

_Stream: TypeAlias = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a ``ws://`` or ``wss://`` URL points."""

    host: str
    port: int
    resource: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def from_url(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Target:
        """Raises ``ValueError`` for a URL that is not ``ws://`` or ``wss://``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"an Iris URL starts with ws:// or wss://, got {url!r}")
        if parts.scheme == "ws" and ssl_context is not None:
            raise ValueError("ssl_context is for wss:// URLs")
        if parts.scheme == "wss" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        if not parts.hostname:
            raise ValueError(f"no host in {url!r}")
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, resource, ssl_context)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.ssl_context is not None else 80
        return host if self.port == default else f"{host}:{self.port}"

    async def open_stream(self) -> _Stream:
        if self.ssl_context is None:
            return await trio.open_tcp_stream(self.host, self.port)
        return await trio.open_ssl_over_tcp_stream(
            self.host, self.port, ssl_context=self.ssl_context, https_compatible=True
        )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@dataclass(eq=False)
class _Link:
    """One authenticated connection."""

    ws: WebSocketConnection
    welcome: Welcome
    opened_at: float
    closed: trio.Event = field(default_factory=trio.Event)
    #: Cancelled to close the connection (the session then closes it with 1000).
    reading: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: The last error frame without an id (it explains a close that follows).
    last_error: ServerError | None = None


@dataclass(eq=False)
class _Attempt:
    """One send attempt waiting for its answer on ``link``."""

    id: str
    link: _Link
    size: int
    answered: trio.Event = field(default_factory=trio.Event)
    answer: Sent | ServerError | None = None


@dataclass(frozen=True, slots=True)
class _Ended:
    """How a connection ended: ``fatal`` stops the client; ``welcomed``: it was authenticated."""

    fatal: IrisClientError | None
    welcomed: bool
    lived: float
    why: str


class _MessageStream:
    def __init__(self, client: IrisClient) -> None:
        self._client = client

    def __aiter__(self) -> _MessageStream:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._client.receive()
        except ClientClosed:
            raise StopAsyncIteration from None


class IrisClient:
    """A connection to an Iris edge that survives reconnects. Build it with :func:`open_iris`."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ssl_context: ssl.SSLContext | None,
        connect_timeout: float,
        send_timeout: float,
        max_backoff: float,
        max_frame_bytes: int,
    ) -> None:
        self.url = url
        self._target = _Target.from_url(url, ssl_context)
        self._token = token
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.max_backoff = max_backoff
        self.max_frame_bytes = max_frame_bytes
        self._link: _Link | None = None
        self._welcome: Welcome | None = None
        self._changed = trio.Event()
        self._fatal: IrisClientError | None = None
        self._closed = False
        self._reconnect_now = False
        self._attempts: dict[str, set[_Attempt]] = {}
        self._pings: dict[bytes, trio.Event] = {}
        self._inbox_send, self._inbox_recv = trio.open_memory_channel[Message](math.inf)
        self._delivered = RecentIds(DEDUP_MEMORY)
        self._acked = RecentIds(DEDUP_MEMORY)
        self._reacks: set[str] = set()
        self._reacks_ready = trio.Event()
        self._run_scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._wake = trio.Event()
        self._connections = 0
        self._messages_received = 0
        self._duplicates_dropped = 0
        self._send_retries = 0

    # ------------------------------------------------------------ public

    @property
    def user(self) -> str | None:
        """The authenticated user (from the last ``welcome``)."""
        return self._welcome.user if self._welcome else None

    @property
    def session(self) -> str | None:
        """The server's id for the current (or last) connection."""
        return self._welcome.session if self._welcome else None

    @property
    def edge(self) -> str | None:
        """The edge that served the current (or last) connection."""
        return self._welcome.edge if self._welcome else None

    @property
    def connected(self) -> bool:
        return self._link is not None

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connections=self._connections,
            messages_received=self._messages_received,
            duplicates_dropped=self._duplicates_dropped,
            send_retries=self._send_retries,
        )

    async def send(self, to: str, body: Any, *, id: str | None = None) -> Sent:
        """Send ``body`` (any CBOR value) to user ``to``; return once the message is durable.

        ``id`` (1..64 bytes, unique per sender) defaults to a fresh random id.
        Sending again with the same id never stores twice (the server answers
        with the original mid within its deduplication window).

        Raises :class:`SendTimeout` when ``send_timeout`` passes without an
        answer (unknown outcome: retry with the same id);
        :class:`IrisClientError` for a definite refusal (``inbox_full``,
        ``bad_request``, ``too_large``...): nothing was stored;
        :class:`AuthError` if the client ended because of its token;
        :class:`ClientClosed` after the client was closed; ``ValueError`` or
        ``TypeError`` at once for arguments that cannot be sent.
        """
        send_id = new_send_id() if id is None else id
        if not isinstance(send_id, str) or not 1 <= len(send_id.encode()) <= 64:
            raise ValueError(f"a send id is text of 1 to 64 bytes, got {send_id!r}")
        if not isinstance(to, str) or not to:
            raise ValueError(f"the recipient is a non-empty user id, got {to!r}")
        data = encode_frame({"type": "send", "id": send_id, "to": to, "body": body})
        if len(data) > self.max_frame_bytes:
            raise IrisClientError(
                "too_large",
                f"the send frame is {len(data)} bytes; the limit is {self.max_frame_bytes}",
            )
        backoff = Backoff(INITIAL_BACKOFF, self.max_backoff)
        in_doubt = False  # an earlier attempt may have been stored
        outstanding = False  # the attempt under way when the deadline struck
        last_error: str | None = None
        first = True
        with trio.move_on_after(self.send_timeout):
            while True:
                link = await self._wait_link()
                if not first:
                    self._send_retries += 1
                first = False
                attempt = _Attempt(send_id, link, len(data))
                self._attempts.setdefault(send_id, set()).add(attempt)
                outstanding = True
                try:
                    try:
                        await link.ws.send_message(data)
                    except ConnectionClosed:
                        in_doubt = True  # part of the frame may have left
                        await link.closed.wait()
                        continue
                    with trio.move_on_after(ATTEMPT_TIMEOUT):
                        await attempt.answered.wait()
                finally:
                    self._forget_attempt(attempt)
                outstanding = False
                answer = attempt.answer
                if isinstance(answer, Sent):
                    return answer
                if answer is None:
                    if self._fatal is not None:
                        raise self._fatal
                    in_doubt = True
                    continue  # connection lost or no answer in time: same id again
                if answer.code in RETRYABLE_CODES:
                    # unavailable: the core did not answer the edge in time (maybe stored);
                    # rate_limited, write_blocked: refused before anything was stored.
                    in_doubt = in_doubt or answer.code == "unavailable"
                    last_error = answer.code
                    await trio.sleep(backoff.next())
                    continue
                raise IrisClientError(answer.code, answer.message or "")
        self._raise_if_ended()
        raise SendTimeout(send_id, may_be_stored=in_doubt or outstanding, last_error=last_error)

    def messages(self) -> AsyncIterator[Message]:
        """Messages for this user, each mid once, in the order they arrived.

        Ends when the client is closed; raises :class:`AuthError` (after the
        messages already received) when the client ended because of its token.
        """
        return _MessageStream(self)

    async def receive(self) -> Message:
        """The next message (see :meth:`messages`).

        Raises :class:`ClientClosed` once the client is closed and every
        message received before was returned, or :class:`AuthError` (also
        after those) when the client ended because of its token.
        """
        try:
            return await self._inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._fatal is not None:
                raise self._fatal from None
            raise ClientClosed() from None

    async def ack(self, *mids: str) -> None:
        """Tell the server the messages are handled; it may forget them.

        Best effort: the protocol does not answer acks. If the connection is
        down, or an ack is lost with its connection, the server delivers the
        message again and the client acks it again on its own (the
        application does not see it twice). Never raises for a lost connection.
        """
        if not mids:
            return
        for mid in mids:
            self._acked.add(mid)
        link = self._link
        if link is not None:
            await self._send_acks(link, mids)

    async def refresh(self, token: str) -> None:
        """Use ``token`` from now on: as an ``auth`` frame now (if connected) and on reconnects.

        The new token must be for the same user; otherwise the server closes
        with 4001 and the client ends with :class:`AuthError`.
        """
        if not isinstance(token, str) or not token:
            raise ValueError("a token is a non-empty text")
        self._token = token
        link = self._link
        if link is not None:
            with contextlib.suppress(ConnectionClosed):
                await link.ws.send_message(encode_frame({"type": "auth", "token": token}))

    async def ping(self, *, timeout: float = 10.0) -> float:
        """Round trip time (seconds) of a ``ping``/``pong`` on the current connection.

        Waits for a connection if there is none; a ping lost with its
        connection is sent again on the next one. Raises :class:`PingTimeout`
        when no pong arrives within ``timeout``.
        """
        with trio.move_on_after(timeout):
            while True:
                link = await self._wait_link()
                data = secrets.token_bytes(8)
                answered = self._pings[data] = trio.Event()
                started = trio.current_time()
                try:
                    try:
                        await link.ws.send_message(encode_frame({"type": "ping", "data": data}))
                    except ConnectionClosed:
                        await link.closed.wait()
                        continue
                    await _first_of(answered.wait, link.closed.wait)
                finally:
                    self._pings.pop(data, None)
                if answered.is_set():
                    return trio.current_time() - started
        self._raise_if_ended()
        raise PingTimeout(timeout)

    async def wait_connected(self) -> None:
        """Wait for an authenticated connection; raises AuthError or ClientClosed if ended."""
        await self._wait_link()

    async def reconnect(self) -> None:
        """Close the current connection (1000) and wait for the next ``welcome`` (no backoff)."""
        target = self._connections + 1
        link = self._link
        self._reconnect_now = True
        self._wake.set()
        if link is not None:
            link.reading.cancel()
        while self._connections < target:
            self._raise_if_ended()
            await self._changed.wait()

    async def aclose(self) -> None:
        """Close the connection (1000) and stop; pending operations raise :class:`ClientClosed`."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link is not None:
            link.reading.cancel()
            with trio.move_on_after(2):
                await self._stopped.wait()
        self._run_scope.cancel()
        self._inbox_send.close()
        self._notify()

    # -------------------------------------------------------- internals

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _raise_if_ended(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed()

    async def _wait_link(self) -> _Link:
        while True:
            self._raise_if_ended()
            if self._link is not None:
                return self._link
            await self._changed.wait()

    def _forget_attempt(self, attempt: _Attempt) -> None:
        waiting = self._attempts.get(attempt.id)
        if waiting is not None:
            waiting.discard(attempt)
            if not waiting:
                del self._attempts[attempt.id]

    def _answer(self, send_id: str, answer: Sent | ServerError) -> None:
        for attempt in self._attempts.pop(send_id, ()):
            attempt.answer = answer
            attempt.answered.set()

    async def _send_acks(self, link: _Link, mids: Iterable[str]) -> None:
        ordered = list(dict.fromkeys(mids))
        with contextlib.suppress(ConnectionClosed):
            for i in range(0, len(ordered), ACK_CHUNK):
                await link.ws.send_message(
                    encode_frame({"type": "ack", "mids": ordered[i : i + ACK_CHUNK]})
                )

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect until closed or a token is refused.

        Before ``task_status.started()`` (the first ``welcome``) it raises
        :class:`AuthError` or :class:`ConnectFailed`; after, it never raises:
        an :class:`AuthError` is kept and raised from the client's operations,
        and anything else (even a refused handshake) is retried.
        """
        backoff = Backoff(INITIAL_BACKOFF, self.max_backoff)
        first_deadline = trio.current_time() + self.connect_timeout
        started = False

        def on_welcome() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        with self._run_scope:
            try:
                while True:
                    ended = await self._connection(on_welcome)
                    if ended.fatal is not None and not started:
                        raise ended.fatal
                    if isinstance(ended.fatal, AuthError):
                        self._fatal = ended.fatal
                        logger.warning("iris client stopped: %s", ended.fatal)
                        return
                    if self._closed:
                        return
                    if not started and trio.current_time() >= first_deadline:
                        raise ConnectFailed(
                            "connect_failed",
                            f"no welcome from {self.url} in {self.connect_timeout} s: {ended.why}",
                        )
                    if ended.welcomed and ended.lived >= STABLE_CONNECTION:
                        backoff.reset()
                    if not self._reconnect_now:
                        delay = backoff.next()
                        if not started:
                            delay = min(delay, max(0.0, first_deadline - trio.current_time()))
                        logger.info(
                            "iris connection ended (%s); reconnecting in %.2f s", ended.why, delay
                        )
                        with trio.move_on_after(delay):
                            await self._wake.wait()  # reconnect() cuts the wait short
                    self._reconnect_now = False
                    self._wake = trio.Event()
            finally:
                self._link = None
                self._stopped.set()
                for waiting in self._attempts.values():
                    for attempt in waiting:
                        attempt.answered.set()
                if self._fatal is not None:
                    self._inbox_send.close()
                self._notify()

    async def _connection(self, on_welcome: Callable[[], None]) -> _Ended:
        """One connection from handshake to close.

        The TCP (or TLS) stream is opened here and always closed here:
        trio-websocket 0.12 leaves a client's stream open when the server
        starts the close (it waits for the server's TCP close, then stops
        reading without closing its socket), which leaked one socket per
        server-closed connection with ``open_websocket_url``.
        """
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await self._target.open_stream()
        except (OSError, trio.TooSlowError) as exc:
            return _Ended(None, False, 0.0, f"cannot connect: {exc!r}")
        try:
            async with trio.open_nursery() as nursery:
                return await self._session(nursery, stream, on_welcome)
        except BaseExceptionGroup as group:
            # Only trio-websocket's reader task raises out of the nursery: a refused handshake.
            errors, rest = group.split(Exception)
            if rest is not None or errors is None:
                raise
            first = _leaves(errors)[0]
            if isinstance(first, ConnectionRejected):
                why = f"handshake refused with HTTP {first.status_code}"
                if 400 <= first.status_code < 500 and first.status_code not in (408, 429):
                    refused = ConnectFailed("handshake_refused", f"{self.url}: {why}")
                    return _Ended(refused, False, 0.0, why)
                return _Ended(None, False, 0.0, why)
            return _Ended(None, False, 0.0, f"connection error: {first!r}")
        finally:
            await trio.aclose_forcefully(stream)

    async def _session(
        self, nursery: trio.Nursery, stream: _Stream, on_welcome: Callable[[], None]
    ) -> _Ended:
        ws: WebSocketConnection | None = None
        link: _Link | None = None
        pre_error: ServerError | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    self._target.host_header,
                    self._target.resource,
                    subprotocols=[SUBPROTOCOL],
                    max_message_size=MAX_INCOMING_FRAME,
                )
            if ws.subprotocol != SUBPROTOCOL:
                await ws.aclose(1002, "subprotocol iris.v1 required")
                wrong = f"{self.url} did not select subprotocol {SUBPROTOCOL}"
                return _Ended(ConnectFailed("protocol_error", wrong), False, 0.0, "no subprotocol")
            await ws.send_message(encode_frame({"type": "auth", "token": self._token}))
            welcome: Welcome | None = None
            with trio.move_on_after(self.connect_timeout):
                while welcome is None:
                    frame = self._decode(await ws.get_message())
                    if isinstance(frame, Welcome):
                        welcome = frame
                    elif isinstance(frame, ServerError):
                        pre_error = frame
            if welcome is None:
                return _Ended(None, False, 0.0, "no welcome in time")
            link = _Link(ws, welcome, trio.current_time())
            self._link, self._welcome = link, welcome
            self._connections += 1
            self._notify()
            on_welcome()
            nursery.start_soon(self._reack_loop, link)
            with link.reading:
                await self._read(link)
        except trio.TooSlowError:
            return _Ended(None, False, 0.0, "no handshake answer in time")
        except ConnectionClosed:
            pass
        except (OSError, trio.BrokenResourceError) as exc:
            return _Ended(None, link is not None, 0.0, f"connection error: {exc!r}")
        finally:
            if link is not None:
                self._drop_link(link)
            if ws is not None:
                with trio.move_on_after(1):
                    await ws.aclose()
            nursery.cancel_scope.cancel()
        lived = trio.current_time() - link.opened_at if link is not None else 0.0
        reason = ws.closed if ws is not None else None
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None else None
        last_error = link.last_error if link is not None else pre_error
        fatal = auth_error_for_close(code, last_error.code if last_error else None, text)
        return _Ended(fatal, link is not None, lived, f"closed with {code} {text or ''}".strip())

    def _drop_link(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
        reason = link.ws.closed
        if reason is not None and reason.code == CLOSE_TOO_LARGE:
            # The server refused a frame of ours as too large: the largest send in flight.
            mine = [a for waiting in self._attempts.values() for a in waiting if a.link is link]
            if mine:
                culprit = max(mine, key=lambda a: a.size)
                self._answer(
                    culprit.id, ServerError("too_large", culprit.id, "frame too large (close 1009)")
                )
        for waiting in list(self._attempts.values()):
            for attempt in waiting:
                if attempt.link is link:
                    attempt.answered.set()  # no answer: the sender retries on the next connection
        link.closed.set()
        self._notify()

    def _decode(self, data: bytes | str) -> ServerFrame | None:
        try:
            return decode_frame(data)
        except FrameError as exc:
            logger.warning("ignoring a malformed frame from %s: %s", self.url, exc)
            return None

    async def _read(self, link: _Link) -> None:
        while True:
            try:
                data = await link.ws.get_message()
            except ConnectionClosed:
                return
            frame = self._decode(data)
            if isinstance(frame, Message):
                self._on_message(frame)
            elif isinstance(frame, Sent):
                self._answer(frame.id, frame)
            elif isinstance(frame, ServerError):
                if frame.id is not None:
                    self._answer(frame.id, frame)  # no one waiting: a late answer, dropped
                else:
                    link.last_error = frame
                    logger.info("iris server error %s: %s", frame.code, frame.message or "")
            elif isinstance(frame, Pong) and isinstance(frame.data, bytes):
                answered = self._pings.get(frame.data)
                if answered is not None:
                    answered.set()

    def _on_message(self, msg: Message) -> None:
        if msg.mid in self._delivered:
            self._duplicates_dropped += 1
            if msg.mid in self._acked:
                self._reacks.add(msg.mid)
                self._reacks_ready.set()
            return
        self._delivered.add(msg.mid)
        self._messages_received += 1
        with contextlib.suppress(trio.ClosedResourceError):
            self._inbox_send.send_nowait(msg)

    async def _reack_loop(self, link: _Link) -> None:
        while True:
            await self._reacks_ready.wait()
            self._reacks_ready = trio.Event()
            mids, self._reacks = self._reacks, set()
            await self._send_acks(link, sorted(mids))


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)


@contextlib.asynccontextmanager
async def open_iris(
    url: str,
    token: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 5.0,
    send_timeout: float = 10.0,
    max_backoff: float = 5.0,
    max_frame_bytes: int = 65536,
) -> AsyncIterator[IrisClient]:
    """Connect to the edge at ``url`` (``ws://host:8085/v1``) with ``token``; close on exit.

    Returns once the first connection is authenticated. ``connect_timeout``
    bounds that (transient failures are retried within it) and each later
    handshake; ``send_timeout`` bounds each :meth:`IrisClient.send`;
    ``max_backoff`` caps the delay between reconnects and between send
    retries; ``max_frame_bytes`` is the server's frame limit (larger sends
    fail at once with ``too_large``).

    Raises :class:`AuthError` when the token is refused,
    :class:`ConnectFailed` when no connection is authenticated in time or the
    handshake is refused (wrong path, no ``iris.v1``), and ``ValueError`` for
    a URL that is not ``ws://`` or ``wss://`` (or ``ssl_context`` with ``ws://``).
    """
    client = IrisClient(
        url,
        token,
        ssl_context=ssl_context,
        connect_timeout=connect_timeout,
        send_timeout=send_timeout,
        max_backoff=max_backoff,
        max_frame_bytes=max_frame_bytes,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # The background task never raises after it started, so a group holds
        # the caller's own exception (or the start failure): give it back as is.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


__all__ = [
    "AUTH_CLOSE_CODES",
    "SUBPROTOCOL",
    "AuthError",
    "Backoff",
    "ClientClosed",
    "ClientStatistics",
    "ConnectFailed",
    "FrameError",
    "IrisClient",
    "IrisClientError",
    "Message",
    "OtherFrame",
    "PingTimeout",
    "Pong",
    "RecentIds",
    "SendTimeout",
    "Sent",
    "ServerError",
    "ServerFrame",
    "Welcome",
    "auth_error_for_close",
    "decode_frame",
    "encode_frame",
    "new_send_id",
    "open_iris",
]
