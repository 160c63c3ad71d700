"""Leader ``kill -9`` -> first successful write: Iris vs PySyncObj defaults vs etcd.

Theory of operation
-------------------
Each system runs as three real processes on this machine. ``WRITERS``
clients write continuously (one write at a time each, no pause); once writes
are flowing, the leader is killed with SIGKILL and the figure of that run is
the time from the signal to the first acknowledgement of a write that was
*issued after* the signal (so a write already committed by the old leader
cannot count). A run with no such acknowledgement within ``GIVE_UP`` seconds
counts as ``GIVE_UP`` (censored, and said in the notes). The killed process
is then restarted on its data folder and the next run waits until it has
caught up with the leader's commit index.

* Iris: 3 ``iris core`` processes in ``cp`` mode (``jepsen_like.cluster``),
  writers are :func:`iris_raft.open_client` clients (each its own
  connection) calling ``put`` with a per-call deadline of
  ``IRIS_CALL_TIMEOUT``; within it the client retries, follows the leader
  and moves to another core, exactly as an application's client would.
* PySyncObj defaults: ``benchmarks.raw_pysyncobj --pysyncobj-defaults``
  (``SyncObjConf()`` defaults plus a journal and a dump file), one replicated
  setter; a writer sends to one node and, on an error or no answer within
  ``ATTEMPT_TIMEOUT``, moves to the next node at once.
* etcd 3.4 with its default timing (heartbeat 100 ms, election 1000 ms),
  puts through the JSON gateway, the same client rule as PySyncObj.

A baseline writer waiting on a follower that forwarded its write to the dead
leader only moves on after ``ATTEMPT_TIMEOUT``, which would round the
baselines' figures up. So from the kill on, the baselines also get *probes*:
every ``PROBE_INTERVAL`` a fresh write to every node at once (new
connections), and the first acknowledged one counts. That favours the
baselines; Iris is measured with its own client only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio

from benchmarks._common import Options, child_env, figure, python_cmd, series, summarize

#: Concurrent writers per system (each writes sequentially, without pauses).
WRITERS = 3
#: Deadline of one Iris ``put`` (the client retries inside it).
IRIS_CALL_TIMEOUT = 1.0
#: Deadline of one baseline attempt before the writer moves to the next node.
ATTEMPT_TIMEOUT = 1.0
#: Baselines: after the kill, a fresh write to every node this often (see measure_runs).
PROBE_INTERVAL = 0.05
#: Deadline of one probe.
PROBE_TIMEOUT = 3.0
#: A run without a write acknowledged by then is recorded as this many seconds.
GIVE_UP = 10.0
TARGET_S = 0.6
#: PySyncObj's default connectionRetryTime (5 s) plus a margin.
RAW_RECONNECT = 5.5

_LEN = struct.Struct(">I")


class Acks:
    """Acknowledged writes as ``(issued, acknowledged)`` trio times."""

    def __init__(self) -> None:
        self.log: list[tuple[float, float]] = []
        self.failures = 0
        self._changed = trio.Event()

    def record(self, issued: float, acked: float) -> None:
        self.log.append((issued, acked))
        self._changed.set()
        self._changed = trio.Event()

    def first_after(self, t: float) -> float | None:
        times = [acked for issued, acked in self.log if issued >= t]
        return min(times) if times else None

    def acked_since(self, t: float) -> int:
        return sum(1 for _, acked in self.log[-200:] if acked >= t)

    async def wait_first_after(self, t: float, timeout: float) -> float | None:
        with trio.move_on_after(timeout):
            while (first := self.first_after(t)) is None:
                await self._changed.wait()
            return first
        return None

    async def wait_flowing(self, timeout: float = 30.0) -> None:
        """Until every writer has had an acknowledgement in the last 0.3 s (roughly)."""
        with trio.fail_after(timeout):
            while self.acked_since(trio.current_time() - 0.3) < WRITERS:
                await trio.sleep(0.02)


async def _probe(acks: Acks, attempt: Callable[[], Awaitable[bool]], issued: float) -> None:
    try:
        ok = await attempt()
    except Exception:
        ok = False
    if ok:
        acks.record(issued, trio.current_time())


async def _probe_loop(acks: Acks, attempts: Sequence[Callable[[], Awaitable[bool]]]) -> None:
    """Every ``PROBE_INTERVAL`` s, one fresh write to every node at once."""
    async with trio.open_nursery() as nursery:
        while True:
            issued = trio.current_time()
            for attempt in attempts:
                nursery.start_soon(_probe, acks, attempt, issued)
            await trio.sleep(PROBE_INTERVAL)


async def measure_runs(
    runs: int,
    acks: Acks,
    find_leader: Callable[[], Awaitable[int]],
    kill: Callable[[int], Awaitable[None]],
    recover: Callable[[int], Awaitable[None]],
    probes: Sequence[Callable[[], Awaitable[bool]]] = (),
) -> tuple[list[float], int]:
    """Kill the leader ``runs`` times; the samples and how many runs gave up.

    ``probes`` (one write attempt per node) are started every
    ``PROBE_INTERVAL`` s from the kill until a write is acknowledged.
    """
    samples: list[float] = []
    censored = 0
    for _ in range(runs):
        leader = await find_leader()
        await acks.wait_flowing()
        await trio.sleep(0.2)
        killed_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            if probes:
                nursery.start_soon(_probe_loop, acks, probes)
            await kill(leader)
            first = await acks.wait_first_after(killed_at, GIVE_UP)
            nursery.cancel_scope.cancel()
        if first is None:
            censored += 1
            samples.append(GIVE_UP)
        else:
            samples.append(first - killed_at)
        await recover(leader)
    return samples, censored


# ------------------------------------------------------------------------ Iris


async def _iris_writer(cores: list[str], secret: str | None, w: int, acks: Acks) -> None:
    from iris_raft import IrisError, open_client

    async with open_client(
        cores, secret=secret, timeout=IRIS_CALL_TIMEOUT, connect_timeout=0.5
    ) as client:
        seq = 0
        while True:
            seq += 1
            issued = trio.current_time()
            try:
                await client.put(f"failover-{w}", seq)
            except (IrisError, OSError):
                acks.failures += 1
                continue
            acks.record(issued, trio.current_time())


async def _iris_caught_up(cluster: Any, index: int, timeout: float = 60.0) -> None:
    """Until core ``index`` follows the agreed leader and has applied its commit index."""
    target: int | None = None
    with trio.fail_after(timeout):
        while True:
            statuses = await cluster.statuses()
            mine = statuses[index]
            leaders = [s for s in statuses if s is not None and s["raft"].get("state") == "leader"]
            if len(leaders) == 1:
                lead = leaders[0]
                if target is None:
                    target = int(lead["raft"]["commit_index"])
                if (
                    mine is not None
                    and mine["leader"] == lead["node"]
                    and mine["safe_for_writes"]
                    and mine["raft"]["last_applied"] >= target
                ):
                    return
            await trio.sleep(0.1)


async def iris_failover(work_dir: str, runs: int) -> dict[str, Any]:
    from jepsen_like.cluster import open_cluster

    acks = Acks()
    async with open_cluster(work_dir, nodes=3, mode="cp") as cluster:
        await cluster.wait_leader(timeout=30)
        for i in range(3):
            await _iris_caught_up(cluster, i)

        async def recover(index: int) -> None:
            await cluster.start(index, timeout=60)
            await _iris_caught_up(cluster, index)

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(_iris_writer, cluster.rpc_addresses, cluster.secret, w, acks)
            samples, censored = await measure_runs(
                runs, acks, lambda: cluster.wait_leader(timeout=30), cluster.kill, recover
            )
            nursery.cancel_scope.cancel()
    return {"samples": samples, "censored": censored, "writes": len(acks.log)}


# ------------------------------------------------------------ PySyncObj defaults


async def _read_frame(stream: trio.SocketStream, buf: bytearray) -> bytes:
    while True:
        if len(buf) >= 4:
            (length,) = _LEN.unpack_from(buf, 0)
            if len(buf) >= 4 + length:
                body = bytes(buf[4 : 4 + length])
                del buf[: 4 + length]
                return body
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("connection closed")
        buf += data


async def _raw_request(port: int, body: bytes, timeout: float) -> bytes:
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(_LEN.pack(len(body)) + body)
            return await _read_frame(stream, bytearray())


class RawCluster:
    """Three ``benchmarks.raw_pysyncobj --pysyncobj-defaults`` processes."""

    def __init__(self, base_dir: str, nodes: int = 3) -> None:
        from jepsen_like.cluster import allocate_ports

        ports = allocate_ports(2 * nodes)
        self.base_dir = base_dir
        self.raft = [f"127.0.0.1:{ports[i]}" for i in range(nodes)]
        self.ports = [ports[nodes + i] for i in range(nodes)]
        self.procs: list[trio.Process | None] = [None] * nodes

    def _log(self, i: int) -> str:
        return os.path.join(self.base_dir, f"raw-{i}.log")

    async def start(self, i: int, timeout: float = 30.0) -> None:
        data_dir = os.path.join(self.base_dir, f"raw-{i}")
        os.makedirs(data_dir, exist_ok=True)
        log_path = self._log(i)
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        partners = ",".join(n for j, n in enumerate(self.raft) if j != i)
        with open(log_path, "ab") as log:
            proc = await trio.lowlevel.open_process(
                python_cmd(
                    "benchmarks.raw_pysyncobj",
                    "--self",
                    self.raft[i],
                    "--partners",
                    partners,
                    "--port",
                    str(self.ports[i]),
                    "--data-dir",
                    data_dir,
                    "--pysyncobj-defaults",
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**child_env(), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        self.procs[i] = proc
        with trio.fail_after(timeout):
            while True:
                with open(log_path, "rb") as f:
                    f.seek(offset)
                    if b"ready " in f.read():
                        return
                if proc.returncode is not None:
                    raise RuntimeError(f"raw_pysyncobj {i} exited with {proc.returncode}")
                await trio.sleep(0.02)

    async def start_all(self) -> None:
        async with trio.open_nursery() as n:
            for i in range(len(self.raft)):
                n.start_soon(self.start, i)

    async def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()

    async def status(self, i: int) -> dict[str, Any] | None:
        proc = self.procs[i]
        if proc is None or proc.returncode is not None:
            return None
        try:
            result: dict[str, Any] = json.loads(await _raw_request(self.ports[i], b"?", 0.5))
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError):
            return None
        return result

    async def statuses(self) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None] * len(self.raft)

        async def one(i: int) -> None:
            out[i] = await self.status(i)

        async with trio.open_nursery() as n:
            for i in range(len(self.raft)):
                n.start_soon(one, i)
        return out

    async def wait_leader(self, timeout: float = 30.0) -> int:
        with trio.fail_after(timeout):
            while True:
                st = await self.statuses()
                leaders = {s["leader"] for s in st if s is not None}
                if len(leaders) == 1 and None not in leaders:
                    (lead,) = leaders
                    for i, s in enumerate(st):
                        if s is not None and s["self"] == lead and s["is_leader"]:
                            return i
                await trio.sleep(0.05)

    async def wait_caught_up(self, index: int, timeout: float = 60.0) -> None:
        """Until node ``index`` follows the leader and reached its commit index (taken once)."""
        target: int | None = None
        with trio.fail_after(timeout):
            while True:
                st = await self.statuses()
                mine = st[index]
                lead = [s for s in st if s is not None and s["is_leader"]]
                if len(lead) == 1:
                    if target is None:
                        target = int(lead[0]["commit_idx"])
                    if (
                        mine is not None
                        and mine["leader"] == lead[0]["self"]
                        and mine["commit_idx"] >= target
                    ):
                        return
                await trio.sleep(0.1)

    async def aclose(self) -> None:
        for i in range(len(self.raft)):
            await self.kill(i)


@contextlib.asynccontextmanager
async def raw_cluster(base_dir: str) -> AsyncIterator[RawCluster]:
    os.makedirs(base_dir, exist_ok=True)
    rc = RawCluster(base_dir)
    try:
        await rc.start_all()
        yield rc
    finally:
        await rc.aclose()


async def _raw_writer(rc: RawCluster, w: int, acks: Acks) -> None:
    node = w % len(rc.ports)
    stream: trio.SocketStream | None = None
    buf = bytearray()
    seq = 0
    while True:
        seq += 1
        body = f"w{w}-{seq}".encode().ljust(100, b".")
        issued = trio.current_time()
        ok = False
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT):
                if stream is None:
                    stream = await trio.open_tcp_stream("127.0.0.1", rc.ports[node])
                    buf = bytearray()
                await stream.send_all(_LEN.pack(len(body)) + body)
                ok = await _read_frame(stream, buf) == b"\x00"
        except (OSError, trio.BrokenResourceError, trio.TooSlowError):
            ok = False
        if ok:
            acks.record(issued, trio.current_time())
            continue
        acks.failures += 1
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.aclose()
            stream = None
        node = (node + 1) % len(rc.ports)
        await trio.sleep(0.01)


async def raw_failover(work_dir: str, runs: int) -> dict[str, Any]:
    acks = Acks()
    async with raw_cluster(work_dir) as rc:
        await rc.wait_leader()

        async def recover(index: int) -> None:
            started = trio.current_time()
            await rc.start(index)
            await rc.wait_caught_up(index)
            # Peers redial a restarted node only every connectionRetryTime (5 s by
            # default): wait until every link can be back before the next kill.
            await trio.sleep_until(started + RAW_RECONNECT)

        def probe(port: int) -> Callable[[], Awaitable[bool]]:
            async def attempt() -> bool:
                return await _raw_request(port, b"probe".ljust(100, b"."), PROBE_TIMEOUT) == b"\x00"

            return attempt

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(_raw_writer, rc, w, acks)
            samples, censored = await measure_runs(
                runs, acks, rc.wait_leader, rc.kill, recover, [probe(p) for p in rc.ports]
            )
            nursery.cancel_scope.cancel()
    return {"samples": samples, "censored": censored, "writes": len(acks.log)}


# ------------------------------------------------------------------------ etcd


async def _etcd_writer(endpoints: list[str], w: int, acks: Acks) -> None:
    from benchmarks._etcd import AsyncEtcdClient, EtcdError

    clients = [AsyncEtcdClient(e, timeout=ATTEMPT_TIMEOUT) for e in endpoints]
    node = w % len(clients)
    seq = 0
    try:
        while True:
            seq += 1
            issued = trio.current_time()
            try:
                await clients[node].put(f"failover-{w}".encode(), str(seq).encode().ljust(100))
            except (EtcdError, OSError, trio.BrokenResourceError, trio.TooSlowError):
                acks.failures += 1
                node = (node + 1) % len(clients)
                await trio.sleep(0.01)
                continue
            acks.record(issued, trio.current_time())
    finally:
        for c in clients:
            with trio.CancelScope(shield=True):
                await c.aclose()


async def etcd_failover(work_dir: str, runs: int) -> dict[str, Any]:
    from benchmarks._etcd import AsyncEtcdClient, etcd_cluster, etcd_version

    acks = Acks()
    async with etcd_cluster(work_dir, nodes=3) as ec:

        async def recover(index: int) -> None:
            await ec.restart(index)
            await ec.wait_leader()

        def probe(endpoint: str) -> Callable[[], Awaitable[bool]]:
            async def attempt() -> bool:
                async with AsyncEtcdClient(endpoint, timeout=PROBE_TIMEOUT) as client:
                    await client.put(b"probe", b"p".ljust(100, b"."))
                return True

            return attempt

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(_etcd_writer, ec.endpoints, w, acks)
            samples, censored = await measure_runs(
                runs, acks, ec.wait_leader, ec.kill, recover, [probe(e) for e in ec.endpoints]
            )
            nursery.cancel_scope.cancel()
    return {
        "samples": samples,
        "censored": censored,
        "writes": len(acks.log),
        "version": etcd_version(),
    }


# ------------------------------------------------------------------------ run


async def run(opts: Options) -> dict[str, Any]:
    from benchmarks._etcd import etcd_binary

    runs = 2 if opts.smoke else max(10, opts.runs)
    notes: list[str] = []
    raw: dict[str, Any] = {}

    iris = await iris_failover(os.path.join(opts.work_dir, "iris"), runs)
    raw["iris"] = iris
    baselines: dict[str, dict[str, Any]] = {}
    hist: dict[str, list[float]] = {"Iris (cp)": iris["samples"]}

    try:
        pso = await raw_failover(os.path.join(opts.work_dir, "pysyncobj"), runs)
        raw["pysyncobj_defaults"] = pso
        baselines["PySyncObj defaults"] = summarize(pso["samples"])
        hist["PySyncObj defaults"] = pso["samples"]
    except Exception as exc:  # a baseline must not hide the Iris figure
        notes.append(f"PySyncObj baseline failed: {type(exc).__name__}: {exc}")

    if opts.baselines and etcd_binary() is not None:
        try:
            et = await etcd_failover(os.path.join(opts.work_dir, "etcd"), runs)
            raw["etcd"] = et
            baselines["etcd"] = summarize(et["samples"])
            hist[f"etcd {et['version']}".strip()] = et["samples"]
        except Exception as exc:
            notes.append(f"etcd baseline failed: {type(exc).__name__}: {exc}")
    elif opts.baselines:
        notes.append("etcd baseline skipped: etcd is not installed")

    value = summarize(iris["samples"])
    med = value["median"]
    for name, r in raw.items():
        if r.get("censored"):
            notes.append(
                f"{name}: {r['censored']} of {runs} runs had no write acknowledged within "
                f"{GIVE_UP:.0f} s; counted as {GIVE_UP:.0f} s"
            )
    notes.append(
        f"Measured from SIGKILL of the leader to the first acknowledgement of a write issued "
        f"after it; {WRITERS} writers write continuously, one write at a time each. {runs} runs "
        "per system, the killed process restarted and caught up between runs."
    )
    notes.append(
        f"Iris: 3 cores, cp, election timeout 0.15-0.3 s, heartbeat 0.03 s; writers are "
        f"iris_raft.open_client with a {IRIS_CALL_TIMEOUT:.1f} s per-call deadline (retries, "
        "leader following and backoff inside it are the client's own). Bound: noticing the "
        "dead leader (election timeout) + one election round + the client's and batcher's "
        "retry backoff (up to 0.5 s / 0.2 s steps)."
    )
    notes.append(
        "PySyncObj defaults: election timeout 0.4-1.4 s, append period 0.1 s, batched appends; "
        "etcd: heartbeat 100 ms, election 1000 ms. Baseline writers move to the next node "
        f"after an error or {ATTEMPT_TIMEOUT:.1f} s without an answer, and from the kill on a "
        f"fresh write goes to every node every {PROBE_INTERVAL * 1000:.0f} ms (favours the "
        "baselines: the figure is not rounded up by a client timeout)."
    )
    return {
        "figures": [
            figure(
                "leader kill -9 → first successful write",
                value,
                unit="s",
                target=f"≤ {TARGET_S} s (median)",
                met=None if med is None else med <= TARGET_S,
                baseline=baselines,
                note=f"{runs} runs, 3 cores, cp",
            )
        ],
        "series": {
            "failover_hist": series(
                "Leader kill -9 → first successful write",
                "seconds",
                "runs",
                kind="hist",
                values=hist,
            )
        },
        "notes": notes,
        "raw": raw,
    }
