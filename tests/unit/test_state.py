"""Unit tests for iris_raft._state: the deterministic replicated state machine.

Pure: batches are built with ``_ops`` and applied by hand; time moves only
through each batch's ``now_ms``. The core of the file is a Hypothesis
rule-based machine that drives :class:`IrisState` and a tiny reference model
(plain dicts and lists) with the same random batches and compares results,
events and every table after each step, while a second replica that is
snapshotted and restored at random must stay identical.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from iris_raft._exceptions import BadRequest
from iris_raft._ops import (
    BATCH_VERSION,
    Ack,
    Announce,
    Barrier,
    Batch,
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
    encode_batch,
    mid_for,
    op_from_wire,
    op_to_wire,
    send_op_id,
)
from iris_raft._state import (
    _DEDUP_OVERHEAD,
    _MSG_OVERHEAD,
    _REGISTER_OVERHEAD,
    _REVOCATION_OVERHEAD,
    _SENT_OVERHEAD,
    _SESSION_OVERHEAD,
    DEFAULT_LEASE_MS,
    AckEvent,
    Event,
    IrisState,
    KickEvent,
    MessageEvent,
    RevokeEvent,
    Session,
    StoredMessage,
    users_of,
)

LIM = Limits(max_inbox_messages=3, max_inbox_bytes=10, message_ttl_ms=1_000, dedup_window_ms=500)
BIG = Limits(10_000, 1 << 30, 10**9, 10**9)


def payload(now: int, *ops: Op, limits: Limits = LIM) -> bytes:
    return encode_batch(Batch(now, "test", limits, ops))


def apply(
    state: IrisState, now: int, *ops: Op, limits: Limits = LIM
) -> tuple[list[Any], list[Event]]:
    return state.apply(payload(now, *ops, limits=limits))


def raw_payload(now: int, limits: Limits, wire_ops: list[Any]) -> bytes:
    lim = [
        limits.max_inbox_messages,
        limits.max_inbox_bytes,
        limits.message_ttl_ms,
        limits.dedup_window_ms,
    ]
    return cbor2.dumps([BATCH_VERSION, now, "test", lim, wire_ops])


def codes(results: list[Any]) -> list[Any]:
    """Results with failure messages dropped: ``(False, code)``."""
    return [r if r[0] else (False, r[1]) for r in results]


def normalized(events: list[Event]) -> tuple[list[Event], list[Event]]:
    """Lease-expiry kicks (a set's order) sorted, then the other events in order."""
    lease = [e for e in events if isinstance(e, KickEvent) and e.reason == "lease_expired"]
    rest = [e for e in events if e not in lease]
    assert events[: len(lease)] == lease, "lease expiry must come before the batch's operations"
    return sorted(lease, key=lambda e: e.session), rest


def snapshot_round_trip(state: IrisState) -> IrisState:
    return IrisState.from_snapshot(pickle.loads(pickle.dumps(state.to_snapshot())))


def same_register_value(a: Any, b: Any) -> bool:
    """Register equality as CBOR sees it: true is not 1, 1 is not 1.0, map keys included."""
    return bool(cbor2.dumps(a, canonical=True) == cbor2.dumps(b, canonical=True))


# ============================================================ reference model


@dataclass(frozen=True)
class Garbage:
    """A malformed op placed in a batch's op list."""

    raw: Any


GARBAGE = (
    None,
    "send",
    [],
    [99, "op"],
    [True],
    [1, "op", "a", "b"],
    [2, "op", "u", "m1"],
    [2, "op", "u", ["m1", 7]],
    [6, "op", "s1", 1],
    [7, "op", "e1", True],
    [5, "op", "s", "u", "e", "j", "1", 0],
)


@dataclass
class Model:
    """What IrisState should hold, written as plainly as possible."""

    now: int = 0
    inboxes: dict[str, list[StoredMessage]] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)
    revoked_jti: dict[str, int] = field(default_factory=dict)
    revoked_users: dict[str, tuple[int, int]] = field(default_factory=dict)
    dedup: dict[str, tuple[int, Any]] = field(default_factory=dict)
    #: Op ids in ``dedup`` remembered by a send (their size estimate differs).
    sent_ids: set[str] = field(default_factory=set)
    registers: dict[str, Any] = field(default_factory=dict)
    members: dict[str, str] = field(default_factory=dict)
    #: (user, mid) pairs ever stored, and ever acked: the generator stores some again.
    stored: set[tuple[str, str]] = field(default_factory=set)
    acked: set[tuple[str, str]] = field(default_factory=set)
    #: What the last batch exercised (reported as Hypothesis events).
    notes: set[str] = field(default_factory=set)

    def apply(
        self, now: int, limits: Limits, items: list[Op | Garbage]
    ) -> tuple[list[Any], list[Event]]:
        self.now = max(self.now, now)
        self.notes = set()
        events: list[Event] = []
        self._expire(events)
        results: list[Any] = []
        for item in items:
            if isinstance(item, Garbage):
                results.append((False, "bad_request"))
            else:
                results.append(self._op(item, limits, events))
        return results, events

    def _expire(self, events: list[Event]) -> None:
        now = self.now
        for user, box in list(self.inboxes.items()):
            if any(m.expires <= now for m in box):
                self.notes.add("message expired")
            box[:] = [m for m in box if m.expires > now]
            if not box:
                del self.inboxes[user]
        if any(v[0] <= now for v in self.dedup.values()):
            self.notes.add("dedup entry expired")
        self.dedup = {k: v for k, v in self.dedup.items() if v[0] > now}
        self.revoked_jti = {k: v for k, v in self.revoked_jti.items() if v > now}
        self.revoked_users = {k: v for k, v in self.revoked_users.items() if v[1] > now}
        for edge, until in list(self.leases.items()):
            if until <= now:
                del self.leases[edge]
                for sid, s in list(self.sessions.items()):
                    if s.edge == edge:
                        del self.sessions[sid]
                        events.append(KickEvent(sid, s.user, edge, "lease_expired"))

    def _op(self, op: Op, limits: Limits, events: list[Event]) -> Any:
        if isinstance(op, Barrier):
            return (True, None)
        if op.op_id in self.dedup:
            self.notes.add("duplicate")
            return (True, self.dedup[op.op_id][1], "duplicate")
        result = self._effect(op, limits, events)
        self.notes.add(f"{type(op).__name__} -> {result[1] if not result[0] else 'ok'}")
        if result[0] and op.op_id:
            self.dedup[op.op_id] = (self.now + limits.dedup_window_ms, result[1])
            if isinstance(op, Send):
                self.sent_ids.add(op.op_id)
            else:
                self.sent_ids.discard(op.op_id)
        return result

    def _effect(self, op: Op, limits: Limits, events: list[Event]) -> Any:
        if isinstance(op, Send):
            if not op.recipient or not op.mid:
                return (False, "bad_request")
            box = self.inboxes.get(op.recipient, [])
            used = sum(len(m.body) for m in box)
            full = used + len(op.body) > limits.max_inbox_bytes
            if len(box) >= limits.max_inbox_messages or full:
                return (False, "inbox_full")
            mid = op.mid
            if any(m.mid == mid for m in box):
                # A new message whose mid is taken: a mid of its own, from the op id and time.
                mid = mid_for(f"{op.op_id}#{self.now}")
                if any(m.mid == mid for m in box):
                    return (False, "bad_request")
            if (op.recipient, mid) in self.stored:
                self.notes.add("mid stored again")
            msg = StoredMessage(mid, op.sender, op.body, op.ts, self.now + limits.message_ttl_ms)
            self.inboxes.setdefault(op.recipient, []).append(msg)
            self.stored.add((op.recipient, mid))
            events.append(MessageEvent(op.recipient, msg))
            return (True, (mid, op.ts))
        if isinstance(op, Ack):
            box = self.inboxes.get(op.user, [])
            removed = []
            for mid in op.mids:
                for i, m in enumerate(box):
                    if m.mid == mid:
                        del box[i]
                        removed.append(mid)
                        self.acked.add((op.user, mid))
                        break
            if op.user in self.inboxes and not box:
                del self.inboxes[op.user]
            if removed:
                events.append(AckEvent(op.user, tuple(removed)))
            return (True, len(removed))
        if isinstance(op, RevokeToken):
            self.revoked_jti[op.jti] = max(op.exp_ms, self.revoked_jti.get(op.jti, 0))
            events.append(RevokeEvent(op.jti, None, None))
            self._kick(lambda s: s.jti == op.jti, events)
            return (True, None)
        if isinstance(op, RevokeUser):
            old = self.revoked_users.get(op.user, (0, 0))
            before = max(op.before_ms, old[0])
            self.revoked_users[op.user] = (before, max(op.until_ms, old[1]))
            events.append(RevokeEvent(None, op.user, before))
            self._kick(lambda s: s.user == op.user and s.iat < before, events)
            return (True, None)
        if isinstance(op, OpenSession):
            if self.is_revoked(op.user, op.jti, op.iat_ms):  # a revoked token opens nothing
                return (False, "token_revoked")
            self.sessions.pop(op.session, None)
            self.sessions[op.session] = Session(op.user, op.edge, op.jti, op.iat_ms, op.since_ms)
            if op.edge not in self.leases:  # an edge without a lease gets a default one
                self.notes.add("default lease")
                self.leases[op.edge] = self.now + DEFAULT_LEASE_MS
            return (True, None)
        if isinstance(op, CloseSession):
            s = self.sessions.pop(op.session, None)
            if s is not None and op.kick:
                events.append(KickEvent(op.session, s.user, s.edge, "kicked"))
            return (True, s is not None)
        if isinstance(op, RenewLease):
            self.leases[op.edge] = max(op.until_ms, self.leases.get(op.edge, 0))
            return (True, None)
        if isinstance(op, Put):
            self.registers[op.key] = op.value
            return (True, None)
        if isinstance(op, Cas):
            if not same_register_value(self.registers.get(op.key), op.expected):
                return (True, False)
            self.registers[op.key] = op.new
            return (True, True)
        if isinstance(op, Announce):
            self.members[op.node] = op.rpc
            return (True, None)
        assert isinstance(op, Forget)
        self.members.pop(op.node, None)
        return (True, None)

    def _kick(self, match: Any, events: list[Event]) -> None:
        for sid, s in list(self.sessions.items()):
            if match(s):
                del self.sessions[sid]
                events.append(KickEvent(sid, s.user, s.edge, "token_revoked"))

    def is_revoked(self, user: str, jti: str, iat: int | None) -> bool:
        if jti in self.revoked_jti:
            return True
        cut = self.revoked_users.get(user)
        return cut is not None and (iat is None or iat < cut[0])

    def state_bytes(self) -> int:
        """The documented size estimate, recomputed from the model's contents."""
        total = 0
        for box in self.inboxes.values():
            total += sum(
                _MSG_OVERHEAD + len(m.body) + len(m.mid) + len(m.sender.encode()) for m in box
            )
        total += sum(
            _SENT_OVERHEAD if k in self.sent_ids else _DEDUP_OVERHEAD + len(k) for k in self.dedup
        )
        total += sum(
            _SESSION_OVERHEAD + len(sid) + len(s.user) + len(s.jti)
            for sid, s in self.sessions.items()
        )
        total += sum(_REVOCATION_OVERHEAD + len(k) for k in self.revoked_jti)
        total += sum(_REVOCATION_OVERHEAD + len(k) for k in self.revoked_users)
        total += sum(_REGISTER_OVERHEAD + len(k) for k in self.registers)
        return total


