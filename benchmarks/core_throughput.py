"""Core commit throughput, 3 cores, ``cp``: Iris vs raw PySyncObj vs etcd.

Theory of operation
-------------------
Each system runs as real processes on 127.0.0.1 and is loaded by separate
load-generator processes (:mod:`benchmarks.coreload`) that store 100-byte
messages with many requests outstanding, counting acknowledgements in a
common window (see that module):

* Iris: three ``iris core`` processes in ``cp`` mode started by
  :func:`jepsen_like.cluster.open_cluster`; an acknowledged send is committed
  by a majority, fsynced and applied. The generator uses
  :func:`iris_raft.open_client`.
* raw PySyncObj: :mod:`benchmarks.raw_pysyncobj`, one ``@replicated`` call
  per message, with Iris's PySyncObj settings (no fsync: less durable).
* etcd 3.4: :mod:`benchmarks._etcd`, one put per message through the JSON
  gateway; etcd fsyncs its WAL before it answers.

For each system a short sweep over the offered concurrency comes first (it
is also the ``core_throughput_concurrency`` plot); the figure is then the
median of ``opts.runs`` runs of ``opts.duration`` seconds at the
concurrency that did best. CPU time of every process in the window is
recorded, since on a small machine the generator and the three replicas
share the same cores. Two checks bound the generator: the same client
against a core that answers without replicating (``null-core``), and the
best point again split over two generator processes.

Finally the Iris cluster keeps being filled while throughput and core RSS
are sampled against the number of stored messages (toward 1M, within a
time budget): the growth curves.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from benchmarks._common import (
    Options,
    child_env,
    cpu_seconds,
    figure,
    python_cmd,
    rss_kib,
    series,
    summarize,
)

TARGET_RATE = 50_000
TARGET_VS_RAW = 10.0
TARGET_VS_ETCD = 5.0
BODY = 100
#: Offered concurrency (requests outstanding) of the sweep.
SWEEP = (1, 16, 64, 256, 1024)
SMOKE_SWEEP = (64, 512)
#: Stored messages the growth curve aims for, and its time budget (s).
GROWTH_TARGET = 1_000_000
GROWTH_BUDGET = 150.0
SMOKE_GROWTH_BUDGET = 3.0

_LEN = struct.Struct(">I")

#: What the profile showed and what was changed (measured while writing this module).
PROFILE_NOTES = (
    "Profile (py-spy of a loaded leader, strace, in-process microbenchmarks), first round: per "
    "message the leader's CPU went to trio bookkeeping around each RPC request (a task per "
    "request ~15 µs, a cancel scope ~6 µs, each event wake-up ~4 µs), the RPC codec (CBOR + "
    "AES-GCM ~6 µs both ways), node.send checks and the batcher (~10 µs), apply (~7 µs per "
    "message, on every replica) and PySyncObj's pickle + zlib + Fernet per follower (~3 µs per "
    "message per follower). Fsync is per Raft entry (group commit: one entry carries every "
    "message queued), not per message.",
    "Fixed from it: the RPC writer sends everything answered in one scheduler pass in one "
    "write; a request takes a free concurrency slot without yielding; a call on an open client "
    "connection skips the connection lock; and the client coalesces concurrent sends into one "
    "send_batch call (up to 500 sends, 4 calls in flight per connection), so the per-request "
    "costs above are paid per batch (leader 140 -> 57 µs per message). Apply is ~8 µs per "
    "message with the packed state tables. Durability is untouched: a send is still answered "
    "only after its entry is committed by a majority, fsynced and applied.",
    "Why 50,000/s is out of reach on this machine: it needs at most 40 µs of CPU per message "
    "summed over the leader, two followers and the client when they share 2 cores; apply alone "
    "is ~8 µs on each of the three replicas, the client ~27 µs (its ceiling against a null "
    "core is ~31,000/s), before any Raft, fsync or RPC work. The design's way up is many Raft "
    "groups sharded by recipient (docs/design.md), not measured here.",
)


# -------------------------------------------------------------- generators


def _load_args(
    target: str, concurrency: int, gen: int, *, connections: bool = True, body: bool = True
) -> list[str]:
    """``benchmarks.coreload TARGET`` with the options every system shares."""
    args = ["benchmarks.coreload", target, "--concurrency", str(concurrency), "--gen-id", str(gen)]
    if connections:
        args += ["--connections", str(min(4, concurrency))]
    if body:
        args += ["--body", str(BODY)]
    return args


@dataclass
class Load:
    """The combined result of the generator processes of one run."""

    rate: float
    concurrency: int
    procs: int
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    generator_cpu: float
    server_cpu: list[float] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rate": round(self.rate, 1),
            "concurrency": self.concurrency,
            "procs": self.procs,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "generator_cpu": round(self.generator_cpu, 3),
            "server_cpu": [round(c, 3) for c in self.server_cpu],
        }


async def _read_lines(stream: trio.abc.ReceiveStream, on_line: Callable[[str], None]) -> None:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            on_line(line.decode(errors="replace").strip())
    if buf.strip():
        on_line(buf.decode(errors="replace").strip())


async def run_generators(
    argvs: Sequence[list[str]],
    *,
    duration: float,
    warmup: float,
    log_path: str,
    server_pids: Sequence[int] = (),
    on_progress: Callable[[float, int], None] | None = None,
    timeout: float | None = None,
) -> Load:
    """Run one generator process per argv (each with ``--sync``), aligned on one window.

    Waits until every generator is connected, starts the window ``warmup``
    seconds later, and measures the CPU time of ``server_pids`` in it.
    Raises RuntimeError naming the log when a generator fails.
    """
    procs: list[trio.Process] = []
    ready = [trio.Event() for _ in argvs]
    results: list[dict[str, Any] | None] = [None] * len(argvs)
    deadline = timeout if timeout is not None else duration + warmup + 90.0
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally, shared by the children
    try:
        async with trio.open_nursery() as nursery:
            for i, argv in enumerate(argvs):
                proc = await trio.lowlevel.open_process(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=child_env(),
                    start_new_session=True,
                )
                procs.append(proc)

                def on_line(line: str, i: int = i) -> None:
                    if line == "ready":
                        ready[i].set()
                    elif line.startswith("{"):
                        data = json.loads(line)
                        if "rate" in data:
                            results[i] = data
                        elif on_progress is not None and "ops" in data:
                            on_progress(float(data["t"]), int(data["ops"]))

                assert proc.stdout is not None
                nursery.start_soon(_read_lines, proc.stdout, on_line)
            with trio.fail_after(deadline):
                for i, event in enumerate(ready):
                    while not event.is_set():
                        if procs[i].returncode is not None:
                            raise RuntimeError(f"load generator exited early; see {log_path}")
                        with trio.move_on_after(0.2):
                            await event.wait()
                start = time.time() + warmup
                for proc in procs:
                    assert proc.stdin is not None
                    await proc.stdin.send_all(f"{start}\n".encode())
                await trio.sleep(max(0.0, start - time.time()))
                cpu0 = [cpu_seconds(pid) for pid in server_pids]
                # The window ends after ``duration``, or earlier when every
                # generator stopped (``--total`` reached).
                with trio.move_on_after(max(0.0, start + duration - time.time())):
                    for proc in procs:
                        await proc.wait()
                cpu1 = [cpu_seconds(pid) for pid in server_pids]
                for proc in procs:
                    await proc.wait()
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await proc.wait()
        log.close()
    done = [r for r in results if r is not None]
    if len(done) != len(argvs):
        raise RuntimeError(f"a load generator gave no result; see {log_path}")
    p50s = [r["p50_ms"] for r in done if r.get("p50_ms") is not None]
    p99s = [r["p99_ms"] for r in done if r.get("p99_ms") is not None]
    return Load(
        rate=sum(r["rate"] for r in done),
        concurrency=sum(r["concurrency"] for r in done),
        procs=len(done),
        p50_ms=max(p50s) if p50s else None,
        p99_ms=max(p99s) if p99s else None,
        errors=sum(r["errors"] for r in done),
        generator_cpu=sum(r.get("cpu_share") or 0.0 for r in done),
        server_cpu=[(b - a) / duration for a, b in zip(cpu0, cpu1, strict=True)],
        raw=done,
    )


def _split(total: int, parts: int) -> list[int]:
    base = [total // parts] * parts
    for i in range(total % parts):
        base[i] += 1
    return base


@dataclass
class System:
    """How to load one system: its generator command and its server processes."""

    name: str
    argv: Callable[[int, int], list[str]]  # (concurrency, generator index) -> argv
    pids: Callable[[], list[int]]
    log_path: str

    async def load(
        self,
        concurrency: int,
        duration: float,
        *,
        procs: int = 1,
        warmup: float = 0.5,
        extra: Sequence[str] = (),
        on_progress: Callable[[float, int], None] | None = None,
        timeout: float | None = None,
    ) -> Load:
        argvs = [
            [*self.argv(c, g), "--duration", str(duration), "--sync", *extra]
            for g, c in enumerate(_split(concurrency, procs))
        ]
        return await run_generators(
            argvs,
            duration=duration,
            warmup=warmup,
            log_path=self.log_path,
            server_pids=self.pids(),
            on_progress=on_progress,
            timeout=timeout,
        )


@dataclass
class Measured:
    name: str
    sweep: list[Load] = field(default_factory=list)
    runs: list[Load] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    skipped: str = ""
    #: Index of the leader among the server processes (None: unknown).
    leader: int | None = None
    #: Cores busy per server process with no load.
    idle_cpu: list[float] = field(default_factory=list)

    @property
    def best_concurrency(self) -> int:
        return max(self.sweep, key=lambda x: x.rate).concurrency

    def summary(self) -> dict[str, Any]:
        return summarize([r.rate for r in self.runs])

    def median(self) -> float | None:
        value = self.summary()["median"]
        return None if value is None else float(value)

    def describe(self) -> dict[str, Any]:
        return {
            "sweep": [x.as_dict() for x in self.sweep],
            "runs": [x.as_dict() for x in self.runs],
            "rss_kib": self.rss_kib,
            "skipped": self.skipped,
            "leader": self.leader,
            "cpu_per_message_us": self.cpu_per_message_us(),
            "idle_cpu": [round(c, 3) for c in self.idle_cpu],
        }

    def cpu_text(self) -> str:
        """CPU per message and cores busy, per process, medians over the runs."""
        if not self.runs:
            return ""
        rate = statistics.median(r.rate for r in self.runs) or 1.0
        server = [
            statistics.median(col) for col in zip(*(r.server_cpu for r in self.runs), strict=True)
        ]
        gen = statistics.median(r.generator_cpu for r in self.runs)
        parts = []
        for i, cores in enumerate(server):
            role = (
                "leader" if i == self.leader else "follower" if self.leader is not None else "node"
            )
            parts.append(f"{role} {cores / rate * 1e6:.0f} µs ({cores:.2f} cores)")
        parts.append(f"generator {gen / rate * 1e6:.0f} µs ({gen:.2f} cores)")
        total = sum(server) + gen
        return (
            f"CPU per message: {', '.join(parts)}; "
            f"{total / rate * 1e6:.0f} µs in all, {total:.2f} of {os.cpu_count()} cores busy"
        )

    def total_cpu_us(self) -> dict[str, Any]:
        """CPU per message summed over every process (servers and generator), per run."""
        return summarize(
            [(sum(r.server_cpu) + r.generator_cpu) / r.rate * 1e6 for r in self.runs if r.rate]
        )

    def cpu_per_message_us(self) -> dict[str, float]:
        if not self.runs:
            return {}
        rate = statistics.median(r.rate for r in self.runs) or 1.0
        out: dict[str, float] = {}
        for i, col in enumerate(zip(*(r.server_cpu for r in self.runs), strict=True)):
            out[f"server{i}{'_leader' if i == self.leader else ''}"] = round(
                statistics.median(col) / rate * 1e6, 1
            )
        out["generator"] = round(
            statistics.median(r.generator_cpu for r in self.runs) / rate * 1e6, 1
        )
        return out


async def measure(system: System, opts: Options, sweep: Sequence[int]) -> Measured:
    """The concurrency sweep, then ``opts.runs`` runs at the best point."""
    out = Measured(system.name)
    sweep_duration = opts.scaled(2.0, min(1.0, opts.duration))
    for conc in sweep:
        out.sweep.append(await system.load(conc, sweep_duration))
    best = out.best_concurrency
    for _ in range(opts.runs):
        out.runs.append(await system.load(best, opts.duration))
    out.rss_kib = [rss_kib(pid) for pid in system.pids()]
    return out


# ------------------------------------------------------------------- Iris


def _iris_system(cluster: Any, log_path: str) -> System:
    cores = ",".join(cluster.rpc_addresses)

    def argv(concurrency: int, gen: int) -> list[str]:
        return python_cmd(
            *_load_args("iris", concurrency, gen), "--cores", cores, "--secret", cluster.secret
        )

    def pids() -> list[int]:
        return [c.process.pid for c in cluster.cores if c.process is not None]

    return System("iris", argv, pids, log_path)


@contextlib.asynccontextmanager
async def _null_core(secret: str, log_path: str) -> AsyncIterator[tuple[str, int]]:
    """A ``coreload null-core`` process; yields its address and pid."""
    with open(log_path, "ab") as log:
        proc = await trio.lowlevel.open_process(
            python_cmd("benchmarks.coreload", "null-core", "--secret", secret),
            stdout=subprocess.PIPE,
            stderr=log,
            env=child_env(),
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        with trio.fail_after(30):
            buf = b""
            while b"\n" not in buf:
                data = await proc.stdout.receive_some(4096)
                if not data:
                    raise RuntimeError(f"null core exited; see {log_path}")
                buf += data
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"null core said {line!r}")
        yield line.split()[1], proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await proc.wait()


async def _generator_ceiling(opts: Options, work: str, concurrency: int) -> Load:
    from jepsen_like.cluster import SECRET

    log_path = os.path.join(work, "null-core.log")
    async with _null_core(SECRET, log_path) as (address, pid):

        def argv(conc: int, gen: int) -> list[str]:
            return python_cmd(
                *_load_args("iris", conc, gen, body=False), "--cores", address, "--secret", SECRET
            )

        system = System("null-core", argv, lambda: [pid], log_path)
        return await system.load(concurrency, opts.duration)


@dataclass
class Growth:
    stored: list[int] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    rss_leader_kib: list[int] = field(default_factory=list)
    rss_follower_kib: list[int] = field(default_factory=list)


async def _growth(
    opts: Options, cluster: Any, system: System, leader: int, concurrency: int
) -> Growth:
    """Keep storing messages; sample rate and core RSS against the stored count."""
    statuses = await cluster.statuses()
    st = statuses[leader] or next(s for s in statuses if s is not None)
    base = int(st["state"]["messages"])
    budget = opts.scaled(GROWTH_BUDGET, SMOKE_GROWTH_BUDGET)
    total = max(0, GROWTH_TARGET - base)
    growth = Growth()
    pids = system.pids()
    leader_pid = pids[leader]
    follower_pids = [p for i, p in enumerate(pids) if i != leader]
    last: list[tuple[float, int]] = []

    def on_progress(t: float, ops: int) -> None:
        if last:
            t0, ops0 = last[-1]
            if t > t0:
                growth.stored.append(base + ops)
                growth.rate.append((ops - ops0) / (t - t0))
                growth.rss_leader_kib.append(rss_kib(leader_pid))
                growth.rss_follower_kib.append(max(rss_kib(p) for p in follower_pids))
        last.append((t, ops))

    if total > 0:
        await system.load(
            concurrency,
            budget,
            warmup=0.0,
            extra=("--progress", str(opts.scaled(2.0, 0.5)), "--total", str(total)),
            on_progress=on_progress,
            timeout=budget + 120,
        )
    return growth


async def _measure_iris(opts: Options, work: str) -> tuple[Measured, Growth, Load | None, int]:
    from jepsen_like.cluster import open_cluster

    sweep = SMOKE_SWEEP if opts.smoke else SWEEP
    base = os.path.join(work, "iris")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base, exist_ok=True)
    async with open_cluster(base, nodes=3, mode="cp") as cluster:
        leader = await cluster.wait_leader()
        system = _iris_system(cluster, os.path.join(work, "iris-generators.log"))
        # The fixed cost of an idle core (Raft tick every 5 ms, heartbeats, guard).
        idle_s = opts.scaled(3.0, 1.0)
        await trio.sleep(0.5)
        cpu0 = [cpu_seconds(pid) for pid in system.pids()]
        await trio.sleep(idle_s)
        idle = [(cpu_seconds(pid) - c) / idle_s for pid, c in zip(system.pids(), cpu0, strict=True)]
        measured = await measure(system, opts, sweep)
        measured.leader = leader
        measured.idle_cpu = idle
        best = measured.best_concurrency
        two = await system.load(best, opts.duration, procs=2) if not opts.smoke else None
        growth = await _growth(opts, cluster, system, leader, best)
        measured.rss_kib = [rss_kib(pid) for pid in system.pids()]
    return measured, growth, two, leader


# ---------------------------------------------------------- raw PySyncObj


def _raw_status(port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(_LEN.pack(1) + b"?")
            buf = b""
            while len(buf) < 4 or len(buf) < 4 + _LEN.unpack_from(buf)[0]:
                data = s.recv(65536)
                if not data:
                    return None
                buf += data
        result: dict[str, Any] = json.loads(buf[4:])
        return result
    except (OSError, ValueError):
        return None


@dataclass
class RawCluster:
    raft: list[str]
    ports: list[int]
    procs: list[trio.Process]

    def leader(self) -> int | None:
        for i, port in enumerate(self.ports):
            st = _raw_status(port)
            if st is not None and st.get("is_leader"):
                return i
        return None


@contextlib.asynccontextmanager
async def raw_cluster(work: str, nodes: int = 3, *extra: str) -> AsyncIterator[RawCluster]:
    """``nodes`` raw PySyncObj processes; waits for a leader; SIGKILLs them on exit."""
    from jepsen_like.cluster import SECRET, allocate_ports

    ports = allocate_ports(2 * nodes)
    raft = [f"127.0.0.1:{p}" for p in ports[:nodes]]
    cluster = RawCluster(raft, ports[nodes:], [])
    os.makedirs(work, exist_ok=True)
    try:
        for i in range(nodes):
            argv = python_cmd(
                "benchmarks.raw_pysyncobj",
                "--self",
                raft[i],
                "--partners",
                ",".join(r for r in raft if r != raft[i]),
                "--port",
                str(cluster.ports[i]),
                "--data-dir",
                os.path.join(work, f"node-{i}"),
                "--password",
                SECRET,
                *extra,
            )
            with open(os.path.join(work, f"node-{i}.log"), "ab") as log:
                cluster.procs.append(
                    await trio.lowlevel.open_process(
                        argv,
                        stdout=log,
                        stderr=log,
                        env=child_env(),
                        start_new_session=True,
                    )
                )
        with trio.fail_after(30):
            while await trio.to_thread.run_sync(cluster.leader) is None:
                for i, proc in enumerate(cluster.procs):
                    if proc.returncode is not None:
                        raise RuntimeError(f"raw PySyncObj node {i} exited; see {work}")
                await trio.sleep(0.1)
        yield cluster
    finally:
        for proc in cluster.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in cluster.procs:
            with trio.CancelScope(shield=True):
                await proc.wait()


async def _measure_raw(opts: Options, work: str) -> Measured:
    sweep = SMOKE_SWEEP if opts.smoke else SWEEP
    base = os.path.join(work, "raw")
    shutil.rmtree(base, ignore_errors=True)
    async with raw_cluster(base) as cluster:
        leader = cluster.leader()
        assert leader is not None
        endpoint = f"127.0.0.1:{cluster.ports[leader]}"

        def argv(concurrency: int, gen: int) -> list[str]:
            return python_cmd(*_load_args("raw", concurrency, gen), "--endpoints", endpoint)

        system = System(
            "raw PySyncObj",
            argv,
            lambda: [p.pid for p in cluster.procs],
            os.path.join(work, "raw-generators.log"),
        )
        measured = await measure(system, opts, sweep)
        measured.leader = leader
        return measured


# ------------------------------------------------------------------- etcd


async def _measure_etcd(opts: Options, work: str) -> Measured:
    from benchmarks._etcd import etcd_binary, etcd_cluster

    if not opts.baselines:
        return Measured("etcd", skipped="baselines disabled (--no-baselines)")
    if etcd_binary() is None:
        return Measured("etcd", skipped="etcd not installed (apt-get install etcd-server)")
    sweep = SMOKE_SWEEP if opts.smoke else SWEEP
    base = os.path.join(work, "etcd")
    shutil.rmtree(base, ignore_errors=True)
    async with etcd_cluster(base, 3) as cluster:
        leader = await cluster.wait_leader()
        endpoint = cluster.endpoints[leader]

        def argv(concurrency: int, gen: int) -> list[str]:
            return python_cmd(
                *_load_args("etcd", concurrency, gen, connections=False), "--endpoints", endpoint
            )

        def pids() -> list[int]:
            return [p.pid for p in cluster.procs if p is not None]

        system = System("etcd", argv, pids, os.path.join(work, "etcd-generators.log"))
        measured = await measure(system, opts, sweep)
        measured.leader = leader
        return measured


# ------------------------------------------------------------------ report


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def _us(cores: float, rate: float) -> str:
    return f"{cores / rate * 1e6:.0f}" if rate else "n/a"


def _fmt(value: float | None, unit: str = "/s") -> str:
    return "n/a" if value is None else f"{value:,.0f}{unit}"


async def _baseline(
    measure_fn: Callable[[Options, str], Awaitable[Measured]],
    name: str,
    opts: Options,
    work: str,
    notes: list[str],
) -> Measured:
    """Measure a baseline; a failure is reported in the notes instead of losing Iris's figure."""
    try:
        return await measure_fn(opts, work)
    except Exception as exc:
        notes.append(f"{name} baseline FAILED: {type(exc).__name__}: {exc}")
        return Measured(name, skipped=f"failed: {type(exc).__name__}: {exc}")


