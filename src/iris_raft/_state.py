"""The replicated state machine: inboxes, sessions, revocations, dedup, registers.

Theory of operation
-------------------
``IrisState.apply(payload)`` takes one encoded batch (see ``_ops``) and
returns one result per operation plus the *events* the batch produced (a new
message for a user, a revocation, a session to kick). Every replica applies the
same batches in the same order and so reaches the same state.

Invariants that keep replicas identical and the process alive:

* Deterministic: time comes from the batch (``now`` never moves backwards),
  ids come from the operations, limits come from the batch. Nothing here reads
  a clock, a random source or the node's configuration.
* Never raises: PySyncObj stops applying forever after an exception in a
  replicated method, so a malformed batch or operation becomes an error result
  and an unexpected bug in one operation becomes an ``internal`` result for
  that operation only (logged once per batch).
* Bounded: per-recipient caps (``inbox_full``), TTL expiry when time
  advances, the dedup window, and a size estimate (``state_bytes``) that the
  node uses to refuse writes above ``max_state_bytes``.
* Idempotent writes: an operation id seen within the dedup window returns the
  first result without applying again. Failed operations are not remembered,
  so a retry after e.g. ``inbox_full`` can succeed once there is room.

The snapshot (``to_snapshot``/``from_snapshot``) holds every table, the dedup
table included, so a restarted node deduplicates exactly as before.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._exceptions import BadRequest
from ._ops import (
    Ack,
    Announce,
    Barrier,
    Cas,
    CloseSession,
    Forget,
    Limits,
    Op,
    OpenSession,
    Put,
    RenewLease,
    RevokeToken,
    RevokeUser,
    Send,
    decode_batch_header,
    mid_for,
    op_from_wire,
)

logger = logging.getLogger("iris_raft.state")

# Fixed per-entry overheads used by the size estimate (CPython object sizes,
# rounded). The estimate is deterministic: it depends only on the contents.
_MSG_OVERHEAD = 260
_DEDUP_OVERHEAD = 180
_SESSION_OVERHEAD = 400
_REVOCATION_OVERHEAD = 150
_REGISTER_OVERHEAD = 150


class StoredMessage(NamedTuple):
    """A message waiting in an inbox until acked or expired."""

    mid: str
    sender: str
    body: bytes
    ts: int
    expires: int


class Session(NamedTuple):
    """A live connection registered by an edge."""

    user: str
    edge: str
    jti: str
    iat: int
    since: int


#: Lease given to an edge that opens a session without holding one.
DEFAULT_LEASE_MS = 60_000


def same_value(a: Any, b: Any) -> bool:
    """Equality for register values that tells ``True`` from ``1`` and ``1`` from ``1.0``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if {(type(k), k) for k in a} != {(type(k), k) for k in b}:
            return False
        return all(same_value(a[k], b[k]) for k in a)
    return bool(a == b)