# =================================================== state machine vs model

USERS = ("u1", "u2", "u3")
JTIS = ("j1", "j2", "j3")
EDGES = ("e1", "e2")
SIDS = ("s1", "s2", "s3", "s4")
KEYS = ("k1", "k2")
NODES = ("n1", "n2")
VALUES = st.sampled_from(
    [None, 0, 1, 2, True, False, 1.0, "a", "b", [1], [True], {"x": 1}, {1: "x"}, {True: "x"}]
)
KINDS = (
    "send",
    "send",
    "send",
    "ack",
    "ack",
    "revoke_token",
    "revoke_user",
    "open",
    "open",
    "close",
    "renew",
    "put",
    "cas",
    "announce",
    "forget",
    "barrier",
    "retry",
    "retry",
    "garbage",
)
limits_strategy = st.one_of(
    st.just(LIM),
    st.builds(
        Limits,
        st.sampled_from([0, 1, 2, 4, 100]),
        st.sampled_from([0, 3, 8, 30]),
        st.sampled_from([0, 40, 150, 600]),
        st.sampled_from([0, 60, 200, 700]),
    ),
)


class IrisStateVsModel(RuleBasedStateMachine):
    """Random batches into IrisState, the model and a snapshot-restored replica."""

    def __init__(self) -> None:
        super().__init__()
        self.state = IrisState()
        self.replica = IrisState()
        self.model = Model()
        self.history: list[Op] = []
        self.counter = 0

    @initialize()
    def start_empty(self) -> None:
        assert self.state.fingerprint() == IrisState().fingerprint()

    # ------------------------------------------------------------ generation

    def _fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _op_id(self, data: st.DataObject) -> str:
        choice = data.draw(st.sampled_from(["fresh"] * 6 + ["empty", "reuse"]))
        if choice == "reuse" and self.history:
            return data.draw(st.sampled_from(self.history)).op_id
        return "" if choice == "empty" else self._fresh("op")

    def _time(self, data: st.DataObject, now: int) -> int:
        # A few offsets, so that equal times (boundaries) are common.
        return max(0, now + data.draw(st.sampled_from([-100, -1, 0, 1, 40, 150, 600])))

    def _draw_item(self, data: st.DataObject, now: int) -> Op | Garbage:
        kind = data.draw(st.sampled_from(KINDS))
        if kind == "retry":
            if not self.history:
                return Barrier()
            return data.draw(st.sampled_from(self.history))
        if kind == "garbage":
            return Garbage(data.draw(st.sampled_from(GARBAGE)))
        op_id = self._op_id(data)
        if kind == "send":
            recipient = data.draw(st.sampled_from((*USERS, "")))
            mid = self._fresh("m")
            how = data.draw(st.sampled_from(["fresh"] * 4 + ["again", "again", "empty"]))
            if how == "empty":
                mid = ""
            elif how == "again":  # a mid this recipient has or had, acked ones first
                acked = sorted(m for u, m in self.model.acked if u == recipient)
                used = sorted(m for u, m in self.model.stored if u == recipient)
                if used:
                    mid = data.draw(st.sampled_from(acked * 3 + used))
            body = data.draw(st.binary(max_size=6))
            return Send(op_id, data.draw(st.sampled_from(USERS)), recipient, body, mid, now)
        if kind == "ack":
            # Mostly a user with messages; mids of theirs, of others, or unknown.
            user = data.draw(st.sampled_from(sorted(self.model.inboxes) * 3 + list(USERS)))
            own = [m.mid for m in self.model.inboxes.get(user, [])]
            others = [m.mid for box in self.model.inboxes.values() for m in box]
            candidates = own * 3 + others + ["nope"]
            mids = tuple(data.draw(st.lists(st.sampled_from(candidates), max_size=3)))
            return Ack(op_id, user, mids)
        if kind == "revoke_token":
            return RevokeToken(op_id, data.draw(st.sampled_from(JTIS)), self._time(data, now))
        if kind == "revoke_user":
            user = data.draw(st.sampled_from(USERS))
            return RevokeUser(op_id, user, self._time(data, now), self._time(data, now))
        if kind == "open":
            return OpenSession(
                op_id,
                data.draw(st.sampled_from(SIDS)),
                data.draw(st.sampled_from(USERS)),
                data.draw(st.sampled_from(EDGES)),
                data.draw(st.sampled_from(JTIS)),
                self._time(data, now),
                self._time(data, now),  # the accepting node's clock, possibly skewed
            )
        if kind == "close":
            return CloseSession(op_id, data.draw(st.sampled_from(SIDS)), data.draw(st.booleans()))
        if kind == "renew":
            return RenewLease(op_id, data.draw(st.sampled_from(EDGES)), self._time(data, now))
        if kind == "put":
            return Put(op_id, data.draw(st.sampled_from(KEYS)), data.draw(VALUES))
        if kind == "cas":
            key = data.draw(st.sampled_from(KEYS))
            return Cas(op_id, key, data.draw(VALUES), data.draw(VALUES))
        if kind == "announce":
            node = data.draw(st.sampled_from(NODES))
            return Announce(op_id, node, data.draw(st.sampled_from(["r1", "r2"])))
        if kind == "forget":
            return Forget(op_id, data.draw(st.sampled_from(NODES)))
        return Barrier(data.draw(st.sampled_from(["", op_id])))

    # ----------------------------------------------------------------- rules

    @rule(data=st.data())
    def apply_batch(self, data: st.DataObject) -> None:
        step = data.draw(st.sampled_from([0, 0, 1, 30, 100, 300, 900, -50, DEFAULT_LEASE_MS]))
        now = max(0, self.model.now + step)  # sometimes backwards: ignored by apply
        limits = data.draw(limits_strategy)
        effective = max(now, self.model.now)
        items = [self._draw_item(data, effective) for _ in range(data.draw(st.integers(0, 6)))]
        self._run(now, limits, items)

    @rule(data=st.data())
    def ack_and_store_again(self, data: st.DataObject) -> None:
        """Ack a stored message and store its mid again: the old expiry must not drop it."""
        stored = sorted((u, m) for u, box in self.model.inboxes.items() for m in box)
        if not stored:
            return
        user, msg = data.draw(st.sampled_from(stored))
        now = self.model.now + data.draw(st.sampled_from([0, 1, 100]))
        again = Send(self._fresh("op"), "u9", user, b"again", msg.mid, now)
        if data.draw(st.booleans()):
            self._run(now, LIM, [Ack(self._fresh("op"), user, (msg.mid,)), again])
        else:
            self._run(now, LIM, [Ack(self._fresh("op"), user, (msg.mid,))])
            self._run(now, LIM, [again])

    def _run(self, now: int, limits: Limits, items: list[Op | Garbage]) -> None:
        """Apply one batch to the state, the model and the replica, and compare."""
        if any(isinstance(i, Garbage) for i in items):
            wire = [i.raw if isinstance(i, Garbage) else op_to_wire(i) for i in items]
            body = raw_payload(now, limits, wire)
        else:
            body = payload(now, *items, limits=limits)  # type: ignore[arg-type]

        expected_results, expected_events = self.model.apply(now, limits, items)
        results, events = self.state.apply(body)
        # repr as well as ==: a result of 1 must not pass for True.
        assert repr(codes(results)) == repr(expected_results)
        for r in results:
            if not r[0]:
                assert isinstance(r[2], str) and r[2]
        assert normalized(events) == normalized(expected_events)
        for note in sorted(self.model.notes | {type(e).__name__ for e in events}):
            event(note)
        for kick in events:
            if isinstance(kick, KickEvent):
                event(f"kick {kick.reason}")
        replica_results, replica_events = self.replica.apply(body)
        assert replica_results == results
        assert normalized(replica_events) == normalized(events)
        self.history.extend(i for i in items if not isinstance(i, Garbage | Barrier))

    @rule(data=st.data())
    def apply_malformed_batch(self, data: st.DataObject) -> None:
        body = data.draw(
            st.one_of(
                st.binary(max_size=20),
                st.sampled_from(
                    [
                        cbor2.dumps([2, self.model.now + 10**6, "x", [1, 1, 1, 1], []]),
                        cbor2.dumps([BATCH_VERSION, "late", "x", [1, 1, 1, 1], []]),
                        cbor2.dumps([BATCH_VERSION, 10**12, "x", [1, 1, 1], []]),
                        cbor2.dumps([BATCH_VERSION, 10**12, "x", [1, 1, 1, 1], {}]),
                        cbor2.dumps({"now": 10**12}),
                    ]
                ),
            )
        )
        before = (self.state.fingerprint(), self.state.applied_batches)
        out = self.state.apply(body)
        if (self.state.fingerprint(), self.state.applied_batches) != before:
            # Random bytes that happen to form a valid empty-enough batch: keep in step.
            assume(False)
        assert out == ([], [])

    @rule()
    def snapshot_and_restore_replica(self) -> None:
        self.replica = snapshot_round_trip(self.replica)

    # ------------------------------------------------------------ invariants

    @invariant()
    def tables_match_the_model(self) -> None:
        state, model = self.state, self.model
        assert state.now_ms == model.now
        for user in {*USERS, "", *state.inboxes, *model.inboxes}:
            assert state.inbox(user) == model.inboxes.get(user, [])
            assert state.inbox_bytes.get(user, 0) == sum(len(m.body) for m in state.inbox(user))
        assert state.message_count == sum(len(box) for box in model.inboxes.values())
        assert set(state.inboxes) == set(model.inboxes)
        assert state.sessions == model.sessions
        by_edge: dict[str, set[str]] = {}
        for sid, s in model.sessions.items():
            by_edge.setdefault(s.edge, set()).add(sid)
        assert state.sessions_by_edge == by_edge
        assert state.leases == model.leases
        assert state.revoked_jti == model.revoked_jti
        assert state.revoked_users == model.revoked_users
        assert state.statistics()["dedup_entries"] == len(model.dedup)
        assert len(state.sent) == len(model.sent_ids & set(model.dedup))
        for op_id, (_, value) in model.dedup.items():
            assert state.seen(op_id)
            assert repr(state.dedup_result(op_id)) == repr(value)
        assert cbor2.dumps(state.registers, canonical=True) == cbor2.dumps(
            model.registers, canonical=True
        )
        assert state.members == model.members
        assert state.state_bytes == model.state_bytes()

    @invariant()
    def revocations_match_the_model(self) -> None:
        iats: set[int | None] = {None, 0}
        for before, _ in self.model.revoked_users.values():
            iats.update((before - 1, before, before + 1))
        for user in USERS:
            for jti in (*JTIS, "other"):
                for iat in iats:
                    assert self.state.is_revoked(user, jti, iat) == self.model.is_revoked(
                        user, jti, iat
                    ), (user, jti, iat)

    @invariant()
    def replica_is_identical(self) -> None:
        assert self.replica.fingerprint() == self.state.fingerprint()
        assert self.replica.statistics() == self.state.statistics()


IrisStateVsModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestIrisStateVsModel = IrisStateVsModel.TestCase


# ================================================================ determinism

text_pool = st.sampled_from(["a", "b", "c"])
times = st.integers(0, 3_000)
model_free_ops = st.one_of(
    st.builds(
        Send,
        st.sampled_from(["o1", "o2", "o3", "o4", ""]),
        text_pool,
        text_pool,
        st.binary(max_size=5),
        st.sampled_from(["m1", "m2", "m3"]),
        times,
    ),
    st.builds(
        Ack,
        st.sampled_from(["o5", "o6"]),
        text_pool,
        st.lists(st.sampled_from(["m1", "m2", "m3"]), max_size=2).map(tuple),
    ),
    st.builds(RevokeToken, st.sampled_from(["o7", "o8"]), text_pool, times),
    st.builds(RevokeUser, st.sampled_from(["o9", "o10"]), text_pool, times, times),
    st.builds(
        OpenSession,
        st.sampled_from(["o11", "o12"]),
        text_pool,
        text_pool,
        text_pool,
        text_pool,
        times,
        times,
    ),
    st.builds(CloseSession, st.sampled_from(["o13", ""]), text_pool, st.booleans()),
    st.builds(RenewLease, st.sampled_from(["o14", ""]), text_pool, times),
    st.builds(Put, st.sampled_from(["o15", ""]), text_pool, st.integers(0, 3)),
    st.builds(Cas, st.sampled_from(["o16", ""]), text_pool, st.integers(0, 3), st.integers(0, 3)),
    st.builds(Announce, st.sampled_from(["o17", ""]), text_pool, text_pool),
    st.builds(Forget, st.sampled_from(["o18", ""]), text_pool),
)
batch_lists = st.lists(
    st.builds(
        lambda now, limits, ops: payload(now, *ops, limits=limits),
        times,
        limits_strategy,
        st.lists(model_free_ops, max_size=6),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(batch_lists, st.data())
def test_replicas_fed_the_same_batches_agree(batches: list[bytes], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(batches)))
    a, b, c = IrisState(), IrisState(), IrisState()
    for i, body in enumerate(batches):
        if i == cut:
            c = snapshot_round_trip(c)
        out_a, out_b, out_c = a.apply(body), b.apply(body), c.apply(body)
        assert out_a == out_b
        assert out_a[0] == out_c[0]
        assert normalized(out_a[1]) == normalized(out_c[1])
        assert a.fingerprint() == b.fingerprint() == c.fingerprint()
    assert a.statistics() == b.statistics() == c.statistics()


def test_retried_op_after_restore_is_still_a_duplicate() -> None:
    state = IrisState()
    send = Send(send_op_id("alice", "c1"), "alice", "bob", b"hi", "m1", 5)
    assert apply(state, 5, send)[0] == [(True, ("m1", 5))]
    restored = snapshot_round_trip(state)
    results, events = apply(restored, 6, send)
    assert results == [(True, ("m1", 5), "duplicate")]
    assert events == []
    assert [m.mid for m in restored.inbox("bob")] == ["m1"]
    # Past the window on the restored copy the dedup entry is dropped as usual.
    apply(restored, 5 + LIM.dedup_window_ms)
    assert restored.dedup_result(send.op_id) is None
    assert restored.fingerprint() == apply_and_fingerprint(state, 5 + LIM.dedup_window_ms)


def apply_and_fingerprint(state: IrisState, now: int, *ops: Op) -> tuple[Any, ...]:
    apply(state, now, *ops)
    return state.fingerprint()


def test_snapshot_rejects_unknown_tables() -> None:
    snap = IrisState().to_snapshot()
    snap["bogus"] = {}
    with pytest.raises(ValueError, match="bogus"):
        IrisState.from_snapshot(snap)


# ================================================================= never raises


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_garbage_bytes_are_rejected_without_raising(body: bytes) -> None:
    state = IrisState()
    apply(state, 100, Put("p", "k", 1))
    before = state.fingerprint(), state.applied_batches
    out = state.apply(body)
    if (state.fingerprint(), state.applied_batches) == before:
        assert out == ([], [])


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=5),
)
cbor_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=15,
)


