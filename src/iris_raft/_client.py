"""The trio client for core nodes: leader-following, retrying, subscribing.

Theory of operation
-------------------
``open_client(cores, secret=...)`` yields a :class:`Client` whose methods
mirror :class:`~iris_raft.Node`. Calls are pipelined over one connection (the
core batches concurrent calls into one Raft entry).

* Every write carries an operation id, fixed before the first attempt; a
  retry reuses it, so retrying never applies twice.
* Each call has one overall deadline (``timeout``). Within it the client
  retries on a connection loss or an unknown outcome (same op id), and moves
  to another core on ``Unavailable`` or ``WriteBlocked`` (another core may be
  on the majority side). When the deadline passes, the last error is raised;
  an attempt whose outcome is unknown makes the final error
  :class:`UnknownOutcome`, never a plain failure.
* Sends are coalesced: concurrent :meth:`Client.send` calls that go to the
  same connection travel as one ``send_batch`` call, answered per item (see
  :class:`SendCoalescer`). Each send keeps its own deadline, retries, order
  fence and errors, exactly as if it had been sent alone; a lone send leaves
  at once. A core without ``send_batch`` gets single ``send`` calls.
* The configured cores are a seed: on every (re)connect the client asks for
  the announced membership and the leader, and prefers the leader. In
  ``cp`` it also checks every second (``LEADER_CHECK_INTERVAL``) that it is
  still on the leader, and moves there if not: a ``cp`` write through a
  follower is forwarded to the leader and acknowledged only once the
  follower learns the commit from the leader's next append (up to its
  append period later). The old connection is closed ``timeout`` seconds
  after the move, so calls in flight on it finish there.
* Per-sender order across cores (``hardened_ap``): a core acknowledges a send
  once it is in its own WAL, and drains it into Raft right after. If the
  client then moves to another core (the first one was cut off, paused or
  killed), the next send from the same sender could be committed before the
  earlier ones, which would break the per-pair order the protocol promises.
  So the client remembers, per sender, the last send acknowledged by each
  core; when a core refuses writes with ``write_blocked``, it also asks that
  core which senders' sends it still holds undrained, whoever sent them.
  Before sending for such a sender through a *different* core it asks that
  core whether the remembered send has been applied (``applied``; the WAL
  drains in order, so the last one implies all earlier ones). Until it has,
  the send fails with :class:`WriteBlocked` (retried within the
  deadline). After ``order_fence`` seconds (default 30) the fence is dropped:
  the accepting core is treated as crashed, and the protocol's order
  exception applies.
* :meth:`Client.subscribe` keeps a subscription alive across reconnects on
  its own connection. After every (re)subscription it yields a
  :class:`Resync` marker: the consumer must refetch the inboxes it serves,
  because events may have been missed in the gap (at-least-once; consumers
  drop repeats by ``mid``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._exceptions import (
    BadRequest,
    IrisError,
    ProtocolError,
    Unavailable,
    UnknownOutcome,
    WriteBlocked,
    error_from_code,
)
from ._node import SendResult
from ._ops import new_op_id, send_op_id
from ._rpc import RpcClientConnection, open_rpc_connection
from ._state import Event, StoredMessage
from ._wire import Resync, event_from_wire, message_from_wire

logger = logging.getLogger("iris_raft.client")

#: Seconds between a ``cp`` client's checks that it is still on the leader.
LEADER_CHECK_INTERVAL = 1.0

#: Senders whose last acknowledged send is remembered for the order fence.
FENCE_ENTRIES = 100_000

#: ``send_batch`` calls in flight per connection; more sends wait for one to return.
SEND_BATCH_CALLS = 4
#: Most sends per ``send_batch`` call (a core accepts up to 1,000).
SEND_BATCH_ITEMS = 500
#: Most users per ``ack_batch`` call (a core accepts up to 1,000).
MAX_ACK_BATCH = 1000
#: Bytes of bodies per ``send_batch`` call, well under the 16 MiB frame limit; a
#: larger send goes alone.
SEND_BATCH_BYTES = 1024 * 1024


def _copy_error(error: IrisError) -> IrisError:
    """A fresh exception of the same class: one per waiting caller, never shared."""
    return error_from_code(error.code, error.message, error.data)


def _unknown_method(exc: IrisError) -> bool:
    """Whether ``exc`` is a core's answer to a method it does not know (an older core)."""
    return isinstance(exc, BadRequest) and exc.message.startswith("unknown method")


