"""A core node: Raft host + batcher + consistency mode + partition guard, for trio.

Theory of operation
-------------------
``open_node(config)`` runs one core node inside the caller's trio run and
yields a :class:`Node`, the API that the RPC server and embedding programs use.

Writes
  * ``cp``: an operation goes to the :class:`_Batcher`, which packs everything
    queued into one replicated call (group commit), one call in flight at a
    time. The caller is answered from the per-op result *after* the batch
    is committed by a majority and applied locally. Every journal entry is
    fsynced before a node acknowledges it (``ChecksummedJournal``), so an
    acknowledged write survives ``kill -9`` of every node.
  * ``hardened_ap``: the operation is appended to the local write-ahead log;
    the caller is answered once the record is fsynced *and* the partition guard
    sees a quorum. A drain task feeds the log, in LSN order, through the same
    batcher into Raft right away, and marks records drained once applied.
    After a crash, undrained records are replayed; dedup by operation id makes
    the replay idempotent. Limits were checked at admission, so drained
    operations are applied without the per-inbox caps (an acknowledged message
    is never refused later).
  * Sends may come many at a time (:meth:`Node.send_many`, the ``send_batch``
    RPC): each is checked as a lone send would be, in order, and the accepted
    ones are written with one ``_write`` (one WAL append or one batcher
    submission).

Ordering
  The batcher keeps one replicated call in flight and, on an unknown outcome,
  retries the same operations at the head of the next batch. So operations
  accepted by one node are applied in acceptance order, whatever fails.

Reads
  * ``cp``: a barrier operation is committed through the log, then the local
    state is read: linearizable. A node whose guard sees no quorum fails reads
    at once with ``Unavailable`` instead of serving stale data.
  * ``hardened_ap``: the local replica, possibly stale.

Unknown outcomes
  Every call has our own deadline. A timeout, a leader change or a discarded
  entry raise :class:`UnknownOutcome`; callers retry with the same op id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._config import ConsistencyMode, IrisConfig
from ._exceptions import (
    BadRequest,
    InboxFull,
    IrisError,
    Overloaded,
    StateFull,
    TokenRevoked,
    Unavailable,
    UnknownOutcome,
    WriteBlocked,
    error_from_code,
)
from ._guard import GuardState, PartitionGuard
from ._ops import (
    MAX_CLIENT_ID_BYTES,
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
    check_text,
    decode_op,
    encode_batch,
    encode_op,
    mid_for,
    new_op_id,
    send_op_id,
)
from ._raft import RaftHost, RaftSettings, check_snapshot_error
from ._state import (
    AckEvent,
    Event,
    IrisState,
    MessageEvent,
    Result,
    StoredMessage,
)
from ._wal import DurableLog, is_volatile_filesystem, open_wal

logger = logging.getLogger("iris_raft.node")

_UNLIMITED = 2**62
_BATCH_BYTES = 4 * 1024 * 1024
_RAFT_CALL_TIMEOUT = 1.0
_TICK_INTERVAL = 1.0
#: Test-only broken build for the fault harness's canary: acknowledge sends
#: before they are durable. Never set this outside the harness.
_UNSAFE_ACK = os.environ.get("IRIS_TEST_UNSAFE_ACK") == "1"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The answer to a send: the message id and acceptance time (ms since epoch)."""

    mid: str
    ts: int
    duplicate: bool


# --------------------------------------------------------------------- batcher


class _Item:
    __slots__ = ("abandoned", "done", "error", "op", "result", "size", "unlimited")

    def __init__(self, op: Op, size: int, unlimited: bool) -> None:
        self.op = op
        self.size = size
        self.unlimited = unlimited
        self.done = trio.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.abandoned = False