#: Lists that look like ops: a tag (known or not) and random fields.
near_ops = st.tuples(st.integers(0, 13), st.lists(cbor_values, max_size=8)).map(
    lambda t: [t[0], *t[1]]
)
near_batches = st.lists(st.one_of(near_ops, cbor_values), max_size=6).map(
    lambda ops: [BATCH_VERSION, 10, "o", [5, 100, 1_000, 1_000], ops]
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(cbor_values, near_batches))
def test_random_cbor_batches_never_raise(value: Any) -> None:
    state = IrisState()
    results, events = state.apply(cbor2.dumps(value))
    assert isinstance(results, list) and isinstance(events, list)
    try:
        header_ok = decode_batch_header(cbor2.dumps(value)) is not None
    except BadRequest:
        header_ok = False
    if header_ok:  # a well-formed batch answers every op, good or bad
        assert len(results) == len(value[4])
    else:
        assert results == []
    for r in results:
        # A decodable op applies; anything else is a bad request, never an internal error.
        assert r[0] is True or r[1] in {"bad_request", "inbox_full"}, r


@pytest.mark.parametrize(
    "raw",
    [
        [2, 10, "o", [1, 1, 1, 1], []],
        [0, 10, "o", [1, 1, 1, 1], []],
        [BATCH_VERSION, 10, "o", [1, 1, 1, 1]],
        [BATCH_VERSION, 10, "o", [1, 1, 1, 1], [], None],
        [BATCH_VERSION, "10", "o", [1, 1, 1, 1], []],
        [BATCH_VERSION, 10, 7, [1, 1, 1, 1], []],
        [BATCH_VERSION, 10, "o", [1, 1, 1], []],
        [BATCH_VERSION, 10, "o", [1, 1, -1, 1], []],
        [BATCH_VERSION, 10, "o", [1, 1, 1, 1], "ops"],
        {"version": 1},
        "batch",
    ],
    ids=repr,
)
def test_wrong_version_or_header_is_rejected_whole(raw: Any) -> None:
    state = IrisState()
    apply(state, 5, Put("p", "k", 1))
    before = state.fingerprint(), state.statistics()
    assert state.apply(cbor2.dumps(raw)) == ([], [])
    assert (state.fingerprint(), state.statistics()) == before


