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

Memory layout
-------------
A core holds every stored message and, for a day, every operation id, so the
per-entry cost decides how many a core can hold (and how long a restart and a
garbage-collector pass take). The tables are therefore packed:

* An inbox is a dict ``mid -> record``; the record is one ``bytes``
  (``ts``, ``expires``, the sender, the body; see :func:`pack_message`), so a
  stored message is two objects (the mid and the record), neither of them
  tracked by the cyclic garbage collector.
* Message expiry keeps one heap entry per *inbox*, not per message
  (``_expiry`` holds ``(time, user)``, ``_armed`` the earliest time armed for
  each user). When it fires, the inbox's oldest messages go while they are
  expired. Messages of an inbox expire in the order they were stored unless
  the TTL was lowered meanwhile; such an inbox is marked in ``_unsorted`` and
  scanned whole when it fires, so expiry stays exact.
* Sends are deduplicated under their mid-to-be, ``mid_for(op_id)`` (a
  104-bit hash of the op id), in ``sent``; that string is the same object as
  the inbox key, and the remembered result is just the ``ts`` when the stored
  mid is that hash. Other operations stay under their op id in ``dedup``.
  Both dicts are consulted for every operation, so an op id is remembered
  once whatever kind of operation reuses it.
* Dedup entries expire in groups: one heap entry per applied batch
  (``_dedup_groups``: ``(expires, batch, op ids, mids)``).

Snapshots from before this layout (``format`` absent) are converted on load.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import struct
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
# rounded up, for the packed layout of the module docstring). The estimate is
# deterministic: it depends only on the contents.
_MSG_OVERHEAD = 150
_DEDUP_OVERHEAD = 110
#: A send's dedup entry: a dict slot, the ts and its group reference, plus the
#: mid string once the message itself is gone.
_SENT_OVERHEAD = 130
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


#: Layout of a stored message's record: ts, expires (ms), sender length; then
#: the sender (UTF-8) and the body.
_RECORD = struct.Struct("<qqI")
_RECORD_SIZE = _RECORD.size
_EXPIRES = struct.Struct("<q")
_EXPIRES_AT = 8

#: Version of the table layout in snapshots (absent: the unpacked layout).
STATE_FORMAT = 2


def pack_message(sender: str, body: bytes, ts: int, expires: int) -> bytes:
    """One stored message's record (everything but its mid, which is the key)."""
    raw_sender = sender.encode("utf-8", "surrogatepass")
    return _RECORD.pack(ts, expires, len(raw_sender)) + raw_sender + body


def unpack_message(mid: str, record: bytes) -> StoredMessage:
    """The :class:`StoredMessage` held in ``record``."""
    ts, expires, n = _RECORD.unpack_from(record)
    end = _RECORD_SIZE + n
    sender = record[_RECORD_SIZE:end].decode("utf-8", "surrogatepass")
    return StoredMessage(mid, sender, record[end:], ts, expires)