class _Batcher:
    """Group commit with one replicated call in flight; retries unknown outcomes in order."""

    def __init__(
        self,
        raft: RaftHost,
        origin: str,
        limits: Callable[[], Limits],
        clock: Callable[[], int],
        max_ops: int,
    ) -> None:
        self._raft = raft
        self._origin = origin
        self._limits = limits
        self._clock = clock
        self._max_ops = max_ops
        self._queue: deque[_Item] = deque()
        self._wakeup = trio.Event()
        self.batches = 0
        self.ops = 0
        self.retries = 0

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, ops: Sequence[Op], *, unlimited: bool = False) -> list[_Item]:
        items = [_Item(op, 0, unlimited) for op in ops]
        self._queue.extend(items)
        self._wakeup.set()
        return items

    async def submit(self, ops: Sequence[Op], deadline: float | None) -> list[Result]:
        """Apply ``ops`` through Raft; raises UnknownOutcome when the deadline passes."""
        items = self.enqueue(ops)
        try:
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                for item in items:
                    await item.done.wait()
        finally:
            for item in items:
                if not item.done.is_set():
                    item.abandoned = True
        results: list[Result] = []
        for item in items:
            if not item.done.is_set():
                raise UnknownOutcome("the operation did not commit before the deadline")
            if item.error is not None:
                raise item.error
            assert item.result is not None
            results.append(item.result)
        return results

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._queue and len(batch) < self._max_ops:
            item = self._queue[0]
            if item.abandoned:
                self._queue.popleft()
                continue
            if batch and (item.unlimited != batch[0].unlimited or size > _BATCH_BYTES):
                break
            self._queue.popleft()
            batch.append(item)
            if isinstance(item.op, Send):
                size += len(item.op.body)
        return batch

    async def run(self) -> None:
        backoff = 0.01
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            items = self._take()
            if not items:
                continue
            limits = self._limits()
            if items[0].unlimited:
                limits = Limits(
                    _UNLIMITED, _UNLIMITED, limits.message_ttl_ms, limits.dedup_window_ms
                )
            payload = encode_batch(
                Batch(self._clock(), self._origin, limits, tuple(i.op for i in items))
            )
            try:
                results = await self._raft.call(payload, _RAFT_CALL_TIMEOUT)
            except (UnknownOutcome, Unavailable) as exc:
                # Put them back at the head, in order, and retry after a pause.
                self.retries += 1
                self._queue.extendleft(reversed([i for i in items if not i.abandoned]))
                logger.debug("batch of %d ops not committed (%s); retrying", len(items), exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 0.2)
                continue
            backoff = 0.01
            self.batches += 1
            self.ops += len(items)
            if len(results) != len(items):
                err = UnknownOutcome("the batch was rejected by apply")
                for item in items:
                    item.error = err
                    item.done.set()
                continue
            for item, result in zip(items, results, strict=True):
                item.result = result
                item.done.set()


# ---------------------------------------------------------------- subscriptions


class SubscriptionLost(Unavailable):
    """The subscriber fell too far behind (or the node stopped); resubscribe and refetch."""

    code = "subscription_lost"


class Subscription:
    """Live events for a set of users, plus every revocation and session kick.

    Delivery is at-least-once when combined with a refetch: subscribe first,
    then fetch the inbox, then consume events (drop repeats by ``mid``).
    """

    def __init__(self, hub: _Hub, users: Iterable[str], capacity: int) -> None:
        self._hub = hub
        self.users: set[str] = set(users)
        self._send, self._recv = trio.open_memory_channel[Event](capacity)
        self.lost = False

    def add_users(self, users: Iterable[str]) -> None:
        self.users.update(users)

    def remove_users(self, users: Iterable[str]) -> None:
        self.users.difference_update(users)

    def _offer(self, event: Event) -> None:
        if self.lost:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.lost = True
            self._send.close()
            logger.warning("a subscriber fell behind; its subscription is closed")

    async def receive(self) -> Event:
        """The next event; raises :class:`SubscriptionLost` when the stream broke."""
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SubscriptionLost("the subscription ended; resubscribe") from None

    def receive_nowait(self) -> Event | None:
        try:
            return self._recv.receive_nowait()
        except trio.WouldBlock:
            return None
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SubscriptionLost("the subscription ended; resubscribe") from None

    def close(self) -> None:
        self._hub.remove(self)
        self._send.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.receive()