@settings(max_examples=100, deadline=None)
@given(cbor_values, st.integers(0, 3))
def test_one_malformed_op_among_good_ones(bad: Any, position: int) -> None:
    try:
        op_from_wire(bad)
    except Exception:
        pass
    else:
        assume(False)
    good = [
        Put("p1", "k", 1),
        Send("s1", "alice", "bob", b"hi", "m1", 7),
        RevokeToken("r1", "j1", 10_000),
    ]
    wire: list[Any] = [op_to_wire(op) for op in good]
    wire.insert(position, bad)
    state = IrisState()
    results, events = state.apply(raw_payload(7, LIM, wire))
    assert len(results) == 4
    bad_result = results.pop(position)
    assert bad_result[:2] == (False, "bad_request")
    assert isinstance(bad_result[2], str)
    assert results == [(True, None), (True, ("m1", 7)), (True, None)]
    assert state.registers == {"k": 1}
    assert [m.mid for m in state.inbox("bob")] == ["m1"]
    assert state.is_revoked("anyone", "j1", 0)
    assert [type(e) for e in events] == [MessageEvent, RevokeEvent]


def test_a_bug_in_one_op_is_an_internal_result_for_that_op_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = IrisState()

    def broken(op: Put) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(state, "_put", broken)
    results, _ = apply(state, 1, Announce("a1", "n1", "r1"), Put("p", "k", 1), Forget("f1", "n2"))
    assert results[0] == (True, None)
    assert results[1][:2] == (False, "internal")
    assert "boom" in results[1][2]
    assert results[2] == (True, None)
    assert state.dedup_result("p") is None
    assert state.members == {"n1": "r1"}


# ======================================================== focused behaviour


def test_send_stores_in_order_and_dedups_by_op_id() -> None:
    state = IrisState()
    s1 = Send("o1", "alice", "bob", b"one", "m1", 10)
    s2 = Send("o2", "carol", "bob", b"two", "m2", 11)
    results, events = apply(state, 10, s1, s2)
    assert results == [(True, ("m1", 10)), (True, ("m2", 11))]
    expires = 10 + LIM.message_ttl_ms
    assert state.inbox("bob") == [
        StoredMessage("m1", "alice", b"one", 10, expires),
        StoredMessage("m2", "carol", b"two", 11, expires),
    ]
    assert events == [
        MessageEvent("bob", state.inbox("bob")[0]),
        MessageEvent("bob", state.inbox("bob")[1]),
    ]
    assert state.inbox("bob", limit=1) == state.inbox("bob")[:1]
    # Same op id, even with other content: the first result, nothing stored.
    retry = Send("o1", "alice", "bob", b"other", "m9", 99)
    assert apply(state, 20, retry) == ([(True, ("m1", 10), "duplicate")], [])
    assert state.message_count == 2
    assert users_of(events) == {"bob"}


def test_inbox_caps_and_failed_ops_are_not_remembered() -> None:
    state = IrisState()
    lim = Limits(
        max_inbox_messages=2, max_inbox_bytes=5, message_ttl_ms=10**6, dedup_window_ms=10**6
    )
    assert apply(state, 1, Send("a", "x", "bob", b"12", "m1", 1), limits=lim)[0][0][0]
    assert apply(state, 1, Send("b", "x", "bob", b"345", "m2", 1), limits=lim)[0][0][0]
    assert state.inbox_bytes["bob"] == 5  # exactly at the byte limit is allowed
    results, events = apply(state, 2, Send("c", "x", "bob", b"", "m3", 2), limits=lim)
    assert codes(results) == [(False, "inbox_full")]
    assert events == []
    assert state.dedup_result("c") is None
    apply(state, 3, Ack("ack", "bob", ("m1",)), limits=lim)
    # The retry of the failed op now fits; the bytes cap still applies.
    assert codes(apply(state, 4, Send("d", "x", "bob", b"123", "m4", 4), limits=lim)[0]) == [
        (False, "inbox_full")
    ]
    assert apply(state, 4, Send("c", "x", "bob", b"", "m3", 2), limits=lim)[0] == [
        (True, ("m3", 2))
    ]
    # A different recipient has its own caps.
    assert apply(state, 5, Send("e", "x", "eve", b"12345", "m5", 5), limits=lim)[0][0][0]


def test_send_rejects_empty_ids_and_a_stored_mid() -> None:
    state = IrisState()
    apply(state, 1, Send("a", "x", "bob", b"", "m1", 1))
    results, _ = apply(
        state,
        2,
        Send("b", "x", "", b"", "m2", 2),
        Send("c", "x", "bob", b"", "", 2),
        Send("d", "x", "bob", b"", "m1", 2),
    )
    assert codes(results)[:2] == [(False, "bad_request")] * 2
    # A taken mid (an id reused after the dedup window) gets a mid of its own.
    assert results[2][0] is True and results[2][1][0] == mid_for("d#2") != "m1"
    assert state.message_count == 2
    assert all(state.dedup_result(o) is None for o in "bc")


def test_ack_removes_only_the_users_messages() -> None:
    state = IrisState()
    apply(state, 1, Send("a", "x", "bob", b"1", "m1", 1), Send("b", "x", "eve", b"2", "m2", 1))
    results, events = apply(state, 2, Ack("k1", "bob", ("m1", "m2", "m1", "zz")))
    assert results == [(True, 1)]
    assert events == [AckEvent("bob", ("m1",))]
    assert state.inbox("bob") == []
    assert "bob" not in state.inboxes and "bob" not in state.inbox_bytes
    assert [m.mid for m in state.inbox("eve")] == ["m2"]
    assert apply(state, 3, Ack("k2", "bob", ("m1",))) == ([(True, 0)], [])
    assert apply(state, 3, Ack("k1", "bob", ())) == ([(True, 1, "duplicate")], [])