async def run(opts: Options) -> dict[str, Any]:
    from benchmarks._etcd import etcd_version

    work = os.path.abspath(opts.work_dir)
    os.makedirs(work, exist_ok=True)
    notes: list[str] = []

    iris, growth, two, _leader = await _measure_iris(opts, work)
    best = iris.best_concurrency
    ceiling = await _generator_ceiling(opts, work, best)
    raw = await _baseline(_measure_raw, "raw PySyncObj", opts, work, notes)
    etcd = await _baseline(_measure_etcd, "etcd", opts, work, notes)

    iris_med = iris.median()
    raw_med = raw.median()
    etcd_med = etcd.median()
    vs_raw = _ratio(iris_med, raw_med)
    vs_etcd = _ratio(iris_med, etcd_med)
    best_run = max(iris.runs, key=lambda r: r.rate)
    baseline: dict[str, Any] = {"raw PySyncObj": raw.summary()}
    if not etcd.skipped:
        baseline[f"etcd {etcd_version() or '3.4'}"] = etcd.summary()

    figures = [
        figure(
            "core commit throughput (3 cores, cp)",
            iris.summary(),
            unit="messages/s",
            target=f"≥ {TARGET_RATE:,}/s",
            met=None if iris_med is None else iris_med >= TARGET_RATE,
            baseline=baseline,
            note=(
                f"{BODY}-byte messages, {best} in flight; p50 {best_run.p50_ms} ms, "
                f"p99 {best_run.p99_ms} ms"
            ),
        ),
        figure(
            "core throughput vs raw PySyncObj",
            vs_raw,
            unit="x",
            target=f"≥ {TARGET_VS_RAW:g}x",
            met=None if vs_raw is None else vs_raw >= TARGET_VS_RAW,
            note=f"raw PySyncObj best at {raw.best_concurrency if raw.sweep else '-'} in flight",
        ),
        figure(
            "core throughput vs etcd",
            vs_etcd,
            unit="x",
            target=f"≥ {TARGET_VS_ETCD:g}x",
            met=None if vs_etcd is None else vs_etcd >= TARGET_VS_ETCD,
            note=etcd.skipped or f"etcd best at {etcd.best_concurrency} connections (JSON gateway)",
        ),
        figure(
            "CPU per committed message, all processes (3 nodes + generator)",
            iris.total_cpu_us(),
            unit="µs",
            baseline={
                name: m.total_cpu_us()
                for name, m in (("raw PySyncObj", raw), ("etcd", etcd))
                if m.runs
            },
            note="lower is better; least disturbed by other load on the machine",
        ),
        figure(
            "load generator ceiling (Iris client vs a null core)",
            ceiling.rate,
            unit="messages/s",
            note=(
                f"{best} in flight; per message: client {_us(ceiling.generator_cpu, ceiling.rate)} µs, "
                f"null core {_us(sum(ceiling.server_cpu), ceiling.rate)} µs"
            ),
        ),
    ]
    if growth.rate:
        k = max(1, len(growth.rate) // 5)
        first = statistics.median(growth.rate[:k])
        last = statistics.median(growth.rate[-k:])
        figures.append(
            figure(
                f"core throughput at {growth.stored[-1]:,} stored messages",
                summarize(growth.rate[-k:]),
                unit="messages/s",
                target="no cliff",
                met=last >= 0.5 * first,
                note=(
                    f"{last / first:.2f}x the rate at {growth.stored[0]:,} stored; core RSS "
                    f"{growth.rss_leader_kib[0] / 1024:.0f} → "
                    f"{growth.rss_leader_kib[-1] / 1024:.0f} MiB"
                ),
            )
        )

    # What bounds the figures.
    notes.append(
        f"Iris: {_fmt(iris_med)} at {best} in flight; {iris.cpu_text()}. Every process "
        f"(3 cores + generator) shares {os.cpu_count()} CPUs, so the figure is bounded by "
        "the CPU cost per message summed over the leader, two followers and the client."
        + (
            f" Idle, each core process keeps {statistics.mean(iris.idle_cpu):.2f} of a CPU "
            "busy (Raft tick every 5 ms, heartbeats, partition guard), included above."
            if iris.idle_cpu
            else ""
        )
    )
    notes.append(
        f"Generator ceiling: the same client against a null core (Iris's RPC server "
        f"answering at once) reaches {_fmt(ceiling.rate)}; the client uses "
        f"{_us(ceiling.generator_cpu, ceiling.rate)} µs and the RPC server "
        f"{_us(sum(ceiling.server_cpu), ceiling.rate)} µs of CPU per message"
        + (
            f"; splitting the best point over two generator processes gave {_fmt(two.rate)} "
            f"(one process: {_fmt(iris_med)})"
            if two is not None
            else ""
        )
        + "."
    )
    notes.append(
        f"raw PySyncObj: {_fmt(raw_med)}; {raw.cpu_text()}. One replicated call per message "
        "(no group commit), Iris's PySyncObj settings; its journal never fsyncs (less durable "
        "than Iris or etcd)."
    )
    if etcd.skipped:
        notes.append(f"etcd baseline skipped: {etcd.skipped}.")
    else:
        notes.append(
            f"etcd: {_fmt(etcd_med)}; {etcd.cpu_text()}. Driven through the JSON gateway "
            "(HTTP/1.1 keep-alive, one request per connection at a time), which costs etcd "
            "more CPU than native gRPC."
        )
    load = os.getloadavg()
    notes.append(
        f"Machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end of the run; "
        "CPU per message is the figure least disturbed by other work on the machine."
    )
    notes.extend(PROFILE_NOTES)
    if growth.rate:
        notes.append(
            f"Growth: {len(growth.rate)} samples from {growth.stored[0]:,} to "
            f"{growth.stored[-1]:,} stored messages (target {GROWTH_TARGET:,} within "
            f"{opts.scaled(GROWTH_BUDGET, SMOKE_GROWTH_BUDGET):g} s)."
        )

    lines = {
        m.name: [(float(x.concurrency), x.rate) for x in m.sweep]
        for m in (iris, raw, etcd)
        if m.sweep
    }
    result_series = {
        "core_throughput_concurrency": series(
            "Commit throughput vs offered concurrency (3 nodes, 100-byte messages)",
            "requests in flight",
            "messages/s",
            lines,
            logx=True,
        )
    }
    if growth.rate:
        result_series["core_throughput_growth"] = series(
            "Iris core throughput as stored messages grow",
            "stored messages",
            "messages/s",
            {"iris (cp, 3 cores)": list(zip(map(float, growth.stored), growth.rate, strict=True))},
            logx=True,
        )
        result_series["core_rss_growth"] = series(
            "Iris core RSS as stored messages grow",
            "stored messages",
            "RSS (MiB)",
            {
                "leader": [
                    (float(s), r / 1024)
                    for s, r in zip(growth.stored, growth.rss_leader_kib, strict=True)
                ],
                "follower (max)": [
                    (float(s), r / 1024)
                    for s, r in zip(growth.stored, growth.rss_follower_kib, strict=True)
                ],
            },
            logx=True,
        )
    return {
        "figures": figures,
        "series": result_series,
        "notes": notes,
        "raw": {
            "iris": iris.describe(),
            "raw_pysyncobj": raw.describe(),
            "etcd": etcd.describe(),
            "generator_ceiling": ceiling.as_dict(),
            "two_generators": two.as_dict() if two is not None else None,
            "growth": growth.__dict__,
        },
    }