class _Hub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def add(self, sub: Subscription) -> None:
        self._subs.add(sub)

    def remove(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def dispatch(self, events: list[Event]) -> None:
        for sub in list(self._subs):
            for ev in events:
                if isinstance(ev, MessageEvent | AckEvent):
                    if ev.user in sub.users:
                        sub._offer(ev)
                else:
                    sub._offer(ev)
            if sub.lost:
                self._subs.discard(sub)

    def close_all(self) -> None:
        for sub in list(self._subs):
            sub._send.close()
        self._subs.clear()


# ------------------------------------------------------------------------ node


def _now_ms() -> int:
    return int(time.time() * 1000)


class Node:
    """One running core node. Create it with :func:`open_node`.

    All methods are for the trio thread that runs the node. Write methods raise
    :class:`WriteBlocked` (hardened_ap, minority side), :class:`Unavailable`
    (cp without quorum, overload), :class:`UnknownOutcome` (retry with the
    same op id), :class:`InboxFull`, :class:`StateFull`, :class:`BadRequest`.
    """

    def __init__(self, config: IrisConfig, raft: RaftHost, wal: DurableLog | None) -> None:
        self.config = config
        self.mode: ConsistencyMode = config.cluster.consistency_mode
        node = config.core.node
        assert node is not None
        self.node_id = node
        self.rpc_address = config.core.rpc
        self._raft = raft
        self._wal = wal
        self._clock: Callable[[], int] = _now_ms
        cl = config.cluster
        self._limits = Limits(
            cl.max_inbox_messages,
            cl.max_inbox_bytes,
            int(cl.message_ttl * 1000),
            int(cl.dedup_window * 1000),
        )
        self._timeout = cl.request_timeout
        self._max_inflight = config.core.max_inflight_ops
        self._batcher = _Batcher(
            raft, node, lambda: self._limits, lambda: self._clock(), config.core.max_batch_ops
        )
        self.guard = PartitionGuard(
            node,
            cl.expected_cluster_nodes or (node,),
            detect_after=1.0,
            hysteresis=1.0,
        )
        self._hub = _Hub()
        # hardened_ap: accepted records waiting to be drained into Raft, by LSN.
        self._undrained: dict[int, Op] = {}
        self._drain_next = 1
        self._drain_ready = trio.Event()
        self._pending_sends: dict[str, tuple[str, int]] = {}  # op_id -> (mid, ts)
        self._undrained_per_recipient: dict[str, set[str]] = {}  # recipient -> send op ids
        self._memory_warned = False
        self.started_at = time.time()
        self._ready = trio.Event()
        self._nursery: trio.Nursery

    # ------------------------------------------------------------ lifecycle

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        token = trio.lowlevel.current_trio_token()

        def on_events(events: list[Event]) -> None:  # tick thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._hub.dispatch, events)

        self._raft.consumer.on_events = on_events
        if _UNSAFE_ACK:
            logger.critical(
                "IRIS_TEST_UNSAFE_ACK is set: sends are acknowledged BEFORE they are durable"
            )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._batcher.run)
            nursery.start_soon(self._guard_loop)
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._announce)
            if self._wal is not None:
                self._drain_next = int(self._wal.statistics()["last_lsn"]) + 1
                self._replay_wal(self._wal.pending)
                nursery.start_soon(self._drain_loop)
            task_status.started()

    def _replay_wal(self, pending: Sequence[tuple[int, bytes]]) -> None:
        if not pending:
            return
        self._drain_next = pending[0][0]
        bad = 0
        for lsn, payload in pending:
            try:
                op = decode_op(payload)
            except BadRequest:
                bad += 1
                op = Barrier()
            self._track_undrained(lsn, op)
        logger.warning(
            "replaying %d write-ahead log records not yet known to be in Raft%s",
            len(pending),
            f" ({bad} undecodable, skipped)" if bad else "",
        )
        self._drain_ready.set()

    async def _guard_loop(self) -> None:
        while True:
            check_snapshot_error(self._raft)
            self.guard.set_members(self._raft.members())
            transition = self.guard.evaluate(self._raft.last_heard(), time.monotonic())
            if transition is not None:
                if transition.state is GuardState.BLOCKED:
                    logger.error(
                        "PARTITION DETECTED - writes blocked (reachable %s of %s)",
                        ", ".join(transition.reachable),
                        ", ".join(transition.members),
                    )
                elif transition.first:
                    logger.info(
                        "quorum reached (%s): writes enabled", ", ".join(transition.reachable)
                    )
                else:
                    logger.warning(
                        "partition healed - writes re-enabled (reachable %s)",
                        ", ".join(transition.reachable),
                    )
            self._check_memory()
            await trio.sleep(0.1)

    def _check_memory(self) -> None:
        used = self._raft.consumer.state.state_bytes
        budget = self.config.cluster.max_state_bytes
        if used > 0.7 * budget and not self._memory_warned:
            self._memory_warned = True
            logger.warning(
                "replicated state uses %d bytes, over 70%% of max_state_bytes (%d); "
                "writes are refused above 100%%",
                used,
                budget,
            )
        elif used < 0.6 * budget:
            self._memory_warned = False

    async def _tick_loop(self) -> None:
        # The leader moves replicated time forward once a second even when idle,
        # so TTLs, leases and the dedup window expire.
        while True:
            await trio.sleep(_TICK_INTERVAL)
            if self._raft.is_leader() and not self._batcher:
                self._batcher.enqueue([Barrier()])
            if not self._ready.is_set():
                st = self._raft.raft_status()
                if st and st["leader"] is not None and st["last_applied"] >= st["commit_index"]:
                    self._ready.set()

    async def _announce(self) -> None:
        op = Announce(new_op_id(), self.node_id, self.rpc_address)
        while True:
            try:
                await self._batcher.submit([op], trio.current_time() + 10)
                return
            except (UnknownOutcome, Unavailable):
                await trio.sleep(0.5)

    async def _drain_loop(self) -> None:
        assert self._wal is not None
        while True:
            if self._drain_next not in self._undrained:
                self._drain_ready = trio.Event()
                await self._drain_ready.wait()
                continue
            lsns: list[int] = []
            lsn = self._drain_next
            while lsn in self._undrained and len(lsns) < self.config.core.max_batch_ops:
                lsns.append(lsn)
                lsn += 1
            ops = [self._undrained[x] for x in lsns]
            items = self._batcher.enqueue(ops, unlimited=True)
            for item in items:
                await item.done.wait()
            for op, item in zip(ops, items, strict=True):
                if item.result is not None and not item.result[0]:
                    logger.error("drained operation %s refused by apply: %s", op.op_id, item.result)
            await self._wal.mark_drained(lsns[-1])
            for x in lsns:
                self._release_undrained(x)
            self._drain_next = lsns[-1] + 1

    # --------------------------------------------------------------- writes

    def _admit(self, ops: Sequence[Op]) -> None:
        if self.mode is ConsistencyMode.HARDENED_AP:
            if not self.guard.safe:
                raise WriteBlocked(
                    "PARTITION DETECTED - this core cannot reach a majority; writes are blocked",
                    reachable=sorted(self.guard.reachable),
                )
        elif not self.guard.safe:
            raise Unavailable("this core cannot reach a majority of the cluster")
        backlog = len(self._batcher) + len(self._undrained)
        if backlog + len(ops) > self._max_inflight:
            raise Overloaded(f"{backlog} operations in flight on this core; retry later")
        used = self._raft.consumer.state.state_bytes
        if used > self.config.cluster.max_state_bytes and any(
            isinstance(op, Send | OpenSession | Put | Cas) for op in ops
        ):
            raise StateFull(
                f"replicated state is {used} bytes, above max_state_bytes "
                f"({self.config.cluster.max_state_bytes}); new writes are refused"
            )

    async def _write(self, ops: Sequence[Op]) -> list[Result]:
        """Admit, make durable per the mode, and return per-op results."""
        self._admit(ops)
        deadline = trio.current_time() + self._timeout
        if self._wal is None:
            return await self._batcher.submit(ops, deadline)
        await self._wal_append(ops)
        return [(True, None)] * len(ops)

    async def _wal_append(self, ops: Sequence[Op]) -> None:
        # Shielded: once records are handed to the log they will be on disk, so
        # they must be registered for draining even if the caller goes away.
        assert self._wal is not None
        with trio.CancelScope(shield=True):
            last = await self._wal.append([encode_op(op) for op in ops])
        first = last - len(ops) + 1
        for i, op in enumerate(ops):
            self._track_undrained(first + i, op)
        self._drain_ready.set()

    async def _late_append(self, op: Op) -> None:
        # The test-only broken path: the write reaches the WAL a second after the ack.
        await trio.sleep(1.0)
        await self._wal_append([op])

    def _track_undrained(self, lsn: int, op: Op) -> None:
        self._undrained[lsn] = op
        if isinstance(op, Send):
            self._hold_send(op)

    def _release_undrained(self, lsn: int) -> None:
        op = self._undrained.pop(lsn)
        if isinstance(op, Send):
            self._forget_send(op)

    def _hold_send(self, op: Send) -> None:
        """Count a send not yet applied: for duplicates and for its recipient's inbox room."""
        self._pending_sends[op.op_id] = (op.mid, op.ts)
        self._undrained_per_recipient.setdefault(op.recipient, set()).add(op.op_id)

    def _forget_send(self, op: Send) -> None:
        """Undo :meth:`_hold_send` (the send was applied, or never reached the WAL)."""
        self._pending_sends.pop(op.op_id, None)
        ids = self._undrained_per_recipient.get(op.recipient)
        if ids is not None:
            ids.discard(op.op_id)
            if not ids:
                del self._undrained_per_recipient[op.recipient]

    @staticmethod
    def _raise_for(result: Result) -> Any:
        if result[0]:
            return result[1]
        code, message = result[1], result[2]
        if code == "inbox_full":
            raise InboxFull(message)
        if code == "token_revoked":
            raise TokenRevoked(message)
        raise error_from_code(code, message)

    async def send(self, sender: str, client_id: str, recipient: str, body: bytes) -> SendResult:
        """Store a message for ``recipient``; durable under the cluster's mode on return.

        Repeating ``(sender, client_id)`` within the dedup window returns the
        original ``mid`` and stores nothing new.
        """
        (outcome,) = await self.send_many([(sender, client_id, recipient, body)])
        if isinstance(outcome, IrisError):
            raise outcome
        return outcome

    async def send_many(
        self, items: Sequence[tuple[str, str, str, bytes]]
    ) -> list[SendResult | IrisError]:
        """:meth:`send` for each ``(sender, client_id, recipient, body)``, as one write.

        Returns one outcome per item, in order: its :class:`SendResult`, or the
        :class:`IrisError` that :meth:`send` would raise for it. Items are
        checked one by one, in order, each seeing the ones accepted before it
        (inbox room, dedup); a refused item does not stop the others. Every
        accepted item goes into one ``_write``, in item order: one WAL append
        (``hardened_ap``) or one batcher submission (``cp``). An error of that
        write (``write_blocked``, ``unavailable``, ``unknown_outcome``...) is
        the outcome of each item in it. An item repeating the
        ``(sender, client_id)`` of an earlier accepted item is not written
        again: it gets that item's outcome, as a duplicate.
        """
        outcomes: dict[int, SendResult | IrisError] = {}
        ops: list[Send] = []
        written: list[int] = []  # the item each op answers
        first: dict[str, int] = {}  # op id -> the item that holds it in this call
        repeats: list[tuple[int, int]] = []  # (item, earlier item with the same op id)
        now = self._clock()
        for i, (sender, client_id, recipient, body) in enumerate(items):
            try:
                check_text("sender", sender)
                check_text("client_id", client_id, max_bytes=MAX_CLIENT_ID_BYTES)
                check_text("recipient", recipient)
                if not isinstance(body, bytes):
                    raise BadRequest("body must be bytes", field="body")
                op_id = send_op_id(sender, client_id)
                if op_id in first:
                    repeats.append((i, first[op_id]))
                    continue
                op = self._send_op(op_id, sender, recipient, body, now)
            except IrisError as exc:
                outcomes[i] = exc
                continue
            first[op_id] = i
            if isinstance(op, SendResult):
                outcomes[i] = op
                continue
            ops.append(op)
            written.append(i)
        if ops:
            for i, outcome in zip(written, await self._write_sends(ops), strict=True):
                outcomes[i] = outcome
        for i, earlier in repeats:
            prior = outcomes[earlier]
            if isinstance(prior, SendResult):
                prior = SendResult(prior.mid, prior.ts, True)
            outcomes[i] = prior
        return [outcomes[i] for i in range(len(items))]

    def _send_op(
        self, op_id: str, sender: str, recipient: str, body: bytes, now: int
    ) -> Send | SendResult:
        """The operation for one checked send, or its result if it is a known duplicate.

        ``hardened_ap`` admits here (inbox room, raises :class:`InboxFull`) and
        holds the send as pending, so that later sends see it before it reaches
        the WAL; :meth:`_write_sends` forgets it if the write fails.
        """
        if self._wal is None:
            return Send(op_id, sender, recipient, body, mid_for(op_id), now)
        known = self._known_send(op_id)
        if known is not None:
            return SendResult(known[0], known[1], True)
        self._check_inbox_room(recipient, len(body))
        mid = mid_for(op_id)
        if self._raft.read_state(lambda s: mid in s.inboxes.get(recipient, ())):
            # The id was reused after the dedup window while the first message
            # is still stored: a new message needs a mid of its own.
            mid = mid_for(f"{op_id}#{now}")
        op = Send(op_id, sender, recipient, body, mid, now)
        self._hold_send(op)
        return op

    async def _write_sends(self, ops: list[Send]) -> list[SendResult | IrisError]:
        """Write accepted sends with one ``_write``; one outcome per op."""
        if self._wal is None:
            try:
                results = await self._write(ops)
            except IrisError as exc:
                return [exc] * len(ops)
            outcomes: list[SendResult | IrisError] = []
            for result in results:
                try:
                    mid, ts = self._raise_for(result)
                except IrisError as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(SendResult(mid, ts, len(result) > 2))
            return outcomes
        try:
            if _UNSAFE_ACK:
                self._admit(ops)
                for op in ops:
                    self._nursery.start_soon(self._late_append, op)
            else:
                await self._write(ops)
        except (IrisError, OSError) as exc:
            for op in ops:
                self._forget_send(op)
            if isinstance(exc, OSError):
                raise
            return [exc] * len(ops)
        return [SendResult(op.mid, op.ts, False) for op in ops]

    def applied(self, op_ids: Sequence[str]) -> list[bool]:
        """Whether each operation id has been applied to this core's replica.

        A local read of the dedup table, without a barrier: clients use it to
        learn that another core's acknowledged (hardened_ap) writes have
        reached the log before they send more for the same sender elsewhere.
        """
        found: list[bool] = self._raft.read_state(lambda s: [s.seen(op) for op in op_ids])
        return found

    def undrained_senders(self) -> dict[str, str]:
        """Sender -> op id of its last send acknowledged here but not yet in Raft.

        Empty in ``cp`` mode. Clients leaving this core ask for it (see the
        order fence in :mod:`iris_raft._client`).
        """
        last: dict[str, str] = {}
        for lsn in sorted(self._undrained):
            op = self._undrained[lsn]
            if isinstance(op, Send):
                last[op.sender] = op.op_id
        return last

    def _known_send(self, op_id: str) -> tuple[str, int] | None:
        pending = self._pending_sends.get(op_id)
        if pending is not None:
            return pending
        value = self._raft.read_state(lambda s: s.dedup_result(op_id))
        if isinstance(value, list | tuple) and len(value) == 2:
            return (str(value[0]), int(value[1]))
        return None

    def _check_inbox_room(self, recipient: str, size: int) -> None:
        """Admission check against the local replica plus this core's undrained sends."""
        lim = self._limits
        pending = self._undrained_per_recipient.get(recipient, ())

        def room(s: IrisState) -> bool:
            box = s.inboxes.get(recipient)
            # Undrained sends already applied are in the inbox: count them once.
            queued = sum(1 for op_id in pending if not s.seen(op_id))
            count = (len(box) if box else 0) + queued
            used = s.inbox_bytes.get(recipient, 0)
            return count < lim.max_inbox_messages and used + size <= lim.max_inbox_bytes

        if not self._raft.read_state(room):
            raise InboxFull(f"inbox of {recipient!r} is full")

    async def ack(self, user: str, mids: Sequence[str], *, op_id: str | None = None) -> None:
        """Forget messages ``mids`` of ``user`` (they were delivered)."""
        await self.ack_many([(user, mids, op_id)])

    async def ack_many(self, acks: Sequence[tuple[str, Sequence[str], str | None]]) -> None:
        """:meth:`ack` for each ``(user, mids, op_id)``, written together in one ``_write``.

        All or nothing as far as the caller can tell: a malformed entry fails
        the call before anything is written, and an error of the write is
        raised once (retrying with the same op ids is safe).
        """
        ops: list[Op] = []
        for user, mids, op_id in acks:
            check_text("user", user)
            if not all(isinstance(m, str) for m in mids):
                raise BadRequest("mids must be text", field="mids")
            ops.append(Ack(op_id or new_op_id(), user, tuple(mids)))
        if not ops:
            return
        for result in await self._write(ops):
            self._raise_for(result)

    async def revoke_token(self, jti: str, exp_ms: int, *, op_id: str | None = None) -> None:
        """Revoke one token until its expiry ``exp_ms``."""
        check_text("jti", jti)
        (result,) = await self._commit([RevokeToken(op_id or new_op_id(), jti, int(exp_ms))])
        self._raise_for(result)

    async def revoke_user(
        self,
        user: str,
        *,
        before_ms: int | None = None,
        retain_ms: int = 30 * 24 * 3600 * 1000,
        op_id: str | None = None,
    ) -> int:
        """Revoke every token of ``user`` issued before ``before_ms`` (default: now)."""
        check_text("user", user)
        before = self._clock() if before_ms is None else int(before_ms)
        op = RevokeUser(op_id or new_op_id(), user, before, before + retain_ms)
        (result,) = await self._commit([op])
        self._raise_for(result)
        return before

    async def open_session(
        self,
        session: str,
        user: str,
        edge: str,
        jti: str,
        iat_ms: int,
        *,
        op_id: str | None = None,
    ) -> None:
        """Register a live connection under ``edge``'s lease."""
        for name, value in (("session", session), ("user", user), ("edge", edge)):
            check_text(name, value)
        op = OpenSession(op_id or new_op_id(), session, user, edge, jti, int(iat_ms), self._clock())
        (result,) = await self._write([op])
        self._raise_for(result)

    async def close_session(
        self, session: str, *, kick: bool = False, op_id: str | None = None
    ) -> None:
        """Drop a session; with ``kick`` the edge holding it closes the connection."""
        check_text("session", session)
        (result,) = await self._write([CloseSession(op_id or new_op_id(), session, kick)])
        self._raise_for(result)

    async def renew_lease(self, edge: str, ttl: float, *, op_id: str | None = None) -> None:
        """Keep ``edge``'s sessions alive for ``ttl`` more seconds."""
        check_text("edge", edge)
        until = self._clock() + int(ttl * 1000)
        (result,) = await self._write([RenewLease(op_id or new_op_id(), edge, until)])
        self._raise_for(result)

    async def put(self, key: str, value: Any, *, op_id: str | None = None) -> None:
        """Set a register."""
        check_text("key", key)
        (result,) = await self._write([Put(op_id or new_op_id(), key, value)])
        self._raise_for(result)

    async def cas(self, key: str, expected: Any, new: Any, *, op_id: str | None = None) -> bool:
        """Compare-and-set a register; True if it was set. Always goes through Raft."""
        check_text("key", key)
        (result,) = await self._commit([Cas(op_id or new_op_id(), key, expected, new)])
        return bool(self._raise_for(result))

    async def _commit(self, ops: Sequence[Op]) -> list[Result]:
        """Admit and commit through Raft in every mode (no WAL acknowledgement).

        Used where the answer needs the replicated state (compare-and-set) or
        where a stale view is a security hole (revocations): these are
        acknowledged only once committed by a majority, also in hardened_ap.
        """
        self._admit(ops)
        return await self._batcher.submit(ops, trio.current_time() + self._timeout)

    # ---------------------------------------------------------------- reads

    async def _read_barrier(self) -> None:
        if self.mode is not ConsistencyMode.CP:
            return
        if not self.guard.safe:
            raise Unavailable(
                "this core cannot reach a majority; a linearizable read is impossible"
            )
        try:
            await self._batcher.submit([Barrier()], trio.current_time() + self._timeout)
        except UnknownOutcome:
            raise Unavailable("the read barrier did not commit in time") from None

    async def read(
        self, fn: Callable[[IrisState], Any], *, linearizable: bool | None = None
    ) -> Any:
        """Run ``fn`` on the state: after a barrier in ``cp`` (or when asked), else locally."""
        if linearizable is None:
            await self._read_barrier()
        elif linearizable:
            if not self.guard.safe:
                raise Unavailable("no quorum: a linearizable read is impossible")
            try:
                await self._batcher.submit([Barrier()], trio.current_time() + self._timeout)
            except UnknownOutcome:
                raise Unavailable("the read barrier did not commit in time") from None
        return self._raft.read_state(fn)

    async def fetch_inbox(self, user: str, limit: int | None = None) -> list[StoredMessage]:
        """Stored messages of ``user``, oldest first."""
        check_text("user", user)
        return list(await self.read(lambda s: s.inbox(user, limit)))

    async def is_revoked(self, user: str, jti: str, iat_ms: int | None) -> bool:
        """True if the token is revoked (by ``jti`` or by a per-user cut-off).

        Linearizable whenever this core sees a quorum, in both modes, so a
        revocation acknowledged anywhere is seen. On the minority side, cp
        raises :class:`Unavailable`; hardened_ap answers from the local replica.
        """
        fn: Callable[[IrisState], bool] = lambda s: s.is_revoked(user, jti, iat_ms)  # noqa: E731
        if self.guard.safe:
            return bool(await self.read(fn, linearizable=True))
        return bool(await self.read(fn))

    async def get(self, key: str, *, linearizable: bool | None = None) -> Any:
        """Read a register (None when unset)."""
        return await self.read(lambda s: s.registers.get(key), linearizable=linearizable)

    def read_local(self, fn: Callable[[IrisState], Any]) -> Any:
        """A local read with no barrier (may be stale in every mode)."""
        return self._raft.read_state(fn)

    # -------------------------------------------------------- subscriptions

    def subscribe(self, users: Iterable[str] = (), capacity: int = 100_000) -> Subscription:
        """Start receiving events for ``users`` (plus all revocations and kicks)."""
        sub = Subscription(self._hub, users, capacity)
        self._hub.add(sub)
        return sub

    # ------------------------------------------------------------ membership

    async def add_node(self, node: str, timeout: float = 10.0) -> None:
        """Add a core (its Raft address) to the running cluster; run on the leader."""
        await self._raft.change_membership(node, None, timeout)

    async def remove_node(self, node: str, timeout: float = 10.0) -> None:
        """Remove a core from the running cluster; run on the leader."""
        await self._raft.change_membership(None, node, timeout)
        with contextlib.suppress(UnknownOutcome, Unavailable):
            await self._batcher.submit([Forget(new_op_id(), node)], trio.current_time() + 5)

    # ---------------------------------------------------------------- status

    def is_safe_for_writes(self) -> bool:
        """The partition guard's verdict: a majority of the cluster is reachable."""
        return self.guard.safe

    async def wait_ready(self) -> None:
        """Wait until this node has caught up with the leader's commit index once."""
        await self._ready.wait()

    def status(self) -> dict[str, Any]:
        """Leader, term, indexes, peers, partition state, WAL backlog, state size."""
        raft = self._raft.raft_status()
        heard = self._raft.last_heard()
        now = time.monotonic()
        members = self._raft.read_state(lambda s: dict(s.members))
        nodes = []
        for node in self._raft.members():
            if node == self.node_id:
                reachable, state = True, raft.get("state", "unknown")
            else:
                age = now - heard[node] if node in heard else None
                reachable = age is not None and age <= self.guard.detect_after
                state = (
                    "leader"
                    if raft.get("leader") == node
                    else ("reachable" if reachable else "unreachable")
                )
            nodes.append(
                {
                    "node": node,
                    "rpc": members.get(node),
                    "reachable": reachable,
                    "state": state,
                    "last_heard_s": None
                    if node == self.node_id or node not in heard
                    else round(now - heard[node], 3),
                }
            )
        stats = self._raft.read_state(lambda s: s.statistics())
        return {
            "node": self.node_id,
            "rpc": self.rpc_address,
            "mode": self.mode.value,
            "leader": raft.get("leader"),
            "leader_rpc": members.get(raft.get("leader") or ""),
            "raft": raft,
            "safe_for_writes": self.guard.safe,
            "partition_state": self.guard.state.value,
            "nodes": nodes,
            "wal": None
            if self._wal is None
            else {**self._wal.statistics(), "undrained": len(self._undrained)},
            "wal_backlog": 0 if self._wal is None else len(self._undrained),
            "batcher": {
                "queued": len(self._batcher),
                "batches": self._batcher.batches,
                "ops": self._batcher.ops,
                "retries": self._batcher.retries,
            },
            "state": stats,
            "state_bytes": stats["state_bytes"],
            "max_state_bytes": self.config.cluster.max_state_bytes,
            "subscriptions": len(self._hub._subs),
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    async def backup(self) -> bytes:
        """A consistent copy of the state as backup-file bytes (after a barrier in ``cp``).

        Serialising holds the state lock, so apply pauses for its duration
        (about a second per million stored messages).
        """
        from ._backup import dump_state

        await self._read_barrier()
        data: bytes = self._raft.read_state(
            lambda s: dump_state(s, node=self.node_id, mode=self.mode.value)
        )
        return data

    def core_members(self) -> dict[str, str]:
        """Announced cores: Raft address -> RPC address."""
        return dict(self._raft.read_state(lambda s: dict(s.members)))


def raft_settings(config: IrisConfig) -> RaftSettings:
    """Raft settings for this node from the configuration."""
    core, cl = config.core, config.cluster
    node = core.node
    if node is None:
        raise BadRequest("core.node is not set")
    others = tuple(n for n in cl.expected_cluster_nodes if n != node)
    return RaftSettings(
        self_node=node,
        other_nodes=others,
        data_dir=os.path.join(core.data_dir, "raft"),
        password=cl.secret,
        allow_table_nuke=core.allow_table_nuke,
        election_timeout_min=core.election_timeout_min,
        election_timeout_max=core.election_timeout_max,
        append_entries_period=core.heartbeat_interval,
        dial=dict(core.raft_dial),
    )


@contextlib.asynccontextmanager
async def open_node(config: IrisConfig) -> AsyncIterator[Node]:
    """Run one core node in this trio run; stop it on exit.

    Raises :class:`CorruptFile` (a journal, WAL or snapshot failed its check and
    ``allow_table_nuke`` is off), ``OSError`` (the Raft port cannot be bound).
    """
    settings = raft_settings(config)
    wal_cm: contextlib.AbstractAsyncContextManager[DurableLog | None]
    if config.cluster.consistency_mode is ConsistencyMode.HARDENED_AP:
        wal_dir = config.core.wal_path
        os.makedirs(wal_dir, exist_ok=True)
        if is_volatile_filesystem(wal_dir):
            logger.warning(
                "wal_directory %s is on tmpfs/ramfs: acknowledged writes will NOT survive a "
                "reboot. Put it on persistent storage.",
                wal_dir,
            )
        wal_cm = open_wal(wal_dir, allow_nuke=config.core.allow_table_nuke)
    else:
        wal_cm = contextlib.nullcontext()
    async with wal_cm as wal:
        raft = RaftHost(settings)
        await trio.to_thread.run_sync(raft.start, abandon_on_cancel=False)
        try:
            node = Node(config, raft, wal)
            async with trio.open_nursery() as nursery:
                await nursery.start(node._run)
                try:
                    yield node
                finally:
                    node._hub.close_all()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(raft.stop)