def test_ttl_expiry_when_time_advances() -> None:
    state = IrisState()
    apply(state, 0, Send("a", "x", "bob", b"1", "m1", 0))
    apply(state, 400, Send("b", "x", "bob", b"2", "m2", 400))
    apply(state, 999)
    assert [m.mid for m in state.inbox("bob")] == ["m1", "m2"]
    apply(state, 1_000)
    assert [m.mid for m in state.inbox("bob")] == ["m2"]
    apply(state, 10)  # time never moves backwards
    assert state.now_ms == 1_000
    apply(state, 1_400)
    assert state.inbox("bob") == []
    assert state.message_count == 0


def test_dedup_window_expiry() -> None:
    state = IrisState()
    apply(state, 0, Put("p", "k", 1))
    assert apply(state, 499, Put("p", "k", 2))[0] == [(True, None, "duplicate")]
    assert state.registers == {"k": 1}
    assert apply(state, 500, Put("p", "k", 3))[0] == [(True, None)]
    assert state.registers == {"k": 3}
    # Ops without an id are never remembered; a Barrier is never deduplicated.
    apply(state, 501, Put("", "k", 4))
    assert "" not in state.dedup
    assert apply(state, 501, Barrier("p")) == ([(True, None)], [])


def test_revocation_by_jti() -> None:
    state = IrisState()
    results, events = apply(state, 10, RevokeToken("r", "j1", 100))
    assert results == [(True, None)]
    assert events == [RevokeEvent("j1", None, None)]
    assert state.is_revoked("anyone", "j1", None)
    assert state.is_revoked("anyone", "j1", 10**12)
    assert not state.is_revoked("anyone", "j2", None)
    apply(state, 20, RevokeToken("r2", "j1", 50))  # never shortened
    apply(state, 99)
    assert state.is_revoked("u", "j1", 0)
    apply(state, 100)
    assert not state.is_revoked("u", "j1", 0)
    assert state.revoked_jti == {}


def test_revocation_by_user() -> None:
    state = IrisState()
    results, events = apply(state, 10, RevokeUser("r", "bob", 50, 200))
    assert results == [(True, None)]
    assert events == [RevokeEvent(None, "bob", 50)]
    assert state.is_revoked("bob", "j", 49)
    assert not state.is_revoked("bob", "j", 50)
    assert state.is_revoked("bob", "j", None)
    assert not state.is_revoked("eve", "j", 0)
    # A later revocation with an earlier cut keeps the later cut and the later expiry.
    _, events = apply(state, 11, RevokeUser("r2", "bob", 30, 300))
    assert events == [RevokeEvent(None, "bob", 50)]
    assert state.revoked_users == {"bob": (50, 300)}
    apply(state, 299)
    assert state.is_revoked("bob", "j", 0)
    apply(state, 300)
    assert not state.is_revoked("bob", "j", 0)


def open_sessions(state: IrisState) -> None:
    apply(
        state,
        0,
        RenewLease("l1", "e1", 1_000),
        RenewLease("l2", "e2", 2_000),
        OpenSession("o1", "s1", "bob", "e1", "j1", 10, 0),
        OpenSession("o2", "s2", "bob", "e2", "j2", 60, 0),
        OpenSession("o3", "s3", "eve", "e1", "j1", 10, 0),
        OpenSession("o4", "s4", "eve", "e2", "j3", 10, 0),
    )


def test_revoking_a_token_kicks_its_sessions() -> None:
    state = IrisState()
    open_sessions(state)
    results, events = apply(state, 5, RevokeToken("r", "j1", 500))
    assert results == [(True, None)]
    assert events == [
        RevokeEvent("j1", None, None),
        KickEvent("s1", "bob", "e1", "token_revoked"),
        KickEvent("s3", "eve", "e1", "token_revoked"),
    ]
    assert set(state.sessions) == {"s2", "s4"}


def test_revoking_a_user_kicks_sessions_issued_before_the_cut() -> None:
    state = IrisState()
    open_sessions(state)
    _, events = apply(state, 5, RevokeUser("r", "bob", 60, 500))
    assert events == [RevokeEvent(None, "bob", 60), KickEvent("s1", "bob", "e1", "token_revoked")]
    assert set(state.sessions) == {"s2", "s3", "s4"}


def test_lease_expiry_kicks_the_edges_sessions() -> None:
    state = IrisState()
    open_sessions(state)
    apply(state, 500, RenewLease("l3", "e1", 800))  # never shortened
    assert apply(state, 999) == ([], [])
    _, events = apply(state, 1_000)
    assert sorted(events, key=lambda e: e.session) == [  # type: ignore[union-attr]
        KickEvent("s1", "bob", "e1", "lease_expired"),
        KickEvent("s3", "eve", "e1", "lease_expired"),
    ]
    assert set(state.sessions) == {"s2", "s4"}
    assert state.leases == {"e2": 2_000}
    apply(state, 1_500, RenewLease("l4", "e2", 3_000))
    assert apply(state, 2_999) == ([], [])
    assert set(state.sessions) == {"s2", "s4"}


def test_close_session_with_and_without_kick() -> None:
    state = IrisState()
    open_sessions(state)
    assert apply(state, 1, CloseSession("c1", "s1", False)) == ([(True, True)], [])
    results, events = apply(state, 1, CloseSession("c2", "s2", True))
    assert results == [(True, True)]
    assert events == [KickEvent("s2", "bob", "e2", "kicked")]
    assert apply(state, 1, CloseSession("c3", "s1", True)) == ([(True, False)], [])
    assert set(state.sessions) == {"s3", "s4"}
    assert state.sessions_by_edge == {"e1": {"s3"}, "e2": {"s4"}}


def test_reopening_a_session_moves_it() -> None:
    state = IrisState()
    open_sessions(state)
    apply(state, 1, OpenSession("o9", "s1", "bob", "e2", "j9", 1, 1))
    assert state.sessions["s1"] == Session("bob", "e2", "j9", 1, 1)
    assert state.sessions_by_edge == {"e1": {"s3"}, "e2": {"s1", "s2", "s4"}}
    assert state.statistics()["sessions"] == 4


def test_put_and_cas_registers() -> None:
    state = IrisState()
    assert apply(state, 1, Cas("c0", "k", None, "first"))[0] == [(True, True)]
    assert apply(state, 1, Cas("c1", "k", None, "second"))[0] == [(True, False)]
    assert state.registers == {"k": "first"}
    apply(state, 1, Put("p", "k", {"a": [1, 2]}))
    assert apply(state, 1, Cas("c2", "k", {"a": [1, 2]}, 7))[0] == [(True, True)]
    assert state.registers == {"k": 7}
    # A failed compare is a successful op: it is remembered.
    assert apply(state, 2, Cas("c1", "k", 7, 8))[0] == [(True, False, "duplicate")]
    assert state.registers == {"k": 7}


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (1, True),
        (True, 1),
        (1, 1.0),
        (0, False),
        (None, False),
        ([1], [True]),
        ({"a": 1}, {"a": True}),
        ([1, [2]], [1, [2.0]]),
        ("1", 1),
        (b"a", "a"),
    ],
    ids=repr,
)
def test_cas_tells_register_types_apart(stored: Any, expected: Any) -> None:
    # Regression: _cas used Python ==, so true matched a register holding 1.
    state = IrisState()
    apply(state, 1, Put("p", "k", stored))
    assert apply(state, 2, Cas("c", "k", expected, "swapped"))[0] == [(True, False)]
    assert state.registers == {"k": stored}
    assert apply(state, 3, Cas("c2", "k", stored, "swapped"))[0] == [(True, True)]