def _item_error(wire: Any) -> IrisError:
    if isinstance(wire, dict) and isinstance(wire.get("code"), str):
        data = wire.get("data")
        return error_from_code(
            wire["code"], str(wire.get("message", "")), data if isinstance(data, dict) else None
        )
    return UnknownOutcome("malformed error in the answer to 'send_batch'")


@dataclass
class SendBatchStats:
    """``send_batch`` calls made and the sends they carried."""

    calls: int = 0
    items: int = 0


class _QueuedSend:
    __slots__ = ("abandoned", "deadline", "done", "error", "fallback", "item", "result", "size")

    def __init__(self, params: dict[str, Any], deadline: float) -> None:
        self.item = [params["sender"], params["client_id"], params["to"], params["body"]]
        self.size = sum(len(x) for x in self.item if isinstance(x, bytes | str))
        self.deadline = deadline
        self.done = trio.Event()
        self.result: Any = None
        self.error: IrisError | None = None
        self.fallback = False  # send it alone: the core has no send_batch
        self.abandoned = False  # the caller stopped waiting

    def finish(
        self, result: Any = None, error: IrisError | None = None, *, fallback: bool = False
    ) -> None:
        if not self.done.is_set():
            self.result, self.error, self.fallback = result, error, fallback
            self.done.set()


