"""The PySyncObj adapter: one Raft node on its own long-lived thread, bridged to trio.

Theory of operation
-------------------
PySyncObj runs its own tick thread, which dies when the thread that built the
``SyncObj`` exits. So :class:`RaftHost` builds it on a dedicated thread that
lives until :meth:`RaftHost.stop`; the trio side never blocks on PySyncObj.

* Writes: :meth:`RaftHost.call` submits one encoded batch with a PySyncObj
  callback and waits on a trio event with *our* timeout (PySyncObj's async
  callbacks may never fire). The callback runs on the tick thread and hands the
  outcome to trio with ``TrioToken.run_sync_soon``. Every outcome other than
  success or a definite "not queued" (``QUEUE_FULL``, ``MISSING_LEADER``,
  ``REQUEST_DENIED``) is an :class:`UnknownOutcome`.
* Apply: the replicated method decodes and applies the batch under
  ``state_lock`` (trio-side reads take the same lock) and never raises.
  Events produced by apply go to ``on_events`` on the tick thread.
* Durability: the journal is our :class:`ChecksummedJournal` (fsync per entry,
  checksums), installed through ``install_journal``; the snapshot file is
  verified before PySyncObj reads it, because PySyncObj swallows load errors.
* Snapshot children: PySyncObj writes snapshots in a forked child. That
  child inherits the Raft listening socket and, if the core is killed, would
  go on writing and renaming the snapshot file under a restarted core (and
  hold its port meanwhile). :func:`_snapshot_child_setup` (an at-fork hook
  that acts only in children forked by PySyncObj's tick thread) closes the
  child's sockets and makes the kernel kill it when the core dies.
* Snapshots: PySyncObj pickles its snapshot with protocol 2, under which
  every ``bytes`` becomes a latin-1 text and a call to re-encode it. With a
  million stored records that made loading slow and left ~290 bytes of
  fragmented heap per record behind. So the state's tables travel as *one*
  protocol-5 pickle inside PySyncObj's (:class:`_PackedTables`, format 2),
  made in PySyncObj's forked child like the rest of the snapshot. Format 1
  (the tables pickled directly) is still read.
* Reachability: :class:`GuardTransport` sends a small heartbeat to every peer
  each ``heartbeat_interval`` and records when anything was last heard from
  each peer; the partition guard reads ``last_heard``. The heartbeats travel the
  same (encrypted, authenticated) links as Raft, so a cut link silences both.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import pickle
import signal
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.tcp_connection import CONNECTION_STATE
from pysyncobj.transport import TCPTransport

from ._exceptions import CorruptFile, Unavailable, UnknownOutcome
from ._journal import ChecksummedJournal, install_journal, verify_dump
from ._state import Event, IrisState, Result

logger = logging.getLogger("iris_raft.raft")

_HEARTBEAT = {"type": "iris_hb"}
_DEFINITELY_NOT_APPLIED = {
    FAIL_REASON.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER,
    FAIL_REASON.REQUEST_DENIED,
}
_REASON_NAMES = {
    value: name for name, value in vars(FAIL_REASON).items() if not name.startswith("_")
}


class GuardTransport(TCPTransport):  # type: ignore[misc]
    """TCP transport that heartbeats every peer and records when each was last heard.

    It also honours per-peer dial addresses (``RaftSettings.dial``): a peer's
    Raft address stays its identity, but this node connects to the given
    address instead (a NAT mapping, or a fault-injection proxy).
    """

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        self.last_heard: dict[str, float] = {}
        self._last_beat = 0.0
        self._interval: float = getattr(syncObj, "_iris_heartbeat", 0.1)
        self._dial: dict[str, tuple[str, int]] = getattr(syncObj, "_iris_dial", {})
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self._heartbeat)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self.last_heard[node.id] = time.monotonic()
        if isinstance(message, dict) and message.get("type") == "iris_hb":
            return
        super()._onMessageReceived(node, message)

    def _connectIfNecessarySingle(self, node: Any) -> bool:
        target = self._dial.get(node.id)
        if target is None:
            return bool(super()._connectIfNecessarySingle(node))
        conn = self._connections.get(node)
        if conn is not None and conn.state != CONNECTION_STATE.DISCONNECTED:
            return True
        if not self._shouldConnect(node):
            return False
        last = self._lastConnectAttempt.get(node)
        if last is not None and time.monotonic() - last < self._syncObj.conf.connectionRetryTime:
            return False
        self._lastConnectAttempt[node] = time.monotonic()
        return bool(self._connections[node].connect(target[0], target[1]))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat < self._interval:
            return
        starved = now - self._last_beat > self._interval + self._syncObj.conf.connectionTimeout / 2
        self._last_beat = now
        if not starved:
            self._watchdog(now)
        for node in list(self._nodes):
            self.send(node, _HEARTBEAT)

    def _watchdog(self, now: float) -> None:
        """Drop peer links that have been silent longer than ``connectionTimeout``.

        PySyncObj checks a connection's timeout only when it sends on it or
        the poller reports an event, and it sends only on CONNECTED links. An
        outgoing connect whose SYN was dropped by a partition therefore stays
        CONNECTING with no event until the kernel gives up (about two minutes),
        and only the higher-addressed node of a pair ever dials: after the heal
        the pair stays apart, and a follower can miss every append for that
        long. Resetting the link lets the normal retry dial again.

        Skipped on a tick that comes late (the process was paused or starved),
        because then the silence is ours and the peer's data is still unread.
        """
        timeout = self._syncObj.conf.connectionTimeout
        for node in list(self._nodes):
            conn = self._connections.get(node)
            if conn is None or conn.state == CONNECTION_STATE.DISCONNECTED:
                continue
            last_read = getattr(conn, "_TcpConnection__lastReadTime", now)
            if now - last_read > timeout:
                logger.info(
                    "raft link to %s silent for %.1f s (%s): reconnecting",
                    node.id,
                    now - last_read,
                    "connecting" if conn.state == CONNECTION_STATE.CONNECTING else "connected",
                )
                conn.disconnect()


_LINK_STATES = {
    CONNECTION_STATE.DISCONNECTED: "disconnected",
    CONNECTION_STATE.CONNECTING: "connecting",
    CONNECTION_STATE.CONNECTED: "connected",
}


def _link_state(sync: Any, node: Any) -> str:
    """The TCP link's state as this node's transport sees it (``none`` before any)."""
    conn = sync._SyncObj__transport._connections.get(node)
    return "none" if conn is None else _LINK_STATES.get(conn.state, "unknown")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# ------------------------------------------------------ snapshot children

_PR_SET_PDEATHSIG = 1
_forking_pid = 0


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _snapshot_child_setup() -> None:
    """In a child forked by PySyncObj's tick thread: die with the core, drop sockets.

    Children of other forks (a program embedding the library) are left alone.
    """
    if "_autoTickThread" not in threading.current_thread().name:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _forking_pid:  # the core died before the hook ran
        os._exit(1)
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_snapshot_child_setup)


#: Snapshot format of the consumer's data: 1 = the tables, 2 = :class:`_PackedTables`.
SNAPSHOT_FORMAT = 2


def _unpack_tables(blob: bytes) -> Any:
    """Called by the unpickler for a :class:`_PackedTables`: the state's tables."""
    return pickle.loads(blob)


