"""Shared tools for the real-process cluster tests: raw per-core calls, polling
with deadlines, a concurrent writer workload that records every acknowledgement,
and the checks run once the cluster has converged.

Nothing here sleeps in place of waiting for an observable condition: waits
poll the condition (``wait_until``) and fail with the last observation when
their deadline passes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from jepsen_like import cluster as _harness  # noqa: E402
from jepsen_like.cluster import LocalCluster  # noqa: E402

import iris_raft  # noqa: E402
from iris_raft import IrisError, Unavailable, UnknownOutcome, WriteBlocked  # noqa: E402
from iris_raft._rpc import open_rpc_connection  # noqa: E402
from iris_raft._wire import message_from_wire  # noqa: E402

#: Errors after which a writer retries the same client id.
RETRYABLE = (UnknownOutcome, Unavailable, WriteBlocked)


# ------------------------------------------------------------------ clusters


@contextlib.asynccontextmanager
async def open_cluster(base_dir: str, **kwargs: Any) -> AsyncIterator[LocalCluster]:
    """``jepsen_like.cluster.open_cluster``, then wait for a leader and every guard
    to see a quorum; with a work-around for ``proxies=True``.

    ``LocalCluster.start_all`` (jepsen_like/cluster.py) calls ``write_configs()``
    *before* ``start_links()``, so every ``raft_dial`` entry is written while the
    proxies still have ``port = 0`` and each core exits with code 2
    ("core.raft_dial = '127.0.0.1:0': the port '0' must be a number from 1 to
    65535"). Until that is fixed, proxied clusters are started here in the right
    order (links, then configs, then cores); everything else is the harness's own.
    """
    if not kwargs.get("proxies"):
        async with _harness.open_cluster(base_dir, **kwargs) as cluster:
            await _wait_healthy(cluster)
            yield cluster
        return
    async with trio.open_nursery() as nursery:
        cluster = LocalCluster(base_dir, nursery, **kwargs)
        try:
            await cluster.start_links()
            cluster.write_configs()
            await start_many(cluster, range(len(cluster.cores)))
            await _wait_healthy(cluster)
            yield cluster
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()


async def _wait_healthy(cluster: LocalCluster) -> None:
    # "ready" means serving, not yet "sees a quorum": a follower's guard reports
    # safe a few heartbeats later. Tests start from a healthy cluster.
    await cluster.wait_leader()
    await wait_all_safe(cluster)


# ------------------------------------------------------------------ raw calls


def secret_of(cluster: LocalCluster) -> bytes:
    assert cluster.secret is not None
    return cluster.secret.encode()


async def core_call(
    cluster: LocalCluster, index: int, method: str, params: dict[str, Any], *, timeout: float = 5.0
) -> Any:
    """Call ``method`` on core ``index`` only, over a fresh raw connection (no retries)."""
    async with open_rpc_connection(
        cluster.cores[index].rpc, secret=secret_of(cluster), connect_timeout=timeout
    ) as conn:
        return await conn.call(method, params, timeout=timeout)


async def core_status(cluster: LocalCluster, index: int, timeout: float = 2.0) -> dict[str, Any]:
    return dict(await core_call(cluster, index, "status", {}, timeout=timeout))


async def wait_until(
    probe: Callable[[], Awaitable[Any]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with the last result.

    ``probe`` may raise :class:`IrisError` or ``OSError`` (the cluster is in
    flux); that counts as "not yet".
    """
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            try:
                last = await probe()
            except (IrisError, OSError) as exc:
                last = exc
            else:
                if last:
                    return last
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


async def wait_safe(cluster: LocalCluster, index: int, safe: bool, timeout: float) -> None:
    async def probe() -> bool:
        return (await core_status(cluster, index))["safe_for_writes"] is safe

    await wait_until(probe, timeout=timeout, what=f"core {index} safe_for_writes == {safe}")


async def wait_all_safe(cluster: LocalCluster, timeout: float = 10.0) -> None:
    """Every running core's partition guard sees a quorum (after start-up, a heal)."""
    for i, core in enumerate(cluster.cores):
        if core.running:
            await wait_safe(cluster, i, True, timeout)


async def kill_all_at_once(cluster: LocalCluster) -> None:
    """``kill -9`` every running core in the same instant, then reap them."""
    for core in cluster.cores:
        if core.running:
            os.kill(core.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    for core in cluster.cores:
        if core.process is not None:
            await core.process.wait()


async def start_many(cluster: LocalCluster, indexes: Sequence[int]) -> None:
    async with trio.open_nursery() as nursery:
        for i in indexes:
            nursery.start_soon(cluster.start, i)


def flip_byte(path: Path, offset: int | None = None) -> int:
    """XOR one byte of ``path`` (its middle by default) with 0xFF; returns the offset."""
    data = bytearray(path.read_bytes())
    assert len(data) > 64, f"{path} is too small ({len(data)} bytes) to corrupt meaningfully"
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return at


def set_core_option(cluster: LocalCluster, index: int, key: str, value: str) -> None:
    """Add ``key = value`` (TOML text) to the ``[core]`` table of one core's config file."""
    path = Path(cluster.cores[index].config_path)
    text = path.read_text()
    assert "[core]\n" in text
    path.write_text(text.replace("[core]\n", f"[core]\n{key} = {value}\n", 1))


# ------------------------------------------------------------------ workload


@dataclass
class Ack:
    sender: str
    client_id: str
    recipient: str
    mid: str
    at: float
    duplicate: bool


@dataclass
class Workload:
    """Concurrent writers, each sending sequentially with unique client ids.

    A send that fails with a retryable error is retried with the *same* client
    id until it is acknowledged or ``op_deadline`` passes. ``acks`` holds every
    acknowledgement (a retried id may be acknowledged more than once only if
    the answers agree); ``unresolved`` the ids never acknowledged.
    """

    tag: str
    writers: int = 20
    recipients: int = 4
    op_deadline: float = 30.0
    #: The client's order fence (seconds): see iris_raft._client.
    order_fence: float = 30.0
    acks: dict[str, Ack] = field(default_factory=dict)
    attempted: set[str] = field(default_factory=set)
    unresolved: set[str] = field(default_factory=set)
    retried: set[str] = field(default_factory=set)
    conflicting_acks: list[tuple[str, str, str]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stop: trio.Event = field(default_factory=trio.Event)
    acked_event: trio.Event = field(default_factory=trio.Event)

    def recipient_of(self, writer: int) -> str:
        return f"{self.tag}-inbox-{writer % self.recipients}"

    @property
    def inboxes(self) -> list[str]:
        return [f"{self.tag}-inbox-{r}" for r in range(self.recipients)]

    def acks_after(self, t: float) -> int:
        return sum(1 for a in self.acks.values() if a.at > t)

    async def wait_acks(self, count: int, *, after: float = float("-inf"), timeout: float) -> None:
        """Wait until ``count`` sends were acknowledged after time ``after``."""
        with trio.move_on_after(timeout):
            while self.acks_after(after) < count:
                self.acked_event = trio.Event()
                await self.acked_event.wait()
            return
        raise AssertionError(
            f"only {self.acks_after(after)} of {count} acknowledgements within {timeout}s "
            f"(errors so far: {dict(self.errors)})"
        )

    async def run(self, cluster: LocalCluster, *, timeout: float = 2.0) -> None:
        """Run every writer until :attr:`stop` is set (then finish the op in hand)."""
        async with trio.open_nursery() as nursery:
            for w in range(self.writers):
                nursery.start_soon(self._writer, cluster, w, timeout)

    async def _writer(self, cluster: LocalCluster, w: int, timeout: float) -> None:
        sender = f"{self.tag}-w{w}"
        recipient = self.recipient_of(w)
        async with iris_raft.open_client(
            cluster.rpc_addresses,
            secret=cluster.secret,
            timeout=timeout,
            connect_timeout=1.0,
            prefer_leader=w % 2 == 0,
            order_fence=self.order_fence,
        ) as client:
            seq = 0
            while not self.stop.is_set():
                client_id = f"{sender}-{seq}"
                seq += 1
                self.attempted.add(client_id)
                deadline = trio.current_time() + self.op_deadline
                attempts = 0
                while True:
                    attempts += 1
                    try:
                        res = await client.send(sender, client_id, recipient, client_id.encode())
                    except RETRYABLE as exc:
                        self.errors[type(exc).__name__] += 1
                        if trio.current_time() > deadline:
                            self.unresolved.add(client_id)
                            break
                        self.retried.add(client_id)
                        await trio.sleep(0.05)
                        continue
                    self._record(
                        Ack(
                            sender,
                            client_id,
                            recipient,
                            res.mid,
                            trio.current_time(),
                            res.duplicate,
                        )
                    )
                    break

    def _record(self, ack: Ack) -> None:
        old = self.acks.get(ack.client_id)
        if old is not None and old.mid != ack.mid:
            self.conflicting_acks.append((ack.client_id, old.mid, ack.mid))
        self.acks.setdefault(ack.client_id, ack)
        self.acked_event.set()


def check_inboxes(
    workload: Workload,
    inboxes: dict[str, list[Any]],
    *,
    where: str,
    mid_may_differ_after: float | None = None,
) -> list[tuple[str, str, str]]:
    """Every acknowledged send present exactly once under its acknowledged mid; no
    client id stored twice; nothing that was never sent.

    ``mid_may_differ_after`` (hardened_ap only): a send acknowledged after that
    time may be stored under another mid. That is the known hardened_ap defect
    pinned by ``test_hardened_ap_resend_on_another_core_returns_the_original_mid``:
    a core killed after fsyncing a send to its WAL but before answering replays
    it on restart under its own mid, while the client's retry on another core
    was acknowledged with a fresh one. Those cases are returned, not failed;
    a mismatch for a send acknowledged before the fault still fails.
    """
    problems: list[str] = []
    seen: Counter[str] = Counter()
    mid_of: dict[str, str] = {}
    for recipient, msgs in inboxes.items():
        for m in msgs:
            client_id = bytes(m.body).decode()
            seen[client_id] += 1
            mid_of[client_id] = m.mid
            if client_id not in workload.attempted:
                problems.append(f"unexpected message {client_id!r} in {recipient}")
            elif (
                workload.recipient_of(int(client_id.rsplit("-w", 1)[1].split("-")[0])) != recipient
            ):
                problems.append(f"{client_id!r} stored in the wrong inbox {recipient}")
    dups = {c: n for c, n in seen.items() if n > 1}
    if dups:
        retried = {c: n for c, n in dups.items() if c in workload.retried}
        problems.append(
            f"{len(dups)} client ids stored more than once (retried: {len(retried)}): "
            f"{sorted(dups.items())[:10]}"
        )
    lost = sorted(c for c in workload.acks if seen[c] == 0)
    if lost:
        problems.append(f"{len(lost)} acknowledged sends lost: {lost[:10]}")
    tolerated: list[tuple[str, str, str]] = []
    wrong_mid: list[tuple[str, str, str]] = []
    for c, a in sorted(workload.acks.items()):
        if c in mid_of and mid_of[c] != a.mid:
            if mid_may_differ_after is not None and a.at > mid_may_differ_after:
                tolerated.append((c, a.mid, mid_of[c]))
            else:
                wrong_mid.append((c, a.mid, mid_of[c]))
    if wrong_mid:
        problems.append(
            f"{len(wrong_mid)} acknowledged sends stored under another mid (id, acked, stored): "
            f"{wrong_mid[:10]}"
        )
    if workload.conflicting_acks:
        problems.append(
            f"one client id acknowledged with two mids: {workload.conflicting_acks[:10]}"
        )
    assert not problems, f"{where}: " + "; ".join(problems)
    return tolerated


async def fetch_all(
    cluster: LocalCluster, index: int, users: Sequence[str]
) -> dict[str, list[Any]]:
    """Every inbox in ``users`` as core ``index`` answers (a barrier read in cp, local in AP)."""
    out: dict[str, list[Any]] = {}
    for user in users:
        raw = await core_call(cluster, index, "fetch", {"user": user}, timeout=5.0)
        out[user] = [message_from_wire(m) for m in raw]
    return out


async def converged_inboxes(
    cluster: LocalCluster,
    users: Sequence[str],
    *,
    indexes: Sequence[int] | None = None,
    timeout: float = 20.0,
) -> dict[str, list[Any]]:
    """Wait until every listed core has no WAL backlog and answers identical inboxes.

    Returns those inboxes. In ``cp`` each fetch is a linearizable (barrier)
    read on that core; in ``hardened_ap`` it is the core's local replica, so
    agreement is what convergence means.
    """
    idx = list(range(len(cluster.cores))) if indexes is None else list(indexes)

    async def probe() -> dict[str, list[Any]] | None:
        for i in idx:
            st = await core_status(cluster, i)
            if st["wal_backlog"] != 0:
                return None
        views = [await fetch_all(cluster, i, users) for i in idx]
        if all(v == views[0] for v in views[1:]):
            return views[0] or {u: [] for u in users}
        last_difference[:] = [describe_difference(idx, views)]
        return None

    last_difference: list[str] = []

    try:
        result: dict[str, list[Any]] = await wait_until(
            probe,
            timeout=timeout,
            what=f"cores {idx} to agree on inboxes {list(users)}",
            interval=0.2,
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last difference: {last_difference}") from None
    return result


def describe_difference(indexes: Sequence[int], views: Sequence[dict[str, list[Any]]]) -> str:
    """Which messages each core has that the first listed core lacks, and vice versa."""
    out: list[str] = []
    base = views[0]
    for i, view in zip(indexes[1:], views[1:], strict=True):
        for user in base:
            a = {m.mid: bytes(m.body).decode(errors="replace") for m in base[user]}
            b = {m.mid: bytes(m.body).decode(errors="replace") for m in view[user]}
            if a != b:
                only_a = sorted(set(a.items()) - set(b.items()))[:5]
                only_b = sorted(set(b.items()) - set(a.items()))[:5]
                out.append(
                    f"{user}: core {indexes[0]} has {len(a)} msgs, core {i} has {len(b)}; "
                    f"only on {indexes[0]}: {only_a}; only on {i}: {only_b}"
                )
            elif [m.mid for m in base[user]] != [m.mid for m in view[user]]:
                out.append(f"{user}: same messages in a different order on core {i}")
    return "; ".join(out)


async def wait_identical_state(
    cluster: LocalCluster, *, indexes: Sequence[int] | None = None, timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the listed cores report the same ``last_applied`` and identical
    ``status()["state"]`` counters; return those counters.

    Replicas that applied the same log prefix must hold the same state. Status
    reads the Raft indexes and the counters a moment apart, so one mismatch
    proves nothing; a real divergence persists until the deadline, and the
    failure shows the last mismatch seen.
    """
    idx = list(range(len(cluster.cores))) if indexes is None else list(indexes)
    last_mismatch: list[Any] = []

    async def probe() -> dict[str, Any] | None:
        statuses = [await core_status(cluster, i) for i in idx]
        if len({s["raft"]["last_applied"] for s in statuses}) != 1:
            return None
        states = [s["state"] for s in statuses]
        if all(st == states[0] for st in states[1:]):
            return dict(states[0])
        last_mismatch[:] = [(statuses[0]["raft"]["last_applied"], states)]
        return None

    try:
        result: dict[str, Any] = await wait_until(
            probe, timeout=timeout, what=f"identical state on cores {idx}"
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; last mismatch at equal last_applied: {last_mismatch}"
        ) from None
    return result


@contextlib.asynccontextmanager
async def running_workload(cluster: LocalCluster, workload: Workload, timeout: float = 2.0) -> Any:
    """Run ``workload`` in the background for the body of the ``async with``; stop it on exit."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(workload.run, cluster, timeout=timeout))
        try:
            yield workload
        finally:
            workload.stop.set()