# Results are tuples for speed: (True, value) or (False, code, message).
Result = tuple[Any, ...]
OK_NONE: Result = (True, None)


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message was stored for ``user``."""

    user: str
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class AckEvent:
    """``user`` acked ``mids`` (other sessions of the user may drop them)."""

    user: str
    mids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RevokeEvent:
    """A token (``jti``) or every token of ``user`` issued before ``before_ms`` was revoked."""

    jti: str | None
    user: str | None
    before_ms: int | None


@dataclass(frozen=True, slots=True)
class KickEvent:
    """The edge holding ``session`` must close it."""

    session: str
    user: str
    edge: str
    reason: str


Event = MessageEvent | AckEvent | RevokeEvent | KickEvent


def _err(code: str, message: str) -> Result:
    return (False, code, message)


class IrisState:
    """The in-memory tables. Mutated only by :meth:`apply`; read under the owner's lock."""

    def __init__(self) -> None:
        self.now_ms = 0
        self.applied_batches = 0
        self.inboxes: dict[str, dict[str, StoredMessage]] = {}
        self.inbox_bytes: dict[str, int] = {}
        self.message_count = 0
        self._expiry: list[tuple[int, str, str]] = []  # (expires, user, mid)
        self.sessions: dict[str, Session] = {}
        self.sessions_by_edge: dict[str, set[str]] = {}
        self.leases: dict[str, int] = {}
        self.revoked_jti: dict[str, int] = {}
        self.revoked_users: dict[str, tuple[int, int]] = {}  # user -> (before, until)
        self._revocation_expiry: list[tuple[int, int, str]] = []  # (until, kind, key)
        self.dedup: dict[str, tuple[int, Any]] = {}  # op_id -> (expires, result value)
        self._dedup_expiry: list[tuple[int, str]] = []
        self.registers: dict[str, Any] = {}
        self.members: dict[str, str] = {}  # Raft address -> RPC address
        self.state_bytes = 0

    # ----------------------------------------------------------------- apply

    def apply(self, payload: bytes) -> tuple[list[Result], list[Event]]:
        """Apply one encoded batch. Never raises; see the module docstring."""
        events: list[Event] = []
        try:
            now_ms, _origin, limits, raw_ops = decode_batch_header(payload)
        except BadRequest as exc:
            logger.error("rejected a malformed batch: %s", exc.message)
            return [], events
        except Exception:  # pragma: no cover - defensive: apply must not raise
            logger.exception("could not decode a batch")
            return [], events
        self.applied_batches += 1
        if now_ms > self.now_ms:
            self.now_ms = now_ms
        try:
            self._expire(events)
        except Exception:  # pragma: no cover - defensive
            logger.exception("expiry failed; state kept as it is")
        results: list[Result] = []
        for raw in raw_ops:
            try:
                op = op_from_wire(raw)
                results.append(self._apply_op(op, limits, events))
            except BadRequest as exc:
                results.append(_err("bad_request", exc.message))
            except Exception as exc:  # a bug must not stall the log
                logger.exception("operation failed inside apply")
                results.append(_err("internal", f"{type(exc).__name__}: {exc}"))
        return results, events

    def _apply_op(self, op: Op, limits: Limits, events: list[Event]) -> Result:
        if isinstance(op, Barrier):
            return OK_NONE
        seen = self.dedup.get(op.op_id)
        if seen is not None:
            return (True, seen[1], "duplicate")
        if isinstance(op, Send):
            result = self._send(op, limits, events)
        elif isinstance(op, Ack):
            result = self._ack(op, events)
        elif isinstance(op, RevokeToken):
            result = self._revoke_token(op, events)
        elif isinstance(op, RevokeUser):
            result = self._revoke_user(op, events)
        elif isinstance(op, OpenSession):
            result = self._open_session(op)
        elif isinstance(op, CloseSession):
            result = self._close_session(op, events)
        elif isinstance(op, RenewLease):
            result = self._renew_lease(op)
        elif isinstance(op, Put):
            result = self._put(op)
        elif isinstance(op, Cas):
            result = self._cas(op)
        elif isinstance(op, Announce):
            self.members[op.node] = op.rpc
            result = OK_NONE
        elif isinstance(op, Forget):
            self.members.pop(op.node, None)
            result = OK_NONE
        else:  # pragma: no cover - op_from_wire only builds known types
            return _err("bad_request", f"unsupported operation {type(op).__name__}")
        if result[0] and op.op_id:
            self._remember(op.op_id, result[1], limits)
        return result

    def _remember(self, op_id: str, value: Any, limits: Limits) -> None:
        expires = self.now_ms + limits.dedup_window_ms
        self.dedup[op_id] = (expires, value)
        heapq.heappush(self._dedup_expiry, (expires, op_id))
        self.state_bytes += _DEDUP_OVERHEAD + len(op_id)

    # ------------------------------------------------------------ operations

    def _send(self, op: Send, limits: Limits, events: list[Event]) -> Result:
        if not op.recipient or not op.mid:
            return _err("bad_request", "recipient and mid must be non-empty")
        inbox = self.inboxes.get(op.recipient)
        count = len(inbox) if inbox is not None else 0
        size = self.inbox_bytes.get(op.recipient, 0)
        if count >= limits.max_inbox_messages or size + len(op.body) > limits.max_inbox_bytes:
            return _err("inbox_full", f"inbox of {op.recipient!r} is full")
        if inbox is None:
            inbox = self.inboxes[op.recipient] = {}
        mid = op.mid
        if mid in inbox:
            # The same (sender, id) again after the dedup window, while the first
            # message is still stored: a new message, with a mid of its own.
            mid = mid_for(f"{op.op_id}#{self.now_ms}")
            if mid in inbox:
                return _err("bad_request", f"message id {mid!r} already stored")
        expires = self.now_ms + limits.message_ttl_ms
        msg = StoredMessage(mid, op.sender, op.body, op.ts, expires)
        inbox[mid] = msg
        self.inbox_bytes[op.recipient] = size + len(op.body)
        self.message_count += 1
        self.state_bytes += self._message_cost(msg)
        heapq.heappush(self._expiry, (expires, op.recipient, mid))
        events.append(MessageEvent(op.recipient, msg))
        return (True, (mid, op.ts))

    @staticmethod
    def _message_cost(msg: StoredMessage) -> int:
        return _MSG_OVERHEAD + len(msg.body) + len(msg.mid) + len(msg.sender)

    def _drop_message(self, user: str, mid: str) -> bool:
        inbox = self.inboxes.get(user)
        if inbox is None:
            return False
        msg = inbox.pop(mid, None)
        if msg is None:
            return False
        self.message_count -= 1
        self.state_bytes -= self._message_cost(msg)
        left = self.inbox_bytes[user] - len(msg.body)
        if inbox:
            self.inbox_bytes[user] = left
        else:
            del self.inboxes[user]
            del self.inbox_bytes[user]
        return True

    def _ack(self, op: Ack, events: list[Event]) -> Result:
        removed = [mid for mid in op.mids if self._drop_message(op.user, mid)]
        if removed:
            events.append(AckEvent(op.user, tuple(removed)))
        return (True, len(removed))

    def _revoke_token(self, op: RevokeToken, events: list[Event]) -> Result:
        if op.jti not in self.revoked_jti:
            self.state_bytes += _REVOCATION_OVERHEAD + len(op.jti)
        self.revoked_jti[op.jti] = max(op.exp_ms, self.revoked_jti.get(op.jti, 0))
        heapq.heappush(self._revocation_expiry, (op.exp_ms, 0, op.jti))
        events.append(RevokeEvent(op.jti, None, None))
        for sid, session in list(self.sessions.items()):
            if session.jti == op.jti:
                self._remove_session(sid)
                events.append(KickEvent(sid, session.user, session.edge, "token_revoked"))
        return OK_NONE

    def _revoke_user(self, op: RevokeUser, events: list[Event]) -> Result:
        old = self.revoked_users.get(op.user)
        if old is None:
            self.state_bytes += _REVOCATION_OVERHEAD + len(op.user)
        before = max(op.before_ms, old[0] if old else 0)
        until = max(op.until_ms, old[1] if old else 0)
        self.revoked_users[op.user] = (before, until)
        heapq.heappush(self._revocation_expiry, (until, 1, op.user))
        events.append(RevokeEvent(None, op.user, before))
        for sid, session in list(self.sessions.items()):
            if session.user == op.user and session.iat < before:
                self._remove_session(sid)
                events.append(KickEvent(sid, session.user, session.edge, "token_revoked"))
        return OK_NONE

    def _open_session(self, op: OpenSession) -> Result:
        # Checked here too, in log order: a revocation committed between the
        # edge's check and this session cannot let the token in.
        if self.is_revoked(op.user, op.jti, op.iat_ms):
            return _err("token_revoked", "the token is revoked")
        if op.session in self.sessions:
            self._remove_session(op.session)
        self.sessions[op.session] = Session(op.user, op.edge, op.jti, op.iat_ms, op.since_ms)
        # Sessions live on their edge's lease; an edge that never renewed gets
        # a short one, so its sessions cannot outlive it forever.
        if op.edge not in self.leases:
            self.leases[op.edge] = self.now_ms + DEFAULT_LEASE_MS
        self.sessions_by_edge.setdefault(op.edge, set()).add(op.session)
        self.state_bytes += _SESSION_OVERHEAD + len(op.session) + len(op.user) + len(op.jti)
        return OK_NONE

    def _remove_session(self, sid: str) -> Session | None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return None
        owned = self.sessions_by_edge.get(session.edge)
        if owned is not None:
            owned.discard(sid)
            if not owned:
                del self.sessions_by_edge[session.edge]
        self.state_bytes -= _SESSION_OVERHEAD + len(sid) + len(session.user) + len(session.jti)
        return session

    def _close_session(self, op: CloseSession, events: list[Event]) -> Result:
        session = self._remove_session(op.session)
        if session is not None and op.kick:
            events.append(KickEvent(op.session, session.user, session.edge, "kicked"))
        return (True, session is not None)

    def _renew_lease(self, op: RenewLease) -> Result:
        self.leases[op.edge] = max(op.until_ms, self.leases.get(op.edge, 0))
        return OK_NONE

    def _put(self, op: Put) -> Result:
        self._set_register(op.key, op.value)
        return OK_NONE

    def _cas(self, op: Cas) -> Result:
        if not same_value(self.registers.get(op.key), op.expected):
            return (True, False)
        self._set_register(op.key, op.new)
        return (True, True)

    def _set_register(self, key: str, value: Any) -> None:
        if key not in self.registers:
            self.state_bytes += _REGISTER_OVERHEAD + len(key)
        self.registers[key] = value

    # ---------------------------------------------------------------- expiry

    def _expire(self, events: list[Event]) -> None:
        now = self.now_ms
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, user, mid = heapq.heappop(heap)
            box = self.inboxes.get(user)
            msg = box.get(mid) if box is not None else None
            # The heap entry may be stale: the mid was acked and stored again later.
            if msg is not None and msg.expires <= now:
                self._drop_message(user, mid)
        dheap = self._dedup_expiry
        while dheap and dheap[0][0] <= now:
            _, op_id = heapq.heappop(dheap)
            entry = self.dedup.get(op_id)
            if entry is not None and entry[0] <= now:
                del self.dedup[op_id]
                self.state_bytes -= _DEDUP_OVERHEAD + len(op_id)
        rheap = self._revocation_expiry
        while rheap and rheap[0][0] <= now:
            _, kind, key = heapq.heappop(rheap)
            if kind == 0:
                exp = self.revoked_jti.get(key)
                if exp is not None and exp <= now:
                    del self.revoked_jti[key]
                    self.state_bytes -= _REVOCATION_OVERHEAD + len(key)
            else:
                entry2 = self.revoked_users.get(key)
                if entry2 is not None and entry2[1] <= now:
                    del self.revoked_users[key]
                    self.state_bytes -= _REVOCATION_OVERHEAD + len(key)
        for edge, until in list(self.leases.items()):
            if until <= now:
                del self.leases[edge]
                for sid in sorted(self.sessions_by_edge.get(edge, ())):
                    session = self._remove_session(sid)
                    if session is not None:
                        events.append(KickEvent(sid, session.user, edge, "lease_expired"))

    # ----------------------------------------------------------------- reads

    def inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        """Stored messages of ``user``, oldest first (apply order)."""
        box = self.inboxes.get(user)
        if not box:
            return []
        msgs = list(box.values())
        return msgs if limit is None else msgs[:limit]

    def is_revoked(self, user: str, jti: str, issued_at_ms: int | None) -> bool:
        """True if the token ``jti`` of ``user`` (issued at ``issued_at_ms``) is revoked."""
        if jti in self.revoked_jti:
            return True
        cut = self.revoked_users.get(user)
        if cut is None:
            return False
        return issued_at_ms is None or issued_at_ms < cut[0]

    def dedup_result(self, op_id: str) -> Any:
        """The remembered result of ``op_id``, or None."""
        entry = self.dedup.get(op_id)
        return None if entry is None else entry[1]

    def statistics(self) -> dict[str, int]:
        """Counters for status and metrics."""
        return {
            "now_ms": self.now_ms,
            "applied_batches": self.applied_batches,
            "messages": self.message_count,
            "inboxes": len(self.inboxes),
            "sessions": len(self.sessions),
            "leases": len(self.leases),
            "revoked_tokens": len(self.revoked_jti),
            "revoked_users": len(self.revoked_users),
            "dedup_entries": len(self.dedup),
            "registers": len(self.registers),
            "state_bytes": self.state_bytes,
        }

    # -------------------------------------------------------------- snapshot

    def to_snapshot(self) -> dict[str, Any]:
        """Every table, by reference (the caller pickles it in a forked child)."""
        return dict(self.__dict__)

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> IrisState:
        """Rebuild a state from :meth:`to_snapshot` output."""
        state = cls()
        unknown = set(data) - set(state.__dict__)
        if unknown:
            raise ValueError(f"snapshot has unknown tables: {sorted(unknown)}")
        state.__dict__.update(data)
        return state

    def fingerprint(self) -> tuple[Any, ...]:
        """A comparable summary of the replicated content (for tests and checks)."""
        return (
            self.now_ms,
            {u: list(box.values()) for u, box in self.inboxes.items()},
            dict(self.sessions),
            dict(self.leases),
            dict(self.revoked_jti),
            dict(self.revoked_users),
            {k: v[1] for k, v in self.dedup.items()},
            dict(self.registers),
            dict(self.members),
            self.state_bytes,
        )


def users_of(events: Iterable[Event]) -> set[str]:
    """Users named by message and ack events (for routing to subscribers)."""
    out: set[str] = set()
    for ev in events:
        if isinstance(ev, MessageEvent | AckEvent):
            out.add(ev.user)
    return out