class _PackedTables:
    """The state's tables, pickled with the newest protocol when PySyncObj pickles this.

    ``__reduce__`` runs while the snapshot is written (in PySyncObj's forked
    child), so the tick thread never pays for it; loading calls
    :func:`_unpack_tables`, which yields the tables themselves.
    """

    __slots__ = ("tables",)

    def __init__(self, tables: dict[str, Any]) -> None:
        self.tables = tables

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (_unpack_tables, (pickle.dumps(self.tables, protocol=pickle.HIGHEST_PROTOCOL),))


def consumer_snapshot(state: IrisState) -> dict[str, Any]:
    """What the consumer hands PySyncObj to snapshot (also written by ``iris restore``)."""
    return {"format": SNAPSHOT_FORMAT, "state": _PackedTables(state.to_snapshot())}


class _StateConsumer(SyncObjConsumer):  # type: ignore[misc]
    """Holds the state; its one replicated method applies a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.state = IrisState()
        self.lock = threading.Lock()
        self.on_events: Callable[[list[Event]], None] | None = None
        self.restored_from_snapshot = False
        self.snapshot_error: str | None = None

    @replicated  # type: ignore[untyped-decorator]
    def apply_batch(self, payload: bytes) -> list[Result]:
        if not isinstance(payload, bytes):
            logger.error("ignored a replicated call with a %s argument", type(payload).__name__)
            return []
        with self.lock:
            results, events = self.state.apply(payload)
        if events and self.on_events is not None:
            try:
                self.on_events(events)
            except Exception:  # never let a listener stall apply
                logger.exception("event listener failed")
        return results

    def _serialize(self) -> dict[str, Any]:
        # Called on the tick thread right before PySyncObj forks; the child
        # pickles these live tables, frozen by the fork.
        return consumer_snapshot(self.state)

    def _deserialize(self, data: Any) -> None:
        try:
            # Either format: unpickling a _PackedTables already gave the tables.
            if not isinstance(data, dict) or data.get("format") not in (1, SNAPSHOT_FORMAT):
                raise ValueError("unknown snapshot format")
            state = IrisState.from_snapshot(data["state"])
        except Exception as exc:
            # PySyncObj would swallow this and go on with an empty state; we
            # record it and the node refuses to serve (see RaftHost.start).
            self.snapshot_error = f"{type(exc).__name__}: {exc}"
            logger.critical("snapshot could not be loaded: %s", self.snapshot_error)
            raise
        with self.lock:
            self.state = state
        self.restored_from_snapshot = True


class _IrisSyncObj(SyncObj):  # type: ignore[misc]
    """Carries our transport settings (set before PySyncObj's constructor builds the transport)."""

    def __init__(
        self, *args: Any, heartbeat: float, dial: dict[str, tuple[str, int]], **kw: Any
    ) -> None:
        # Set before super().__init__(), so they are not part of snapshots.
        self._iris_heartbeat = heartbeat
        self._iris_dial = dial
        super().__init__(*args, **kw)


@dataclass(frozen=True, slots=True)
class RaftSettings:
    """How to run one Raft node. Times are seconds."""

    self_node: str
    other_nodes: tuple[str, ...]
    data_dir: str
    password: str | None
    allow_table_nuke: bool = False
    election_timeout_min: float = 0.15
    election_timeout_max: float = 0.3
    append_entries_period: float = 0.03
    connection_timeout: float = 0.6
    connection_retry: float = 0.1
    leader_fallback_timeout: float = 1.0
    heartbeat_interval: float = 0.1
    #: Longest the tick thread sleeps in poll(); a single-node cluster commits
    #: on the tick after appending, so this bounds its write latency.
    tick_period: float = 0.005
    #: Largest append_entries message PySyncObj builds. A single entry at least
    #: this big goes through PySyncObj's chunked "transmission" path, which marks
    #: the wrong chunk as the last one when the pickled entry is longer than the
    #: command (the follower then fails to unpickle, logs it, and completes the
    #: entry only when the real last chunk arrives). 1 MiB keeps Iris's batches
    #: (up to ~4 MiB of bodies, usually far less) off that path in practice;
    #: PySyncObj's default is 64 KiB.
    append_entries_batch_bytes: int = 1 << 20
    log_compaction_min_entries: int = 2000
    log_compaction_min_time: float = 120.0
    dynamic_membership: bool = True
    #: Peer Raft address -> address to dial instead (NAT, fault-injection proxy).
    dial: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def journal_path(self) -> str:
        return os.path.join(self.data_dir, "raft.journal")

    @property
    def dump_path(self) -> str:
        return os.path.join(self.data_dir, "raft.snapshot")


class RaftHost:
    """One PySyncObj node on a dedicated thread, with a trio-friendly call."""

    def __init__(self, settings: RaftSettings) -> None:
        self.settings = settings
        self.consumer = _StateConsumer()
        self._sync: _IrisSyncObj | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = threading.Event()

    # ----------------------------------------------------------- lifecycle

    def _build(self) -> _IrisSyncObj:
        s = self.settings
        os.makedirs(s.data_dir, exist_ok=True)
        verify_dump(s.dump_path, allow_nuke=s.allow_table_nuke)
        journal = ChecksummedJournal(
            s.journal_path, dump_path=s.dump_path, allow_nuke=s.allow_table_nuke
        )
        install_journal(s.journal_path, journal)
        conf = SyncObjConf(
            password=s.password,
            appendEntriesUseBatch=False,
            autoTickPeriod=s.tick_period,
            raftMinTimeout=s.election_timeout_min,
            raftMaxTimeout=s.election_timeout_max,
            appendEntriesPeriod=s.append_entries_period,
            appendEntriesBatchSizeBytes=s.append_entries_batch_bytes,
            connectionTimeout=s.connection_timeout,
            connectionRetryTime=s.connection_retry,
            leaderFallbackTimeout=s.leader_fallback_timeout,
            commandsWaitLeader=False,
            journalFile=s.journal_path,
            fullDumpFile=s.dump_path,
            logCompactionMinEntries=s.log_compaction_min_entries,
            logCompactionMinTime=s.log_compaction_min_time,
            logCompactionSplit=True,
            dynamicMembershipChange=s.dynamic_membership,
            maxBindRetries=3,
            bindRetryTime=0.2,
            **s.extra,
        )
        sync = _IrisSyncObj(
            s.self_node,
            [n for n in s.other_nodes if n != s.self_node],
            conf,
            consumers=[self.consumer],
            transportClass=GuardTransport,
            heartbeat=s.heartbeat_interval,
            dial={peer: _split(addr) for peer, addr in s.dial.items()},
        )
        try:
            sync.waitBinded()
        except Exception:
            sync.destroy()
            raise OSError(
                f"cannot bind the Raft port {s.self_node}: is another process using it?"
            ) from None
        return sync

    def _thread_main(self) -> None:
        try:
            self._sync = self._build()
        except BaseException as exc:  # handed to the starter
            self._start_error = exc
            self._started.set()
            self._stopped.set()
            return
        self._started.set()
        self._stop.wait()
        sync = self._sync
        try:
            sync.destroy()
            deadline = time.monotonic() + 5
            while sync.tick_thread_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            self._stopped.set()

    def start(self) -> None:
        """Build the node on its own thread; raises what building raised.

        Raises :class:`CorruptFile` (journal or snapshot failed its checksum),
        ``OSError`` (Raft port not bindable).
        """
        self._thread = threading.Thread(
            target=self._thread_main, name=f"iris-raft-{self.settings.self_node}", daemon=True
        )
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def stop(self) -> None:
        """Stop the node and wait (bounded) for its threads to end."""
        self._stop.set()
        self._stopped.wait(10)

    @property
    def sync(self) -> _IrisSyncObj:
        if self._sync is None:
            raise Unavailable("the Raft node is not running")
        return self._sync

    # --------------------------------------------------------------- calls

    async def call(self, payload: bytes, timeout: float) -> list[Result]:
        """Replicate one batch and return its per-op results (applied on this node).

        Raises :class:`UnknownOutcome` (timeout, leader change, discarded: may or
        may not be applied; retry with the same op ids) or :class:`Unavailable`
        (definitely not queued: no leader, queue full).
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[Any, int]] = []

        def deliver(res: Any, err: int) -> None:
            box.append((res, err))
            done.set()

        def callback(res: Any, err: int) -> None:  # tick thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver, res, err)

        self.consumer.apply_batch(payload, callback=callback)
        with trio.move_on_after(timeout):
            await done.wait()
        if not box:
            raise UnknownOutcome(f"no answer from Raft within {timeout:.2f}s")
        res, err = box[0]
        if err == FAIL_REASON.SUCCESS:
            if not isinstance(res, list):
                raise UnknownOutcome("the batch was not applied as expected")
            return res
        name = _REASON_NAMES.get(err, str(err))
        if err in _DEFINITELY_NOT_APPLIED:
            raise Unavailable(f"Raft refused the batch: {name}", reason=name)
        raise UnknownOutcome(f"Raft outcome unknown: {name}", reason=name)

    # -------------------------------------------------------------- status

    def is_leader(self) -> bool:
        sync = self._sync
        return bool(sync is not None and sync._isLeader())

    def leader(self) -> str | None:
        sync = self._sync
        if sync is None:
            return None
        node = sync._getLeader()
        return None if node is None else str(node.id if hasattr(node, "id") else node)

    def last_heard(self) -> dict[str, float]:
        sync = self._sync
        if sync is None:
            return {}
        transport = sync._SyncObj__transport
        return dict(getattr(transport, "last_heard", {}))

    def members(self) -> list[str]:
        """The current Raft membership (self included)."""
        sync = self._sync
        if sync is None:
            return [self.settings.self_node]
        return sorted([self.settings.self_node, *(n.id for n in sync.otherNodes)])

    def raft_status(self) -> dict[str, Any]:
        sync = self._sync
        if sync is None:
            return {}
        st = sync.getStatus()
        return {
            "state": {0: "follower", 1: "candidate", 2: "leader"}.get(st["state"], "unknown"),
            "leader": self.leader(),
            "term": st["raft_term"],
            "commit_index": st["commit_idx"],
            "last_applied": st["last_applied"],
            "log_len": st["log_len"],
            "has_quorum": bool(st["has_quorum"]),
            "peers": {
                node.id: {
                    "connected": bool(sync.isNodeConnected(node)),
                    "link": _link_state(sync, node),
                    "next_index": st.get("next_node_idx_server_" + node.id),
                    "match_index": st.get("match_idx_server_" + node.id),
                }
                for node in list(sync.otherNodes)
            },
        }

    async def change_membership(self, add: str | None, remove: str | None, timeout: float) -> None:
        """Add or remove one node (the leader must run this). Raises UnknownOutcome/Unavailable."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[Any, int]] = []

        def callback(res: Any, err: int) -> None:
            def deliver() -> None:
                box.append((res, err))
                done.set()

            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver)

        if add is not None:
            self.sync.addNodeToCluster(add, callback=callback)
        elif remove is not None:
            self.sync.removeNodeFromCluster(remove, callback=callback)
        with trio.move_on_after(timeout):
            await done.wait()
        if not box:
            raise UnknownOutcome("membership change: no answer in time")
        _, err = box[0]
        if err != FAIL_REASON.SUCCESS:
            name = _REASON_NAMES.get(err, str(err))
            if err in _DEFINITELY_NOT_APPLIED:
                raise Unavailable(f"membership change refused: {name}", reason=name)
            raise UnknownOutcome(f"membership change outcome unknown: {name}", reason=name)

    def force_snapshot(self) -> None:
        self.sync.forceLogCompaction()

    def read_state(self, fn: Callable[[IrisState], Any]) -> Any:
        """Run ``fn`` on the local state under the apply lock (a local, possibly stale read)."""
        with self.consumer.lock:
            return fn(self.consumer.state)


def check_snapshot_error(host: RaftHost) -> None:
    """Raise :class:`CorruptFile` if PySyncObj failed to load the snapshot."""
    err = host.consumer.snapshot_error
    if err is not None:
        raise CorruptFile(
            f"the snapshot could not be loaded ({err}); restore from a backup, or set "
            "allow_table_nuke = true to move it aside and rebuild from the peers",
            path=host.settings.dump_path,
        )


__all__: Sequence[str] = ("GuardTransport", "RaftHost", "RaftSettings", "check_snapshot_error")