class SendCoalescer:
    """The sends made on one core connection, coalesced into ``send_batch`` calls.

    Theory of operation
    -------------------
    :meth:`send` queues the item and, unless a flusher is about to start or
    ``max_calls`` batch calls are already in flight, starts a flusher task.
    A task started with ``start_soon`` first runs in the *next* scheduler
    pass, so every send queued in the current pass (say, all the tasks woken
    by one event) joins its batch, and a lone send leaves at once: there is
    no timer. The flusher takes up to ``max_items`` items (``max_bytes`` of
    bodies), starts another flusher if more is waiting, makes the call,
    hands each item its answer and loops while items wait, then ends. With
    ``max_calls`` calls in flight new items queue up and leave with the next
    call that returns: the busier the connection, the larger the batches.

    Each caller waits for its own item, with its own deadline. A caller that
    times out or is cancelled before its batch is sent drops the item; after
    that, the batch goes on for the others and the caller gets what a single
    ``conn.call("send")`` gives: :class:`UnknownOutcome` on timeout, the
    cancellation otherwise. An item's error is raised in its caller alone; an
    error of the whole call (connection lost, timeout) in every caller of the
    batch, each getting its own exception object. So the client's retry
    loop, order fence and error handling run per send, as for a single call.

    A core without ``send_batch`` answers ``bad_request`` "unknown method":
    nothing was applied, and the coalescer sends this and every later item
    on the connection as a single ``send`` call.
    """

    def __init__(
        self,
        conn: RpcClientConnection,
        nursery: trio.Nursery,
        *,
        max_calls: int = SEND_BATCH_CALLS,
        max_items: int = SEND_BATCH_ITEMS,
        max_bytes: int = SEND_BATCH_BYTES,
        stats: SendBatchStats | None = None,
    ) -> None:
        self.conn = conn
        self._nursery = nursery
        self.max_calls = max_calls
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queue: deque[_QueuedSend] = deque()
        self._flushers = 0  # running or started; each has at most one call in flight
        self._starting = False  # a flusher was started and has not taken its batch yet
        #: False once the core turned out to lack ``send_batch``.
        self.batching = True
        #: Counters, possibly shared with other coalescers (the client's).
        self.stats = stats if stats is not None else SendBatchStats()

    async def send(self, params: dict[str, Any], timeout: float) -> Any:
        """What ``conn.call("send", params, timeout=timeout)`` answers, by way of a batch."""
        if not self.batching:
            return await self.conn.call("send", params, timeout=timeout)
        queued = _QueuedSend(params, trio.current_time() + timeout)
        self._queue.append(queued)
        self._flush_soon()
        try:
            with trio.move_on_at(queued.deadline):
                await queued.done.wait()
        finally:
            queued.abandoned = not queued.done.is_set()
        if queued.abandoned:
            raise UnknownOutcome(
                f"no answer to 'send' from {self.conn.address} within {timeout}s; "
                "it may have been applied",
                method="send",
            )
        if queued.fallback:
            remaining = max(0.05, queued.deadline - trio.current_time())
            return await self.conn.call("send", params, timeout=remaining)
        if queued.error is not None:
            raise queued.error
        return queued.result

    def _flush_soon(self) -> None:
        if not self._starting and self._flushers < self.max_calls:
            self._starting = True
            self._flushers += 1
            self._nursery.start_soon(self._flusher)

    async def _flusher(self) -> None:
        self._starting = False
        try:
            while batch := self._take():
                if self._queue:
                    self._flush_soon()  # more than one call's worth is waiting
                await self._call(batch)
        finally:
            self._flushers -= 1

    def _take(self) -> list[_QueuedSend]:
        batch: list[_QueuedSend] = []
        size = 0
        while self._queue and len(batch) < self.max_items:
            queued = self._queue[0]
            if queued.abandoned:
                self._queue.popleft()
                continue
            if batch and size + queued.size > self.max_bytes:
                break
            self._queue.popleft()
            batch.append(queued)
            size += queued.size
        return batch

    async def _call(self, batch: list[_QueuedSend]) -> None:
        timeout = max(0.05, max(q.deadline for q in batch) - trio.current_time())
        self.stats.calls += 1
        self.stats.items += len(batch)
        try:
            reply = await self.conn.call(
                "send_batch", {"items": [q.item for q in batch]}, timeout=timeout
            )
            self._answer(batch, reply)
        except IrisError as exc:
            if _unknown_method(exc):
                logger.info("core %s has no send_batch: sending one by one", self.conn.address)
                self.batching = False
                for q in [*batch, *self._queue]:
                    q.finish(fallback=True)
                self._queue.clear()
            else:
                for q in batch:
                    q.finish(error=_copy_error(exc))
        except Exception:  # not expected: it must not stop the client's nursery
            logger.exception("send_batch to %s failed unexpectedly", self.conn.address)
        finally:
            # Cancelled (the client is closing) or a bug: the request may have run.
            for q in batch:
                q.finish(error=UnknownOutcome("send_batch ended without an answer for this send"))

    @staticmethod
    def _answer(batch: list[_QueuedSend], reply: Any) -> None:
        answers = reply.get("r") if isinstance(reply, dict) else None
        if not isinstance(answers, list) or len(answers) != len(batch):
            raise UnknownOutcome("malformed answer to 'send_batch'")
        for q, answer in zip(batch, answers, strict=True):
            if isinstance(answer, dict) and "e" in answer:
                q.finish(error=_item_error(answer["e"]))
            else:
                q.finish(result=answer)