def _expires_of(record: bytes) -> int:
    value: int = _EXPIRES.unpack_from(record, _EXPIRES_AT)[0]
    return value


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
        self.format = STATE_FORMAT
        self.inboxes: dict[str, dict[str, bytes]] = {}  # user -> mid -> record
        self.inbox_bytes: dict[str, int] = {}
        self.message_count = 0
        self._expiry: list[tuple[int, str]] = []  # (time, user), one per inbox
        self._armed: dict[str, int] = {}  # user -> earliest time in _expiry
        self._unsorted: set[str] = set()  # inboxes not in expiry order
        self.sessions: dict[str, Session] = {}
        self.sessions_by_edge: dict[str, set[str]] = {}
        self.leases: dict[str, int] = {}
        self.revoked_jti: dict[str, int] = {}
        self.revoked_users: dict[str, tuple[int, int]] = {}  # user -> (before, until)
        self._revocation_expiry: list[tuple[int, int, str]] = []  # (until, kind, key)
        self.dedup: dict[str, Any] = {}  # op_id -> result value (not sends)
        self.sent: dict[str, Any] = {}  # mid_for(op_id) -> ts, or (mid, ts)
        # (expires, batch number, op ids, send keys), one per batch that remembered any.
        self._dedup_groups: list[tuple[int, int, list[str], list[str]]] = []
        self._open_group: tuple[int, int, list[str], list[str]] | None = None
        # One int object per distinct send ts within a batch (sends of a batch
        # mostly share a few milliseconds): dedup entries then share them.
        self._ts_pool: dict[int, int] = {}
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
        self._open_group = None
        self._ts_pool = {}
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
        key = ""
        if op.op_id:
            key = mid_for(op.op_id)
            if key in self.sent:
                return (True, self._sent_value(key), "duplicate")
            if op.op_id in self.dedup:
                return (True, self.dedup[op.op_id], "duplicate")
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
            group = self._group(limits)
            if isinstance(op, Send):
                mid, ts = result[1]
                ts = self._ts_pool.setdefault(ts, ts)
                if mid == key:
                    key = mid  # one string for the inbox key and the dedup key
                    self.sent[key] = ts
                else:
                    self.sent[key] = (mid, ts)
                group[3].append(key)
                self.state_bytes += _SENT_OVERHEAD
            else:
                self.dedup[op.op_id] = result[1]
                group[2].append(op.op_id)
                self.state_bytes += _DEDUP_OVERHEAD + len(op.op_id)
        return result

    def _group(self, limits: Limits) -> tuple[int, int, list[str], list[str]]:
        """This batch's dedup group (every entry of a batch expires together)."""
        group = self._open_group
        if group is None:
            expires = self.now_ms + limits.dedup_window_ms
            group = self._open_group = (expires, self.applied_batches, [], [])
            heapq.heappush(self._dedup_groups, group)
        return group

    def _sent_value(self, key: str) -> tuple[str, int]:
        value = self.sent[key]
        if isinstance(value, tuple):
            return value
        return (key, value)

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
        # Packed before anything changes: a value that does not fit fails the op alone.
        record = pack_message(op.sender, op.body, op.ts, expires)
        recipient = op.recipient
        if (
            inbox
            and recipient not in self._unsorted
            and expires < _expires_of(inbox[next(reversed(inbox))])
        ):
            self._unsorted.add(recipient)  # the TTL was lowered
        inbox[mid] = record
        self.inbox_bytes[recipient] = size + len(op.body)
        self.message_count += 1
        self.state_bytes += self._message_cost(mid, record)
        armed = self._armed.get(recipient)
        if armed is None or expires < armed:
            self._armed[recipient] = expires
            heapq.heappush(self._expiry, (expires, recipient))
        events.append(
            MessageEvent(recipient, StoredMessage(mid, op.sender, op.body, op.ts, expires))
        )
        return (True, (mid, op.ts))

    @staticmethod
    def _message_cost(mid: str, record: bytes) -> int:
        # = overhead + body + mid + sender, as documented (the sender in bytes).
        return _MSG_OVERHEAD + len(record) - _RECORD_SIZE + len(mid)

    def _drop_message(self, user: str, mid: str) -> bool:
        inbox = self.inboxes.get(user)
        if inbox is None:
            return False
        record = inbox.pop(mid, None)
        if record is None:
            return False
        self.message_count -= 1
        self.state_bytes -= self._message_cost(mid, record)
        n = _RECORD.unpack_from(record)[2]
        left = self.inbox_bytes[user] - (len(record) - _RECORD_SIZE - n)
        if inbox:
            self.inbox_bytes[user] = left
        else:
            del self.inboxes[user]
            del self.inbox_bytes[user]
            self._unsorted.discard(user)
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
            when, user = heapq.heappop(heap)
            if self._armed.get(user) != when:
                continue  # superseded by an earlier entry, which re-armed
            del self._armed[user]
            self._expire_inbox(user, now)
        dheap = self._dedup_groups
        while dheap and dheap[0][0] <= now:
            _, _, op_ids, keys = heapq.heappop(dheap)
            # An entry leaves only here, so each one is still in its group's table.
            for op_id in op_ids:
                del self.dedup[op_id]
                self.state_bytes -= _DEDUP_OVERHEAD + len(op_id)
            for key in keys:
                del self.sent[key]
            self.state_bytes -= _SENT_OVERHEAD * len(keys)
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

    def _expire_inbox(self, user: str, now: int) -> None:
        """Drop the expired messages of ``user`` and arm the next expiry of the inbox."""
        box = self.inboxes.get(user)
        if box is None:
            return
        if user in self._unsorted:
            for mid in [m for m, rec in box.items() if _expires_of(rec) <= now]:
                self._drop_message(user, mid)
            box = self.inboxes.get(user)
            nxt = min(map(_expires_of, box.values())) if box else None
        else:
            nxt = None
            while box:
                mid = next(iter(box))
                expires = _expires_of(box[mid])
                if expires > now:
                    nxt = expires
                    break
                self._drop_message(user, mid)  # the last one deletes the inbox: loop ends
        if nxt is not None:
            self._armed[user] = nxt
            heapq.heappush(self._expiry, (nxt, user))

    # ----------------------------------------------------------------- reads

    def inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        """Stored messages of ``user``, oldest first (apply order)."""
        box = self.inboxes.get(user)
        if not box:
            return []
        items = box.items() if limit is None else itertools.islice(box.items(), max(0, limit))
        return [unpack_message(mid, rec) for mid, rec in items]

    def has_message(self, user: str, mid: str) -> bool:
        """Whether ``user``'s inbox holds ``mid``."""
        box = self.inboxes.get(user)
        return box is not None and mid in box

    def seen(self, op_id: str) -> bool:
        """Whether ``op_id`` was applied within the dedup window."""
        return bool(op_id) and (op_id in self.dedup or mid_for(op_id) in self.sent)

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
        if not op_id:
            return None
        key = mid_for(op_id)
        if key in self.sent:
            return self._sent_value(key)
        return self.dedup.get(op_id)

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
            "dedup_entries": len(self.dedup) + len(self.sent),
            "registers": len(self.registers),
            "state_bytes": self.state_bytes,
        }

    # -------------------------------------------------------------- snapshot

    def to_snapshot(self) -> dict[str, Any]:
        """Every table, by reference (the caller pickles it in a forked child)."""
        tables = dict(self.__dict__)
        tables["_open_group"] = None  # these two matter only while a batch is applied
        tables["_ts_pool"] = {}
        return tables

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> IrisState:
        """Rebuild a state from :meth:`to_snapshot` output (any format so far)."""
        if "format" not in data:
            data = _from_format_1(data)
        elif data["format"] != STATE_FORMAT:
            raise ValueError(f"snapshot has table format {data['format']!r}, not {STATE_FORMAT}")
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
            {u: self.inbox(u) for u in self.inboxes},
            dict(self.sessions),
            dict(self.leases),
            dict(self.revoked_jti),
            dict(self.revoked_users),
            dict(self.dedup),
            dict(self.sent),
            dict(self.registers),
            dict(self.members),
            self.state_bytes,
        )