def test_cas_tells_map_key_types_apart() -> None:
    # Regression: same_value compared map keys with ==, so {true: x} matched {1: x}.
    state = IrisState()
    apply(state, 1, Put("p", "k", {1: "x"}))
    assert apply(state, 2, Cas("c", "k", {True: "x"}, "swapped"))[0] == [(True, False)]
    assert state.registers == {"k": {1: "x"}}


def test_announce_and_forget_members() -> None:
    state = IrisState()
    apply(
        state,
        1,
        Announce("a1", "n1", "r1"),
        Announce("a2", "n2", "r2"),
        Announce("a3", "n1", "r1b"),
    )
    assert state.members == {"n1": "r1b", "n2": "r2"}
    assert apply(state, 2, Forget("f1", "n1"), Forget("f2", "zz"))[0] == [(True, None)] * 2
    assert state.members == {"n2": "r2"}


# ================================================================ state_bytes

TTL_BIG = Limits(100, 1 << 20, 1_000, 700)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(text_pool, st.binary(max_size=40)), max_size=8),
    st.lists(st.tuples(st.sampled_from(["s1", "s22", "s333"]), text_pool, text_pool), max_size=4),
    st.lists(st.sampled_from(["j", "jj", "jjj"]), max_size=4),
    st.lists(st.sampled_from(["u", "uu"]), max_size=3),
    st.booleans(),
)
def test_state_bytes_returns_to_its_initial_value(
    sends: list[tuple[str, bytes]],
    sessions: list[tuple[str, str, str]],
    jtis: list[str],
    users: list[str],
    ack: bool,
) -> None:
    state = IrisState()
    initial = state.state_bytes
    ops: list[Op] = []
    for i, (recipient, body) in enumerate(sends):
        ops.append(Send(f"send-{i}", "sender", recipient, body, f"m{i}", 0))
    for i, (sid, user, jti) in enumerate(sessions):
        ops.append(OpenSession(f"open-{i}", sid, user, "edge", jti, 0, 0))
    ops += [RevokeToken(f"rt-{i}", jti, 300 + i) for i, jti in enumerate(jtis)]
    ops += [RevokeUser(f"ru-{i}", user, 5, 400 + i) for i, user in enumerate(users)]
    results, _ = apply(state, 0, *ops, limits=TTL_BIG)
    assert all(r[0] for r in results)
    if ops:
        assert state.state_bytes > initial
    if ack:
        cleanup: list[Op] = [
            Ack(f"ack-{u}", u, tuple(f"m{i}" for i in range(len(sends)))) for u in ("a", "b", "c")
        ]
        cleanup += [CloseSession(f"close-{sid}", sid, True) for sid, _, _ in sessions]
        apply(state, 10, *cleanup, limits=TTL_BIG)
        assert state.message_count == 0
    else:
        apply(state, 10, RenewLease("", "edge", 20))  # sessions go with the lease
    apply(state, DEFAULT_LEASE_MS + 2_000, limits=TTL_BIG)
    assert state.statistics() | {"now_ms": 0, "applied_batches": 0} == IrisState().statistics()
    assert state.state_bytes == initial


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 5_000), st.integers(1, 5_000))
def test_state_bytes_grows_with_body_size(size: int, extra: int) -> None:
    small, large = IrisState(), IrisState()
    apply(small, 1, Send("o", "alice", "bob", b"x" * size, "m1", 1), limits=BIG)
    apply(large, 1, Send("o", "alice", "bob", b"x" * (size + extra), "m1", 1), limits=BIG)
    assert small.state_bytes > IrisState().state_bytes + size
    assert large.state_bytes - small.state_bytes == extra
    apply(large, 2, Ack("a", "bob", ("m1",)), limits=BIG)
    apply(small, 2, Ack("a", "bob", ("m1",)), limits=BIG)
    assert large.state_bytes == small.state_bytes  # only the dedup entries remain


# ================================================ regressions of fixed bugs


def test_mid_stored_again_after_ack_keeps_its_own_ttl() -> None:
    # Regression: expiry dropped (user, mid) from a stale heap entry of the acked copy.
    state = IrisState()
    lim = Limits(10, 1_000, message_ttl_ms=100, dedup_window_ms=1_000)
    apply(state, 0, Send("o1", "alice", "bob", b"x", "M", 0), limits=lim)
    apply(state, 10, Ack("a1", "bob", ("M",)), limits=lim)
    _, events = apply(state, 50, Send("o2", "alice", "bob", b"y", "M", 50), limits=lim)
    assert events == [MessageEvent("bob", StoredMessage("M", "alice", b"y", 50, 150))]
    apply(state, 100, limits=lim)  # the first copy's expiry time
    assert [m.body for m in state.inbox("bob")] == [b"y"]
    apply(state, 150, limits=lim)
    assert state.inbox("bob") == []
    assert state.state_bytes == 2 * _SENT_OVERHEAD + _DEDUP_OVERHEAD + len("a1")


def test_mid_stored_again_with_a_shorter_ttl_expires_on_time() -> None:
    state = IrisState()
    apply(state, 0, Send("o1", "alice", "bob", b"x", "M", 0), limits=Limits(10, 100, 1_000, 10))
    apply(state, 1, Ack("a1", "bob", ("M",)))
    apply(state, 2, Send("o2", "alice", "bob", b"y", "M", 2), limits=Limits(10, 100, 50, 10))
    apply(state, 51)
    assert [m.body for m in state.inbox("bob")] == [b"y"]
    apply(state, 52)
    assert state.inbox("bob") == []
    assert state.message_count == 0


def test_session_on_an_edge_without_a_lease_gets_a_default_lease() -> None:
    # Regression: a session on an edge that never renewed (or whose lease had
    # lapsed) was never expired.
    state = IrisState()
    apply(state, 0, RenewLease("l", "e1", 100))
    apply(state, 200)  # e1's lease has lapsed: the edge is presumed dead
    apply(state, 201, OpenSession("o", "s1", "bob", "e1", "j1", 0, 150))
    assert state.leases == {"e1": 201 + DEFAULT_LEASE_MS}  # replicated time, not the op's clock
    assert apply(state, 200 + DEFAULT_LEASE_MS) == ([], [])
    assert "s1" in state.sessions
    _, events = apply(state, 201 + DEFAULT_LEASE_MS)
    assert events == [KickEvent("s1", "bob", "e1", "lease_expired")]
    assert state.sessions == {} and state.leases == {}


