"""The edge server: WebSocket connections speaking protocol v1, backed by the core.

Theory of operation
-------------------
One :class:`EdgeServer` serves many WebSocket connections and holds one event
stream from the core for all the users connected to it.

Per connection (:meth:`EdgeServer._handle`): the handshake selects
``iris.v1``; the token comes from the ``Authorization`` header or the first
frame (within 5 s); the token is checked for revocation in the core (a
barrier read whenever the core has quorum); a session is registered in the
core under this edge's lease; ``welcome`` is sent. Then three tasks run:

* the *reader* parses frames (``_protocol``) and answers ``ping``, ``ack``
  (queued edge-wide, flushed to the core within 50 ms, even if the
  connection closes right after) and ``auth`` refreshes; ``send`` frames go
  to a bounded per-connection queue;
* the *sender* takes sends one at a time, in order, and answers ``sent`` only
  when the core says the message is durable (so per sender→recipient order
  is the order of ``sent`` frames); core errors become error frames;
* the *writer* drains the bounded outgoing queue to the socket. A client that
  does not read fills it; the connection is then closed with 4008 and its
  messages stay stored (at-least-once).

The sender and the writer (and their queues) are made on first use: an idle
connection holds only its reader, which keeps memory per connection low
(tasks and channels are most of it). Token expiry is watched by one task for
the whole edge (a heap of deadlines), not a task per connection.

Delivery: a connection first *syncs*: it fetches the user's stored inbox and
delivers it oldest first; live messages arriving meanwhile are buffered and
delivered after, skipping mids already delivered on this connection. When
the core stream resubscribes (``Resync``: a core failover), every connection
syncs again, so nothing falls in the gap; clients drop repeats by ``mid``.

Revocation events close affected connections with 4003 at once; token expiry
closes with 4002 (after the leeway) unless refreshed. SIGTERM (``drain``):
stop accepting, let queued sends finish, flush acks, close with 1001.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from iris_raft import (
    AckEvent,
    InboxFull,
    IrisError,
    KickEvent,
    MessageEvent,
    Resync,
    RevokeEvent,
    StateFull,
    StoredMessage,
    TokenRevoked,
    Unavailable,
    UnknownOutcome,
    WriteBlocked,
)
from iris_raft._config import EdgeConfig
from iris_raft._state import Event

from ._auth import Claims, TokenError, TokenVerifier
from ._core import CoreAccess, EventStream
from ._metrics import EdgeMetrics
from ._protocol import (
    SUBPROTOCOL,
    Ack,
    Auth,
    CloseCode,
    CloseRequest,
    ErrorCode,
    FrameError,
    Ping,
    Send,
    encode_error,
    encode_msg,
    encode_pong,
    encode_sent,
    encode_welcome,
    parse_message,
)

logger = logging.getLogger("iris_edge.server")

AUTH_TIMEOUT = 5.0
LEASE_TTL = 30.0
ACK_FLUSH_INTERVAL = 0.05
SEND_QUEUE = 256
RATE_VIOLATIONS_BEFORE_CLOSE = 50
#: Longest a single frame may take to write before the connection is aborted.
WRITE_TIMEOUT = 30.0
#: Longest a close handshake may take before the socket is simply closed.
CLOSE_TIMEOUT = 5.0
#: Frames of any kind per connection per second (and burst) before ``rate_limited``.
FRAME_RATE = 1000.0
FRAME_BURST = 2000
#: Core events handled per turn of the event loop when the stream holds more.
EVENT_BATCH = 1000


class TokenBucket:
    """Rate limit: ``rate`` tokens per second, at most ``burst`` saved. Time is passed in."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class _Close(Exception):
    """Close this connection with ``code`` after sending ``error`` (if any)."""

    def __init__(self, code: int, reason: str, error: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error


@dataclass(eq=False, slots=True)
class Connection:
    """One authenticated client connection.

    The outgoing queue (and its writer task) and the send queue (and its
    sender task) are made on first use (:meth:`EdgeServer._out`,
    :meth:`EdgeServer._accept_send`), in ``nursery``, the connection's
    nursery while it is open.
    """

    session: str
    user: str
    claims: Claims | None
    ws: WebSocketConnection
    out_send: trio.MemorySendChannel[tuple[str, bytes]] | None = None
    out_recv: trio.MemoryReceiveChannel[tuple[str, bytes]] | None = None
    sends_send: trio.MemorySendChannel[Send] | None = None
    sends_recv: trio.MemoryReceiveChannel[Send] | None = None
    nursery: trio.Nursery | None = None
    writer_started: bool = False
    sender_started: bool = False
    #: Mids delivered on this connection and not acked yet (made on first use).
    delivered: set[str] | None = None
    buffered: list[StoredMessage] = field(default_factory=list)
    live: bool = False
    closing: _Close | None = None
    #: The cancel scope of ``nursery`` (None before it opens).
    scope: trio.CancelScope | None = None
    #: Bumped whenever the token changes: older expiry entries are stale.
    expiry_generation: int = 0
    rate_violations: int = 0
    sync_generation: int = 0
    broken: bool = False  # a frame was cut: no clean close is possible
    frames: TokenBucket = field(
        default_factory=lambda: TokenBucket(FRAME_RATE, FRAME_BURST, time.monotonic())
    )

    @property
    def jti(self) -> str:
        return self.claims.jti if self.claims is not None else ""

    @property
    def iat_ms(self) -> int | None:
        if self.claims is None or self.claims.iat is None:
            return None
        return int(self.claims.iat * 1000)

    def was_delivered(self, mid: str) -> bool:
        return self.delivered is not None and mid in self.delivered

    def mark_delivered(self, mid: str) -> None:
        if self.delivered is None:
            self.delivered = set()
        self.delivered.add(mid)

    def forget_delivered(self, mids: Iterable[str]) -> None:
        """The core applied an ack for ``mids``: stop tracking them.

        Called for the core's ack *event*, not for the client's ack frame:
        the event stream is in apply order, so every live copy of these
        messages has already come through it (delivered, or buffered during
        a sync, and dropped from the buffer here). Forgetting on the client's
        frame would let a live copy that is still on its way be delivered a
        second time on this connection.
        """
        gone = set(mids)
        if self.delivered:
            self.delivered.difference_update(gone)
        if self.buffered:
            self.buffered = [m for m in self.buffered if m.mid not in gone]

    def close(self, code: int, reason: str, error: ErrorCode | None = None) -> None:
        """Ask the connection's tasks to stop and close with ``code`` (first request wins)."""
        if self.closing is None:
            self.closing = _Close(code, reason, error)
        if self.scope is not None:
            self.scope.cancel()


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """The edge's settings, from ``[edge]`` plus derived values."""

    config: EdgeConfig
    edge_id: str
    max_connections: int
    jwt_secret: str | None


class EdgeServer:
    """Serves protocol v1 over WebSocket for one edge. Use :func:`serve_edge`."""

    def __init__(
        self, core: CoreAccess, settings: EdgeSettings, metrics: EdgeMetrics | None = None
    ) -> None:
        self.core = core
        self.settings = settings
        cfg = settings.config
        self.config = cfg
        self.edge_id = settings.edge_id
        self.verifier = (
            TokenVerifier(settings.jwt_secret, leeway=cfg.jwt_leeway)
            if cfg.auth_enabled and settings.jwt_secret
            else None
        )
        self.metrics = metrics or EdgeMetrics()
        # Labelled counters looked up once: ``labels()`` costs more than ``inc()``.
        self._frames_in = {
            k: self.metrics.frames_in.labels(k) for k in ("auth", "send", "ack", "ping", "invalid")
        }
        self._frames_out = {
            k: self.metrics.frames_out.labels(k)
            for k in ("welcome", "sent", "msg", "pong", "error")
        }
        self.connections: set[Connection] = set()
        self.by_user: dict[str, set[Connection]] = {}
        self.by_session: dict[str, Connection] = {}
        self.by_jti: dict[str, set[Connection]] = {}
        self.buckets: dict[str, TokenBucket] = {}
        self._acks: dict[str, set[str]] = {}
        self._acks_ready = trio.Event()
        # Token expiry: (trio deadline, tie-breaker, generation, session), a heap.
        self._expiries: list[tuple[float, int, int, str]] = []
        self._expiry_seq = itertools.count()
        self._expiry_wake = trio.Event()
        self._events: EventStream | None = None
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._inflight_sends = 0
        self.core_reachable = False
        self.core_safe = False
        self.port: int | None = None
        self._clock: Callable[[], float] = time.monotonic

    # -------------------------------------------------------------- serving

    async def serve(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._events = self.core.events(())
            nursery.start_soon(self._event_loop)
            nursery.start_soon(self._ack_loop)
            nursery.start_soon(self._lease_loop)
            nursery.start_soon(self._status_loop)
            nursery.start_soon(self._expiry_loop)
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    host,
                    port,
                    ssl_context,
                    handler_nursery=nursery,
                    message_queue_size=16,
                    max_message_size=self.config.max_frame_bytes,
                    connect_timeout=10,
                    disconnect_timeout=5,
                    task_status=task_status,
                )
            )
            self.port = int(server.port)
            self._server_scope = trio.CancelScope()
            task_status.started(self.port)

    async def drain(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: refuse new connections, finish queued sends, flush acks, close 1001."""
        self._draining = True
        with trio.move_on_after(timeout):
            for conn in list(self.connections):
                if conn.sends_send is not None:
                    conn.sends_send.close()
            while self._inflight_sends or any(
                conn.sends_recv is not None and conn.sends_recv.statistics().current_buffer_used
                for conn in self.connections
            ):
                await trio.sleep(0.01)
            await self._flush_acks()
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server going away")
        with trio.move_on_after(2):
            while self.connections:
                await trio.sleep(0.01)

    # ------------------------------------------------------------ handshake

    async def _handle(self, request: WebSocketRequest) -> None:
        path = request.path.split("?", 1)[0]
        if path not in ("/v1", "/v1/", "/"):
            await request.reject(404, body=b"the Iris endpoint is /v1\n")
            return
        offered = list(request.proposed_subprotocols)
        if offered and SUBPROTOCOL not in offered:
            await request.reject(400, body=b"subprotocol iris.v1 required\n")
            return
        if self._draining:
            await request.reject(503, body=b"server going away\n")
            return
        if len(self.connections) >= self.settings.max_connections:
            self.metrics.rejected.labels("capacity").inc()
            await request.reject(503, body=b"edge at capacity\n")
            return
        subprotocol = SUBPROTOCOL if offered else None
        del offered
        ws = await request.accept(subprotocol=subprotocol)
        self.metrics.handshakes.inc()
        try:
            # The token is not kept in this frame: _serve_connection drops it once checked.
            await self._serve_connection(ws, _bearer(request.headers))
        except ConnectionClosed:
            pass
        except _Close as close:
            await _close(ws, close)

    async def _authenticate(
        self, ws: WebSocketConnection, header_token: str | None
    ) -> tuple[str, Claims | None]:
        token = header_token
        if token is None:
            with trio.move_on_after(AUTH_TIMEOUT):
                data = await ws.get_message()
                self._frames_in["auth"].inc()
                frame = parse_message(data, max_frame=self.config.max_frame_bytes)
                if isinstance(frame, CloseRequest):
                    raise _Close(frame.code, frame.reason)
                if isinstance(frame, FrameError):
                    raise _Close(CloseCode.AUTH_FAILED, "frame before auth", frame.code)
                if not isinstance(frame, Auth):
                    raise _Close(
                        CloseCode.AUTH_FAILED, "authenticate first", ErrorCode.NOT_AUTHENTICATED
                    )
                if self.verifier is None:
                    if frame.user is None and frame.token is None:
                        raise _Close(
                            CloseCode.AUTH_FAILED, "auth needs user", ErrorCode.AUTH_FAILED
                        )
                    if frame.user is not None:
                        return frame.user, None
                token = frame.token
            if token is None:
                raise _Close(
                    CloseCode.AUTH_FAILED, "no auth frame within 5 s", ErrorCode.NOT_AUTHENTICATED
                )
        if self.verifier is None:
            raise _Close(
                CloseCode.AUTH_FAILED, "tokens are not enabled here", ErrorCode.AUTH_FAILED
            )
        try:
            claims = self.verifier.verify(token)
        except TokenError as exc:
            self.metrics.auth_failures.labels(exc.code.value).inc()
            raise _Close(CloseCode.AUTH_FAILED, exc.message, exc.code) from None
        return claims.sub, claims

    async def _serve_connection(self, ws: WebSocketConnection, header_token: str | None) -> None:
        user, claims = await self._authenticate(ws, header_token)
        header_token = None  # not kept for the connection's lifetime
        if claims is not None:
            try:
                revoked = await self.core.is_revoked(user, claims.jti, _ms(claims.iat))
            except IrisError:
                raise _Close(
                    CloseCode.GOING_AWAY, "core unavailable", ErrorCode.UNAVAILABLE
                ) from None
            if revoked:
                self.metrics.auth_failures.labels("token_revoked").inc()
                raise _Close(CloseCode.AUTH_FAILED, "token revoked", ErrorCode.TOKEN_REVOKED)
        session = os.urandom(12).hex()
        try:
            await self.core.open_session(
                session,
                user,
                self.edge_id,
                claims.jti if claims else "",
                _ms(claims.iat if claims else None) or 0,
            )
        except TokenRevoked:
            self.metrics.auth_failures.labels("token_revoked").inc()
            raise _Close(CloseCode.AUTH_FAILED, "token revoked", ErrorCode.TOKEN_REVOKED) from None
        except IrisError:
            raise _Close(CloseCode.GOING_AWAY, "core unavailable", ErrorCode.UNAVAILABLE) from None
        conn = Connection(session, user, claims, ws)
        await self._register(conn)
        try:
            await ws.send_message(encode_welcome(user, session, self.edge_id))
            self._frames_out["welcome"].inc()
            try:
                async with trio.open_nursery() as nursery:
                    conn.nursery, conn.scope = nursery, nursery.cancel_scope
                    if conn.closing is not None:  # closed before this point
                        nursery.cancel_scope.cancel()
                    if conn.out_send is not None:
                        self._out(conn)  # frames queued before: start the writer
                    nursery.start_soon(self._sync, conn)
                    if claims is not None:
                        self._arm_expiry(conn)
                    await self._reader(conn)
                    nursery.cancel_scope.cancel()
            finally:
                conn.nursery = None
        finally:
            await self._unregister(conn)
        if conn.closing is not None:
            # Frames queued before the close (sent, pong, msg) still go out, briefly.
            if conn.closing.code != CloseCode.POLICY and conn.out_recv is not None:
                with (
                    trio.move_on_after(1.0),
                    contextlib.suppress(ConnectionClosed, trio.WouldBlock),
                ):
                    while True:
                        _kind, data = conn.out_recv.receive_nowait()
                        await ws.send_message(data)
            await _close(ws, conn.closing, broken=conn.broken)

    async def _register(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.by_session[conn.session] = conn
        if conn.jti:
            self.by_jti.setdefault(conn.jti, set()).add(conn)
        first = conn.user not in self.by_user
        self.by_user.setdefault(conn.user, set()).add(conn)
        self.metrics.connections.set(len(self.connections))
        if first and self._events is not None:
            await self._events.add_users([conn.user])

    async def _unregister(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.by_session.pop(conn.session, None)
        if conn.jti:
            peers = self.by_jti.get(conn.jti)
            if peers is not None:
                peers.discard(conn)
                if not peers:
                    del self.by_jti[conn.jti]
        conns = self.by_user.get(conn.user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_user[conn.user]
                self.buckets.pop(conn.user, None)
                if self._events is not None:
                    with (
                        contextlib.suppress(IrisError),
                        trio.CancelScope(shield=True),
                        trio.move_on_after(2),
                    ):
                        await self._events.remove_users([conn.user])
        self.metrics.connections.set(len(self.connections))
        if self._nursery is not None:
            self._nursery.start_soon(self._close_session, conn.session)

    async def _close_session(self, session: str) -> None:
        with contextlib.suppress(IrisError), trio.move_on_after(30):
            await self.core.close_session(session)

    # --------------------------------------------------------------- tasks

    async def _reader(self, conn: Connection) -> None:
        max_frame = self.config.max_frame_bytes
        while True:
            try:
                data = await conn.ws.get_message()
            except ConnectionClosed:
                return
            frame = parse_message(data, max_frame=max_frame)
            if isinstance(frame, CloseRequest):
                self._frames_in["invalid"].inc()
                conn.close(frame.code, frame.reason)
                return
            if not conn.frames.take(self._clock()):
                # Every frame costs parsing: a flood of pings or junk is limited too.
                self._rate_violation(conn, None)
                continue
            if isinstance(frame, FrameError):
                self._frames_in["invalid"].inc()
                self._error(conn, frame.code, frame.id, frame.message or None)
                continue
            if isinstance(frame, Send):
                self._frames_in["send"].inc()
                self._accept_send(conn, frame)
            elif isinstance(frame, Ack):
                self._frames_in["ack"].inc()
                self._queue_ack(conn, frame.mids)
            elif isinstance(frame, Ping):
                self._frames_in["ping"].inc()
                self._enqueue(conn, "pong", encode_pong(frame.data, frame.has_data))
            elif isinstance(frame, Auth):
                self._frames_in["auth"].inc()
                self._refresh(conn, frame)
            if conn.closing is not None:
                return

    def _accept_send(self, conn: Connection, frame: Send) -> None:
        now = self._clock()
        bucket = self.buckets.get(conn.user)
        if bucket is None:
            bucket = self.buckets[conn.user] = TokenBucket(
                self.config.rate_limit_per_second, self.config.rate_limit_burst, now
            )
        if not bucket.take(now):
            self._rate_violation(conn, frame.id)
            return
        conn.rate_violations = 0
        if conn.sends_send is None:
            if self._draining:
                self._error(conn, ErrorCode.UNAVAILABLE, frame.id, "server going away")
                return
            conn.sends_send, conn.sends_recv = trio.open_memory_channel[Send](SEND_QUEUE)
        if not conn.sender_started and conn.nursery is not None:
            conn.sender_started = True
            conn.nursery.start_soon(self._sender, conn)
        try:
            conn.sends_send.send_nowait(frame)
        except trio.WouldBlock:
            self._error(conn, ErrorCode.RATE_LIMITED, frame.id, "too many sends in flight")
        except trio.ClosedResourceError:
            self._error(conn, ErrorCode.UNAVAILABLE, frame.id, "server going away")

    def _rate_violation(self, conn: Connection, id: str | None) -> None:
        conn.rate_violations += 1
        self._error(conn, ErrorCode.RATE_LIMITED, id)
        if conn.rate_violations >= RATE_VIOLATIONS_BEFORE_CLOSE:
            self.metrics.closes.labels("rate_limited").inc()
            conn.close(CloseCode.POLICY, "rate limit exceeded repeatedly")

    async def _sender(self, conn: Connection) -> None:
        assert conn.sends_recv is not None
        async for frame in conn.sends_recv:
            self._inflight_sends += 1
            started = time.perf_counter()
            try:
                result = await self.core.send(conn.user, frame.id, frame.to, frame.body)
            except InboxFull:
                self._error(conn, ErrorCode.INBOX_FULL, frame.id)
            except WriteBlocked:
                self._error(conn, ErrorCode.WRITE_BLOCKED, frame.id)
            except (Unavailable, UnknownOutcome, StateFull) as exc:
                self._error(conn, ErrorCode.UNAVAILABLE, frame.id, exc.message)
            except IrisError as exc:
                if exc.code == "bad_request":
                    self._error(conn, ErrorCode.BAD_REQUEST, frame.id, exc.message)
                else:
                    logger.warning("send failed: %s", exc)
                    self._error(conn, ErrorCode.INTERNAL, frame.id)
            else:
                self.metrics.send_latency.observe(time.perf_counter() - started)
                self._enqueue(conn, "sent", encode_sent(frame.id, result.mid, result.ts))
            finally:
                self._inflight_sends -= 1

    async def _writer(self, conn: Connection) -> None:
        assert conn.out_recv is not None
        async for _kind, data in conn.out_recv:
            # A frame is never cut in half by a close: the send is shielded,
            # bounded by WRITE_TIMEOUT, after which the connection is aborted.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + WRITE_TIMEOUT
                try:
                    await conn.ws.send_message(data)
                except ConnectionClosed:
                    conn.close(CloseCode.NORMAL, "peer closed")
                    return
            if scope.cancelled_caught:
                conn.broken = True
                conn.close(CloseCode.POLICY, "client too slow: a frame could not be written")
                return

    def _arm_expiry(self, conn: Connection, min_delay: float = 0.0) -> None:
        """Watch ``conn``'s token: close with 4002 once ``exp + leeway`` has passed."""
        if conn.claims is None:
            return
        conn.expiry_generation += 1
        delay = max(min_delay, conn.claims.exp + self.config.jwt_leeway - time.time())
        entry = (
            trio.current_time() + delay,
            next(self._expiry_seq),
            conn.expiry_generation,
            conn.session,
        )
        heap = self._expiries
        if len(heap) > 2 * len(self.connections) + 1024:
            # Entries of closed connections and replaced tokens: drop them.
            live = [
                e
                for e in heap
                if (c := self.by_session.get(e[3])) is not None and c.expiry_generation == e[2]
            ]
            heapq.heapify(live)
            self._expiries = heap = live
        heapq.heappush(heap, entry)
        if heap[0] is entry:
            self._expiry_wake.set()

    async def _expiry_loop(self) -> None:
        """One task for every connection's token expiry (a heap of deadlines)."""
        while True:
            now = trio.current_time()
            while self._expiries and self._expiries[0][0] <= now:
                _when, _seq, generation, session = heapq.heappop(self._expiries)
                conn = self.by_session.get(session)
                if (
                    conn is None
                    or conn.expiry_generation != generation
                    or conn.claims is None
                    or conn.closing is not None
                ):
                    continue
                if time.time() >= conn.claims.exp + self.config.jwt_leeway:
                    self.metrics.closes.labels("token_expired").inc()
                    conn.close(CloseCode.TOKEN_EXPIRED, "token expired", ErrorCode.TOKEN_EXPIRED)
                else:  # the wall clock and trio's clock drifted apart: look again soon
                    self._arm_expiry(conn, min_delay=0.01)
            self._expiry_wake = wake = trio.Event()
            with trio.move_on_at(self._expiries[0][0] if self._expiries else math.inf):
                await wake.wait()

    def _refresh(self, conn: Connection, frame: Auth) -> None:
        if self.verifier is None or frame.token is None:
            conn.close(CloseCode.AUTH_FAILED, "refresh needs a token", ErrorCode.AUTH_FAILED)
            return
        try:
            claims = self.verifier.verify(frame.token)
        except TokenError as exc:
            conn.close(CloseCode.AUTH_FAILED, "bad refresh token", exc.code)
            return
        if claims.sub != conn.user:
            conn.close(CloseCode.AUTH_FAILED, "refresh for another user", ErrorCode.AUTH_FAILED)
            return
        if conn.jti:
            self.by_jti.get(conn.jti, set()).discard(conn)
        conn.claims = claims
        self.by_jti.setdefault(claims.jti, set()).add(conn)
        self._arm_expiry(conn)  # the earlier deadline's entry is now stale
        if self._nursery is not None:
            self._nursery.start_soon(self._recheck_revoked, conn)

    async def _recheck_revoked(self, conn: Connection) -> None:
        if conn.claims is None or conn.closing is not None:
            return
        with contextlib.suppress(IrisError):
            if await self.core.is_revoked(conn.user, conn.claims.jti, conn.iat_ms):
                self._revoke(conn)

    # -------------------------------------------------------------- delivery

    async def _sync(self, conn: Connection) -> None:
        """Deliver the stored inbox, then the live messages buffered meanwhile."""
        conn.sync_generation += 1
        generation = conn.sync_generation
        conn.live = False
        backoff = 0.05
        while True:
            try:
                stored = await self.core.fetch_inbox(conn.user)
                break
            except IrisError as exc:
                logger.info("inbox fetch for %s failed (%s); retrying", conn.user, exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        if generation != conn.sync_generation or conn.closing is not None:
            return
        # Stored messages wait for the writer (an inbox may be larger than the queue).
        for msg in stored:
            await self._deliver_waiting(conn, msg)
        while conn.buffered:
            buffered, conn.buffered = conn.buffered, []
            for msg in buffered:
                await self._deliver_waiting(conn, msg)
        conn.live = True

    async def _deliver_waiting(self, conn: Connection, msg: StoredMessage) -> None:
        if conn.was_delivered(msg.mid) or conn.closing is not None:
            return
        conn.mark_delivered(msg.mid)
        self.metrics.delivery_latency.observe(max(0.0, time.time() - msg.ts / 1000))
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            out = self._out(conn)
            await out.send(("msg", encode_msg(msg.mid, msg.sender, msg.body, msg.ts)))
            self._frames_out["msg"].inc()

    def _deliver(self, conn: Connection, msg: StoredMessage) -> None:
        if conn.was_delivered(msg.mid):
            return
        conn.mark_delivered(msg.mid)
        self.metrics.delivery_latency.observe(max(0.0, time.time() - msg.ts / 1000))
        self._enqueue(conn, "msg", encode_msg(msg.mid, msg.sender, msg.body, msg.ts))

    def _out(self, conn: Connection) -> trio.MemorySendChannel[tuple[str, bytes]]:
        """The connection's outgoing queue; made, and its writer started, on first use."""
        if conn.out_send is None:
            conn.out_send, conn.out_recv = trio.open_memory_channel[tuple[str, bytes]](
                self.config.max_queue_per_connection
            )
        if not conn.writer_started and conn.nursery is not None:
            conn.writer_started = True
            conn.nursery.start_soon(self._writer, conn)
        return conn.out_send

    def _enqueue(self, conn: Connection, kind: str, data: bytes) -> None:
        if conn.closing is not None:
            return
        try:
            self._out(conn).send_nowait((kind, data))
        except trio.WouldBlock:
            self.metrics.closes.labels("slow_consumer").inc()
            conn.close(CloseCode.POLICY, "client too slow: outgoing queue full")
            return
        except trio.ClosedResourceError:
            return
        counter = self._frames_out.get(kind)
        (counter if counter is not None else self.metrics.frames_out.labels(kind)).inc()

    def _error(
        self, conn: Connection, code: ErrorCode, id: str | None, message: str | None = None
    ) -> None:
        self.metrics.errors.labels(code.value).inc()
        self._enqueue(conn, "error", encode_error(code, id, message))

    def _queue_ack(self, conn: Connection, mids: tuple[str, ...]) -> None:
        if not mids:
            return
        self._acks.setdefault(conn.user, set()).update(mids)
        self._acks_ready.set()

    async def _flush_acks(self) -> None:
        pending, self._acks = self._acks, {}
        if not pending:
            return

        try:
            await self.core.ack_many({user: sorted(mids) for user, mids in pending.items()})
        except IrisError as exc:
            # Acks are idempotent: all of them go again with the next flush.
            logger.info("acks of %d users failed (%s); will retry", len(pending), exc)
            for user, mids in pending.items():
                self._acks.setdefault(user, set()).update(mids)
            self._acks_ready.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._acks_ready.wait()
            self._acks_ready = trio.Event()
            await self._flush_acks()
            await trio.sleep(ACK_FLUSH_INTERVAL)

    async def _event_loop(self) -> None:
        assert self._events is not None
        # A stream that can hand over what it already holds without waiting
        # (``receive_nowait``: an event, or None) is drained a batch per turn:
        # with hundreds of busy connection tasks, one event per scheduler turn
        # lets deliveries fall behind the sends.
        drain: Callable[[], Event | Resync | None] | None = getattr(
            self._events, "receive_nowait", None
        )
        async for event in self._events:
            self._on_event(event)
            if drain is not None:
                for _ in range(EVENT_BATCH):
                    more = drain()
                    if more is None:
                        break
                    self._on_event(more)

    def _on_event(self, event: Event | Resync) -> None:
        if isinstance(event, MessageEvent):
            for conn in list(self.by_user.get(event.user, ())):
                if conn.live:
                    self._deliver(conn, event.message)
                else:
                    conn.buffered.append(event.message)
        elif isinstance(event, AckEvent):
            for conn in self.by_user.get(event.user, ()):
                conn.forget_delivered(event.mids)
        elif isinstance(event, RevokeEvent):
            self._apply_revocation(event)
        elif isinstance(event, KickEvent):
            kicked = self.by_session.get(event.session)
            if kicked is not None:
                if event.reason == "token_revoked":
                    self._revoke(kicked)
                else:
                    kicked.close(
                        CloseCode.POLICY, f"session closed by the cluster ({event.reason})"
                    )
        elif isinstance(event, Resync):
            self._on_resync()

    def _on_resync(self) -> None:
        if self._nursery is None:
            return
        logger.info(
            "core event stream (re)subscribed: resyncing %d connections", len(self.connections)
        )
        for conn in list(self.connections):
            self._nursery.start_soon(self._resync_connection, conn)

    async def _resync_connection(self, conn: Connection) -> None:
        await self._recheck_revoked(conn)
        if conn.closing is None:
            await self._sync(conn)

    def _apply_revocation(self, event: RevokeEvent) -> None:
        victims: set[Connection] = set()
        if event.jti is not None:
            victims |= self.by_jti.get(event.jti, set())
        if event.user is not None:
            for conn in self.by_user.get(event.user, ()):
                iat = conn.iat_ms
                if event.before_ms is None or iat is None or iat < event.before_ms:
                    victims.add(conn)
        for conn in victims:
            self._revoke(conn)

    def _revoke(self, conn: Connection) -> None:
        self.metrics.closes.labels("token_revoked").inc()
        conn.close(CloseCode.TOKEN_REVOKED, "token revoked", ErrorCode.TOKEN_REVOKED)

    # ----------------------------------------------------------- background

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self.core.renew_lease(self.edge_id, LEASE_TTL)
                await trio.sleep(LEASE_TTL / 3)
            except IrisError as exc:
                logger.warning("lease renewal failed: %s", exc)
                await trio.sleep(1.0)

    async def _status_loop(self) -> None:
        while True:
            try:
                with trio.fail_after(3):
                    status = await self.core.status()
                self.core_reachable = True
                self.core_safe = bool(status.get("safe_for_writes"))
            except (IrisError, trio.TooSlowError, OSError):
                self.core_reachable = False
                self.core_safe = False
            self.metrics.core_reachable.set(1 if self.core_reachable else 0)
            self.metrics.core_safe.set(1 if self.core_safe else 0)
            self.metrics.queued.set(
                sum(
                    c.out_recv.statistics().current_buffer_used
                    for c in self.connections
                    if c.out_recv is not None
                )
            )
            await trio.sleep(1.0)

    def health(self) -> tuple[int, dict[str, Any]]:
        body = {
            "status": "ok" if self.core_reachable else "core_unreachable",
            "edge": self.edge_id,
            "connections": len(self.connections),
            "core_reachable": self.core_reachable,
            "safe_for_writes": self.core_safe,
            "draining": self._draining,
        }
        return (200 if self.core_reachable and not self._draining else 503, body)


def _ms(seconds: int | float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    return None


async def _close(ws: WebSocketConnection, close: _Close, *, broken: bool = False) -> None:
    """Send the error frame (if any) and the close frame; bounded, then the socket is closed."""
    errors = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
    if not broken:
        with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(*errors):
            if close.error is not None:
                await ws.send_message(encode_error(close.error, None, close.reason))
            await ws.aclose(close.code, close.reason[:120])
            return
    # Aborted (a cut frame, or a peer that does not read): close the TCP stream.
    with contextlib.suppress(*errors, AttributeError):
        await ws._stream.aclose()
