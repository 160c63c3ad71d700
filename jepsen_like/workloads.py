"""Workloads: concurrent clients that drive a cluster and record a history.

Theory of operation
-------------------
Each workload runs numbered *processes* (Jepsen's logical clients). A process
invokes one operation at a time and records ``invoke`` then ``ok``, ``fail``
(definitely not applied) or ``info`` (unknown outcome). A process that got
``info`` is retired and a fresh process number takes its place, so the
checkers may assume each process is sequential.

* :class:`RegisterWorkload`: read / write / compare-and-set on a few keys
  through the library's RPC, each process bound to one core (followers and
  partitioned cores included). Reads are linearizable reads (a barrier)
  unless ``local_reads`` (the canary: local state without the barrier, which
  must be caught as not linearizable).
* :class:`MessageWorkload`: unique messages to many recipients through the
  edges (WebSocket, protocol v1), receivers that ack what they get, and a
  final drain of every recipient.
* :class:`RevocationWorkload`: clients authenticate with fresh tokens while a
  revoker revokes some of them; afterwards each revoked token is tried again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from iris_raft import IrisError, UnknownOutcome
from iris_raft._rpc import RpcClientConnection, open_rpc_connection

from . import checkers
from .cluster import LocalCluster
from .history import History

logger = logging.getLogger("jepsen_like.workloads")

OP_TIMEOUT = 3.0
#: What an edge connection can fail with; the workload reconnects after any of them.
_EDGE_ERRORS = (
    ConnectionClosed,
    HandshakeError,
    OSError,
    trio.TooSlowError,
    ConnectionError,
    ValueError,
)


@dataclass
class Counters:
    """Progress counters shown while a run goes on."""

    ok: int = 0
    fail: int = 0
    info: int = 0

    def count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)


@dataclass
class Workload:
    """Base: ``run`` drives the cluster until ``until``; ``final`` reads the end state."""

    name: str = "workload"
    counters: Counters = field(default_factory=Counters)
    needs_edges: int = 0
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count())

    def new_process(self) -> int:
        return next(self._pids)

    async def run(
        self, cluster: LocalCluster, history: History, rng: random.Random, until: float
    ) -> None:
        raise NotImplementedError

    async def final(self, cluster: LocalCluster, history: History) -> dict[str, Any]:
        return {}

    def check(
        self, history: History, final: dict[str, Any], mode: str
    ) -> list[checkers.CheckResult]:
        raise NotImplementedError


# ---------------------------------------------------------------- registers


def _open_core(cluster: LocalCluster, index: int):  # type: ignore[no-untyped-def]
    secret = cluster.secret.encode() if cluster.secret else None
    return open_rpc_connection(cluster.cores[index].rpc, secret=secret, connect_timeout=1.0)


_RETRY = (UnknownOutcome, trio.TooSlowError, OSError)


@dataclass
class RegisterWorkload(Workload):
    """CAS registers through the library API; linearizable reads unless ``local_reads``."""

    name: str = "register"
    keys: int = 3
    processes: int = 9
    local_reads: bool = False

    async def run(
        self, cluster: LocalCluster, history: History, rng: random.Random, until: float
    ) -> None:
        async with trio.open_nursery() as nursery:
            for slot in range(self.processes):
                nursery.start_soon(
                    self._client, cluster, history, random.Random(rng.random()), slot, until
                )

    async def _client(
        self, cluster: LocalCluster, history: History, rng: random.Random, slot: int, until: float
    ) -> None:
        key = f"r{slot % self.keys}"
        # Each slot is bound to one core, as a Jepsen client is bound to a node;
        # the slots of one key are spread over different cores.
        index = (slot // self.keys) % len(cluster.cores)
        node = cluster.cores[index].node
        process = self.new_process()
        while trio.current_time() < until:
            try:
                async with _open_core(cluster, index) as conn:
                    while trio.current_time() < until:
                        process, reconnect = await self._one_op(
                            conn, history, rng, process, key, node
                        )
                        if reconnect:
                            break
            except (IrisError, OSError):
                pass  # could not connect: nothing was invoked
            await trio.sleep(0.05)

    async def _one_op(
        self,
        conn: RpcClientConnection,
        history: History,
        rng: random.Random,
        process: int,
        key: str,
        node: str,
    ) -> tuple[int, bool]:
        roll = rng.random()
        params: dict[str, Any]
        if roll < 0.5:
            f, value, method = "read", None, "get"
            params = {"key": key, "linearizable": not self.local_reads}
        elif roll < 0.75:
            value = rng.randrange(5)
            f, method, params = "write", "put", {"key": key, "value": value}
        else:
            value = [rng.randrange(5), rng.randrange(5)]
            f, method, params = "cas", "cas", {"key": key, "expected": value[0], "new": value[1]}
        if f != "read":
            params["op_id"] = f"p{process}-{rng.getrandbits(48):x}"
        op = history.invoke(process, f, key, value, node=node)
        try:
            result = await conn.call(method, params, timeout=OP_TIMEOUT)
        except _RETRY as exc:
            if f == "read":
                history.complete(op, "fail", error=type(exc).__name__)
                self.counters.count("fail")
            else:
                history.complete(op, "info", error=type(exc).__name__)
                self.counters.count("info")
                process = self.new_process()
            return process, True
        except IrisError as exc:
            history.complete(op, "fail", error=exc.code)
            self.counters.count("fail")
            await trio.sleep(0.02)
            return process, conn.closed
        if f == "read":
            history.complete(op, "ok", result)
        elif f == "write":
            history.complete(op, "ok", value)
        else:
            history.complete(op, "ok", value, swapped=bool(result))
        self.counters.count("ok")
        return process, False

    def check(
        self, history: History, final: dict[str, Any], mode: str
    ) -> list[checkers.CheckResult]:
        return [checkers.check_linearizable(history), checkers.availability(history)]


# ------------------------------------------------------------------ messages


class _Edge:
    """A raw protocol-v1 connection (no retries: the workload records outcomes)."""

    def __init__(self, ws: Any, user: str) -> None:
        self.ws = ws
        self.user = user

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(cbor2.dumps(frame))

    async def receive(self) -> dict[str, Any]:
        data = await self.ws.get_message()
        frame = cbor2.loads(data)
        if not isinstance(frame, dict):
            raise ValueError("not a frame")
        return frame


@contextlib.asynccontextmanager
async def _open_edge(url: str, token: str, user: str):  # type: ignore[no-untyped-def]
    async with open_websocket_url(
        url,
        subprotocols=["iris.v1"],
        extra_headers=[("Authorization", f"Bearer {token}")],
        connect_timeout=3,
    ) as ws:
        edge = _Edge(ws, user)
        with trio.fail_after(5):
            welcome = await edge.receive()
        if welcome.get("type") == "error":
            raise Rejected(str(welcome.get("code")))
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"not welcomed: {welcome}")
        yield edge


class Rejected(ConnectionError):
    """The edge refused the token (an ``error`` frame, then close 4001)."""


@dataclass
class MessageWorkload(Workload):
    """Unique messages to many recipients through the edges, acked by receivers, then drained."""

    name: str = "messages"
    senders: int = 6
    recipients: int = 6
    needs_edges: int = 2
    pace: float = 0.01

    async def run(
        self, cluster: LocalCluster, history: History, rng: random.Random, until: float
    ) -> None:
        self._stop_receivers = trio.Event()
        async with trio.open_nursery() as nursery:
            for r in range(self.recipients):
                nursery.start_soon(
                    self._receiver, cluster, history, random.Random(rng.random()), f"rcpt{r}", until
                )
            async with trio.open_nursery() as senders:
                for s in range(self.senders):
                    senders.start_soon(
                        self._sender, cluster, history, random.Random(rng.random()), s, until
                    )
            nursery.cancel_scope.cancel()

    async def _sender(
        self, cluster: LocalCluster, history: History, rng: random.Random, slot: int, until: float
    ) -> None:
        user = f"sender{slot}"
        seq = 0
        process = self.new_process()
        while trio.current_time() < until:
            edge_i = rng.randrange(len(cluster.edges))
            try:
                async with _open_edge(cluster.edges[edge_i].url, cluster.token(user), user) as edge:
                    while trio.current_time() < until:
                        seq += 1
                        msg_id = f"{user}-{seq}"
                        to = f"rcpt{rng.randrange(self.recipients)}"
                        body = {"from": user, "seq": seq}
                        op = history.invoke(
                            process,
                            "send",
                            to,
                            {"id": msg_id, "from": user, "to": to, "body": body},
                            edge=edge_i,
                        )
                        try:
                            await edge.send_frame(
                                {"type": "send", "id": msg_id, "to": to, "body": body}
                            )
                            kind, extra = await self._await_sent(edge, msg_id)
                        except (_Unknown, ConnectionClosed) as exc:
                            history.complete(
                                op, "info", op.value, error=str(exc) or type(exc).__name__
                            )
                            self.counters.count("info")
                            process = self.new_process()
                            break
                        history.complete(op, kind, op.value, **extra)
                        self.counters.count(kind)
                        if kind == "info":
                            process = self.new_process()
                        if kind != "ok":
                            await trio.sleep(0.05)
                        await trio.sleep(self.pace)
            except _EDGE_ERRORS:
                await trio.sleep(0.1)

    async def _await_sent(self, edge: _Edge, msg_id: str) -> tuple[str, dict[str, Any]]:
        try:
            with trio.fail_after(OP_TIMEOUT):
                while True:
                    frame = await edge.receive()
                    if frame.get("id") != msg_id:
                        continue
                    if frame.get("type") == "sent":
                        return "ok", {"mid": frame["mid"], "ts": frame["ts"]}
                    if frame.get("type") == "error":
                        code = frame.get("code")
                        # `unavailable` means the core did not answer in time: unknown outcome.
                        if code == "unavailable":
                            return "info", {"error": code}
                        return "fail", {"error": code}
        except (trio.TooSlowError, ConnectionClosed) as exc:
            raise _Unknown(type(exc).__name__) from None

    async def _receiver(
        self, cluster: LocalCluster, history: History, rng: random.Random, user: str, until: float
    ) -> None:
        process = self.new_process()
        connection = 0
        while True:
            edge_i = rng.randrange(len(cluster.edges))
            connection += 1
            stream = f"{user}#{connection}"  # push order is only promised within a connection
            try:
                async with _open_edge(cluster.edges[edge_i].url, cluster.token(user), user) as edge:
                    while True:
                        frame = await edge.receive()
                        if frame.get("type") == "msg":
                            history.observe(
                                process, "deliver", user, _seen(user, frame), stream=stream
                            )
                            await edge.send_frame({"type": "ack", "mids": [frame["mid"]]})
            except _EDGE_ERRORS:
                await trio.sleep(0.1)

    async def final(self, cluster: LocalCluster, history: History) -> dict[str, Any]:
        """Drain every recipient: read until 2 s pass with nothing new; record one ``drain``."""
        drained = 0

        async def drain(user: str) -> None:
            nonlocal drained
            process = self.new_process()
            for attempt in range(20):
                seen: list[dict[str, Any]] = []
                try:
                    url = cluster.edges[attempt % len(cluster.edges)].url
                    async with _open_edge(url, cluster.token(user), user) as edge:
                        while True:
                            with trio.move_on_after(2.0) as idle:
                                frame = await edge.receive()
                            if idle.cancelled_caught:
                                history.observe(process, "drain", user, seen)
                                drained += len(seen)
                                return
                            if frame.get("type") == "msg":
                                seen.append(_seen(user, frame))
                except _EDGE_ERRORS:
                    await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            for r in range(self.recipients):
                nursery.start_soon(drain, f"rcpt{r}")
        return {"drained": drained, "convergence": await replica_fingerprints(cluster)}

    def check(
        self, history: History, final: dict[str, Any], mode: str
    ) -> list[checkers.CheckResult]:
        ap = mode == "hardened_ap"
        results = [
            checkers.check_messages(
                history,
                mode=mode,
                allow_late_after_crash=late_after_crash(history) if ap else set(),
                allow_late_across_connections=late_after_cut(history) if ap else set(),
            ),
            checkers.availability(history),
        ]
        if final.get("convergence"):
            results.append(checkers.check_convergence(final["convergence"]))
        return results


class _Unknown(Exception):
    pass


#: How long before a core crash an acknowledged hardened_ap write may still sit
#: undrained in that core's WAL (it normally drains within milliseconds).
DRAIN_WINDOW = 2.0


def late_after_crash(history: History) -> set[str]:
    """Mids that hardened_ap may deliver late: acknowledged shortly before a core was killed.

    The protocol allows a message whose accepting core crashed before
    replicating it to arrive when that core is back, after later messages.
    Which core accepted a message is not visible to clients, so every message
    acknowledged within ``DRAIN_WINDOW`` seconds before a kill is allowed to
    be late (counted as ``late``, not as reordered); nothing else is.
    """
    return _acked_near(history, ("kill",), before=DRAIN_WINDOW, after=0.0)


#: Faults that cut a core off (from the other cores, and from some clients)
#: without killing it: its undrained hardened_ap writes wait for the heal.
_CUT_OFF_FAULTS = ("random-halves", "isolate", "bridge", "majorities-ring", "pause")


#: How long after a cut a minority core may still acknowledge from its WAL:
#: the partition guard's detection (about 1.1 s) with slack for a loaded machine.
GUARD_WINDOW = 2.0


def late_after_cut(history: History) -> set[str]:
    """Mids acknowledged from ``DRAIN_WINDOW`` before a partition or pause began
    until ``GUARD_WINDOW`` after.

    Such a message may sit undrained on a core that was cut off or paused.
    The clients' order fence holds later sends of the same sender back on
    every connection whose client learned of it (see iris_raft._client), but
    a sender that continues on a *new* connection through an edge that never
    talked to that core cannot be held back: there the message may arrive
    after later ones, as after a crash (docs/consistency.md, "Order
    exception"). The checker allows that only when the overtaking message
    came from a different process (connection).
    """
    return _acked_near(history, _CUT_OFF_FAULTS, before=DRAIN_WINDOW, after=GUARD_WINDOW)


def _acked_near(
    history: History, faults: tuple[str, ...], *, before: float, after: float
) -> set[str]:
    """Mids of sends acknowledged from ``before`` s ahead of the start of a
    fault named ``faults*`` until ``after`` s past it."""
    starts = [
        start for start, _end, name in history.fault_windows() if str(name).startswith(faults)
    ]
    late: set[str] = set()
    for inv, done in history.pairs():
        if inv.f != "send" or done is None or done.type != "ok":
            continue
        if any(t - before <= done.time <= t + after for t in starts):
            mid = done.extra.get("mid") if isinstance(done.extra, dict) else None
            if mid:
                late.add(mid)
    return late


def _seen(user: str, frame: dict[str, Any]) -> dict[str, Any]:
    body = frame.get("body")
    seen: dict[str, Any] = {
        "to": user,
        "mid": frame.get("mid"),
        "from": frame.get("from"),
        "body": body,
    }
    if isinstance(body, dict) and "seq" in body:
        seen["id"] = f"{body.get('from')}-{body.get('seq')}"
    return seen


async def replica_fingerprints(cluster: LocalCluster, timeout: float = 30.0) -> dict[str, Any]:
    """Each core's replicated counters once WAL backlogs are drained and indexes agree."""
    last: dict[str, Any] = {}
    with trio.move_on_after(timeout):
        while True:
            statuses = await cluster.statuses()
            if all(s is not None for s in statuses):
                last = {
                    s["node"]: {
                        k: s["state"][k]
                        for k in (
                            "messages",
                            "inboxes",
                            "revoked_tokens",
                            "revoked_users",
                            "registers",
                            "dedup_entries",
                        )
                    }
                    for s in statuses
                    if s is not None
                }
                backlog = sum(s["wal_backlog"] for s in statuses if s is not None)
                applied = {s["raft"].get("last_applied") for s in statuses if s is not None}
                if (
                    backlog == 0
                    and len({repr(v) for v in last.values()}) == 1
                    and len(applied) == 1
                ):
                    return last
            await trio.sleep(0.5)
    return last


# --------------------------------------------------------------- revocation


@dataclass
class RevocationWorkload(Workload):
    """Authenticate with fresh tokens while some are revoked; revoked tokens must stay out."""

    name: str = "revocation"
    processes: int = 4
    needs_edges: int = 2

    async def run(
        self, cluster: LocalCluster, history: History, rng: random.Random, until: float
    ) -> None:
        self._issued: list[tuple[str, str]] = []
        self._revoked: list[tuple[str, str]] = []
        async with trio.open_nursery() as nursery:
            for slot in range(self.processes):
                nursery.start_soon(
                    self._authenticator, cluster, history, random.Random(rng.random()), slot, until
                )
            nursery.start_soon(self._revoker, cluster, history, random.Random(rng.random()), until)

    async def _auth(
        self,
        cluster: LocalCluster,
        history: History,
        process: int,
        user: str,
        jti: str,
        edge_i: int,
    ) -> str:
        op = history.invoke(process, "auth", user, {"jti": jti, "user": user}, edge=edge_i)
        try:
            with trio.fail_after(OP_TIMEOUT):
                async with _open_edge(
                    cluster.edges[edge_i].url, cluster.token(user, jti=jti), user
                ):
                    pass
        except Rejected as exc:
            # token_revoked / auth_failed are definite; unavailable means unknown.
            kind = "info" if str(exc) == "unavailable" else "fail"
            history.complete(op, kind, op.value, error=str(exc))
            return kind
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else None
            kind = "fail" if code == 4001 else "info"
            history.complete(op, kind, op.value, close=code)
            return kind
        except (HandshakeError, OSError, trio.TooSlowError, ConnectionError, ValueError) as exc:
            history.complete(op, "info", op.value, error=type(exc).__name__)
            return "info"
        history.complete(op, "ok", op.value)
        return "ok"

    async def _authenticator(
        self, cluster: LocalCluster, history: History, rng: random.Random, slot: int, until: float
    ) -> None:
        process = self.new_process()
        n = 0
        while trio.current_time() < until:
            n += 1
            user = f"user{slot}"
            if self._revoked and rng.random() < 0.3:
                user, jti = rng.choice(self._revoked)
            else:
                jti = f"t{slot}-{n}"
                self._issued.append((user, jti))
            kind = await self._auth(
                cluster, history, process, user, jti, rng.randrange(len(cluster.edges))
            )
            self.counters.count(kind)
            if kind == "info":
                process = self.new_process()
            await trio.sleep(0.02)

    async def _revoker(
        self, cluster: LocalCluster, history: History, rng: random.Random, until: float
    ) -> None:
        process = self.new_process()
        while trio.current_time() < until:
            await trio.sleep(0.2)
            if not self._issued:
                continue
            user, jti = rng.choice(self._issued)
            try:
                async with _open_core(cluster, rng.randrange(len(cluster.cores))) as conn:
                    op = history.invoke(process, "revoke", user, {"jti": jti, "user": user})
                    try:
                        await conn.call(
                            "revoke_token",
                            {"jti": jti, "exp_ms": 2**41, "op_id": f"rv-{jti}"},
                            timeout=OP_TIMEOUT,
                        )
                    except _RETRY as exc:
                        history.complete(op, "info", error=type(exc).__name__)
                        kind = "info"
                    except IrisError as exc:
                        history.complete(op, "fail", error=exc.code)
                        kind = "fail"
                    else:
                        history.complete(op, "ok")
                        self._revoked.append((user, jti))
                        kind = "ok"
            except (IrisError, OSError):
                continue
            self.counters.count(kind)
            if kind == "info":
                process = self.new_process()

    async def final(self, cluster: LocalCluster, history: History) -> dict[str, Any]:
        """Every revoked token is tried once more on every edge: none may get in."""
        process = self.new_process()
        for user, jti in list(self._revoked):
            for edge_i in range(len(cluster.edges)):
                await self._auth(cluster, history, process, user, jti, edge_i)
        return {"revoked": len(self._revoked)}

    def check(
        self, history: History, final: dict[str, Any], mode: str
    ) -> list[checkers.CheckResult]:
        return [checkers.check_revocations(history), checkers.availability(history)]


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "register": RegisterWorkload,
    "register-local-reads": lambda: RegisterWorkload(name="register-local-reads", local_reads=True),
    "messages": MessageWorkload,
    "revocation": RevocationWorkload,
}
