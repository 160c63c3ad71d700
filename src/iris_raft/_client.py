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
* The configured cores are a seed: on every (re)connect the client asks for
  the announced membership and the leader, and prefers the leader.
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
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import trio

from ._exceptions import (
    IrisError,
    ProtocolError,
    Unavailable,
    UnknownOutcome,
    WriteBlocked,
)
from ._node import SendResult
from ._ops import new_op_id, send_op_id
from ._rpc import RpcClientConnection, open_rpc_connection
from ._state import Event, StoredMessage
from ._wire import Resync, event_from_wire, message_from_wire

logger = logging.getLogger("iris_raft.client")

#: Senders whose last acknowledged send is remembered for the order fence.
FENCE_ENTRIES = 100_000


class Client:
    """A connection to a core cluster. Build it with :func:`open_client`."""

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

    async def _open(self, address: str) -> RpcClientConnection:
        conn: RpcClientConnection
        release: trio.Event
        conn, release = await self._nursery.start(self._hold, address)
        await self._drop()
        self._conn, self._release, self._conn_address = conn, release, address
        self.reconnects += 1
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

    async def _rotate(self) -> None:
        async with self._lock:
            await self._drop()

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
    ) -> tuple[Any, str]:
        """:meth:`call`, also returning the address of the core that answered.

        ``before(conn, address, deadline)`` runs ahead of each attempt and may
        raise a retryable error to move on to another core.
        """
        deadline = trio.current_time() + (self.timeout if timeout is None else timeout)
        unknown = False
        last: IrisError | None = None
        backoff = 0.02
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            try:
                conn = await self._connection()
                address = self._conn_address or ""
                if before is not None:
                    await before(conn, address, deadline)
                result = await conn.call(
                    method, params, timeout=max(0.05, deadline - trio.current_time())
                )
                return result, address
            except UnknownOutcome as exc:
                unknown, last = True, exc
                if self._conn is not None and self._conn.closed:
                    await self._rotate()
            except WriteBlocked as exc:
                last = exc
                await self._learn_undrained()
                await self._rotate()
            except (Unavailable, ProtocolError) as exc:
                last = exc
                await self._rotate()
            except OSError as exc:
                last = Unavailable(f"connection failed: {exc}")
                await self._rotate()
            await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
            backoff = min(backoff * 2, 0.5)
        if unknown:
            raise UnknownOutcome(f"{method}: outcome unknown after retries ({last})")
        raise last or Unavailable(f"{method}: no answer in time")

    # --------------------------------------------------------------- writes

    async def send(self, sender: str, client_id: str, recipient: str, body: bytes) -> SendResult:
        async def fence(conn: RpcClientConnection, address: str, deadline: float) -> None:
            await self._order_fence(conn, address, sender, deadline)

        r, address = await self._call(
            "send",
            {"sender": sender, "client_id": client_id, "to": recipient, "body": body},
            before=fence,
        )
        if self.mode == "hardened_ap" and address:
            self._remember(sender, address, send_op_id(sender, client_id), time.monotonic())
        return SendResult(r["mid"], r["ts"], bool(r["duplicate"]))

    async def _learn_undrained(self) -> None:
        """Before leaving a core that blocks writes, learn whose sends it still holds.

        Those sends were acknowledged (possibly through another client or
        edge) and will reach Raft only when that core rejoins; the order fence
        then holds later sends of the same senders back.
        """
        conn, address = self._conn, self._conn_address
        if self.mode != "hardened_ap" or conn is None or conn.closed or not address:
            return
        try:
            held = await conn.call("undrained_senders", {}, timeout=0.5)
        except (IrisError, OSError):
            return
        if not isinstance(held, dict):
            return
        now = time.monotonic()
        for sender, op_id in held.items():
            if isinstance(sender, str) and isinstance(op_id, str):
                self._remember(sender, address, op_id, now)

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
) -> AsyncIterator[Client]:
    """Connect to a core cluster (any of ``cores``); close everything on exit."""
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
        )
        try:
            yield client
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await client._drop()