def _from_format_1(old: dict[str, Any]) -> dict[str, Any]:
    """Convert the tables of a snapshot written before the packed layout."""
    data = dict(old)
    inboxes: dict[str, dict[str, bytes]] = {}
    armed: dict[str, int] = {}
    unsorted: set[str] = set()
    for user, box in data.pop("inboxes", {}).items():
        packed: dict[str, bytes] = {}
        last = None
        for mid, m in box.items():
            packed[mid] = pack_message(m.sender, m.body, m.ts, m.expires)
            if last is not None and m.expires < last:
                unsorted.add(user)
            last = m.expires
            armed[user] = min(m.expires, armed.get(user, m.expires))
        inboxes[user] = packed
    data["inboxes"] = inboxes
    data["_armed"] = armed
    data["_unsorted"] = unsorted
    data["_expiry"] = [(when, user) for user, when in armed.items()]
    heapq.heapify(data["_expiry"])
    dedup: dict[str, Any] = {}
    sent: dict[str, Any] = {}
    groups: dict[int, tuple[int, int, list[str], list[str]]] = {}
    state_bytes = data.get("state_bytes", 0)
    for op_id, (expires, value) in data.pop("dedup", {}).items():
        group = groups.setdefault(expires, (expires, -len(groups) - 1, [], []))
        state_bytes -= _V1_DEDUP_OVERHEAD + len(op_id)
        if isinstance(value, tuple) and len(value) == 2 and op_id.startswith("send:"):
            key = mid_for(op_id)
            sent[key] = value[1] if value[0] == key else value
            group[3].append(key)
            state_bytes += _SENT_OVERHEAD
        else:
            dedup[op_id] = value
            group[2].append(op_id)
            state_bytes += _DEDUP_OVERHEAD + len(op_id)
    data.pop("_dedup_expiry", None)
    data["dedup"] = dedup
    data["sent"] = sent
    data["_dedup_groups"] = list(groups.values())
    heapq.heapify(data["_dedup_groups"])
    for box in inboxes.values():
        for mid, rec in box.items():
            m = unpack_message(mid, rec)
            state_bytes += (
                (_MSG_OVERHEAD - _V1_MSG_OVERHEAD)
                + len(m.sender.encode("utf-8", "surrogatepass"))
                - len(m.sender)
            )
    data["state_bytes"] = state_bytes
    data["format"] = STATE_FORMAT
    data["_open_group"] = None
    data["_ts_pool"] = {}
    return data


# The size estimate's overheads in format 1 (to convert its state_bytes).
_V1_MSG_OVERHEAD = 260
_V1_DEDUP_OVERHEAD = 180


def users_of(events: Iterable[Event]) -> set[str]:
    """Users named by message and ack events (for routing to subscribers)."""
    out: set[str] = set()
    for ev in events:
        if isinstance(ev, MessageEvent | AckEvent):
            out.add(ev.user)
    return out
