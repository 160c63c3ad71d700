"""How an edge reaches the core: over RPC (``iris edge``) or in-process (``iris dev``).

Theory of operation
-------------------
The edge needs a handful of core operations and one event stream. Both
adapters present the same surface (:class:`CoreAccess`):

* :class:`RemoteCore` wraps :class:`iris_raft.Client` (leader-following,
  retrying with the same operation id, discovering announced cores).
* :class:`LocalCore` wraps an embedded :class:`iris_raft.Node`.

The event stream yields core events and :class:`iris_raft.Resync` markers.
After a ``Resync`` the edge refetches the inboxes of its connected users and
rechecks their tokens, because events may have been missed in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from iris_raft import (
    Client,
    IrisError,
    Node,
    Resync,
    SendResult,
    StoredMessage,
    Subscription,
    SubscriptionLost,
)
from iris_raft._state import Event


class EventStream(Protocol):
    """Events for a changing set of users, plus every revocation and kick.

    A stream may also offer ``receive_nowait() -> Event | Resync | None``
    (an event already waiting, or None): the edge then handles what has
    piled up in one turn instead of one event per scheduler turn.
    """

    async def add_users(self, users: Iterable[str]) -> None: ...

    async def remove_users(self, users: Iterable[str]) -> None: ...

    def __aiter__(self) -> AsyncIterator[Event | Resync]: ...


class CoreAccess(Protocol):
    """What the edge asks of the core."""

    async def send(
        self, sender: str, client_id: str, recipient: str, body: bytes
    ) -> SendResult: ...

    async def ack(self, user: str, mids: Sequence[str]) -> None: ...

    async def ack_many(self, acks: Mapping[str, Sequence[str]]) -> None: ...

    async def fetch_inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]: ...

    async def is_revoked(self, user: str, jti: str, iat_ms: int | None) -> bool: ...

    async def open_session(
        self, session: str, user: str, edge: str, jti: str, iat_ms: int
    ) -> None: ...

    async def close_session(self, session: str) -> None: ...

    async def renew_lease(self, edge: str, ttl: float) -> None: ...

    async def status(self) -> dict[str, Any]: ...

    def events(self, users: Iterable[str]) -> EventStream: ...


class RemoteCore:
    """The core cluster over RPC, through a pool of client connections.

    Calls for one sender always use the same connection (``router_pool_size``
    connections, chosen by a hash of the sender), so one sender's sends reach
    the core in order while different senders spread over the pool.
    """

    def __init__(self, clients: Sequence[Client]) -> None:
        if not clients:
            raise ValueError("at least one client is needed")
        self.clients = list(clients)
        self.client = self.clients[0]

    def _for(self, key: str) -> Client:
        return self.clients[hash(key) % len(self.clients)]

    async def send(self, sender: str, client_id: str, recipient: str, body: bytes) -> SendResult:
        return await self._for(sender).send(sender, client_id, recipient, body)

    async def ack(self, user: str, mids: Sequence[str]) -> None:
        await self._for(user).ack(user, mids)

    async def ack_many(self, acks: Mapping[str, Sequence[str]]) -> None:
        """One ``ack_batch`` call per pool client that the users map to, concurrently.

        If any call fails, the first error is raised once all have ended (acks
        are idempotent: the caller may retry them all).
        """
        groups: dict[int, dict[str, Sequence[str]]] = {}
        for user, mids in acks.items():
            groups.setdefault(hash(user) % len(self.clients), {})[user] = mids
        errors: list[IrisError] = []

        async def one(client: Client, group: dict[str, Sequence[str]]) -> None:
            try:
                await client.ack_many(group)
            except IrisError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for index, group in groups.items():
                nursery.start_soon(one, self.clients[index], group)
        if errors:
            raise errors[0]

    async def fetch_inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        return await self._for(user).fetch_inbox(user, limit)

    async def is_revoked(self, user: str, jti: str, iat_ms: int | None) -> bool:
        return await self._for(user).is_revoked(user, jti, iat_ms)

    async def open_session(self, session: str, user: str, edge: str, jti: str, iat_ms: int) -> None:
        await self._for(user).open_session(session, user, edge, jti, iat_ms)

    async def close_session(self, session: str) -> None:
        await self._for(session).close_session(session)

    async def renew_lease(self, edge: str, ttl: float) -> None:
        await self.client.renew_lease(edge, ttl)

    async def status(self) -> dict[str, Any]:
        return await self.client.status()

    def events(self, users: Iterable[str]) -> EventStream:
        return self.client.subscribe(users)


class _LocalStream:
    """A node subscription as an :class:`EventStream`; resubscribes if it is dropped."""

    def __init__(self, node: Node, users: Iterable[str]) -> None:
        self._node = node
        self._users = set(users)
        self._sub: Subscription = node.subscribe(self._users)
        self._first = True

    async def add_users(self, users: Iterable[str]) -> None:
        users = set(users)
        self._users |= users
        self._sub.add_users(users)

    async def remove_users(self, users: Iterable[str]) -> None:
        users = set(users)
        self._users -= users
        self._sub.remove_users(users)

    def receive_nowait(self) -> Event | Resync | None:
        """An event already waiting, or None (then ``__anext__`` waits, or resubscribes)."""
        if self._first:
            return None
        try:
            return self._sub.receive_nowait()
        except SubscriptionLost:
            return None

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Event | Resync:
        if self._first:
            self._first = False
            return Resync("subscribed")
        try:
            return await self._sub.receive()
        except SubscriptionLost:
            self._sub = self._node.subscribe(self._users)
            await trio.lowlevel.checkpoint()
            return Resync("resubscribed")


class LocalCore:
    """An embedded core node in this process."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def send(self, sender: str, client_id: str, recipient: str, body: bytes) -> SendResult:
        return await self.node.send(sender, client_id, recipient, body)

    async def ack(self, user: str, mids: Sequence[str]) -> None:
        await self.node.ack(user, mids)

    async def ack_many(self, acks: Mapping[str, Sequence[str]]) -> None:
        await self.node.ack_many([(user, mids, None) for user, mids in acks.items()])

    async def fetch_inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        return await self.node.fetch_inbox(user, limit)

    async def is_revoked(self, user: str, jti: str, iat_ms: int | None) -> bool:
        return await self.node.is_revoked(user, jti, iat_ms)

    async def open_session(self, session: str, user: str, edge: str, jti: str, iat_ms: int) -> None:
        await self.node.open_session(session, user, edge, jti, iat_ms)

    async def close_session(self, session: str) -> None:
        await self.node.close_session(session)

    async def renew_lease(self, edge: str, ttl: float) -> None:
        await self.node.renew_lease(edge, ttl)

    async def status(self) -> dict[str, Any]:
        return self.node.status()

    def events(self, users: Iterable[str]) -> EventStream:
        return _LocalStream(self.node, users)