def test_a_revoked_token_cannot_open_a_session() -> None:
    state = IrisState()
    apply(state, 1, RevokeToken("r", "j1", 10**6))
    assert apply(state, 2, OpenSession("o", "s1", "bob", "e1", "j1", 0, 2))[0] == [
        (False, "token_revoked", "the token is revoked")
    ]
    apply(state, 3, RevokeUser("ru", "eve", 100, 10**6))
    assert (
        apply(state, 4, OpenSession("o2", "s2", "eve", "e1", "j2", 99, 4))[0][0][1]
        == "token_revoked"
    )
    assert apply(state, 5, OpenSession("o3", "s3", "eve", "e1", "j3", 100, 5))[0] == [(True, None)]
    assert set(state.sessions) == {"s3"}


def test_a_live_lease_is_not_changed_by_opening_a_session() -> None:
    state = IrisState()
    apply(state, 0, RenewLease("l", "e1", 100))
    apply(state, 1, OpenSession("o", "s1", "bob", "e1", "j1", 0, 10**9))
    assert state.leases == {"e1": 100}
    _, events = apply(state, 100)
    assert events == [KickEvent("s1", "bob", "e1", "lease_expired")]


# ===================================================== packed layout, format 1


def to_format_1(state: IrisState) -> dict[str, Any]:
    """The tables ``state`` would have had in the unpacked layout (snapshot format 1)."""
    v1_msg, v1_dedup = 260, 180
    tables = dict(state.to_snapshot())
    for name in (
        "format",
        "_armed",
        "_unsorted",
        "sent",
        "_dedup_groups",
        "_open_group",
        "_ts_pool",
    ):
        del tables[name]
    size = state.state_bytes
    inboxes: dict[str, dict[str, StoredMessage]] = {}
    expiry: list[tuple[int, str, str]] = []
    for user in state.inboxes:
        inboxes[user] = {m.mid: m for m in state.inbox(user)}
        for m in inboxes[user].values():
            expiry.append((m.expires, user, m.mid))
            size += (v1_msg - _MSG_OVERHEAD) + len(m.sender) - len(m.sender.encode())
    dedup: dict[str, tuple[int, Any]] = {}
    for expires, _, op_ids, keys in state._dedup_groups:
        for op_id in op_ids:
            dedup[op_id] = (expires, state.dedup[op_id])
            size += v1_dedup - _DEDUP_OVERHEAD
        for key in keys:
            op_id = SEND_IDS[key]
            dedup[op_id] = (expires, state.dedup_result(op_id))
            size += v1_dedup + len(op_id) - _SENT_OVERHEAD
    tables.update(
        inboxes=inboxes,
        _expiry=sorted(expiry),
        dedup=dedup,
        _dedup_expiry=sorted((e, k) for k, (e, _) in dedup.items()),
        state_bytes=size,
    )
    return tables


SEND_IDS = {
    mid_for(op_id): op_id
    for op_id in [send_op_id("alice", str(i)) for i in range(20)] + [send_op_id("\u00e9lise", "7")]
}


def test_a_format_1_snapshot_is_converted_on_load() -> None:
    state = IrisState()
    lim = Limits(100, 1 << 20, message_ttl_ms=1_000, dedup_window_ms=500)
    ops: list[Op] = []
    for i in range(6):
        op_id = send_op_id("alice", str(i))
        mid = mid_for(op_id) if i != 3 else "custom-mid"
        ops.append(Send(op_id, "alice", "bob" if i % 2 else "carol", b"x" * i, mid, i))
    apply(state, 0, *ops, limits=lim)
    apply(state, 10, Ack("ack-1", "bob", (mid_for(send_op_id("alice", "1")),)), limits=lim)
    apply(state, 20, Put("put-1", "k", [1, 2]), limits=lim)
    sender = "\u00e9lise"  # its size estimate counts UTF-8 bytes now, characters before
    apply(state, 30, Send(send_op_id(sender, "7"), sender, "bob", b"yz", "m7", 30), limits=lim)
    restored = IrisState.from_snapshot(pickle.loads(pickle.dumps(to_format_1(state))))
    assert restored.fingerprint() == state.fingerprint()
    assert restored.statistics() == state.statistics()
    # And it goes on exactly alike: duplicates, dedup expiry, message expiry.
    for now in (40, 505, 520, 1_000, 1_031):
        again = Send(send_op_id("alice", "2"), "alice", "carol", b"", "other", now)
        assert apply(restored, now, again, limits=lim) == apply(state, now, again, limits=lim)
        assert restored.fingerprint() == state.fingerprint()
    assert restored.message_count == state.message_count == 2  # stored again at 505 and 1031


def test_an_unknown_table_format_is_refused() -> None:
    snap = IrisState().to_snapshot() | {"format": 99}
    with pytest.raises(ValueError, match="format 99"):
        IrisState.from_snapshot(snap)


def test_a_lowered_ttl_expires_later_messages_before_older_ones() -> None:
    state = IrisState()
    apply(state, 0, Send("o1", "alice", "bob", b"a", "M1", 0), limits=Limits(10, 100, 1_000, 10))
    apply(state, 2, Send("o2", "alice", "bob", b"b", "M2", 2), limits=Limits(10, 100, 50, 10))
    apply(state, 3, Send("o3", "alice", "bob", b"c", "M3", 3), limits=Limits(10, 100, 500, 10))
    apply(state, 52)
    assert [m.mid for m in state.inbox("bob")] == ["M1", "M3"]
    apply(state, 503)
    assert [m.mid for m in state.inbox("bob")] == ["M1"]
    apply(state, 1_000)
    assert state.inbox("bob") == [] and state.message_count == 0
    assert not state._unsorted and not state._armed


def test_expiry_bookkeeping_is_per_inbox_and_per_batch_not_per_message() -> None:
    state = IrisState()
    lim = Limits(10_000, 1 << 30, message_ttl_ms=10**6, dedup_window_ms=10**6)
    for round_ in range(50):
        sends = [
            Send(f"s{round_}-{i}", "alice", "bob", b"x", f"m{round_}-{i}", 0) for i in range(20)
        ]
        apply(state, round_, *sends, limits=lim)
        acks = [Ack(f"a{round_}", "bob", tuple(s.mid for s in sends))]
        apply(state, round_, *acks, limits=lim)
    assert state.message_count == 0
    assert len(state._expiry) == 1  # bob's first arming; nothing per message
    assert len(state._dedup_groups) == 100  # one per batch
    assert state.statistics()["dedup_entries"] == 50 * 21


def test_stored_records_hold_any_text_and_bytes() -> None:
    state = IrisState()
    sender = "\u00e9\U0001f600"  # non-ASCII
    apply(state, 5, Send("o", sender, "bob", b"\x00\xff" * 3, "M", -7), limits=BIG)
    assert state.inbox("bob") == [StoredMessage("M", sender, b"\x00\xff" * 3, -7, 5 + 10**9)]
    assert state.inbox("bob", limit=0) == []