class Client:
    """A connection to a core cluster. Build it with :func:`open_client`.

    Methods mirror :class:`~iris_raft.Node` and retry within ``timeout`` (see
    the module docstring). Concurrent :meth:`send` calls on one connection
    are coalesced into ``send_batch`` calls (:class:`SendCoalescer`) unless
    ``coalesce_sends`` is false; ``send_batches`` counts those calls and the
    sends they carried.
    """

    def __init__(
        self,
        cores: Sequence[str],
        *,
        secret: bytes | None,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        connect_timeout: float,
        prefer_leader: bool,
        nursery: trio.Nursery,
        order_fence: float = 30.0,
        coalesce_sends: bool = True,
    ) -> None:
        if not cores:
            raise ValueError("at least one core address is needed")
        self.cores: list[str] = list(dict.fromkeys(cores))
        self._secret = secret
        self._ssl = ssl_context
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._prefer_leader = prefer_leader
        self._nursery = nursery
        self._conn: RpcClientConnection | None = None
        self._release: trio.Event | None = None
        self._conn_address: str | None = None
        self._lock = trio.Lock()
        self._next = random.randrange(len(self.cores))
        self.reconnects = 0
        #: The consistency mode the cores announced (None until first connect).
        self.mode: str | None = None
        self.order_fence = order_fence
        # sender -> (core address, op id of its last acknowledged send, when).
        self._fence: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self.coalesce_sends = coalesce_sends
        self._coalescers: dict[RpcClientConnection, SendCoalescer] = {}
        self.send_batches = SendBatchStats()
        # Connections being asked for their undrained senders (one question each).
        self._learning: dict[RpcClientConnection, trio.Event] = {}
        self._ack_batch_missing = False  # the cores predate ``ack_batch``

    # ---------------------------------------------------------- connections

    @property
    def connected_to(self) -> str | None:
        """The core address of the current connection."""
        return self._conn_address

    async def _hold(
        self, address: str, task_status: trio.TaskStatus[tuple[RpcClientConnection, trio.Event]]
    ) -> None:
        # A connection lives in its own task (its context manager owns a nursery).
        async with open_rpc_connection(
            address,
            secret=self._secret,
            ssl_context=self._ssl,
            connect_timeout=self._connect_timeout,
        ) as conn:
            release = trio.Event()
            task_status.started((conn, release))
            await release.wait()

    async def _open(self, address: str, *, retire_old: bool = False) -> RpcClientConnection:
        """Connect to ``address`` and make it the current connection.

        The old one is closed at once, or, with ``retire_old``, ``timeout``
        seconds later, so that calls in flight on it finish there.
        """
        conn: RpcClientConnection
        release: trio.Event
        conn, release = await self._nursery.start(self._hold, address)
        old = self._release
        if retire_old:
            self._release = None
        await self._drop()
        self._conn, self._release, self._conn_address = conn, release, address
        self.reconnects += 1
        if retire_old and old is not None:
            self._nursery.start_soon(self._retire, old)
        return conn

    async def _drop(self) -> None:
        release, self._release, self._conn = self._release, None, None
        self._conn_address = None
        if release is not None:
            release.set()
        await trio.lowlevel.checkpoint()

    async def _connection(self) -> RpcClientConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn  # the common case: no lock, no yield per call
        async with self._lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            last: IrisError | None = None
            for _ in range(len(self.cores)):
                address = self.cores[self._next % len(self.cores)]
                self._next += 1
                try:
                    conn = await self._open(address)
                except IrisError as exc:
                    last = exc
                    continue
                except OSError as exc:
                    last = Unavailable(f"cannot reach core {address}: {exc}")
                    continue
                await self._learn(conn)
                return self._conn or conn
            raise last or Unavailable("no core reachable")

    async def _learn(self, conn: RpcClientConnection) -> None:
        """Learn the membership and move to the leader if preferred."""
        try:
            status = await conn.call("status", {}, timeout=self._connect_timeout)
        except IrisError:
            return
        mode = status.get("mode")
        if isinstance(mode, str):
            self.mode = mode
        for node in status.get("nodes", []):
            rpc = node.get("rpc")
            if isinstance(rpc, str) and rpc not in self.cores:
                self.cores.append(rpc)
        leader_rpc = status.get("leader_rpc")
        if self._prefer_leader and isinstance(leader_rpc, str) and leader_rpc != self._conn_address:
            with contextlib.suppress(IrisError, OSError):
                await self._open(leader_rpc)

    async def _follow_leader(self) -> None:
        """In ``cp``, move to the leader when it is not the core this client is on."""
        while True:
            await trio.sleep(LEADER_CHECK_INTERVAL)
            conn, address = self._conn, self._conn_address
            if not self._prefer_leader or self.mode != "cp" or conn is None or conn.closed:
                continue
            try:
                status = await conn.call("status", {}, timeout=self._connect_timeout)
            except (IrisError, OSError):
                continue
            leader = status.get("leader_rpc") if isinstance(status, dict) else None
            if not isinstance(leader, str) or leader == address:
                continue
            async with self._lock:
                if self._conn is conn:  # else it moved meanwhile (an error, a reconnect)
                    with contextlib.suppress(IrisError, OSError):
                        await self._open(leader, retire_old=True)

    async def _retire(self, release: trio.Event) -> None:
        await trio.sleep(self.timeout)  # calls in flight on the old connection end first
        release.set()

    async def _rotate(self, failed: RpcClientConnection | None = None) -> None:
        """Drop the current connection (only if it is still ``failed``, when given)."""
        async with self._lock:
            if failed is None or self._conn is failed:
                await self._drop()

    def _coalescer(self, conn: RpcClientConnection) -> SendCoalescer:
        coalescer = self._coalescers.get(conn)
        if coalescer is None:
            for old in [c for c in self._coalescers if c.closed]:
                del self._coalescers[old]
            coalescer = SendCoalescer(conn, self._nursery, stats=self.send_batches)
            self._coalescers[conn] = coalescer
        return coalescer

    async def call(
        self, method: str, params: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        """Call ``method`` with retries until the deadline; see the module docstring."""
        result, _address = await self._call(method, params, timeout=timeout)
        return result

    async def _call(
        self,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float | None = None,
        before: Callable[[RpcClientConnection, str, float], Awaitable[None]] | None = None,
        attempt: Callable[[RpcClientConnection, float], Awaitable[Any]] | None = None,
    ) -> tuple[Any, str]:
        """:meth:`call`, also returning the address of the core that answered.

        ``before(conn, address, deadline)`` runs ahead of each attempt and may
        raise a retryable error to move on to another core. ``attempt(conn,
        timeout)``, if given, makes the attempt instead of ``conn.call(method,
        params, timeout=timeout)`` and must fail the same way.
        """
        deadline = trio.current_time() + (self.timeout if timeout is None else timeout)
        unknown = False
        last: IrisError | None = None
        backoff = 0.02
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            conn: RpcClientConnection | None = None
            address = ""
            try:
                conn = await self._connection()
                address = self._conn_address or ""
                if before is not None:
                    await before(conn, address, deadline)
                timeout_left = max(0.05, deadline - trio.current_time())
                if attempt is None:
                    result = await conn.call(method, params, timeout=timeout_left)
                else:
                    result = await attempt(conn, timeout_left)
                return result, address
            except UnknownOutcome as exc:
                unknown, last = True, exc
                if self._conn is not None and self._conn.closed:
                    await self._rotate()
            except WriteBlocked as exc:
                last = exc
                await self._learn_undrained(conn, address)
                await self._rotate(conn)
            except (Unavailable, ProtocolError) as exc:
                last = exc
                await self._rotate(conn)
            except OSError as exc:
                last = Unavailable(f"connection failed: {exc}")
                await self._rotate(conn)
            await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
            backoff = min(backoff * 2, 0.5)
        if unknown:
            raise UnknownOutcome(f"{method}: outcome unknown after retries ({last})")
        raise last or Unavailable(f"{method}: no answer in time")

    # --------------------------------------------------------------- writes

    async def send(self, sender: str, client_id: str, recipient: str, body: bytes) -> SendResult:
        """Store a message (see :meth:`Node.send`), retried with the same id until durable.

        Concurrent sends on one connection share ``send_batch`` calls; each
        is still answered, retried and fenced on its own.
        """
        params = {"sender": sender, "client_id": client_id, "to": recipient, "body": body}

        async def fence(conn: RpcClientConnection, address: str, deadline: float) -> None:
            await self._order_fence(conn, address, sender, deadline)

        async def attempt(conn: RpcClientConnection, timeout: float) -> Any:
            if not self.coalesce_sends:
                return await conn.call("send", params, timeout=timeout)
            return await self._coalescer(conn).send(params, timeout)

        r, address = await self._call("send", params, before=fence, attempt=attempt)
        if self.mode == "hardened_ap" and address:
            self._remember(sender, address, send_op_id(sender, client_id), time.monotonic())
        return SendResult(r["mid"], r["ts"], bool(r["duplicate"]))

    async def _learn_undrained(self, conn: RpcClientConnection | None, address: str) -> None:
        """Before leaving a core that blocks writes, learn whose sends it still holds.

        Those sends were acknowledged (possibly through another client or
        edge) and will reach Raft only when that core rejoins; the order fence
        then holds later sends of the same senders back. Sends refused together
        (e.g. one batch) ask the connection once and share the answer.
        """
        if self.mode != "hardened_ap" or conn is None or conn.closed or not address:
            return
        asked = self._learning.get(conn)
        if asked is not None:
            await asked.wait()
            return
        asked = self._learning[conn] = trio.Event()
        try:
            held = await conn.call("undrained_senders", {}, timeout=0.5)
            if isinstance(held, dict):
                now = time.monotonic()
                for sender, op_id in held.items():
                    if isinstance(sender, str) and isinstance(op_id, str):
                        self._remember(sender, address, op_id, now)
        except (IrisError, OSError):
            return
        finally:
            del self._learning[conn]
            asked.set()

    def _remember(self, sender: str, address: str, op_id: str, when: float) -> None:
        self._fence[sender] = (address, op_id, when)
        self._fence.move_to_end(sender)
        while len(self._fence) > FENCE_ENTRIES:
            self._fence.popitem(last=False)

    async def _order_fence(
        self, conn: RpcClientConnection, address: str, sender: str, deadline: float
    ) -> None:
        """Wait until ``sender``'s sends acknowledged by another core are applied here.

        See the module docstring. Raises :class:`WriteBlocked` when they are
        not applied within ~1 s (the caller moves on and retries).
        """
        entry = self._fence.get(sender)
        if entry is None or entry[0] == address:
            return
        core, op_id, acked_at = entry
        if time.monotonic() - acked_at > self.order_fence:
            logger.warning(
                "order fence for %s dropped: its send %s acknowledged by %s is not applied "
                "after %.0f s; later sends may be delivered before it",
                sender,
                op_id,
                core,
                self.order_fence,
            )
            del self._fence[sender]
            return
        stop = min(deadline, trio.current_time() + 1.0)
        while True:
            (done,) = await conn.call(
                "applied", {"op_ids": [op_id]}, timeout=max(0.05, deadline - trio.current_time())
            )
            if done:
                if self._fence.get(sender) == entry:
                    del self._fence[sender]
                return
            if trio.current_time() + 0.05 >= stop:
                raise WriteBlocked(
                    f"earlier messages from {sender!r} accepted by core {core} are not "
                    "replicated yet; retry"
                )
            await trio.sleep(0.05)

    async def ack(self, user: str, mids: Sequence[str], *, op_id: str | None = None) -> None:
        await self.call("ack", {"user": user, "mids": list(mids), "op_id": op_id or new_op_id()})

    async def ack_many(self, acks: Mapping[str, Sequence[str]]) -> None:
        """:meth:`ack` for many users in one call (``ack_batch``), one op id per user.

        Retries (after an unknown outcome) carry the same op ids. A core
        without ``ack_batch`` gets one ``ack`` call per user instead.
        """
        entries = [[user, list(mids), new_op_id()] for user, mids in acks.items()]
        for start in range(0, len(entries), MAX_ACK_BATCH):
            chunk = entries[start : start + MAX_ACK_BATCH]
            if not self._ack_batch_missing:
                try:
                    await self.call("ack_batch", {"acks": chunk})
                    continue
                except BadRequest as exc:
                    if not _unknown_method(exc):
                        raise
                    self._ack_batch_missing = True
            for user, mids, op_id in chunk:
                await self.call("ack", {"user": user, "mids": mids, "op_id": op_id})

    async def revoke_token(self, jti: str, exp_ms: int, *, op_id: str | None = None) -> None:
        await self.call(
            "revoke_token", {"jti": jti, "exp_ms": exp_ms, "op_id": op_id or new_op_id()}
        )

    async def revoke_user(
        self, user: str, *, before_ms: int | None = None, op_id: str | None = None
    ) -> int:
        return int(
            await self.call(
                "revoke_user", {"user": user, "before_ms": before_ms, "op_id": op_id or new_op_id()}
            )
        )

    async def open_session(
        self, session: str, user: str, edge: str, jti: str, iat_ms: int, *, op_id: str | None = None
    ) -> None:
        await self.call(
            "open_session",
            {
                "session": session,
                "user": user,
                "edge": edge,
                "jti": jti,
                "iat_ms": iat_ms,
                "op_id": op_id or new_op_id(),
            },
        )

    async def close_session(
        self, session: str, *, kick: bool = False, op_id: str | None = None
    ) -> None:
        await self.call(
            "close_session", {"session": session, "kick": kick, "op_id": op_id or new_op_id()}
        )

    async def renew_lease(self, edge: str, ttl: float, *, op_id: str | None = None) -> None:
        await self.call("renew_lease", {"edge": edge, "ttl": ttl, "op_id": op_id or new_op_id()})

    async def put(self, key: str, value: Any, *, op_id: str | None = None) -> None:
        await self.call("put", {"key": key, "value": value, "op_id": op_id or new_op_id()})

    async def cas(self, key: str, expected: Any, new: Any, *, op_id: str | None = None) -> bool:
        return bool(
            await self.call(
                "cas", {"key": key, "expected": expected, "new": new, "op_id": op_id or new_op_id()}
            )
        )

    # ---------------------------------------------------------------- reads

    async def fetch_inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        raw = await self.call("fetch", {"user": user, "limit": limit})
        return [message_from_wire(m) for m in raw]

    async def is_revoked(self, user: str, jti: str, iat_ms: int | None) -> bool:
        return bool(await self.call("is_revoked", {"user": user, "jti": jti, "iat_ms": iat_ms}))

    async def get(self, key: str, *, linearizable: bool | None = None) -> Any:
        return await self.call("get", {"key": key, "linearizable": linearizable})

    async def status(self) -> dict[str, Any]:
        result = await self.call("status", {})
        return dict(result)

    async def members(self) -> dict[str, str]:
        return dict(await self.call("members", {}))

    async def add_node(self, node: str) -> None:
        await self.call("add_node", {"node": node}, timeout=max(self.timeout, 15))

    async def remove_node(self, node: str) -> None:
        await self.call("remove_node", {"node": node}, timeout=max(self.timeout, 15))

    # -------------------------------------------------------- subscriptions

    def subscribe(self, users: Iterable[str] = (), capacity: int = 100_000) -> RemoteSubscription:
        """A subscription that survives reconnects; see :class:`RemoteSubscription`."""
        sub = RemoteSubscription(self, users, capacity)
        self._nursery.start_soon(sub._run)
        return sub


class RemoteSubscription:
    """Events for a set of users from the cores; yields :class:`Resync` after each (re)subscribe."""

    def __init__(self, client: Client, users: Iterable[str], capacity: int) -> None:
        self._client = client
        self.users: set[str] = set(users)
        self._send, self._recv = trio.open_memory_channel[Event | Resync](capacity)
        self._conn: RpcClientConnection | None = None
        self._cancel = trio.CancelScope()
        self.resubscriptions = 0
        self.connected_to: str | None = None

    async def add_users(self, users: Iterable[str]) -> None:
        new = set(users) - self.users
        self.users |= new
        conn = self._conn
        if new and conn is not None and not conn.closed:
            with contextlib.suppress(IrisError):
                await conn.call(
                    "subscribe_add", {"users": sorted(new)}, timeout=self._client.timeout
                )

    async def remove_users(self, users: Iterable[str]) -> None:
        gone = set(users) & self.users
        self.users -= gone
        conn = self._conn
        if gone and conn is not None and not conn.closed:
            with contextlib.suppress(IrisError):
                await conn.call(
                    "subscribe_remove", {"users": sorted(gone)}, timeout=self._client.timeout
                )

    async def _run(self) -> None:
        with self._cancel:
            backoff = 0.05
            while True:
                try:
                    await self._session()
                    backoff = 0.05
                except (IrisError, OSError) as exc:
                    logger.info("subscription interrupted (%s); resubscribing", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _session(self) -> None:
        cores = self._client.cores
        start = random.randrange(len(cores))
        last: Exception | None = None
        for i in range(len(cores)):
            address = cores[(start + i) % len(cores)]
            try:
                async with open_rpc_connection(
                    address,
                    secret=self._client._secret,
                    ssl_context=self._client._ssl,
                    connect_timeout=self._client._connect_timeout,
                ) as conn:
                    pushes = conn.pushes("events")
                    await conn.call(
                        "subscribe", {"users": sorted(self.users)}, timeout=self._client.timeout
                    )
                    self._conn = conn
                    self.connected_to = address
                    self.resubscriptions += 1
                    await self._send.send(
                        Resync("subscribed" if self.resubscriptions == 1 else "resubscribed")
                    )
                    async for push in pushes:
                        if push.get("lost"):
                            raise Unavailable("the core dropped this subscription (fell behind)")
                        # No yield per event while the channel has room: with many
                        # busy tasks each yield costs a whole scheduler turn.
                        for raw in push.get("events", ()):
                            ev = event_from_wire(raw)
                            try:
                                self._send.send_nowait(ev)
                            except trio.WouldBlock:
                                await self._send.send(ev)
                    raise Unavailable("subscription connection closed")
            except (IrisError, OSError) as exc:
                last = exc
                self._conn = None
                self.connected_to = None
                continue
        raise Unavailable(f"no core accepted the subscription: {last}")

    async def receive(self) -> Event | Resync:
        return await self._recv.receive()

    def receive_nowait(self) -> Event | Resync | None:
        """The next event if one is waiting, else None (also once closed:
        :meth:`receive` then raises)."""
        try:
            return self._recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return None

    def close(self) -> None:
        self._cancel.cancel()
        self._send.close()

    def __aiter__(self) -> RemoteSubscription:
        return self

    async def __anext__(self) -> Event | Resync:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


@contextlib.asynccontextmanager
async def open_client(
    cores: Sequence[str],
    *,
    secret: bytes | str | None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
    connect_timeout: float = 2.0,
    prefer_leader: bool = True,
    order_fence: float = 30.0,
    coalesce_sends: bool = True,
) -> AsyncIterator[Client]:
    """Connect to a core cluster (any of ``cores``); close everything on exit.

    ``coalesce_sends=False`` sends each :meth:`Client.send` as its own call.
    """
    key = secret.encode() if isinstance(secret, str) else secret
    async with trio.open_nursery() as nursery:
        client = Client(
            cores,
            secret=key,
            ssl_context=ssl_context,
            timeout=timeout,
            connect_timeout=connect_timeout,
            prefer_leader=prefer_leader,
            nursery=nursery,
            order_fence=order_fence,
            coalesce_sends=coalesce_sends,
        )
        nursery.start_soon(client._follow_leader)
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await client._drop()
