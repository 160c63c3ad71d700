"""Driving ``benchmarks.wsload`` processes and echo servers from a trio benchmark.

:func:`open_load` starts load-generator processes (``python -m
benchmarks.wsload``), :func:`open_echo_server` a bare echo server; both kill
their processes on exit, whatever happens. :class:`LoadGroup` spreads
connections and offered load over its processes and merges their answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from benchmarks._common import child_env, percentile, python_cmd


def cpu_wait_seconds(pid: int) -> float:
    """Seconds the process's main thread has waited on a run queue (ready, but no CPU free)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _kill(proc: trio.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


class LoadProcess:
    """One ``wsload`` process: JSON commands on stdin, ``wsload {json}`` answers on stdout."""

    def __init__(self, proc: trio.Process, log_path: str) -> None:
        self.proc = proc
        self.log_path = log_path
        self._buf = b""
        self._lock = trio.Lock()
        self.pid = proc.pid

    async def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"wsload "):
                    return dict(json.loads(line[7:]))
            data = await self.proc.stdout.receive_some(1 << 20)
            if not data:
                raise RuntimeError(f"wsload {self.pid} exited; see {self.log_path}")
            self._buf += data

    async def call(self, cmd: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        async with self._lock:
            with trio.fail_after(timeout):
                await self.proc.stdin.send_all(json.dumps(cmd).encode() + b"\n")
                answer = await self._line()
        if "error" in answer:
            raise RuntimeError(f"wsload {self.pid}: {answer['error']}")
        return answer


@dataclass
class LoadGroup:
    """Several load processes used as one."""

    procs: list[LoadProcess]
    pids: list[int] = field(default_factory=list)

    async def each(
        self, cmds: Sequence[dict[str, Any] | None], timeout: float = 300.0
    ) -> list[dict[str, Any]]:
        """Send ``cmds[i]`` to process ``i`` (None: skip), concurrently; the answers in order."""
        out: list[dict[str, Any]] = [{} for _ in self.procs]

        async def one(i: int, cmd: dict[str, Any]) -> None:
            out[i] = await self.procs[i].call(cmd, timeout)

        async with trio.open_nursery() as n:
            for i, cmd in enumerate(cmds):
                if cmd is not None:
                    n.start_soon(one, i, cmd)
        return out

    async def all(self, cmd: dict[str, Any], timeout: float = 300.0) -> list[dict[str, Any]]:
        return await self.each([cmd] * len(self.procs), timeout)

    async def connect(
        self,
        url: str | Sequence[str],
        users: Sequence[str],
        *,
        role: str = "idle",
        peers: Sequence[str] | None = None,
        jtis: Sequence[str | None] | None = None,
        jwt_secret: str | None = None,
        concurrency: int = 64,
        split: Sequence[int] | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Open ``len(users)`` connections, spread over the processes (``split[i]`` of them to i).

        ``url`` may be one URL, or one per user. Pairs that must share a
        process (sender ``i`` and the recipient ``peers[i]``) are kept
        together when both calls use the same ``split``.
        """
        n = len(users)
        urls = [url] * n if isinstance(url, str) else list(url)
        split = list(split) if split is not None else _even(n, len(self.procs))
        cmds: list[dict[str, Any] | None] = []
        start = 0
        for count in split:
            part = slice(start, start + count)
            start += count
            if count == 0:
                cmds.append(None)
                continue
            by_url: dict[str, list[int]] = {}
            for k in range(part.start, part.stop):
                by_url.setdefault(urls[k], []).append(k)
            cmds.append(
                {
                    "cmd": "multi",
                    "parts": [
                        {
                            "cmd": "connect",
                            "url": u,
                            "role": role,
                            "users": [users[k] for k in idx],
                            "peers": [peers[k] for k in idx] if peers is not None else None,
                            "jtis": [jtis[k] for k in idx] if jtis is not None else None,
                            "jwt_secret": jwt_secret,
                            "concurrency": max(1, concurrency // len(self.procs)),
                        }
                        for u, idx in by_url.items()
                    ],
                }
            )
        answers = await self._multi(cmds, timeout)
        total = {"opened": 0, "failed": 0, "errors": {}, "seconds": 0.0, "open": 0}
        for parts in answers:
            for a in parts:
                total["opened"] += a["opened"]
                total["failed"] += a["failed"]
                total["errors"].update(a["errors"])
                total["seconds"] = max(total["seconds"], a["seconds"])
            if parts:
                total["open"] += parts[-1]["open"]
        return total

    async def _multi(
        self, cmds: Sequence[dict[str, Any] | None], timeout: float
    ) -> list[list[dict[str, Any]]]:
        out: list[list[dict[str, Any]]] = [[] for _ in self.procs]

        async def one(i: int, cmd: dict[str, Any]) -> None:
            for part in cmd["parts"]:
                out[i].append(await self.procs[i].call(part, timeout))

        async with trio.open_nursery() as n:
            for i, cmd in enumerate(cmds):
                if cmd is not None:
                    n.start_soon(one, i, cmd)
        return out

    async def load(
        self,
        kind: str,
        *,
        duration: float,
        warmup: float = 0.5,
        window: int = 1,
        rate: float | None = None,
        drain: float = 3.0,
    ) -> dict[str, Any]:
        """Run one load on every process at once (the offered ``rate`` split evenly); merged."""
        share = None if rate is None else rate / len(self.procs)
        cmd = {
            "cmd": "load",
            "kind": kind,
            "duration": duration,
            "warmup": warmup,
            "window": window,
            "rate": share,
            "drain": drain,
        }
        answers = await self.all(cmd, timeout=warmup + duration + drain + 60)
        return merge_loads(answers, rate)

    async def closes(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        for a in await self.all({"cmd": "closes"}):
            out.extend(a["closes"])
        return out

    async def open_count(self) -> int:
        return sum(a["open"] for a in await self.all({"cmd": "status"}))

    async def close(self, timeout: float = 20.0) -> int:
        answers = await self.all({"cmd": "close", "timeout": timeout}, timeout=timeout + 30)
        return sum(a["open"] for a in answers)


def _even(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(samples_ms),
        "p50": percentile(samples_ms, 50),
        "p90": percentile(samples_ms, 90),
        "p99": percentile(samples_ms, 99),
        "max": max(samples_ms) if samples_ms else float("nan"),
    }


def merge_loads(answers: Sequence[dict[str, Any]], rate: float | None) -> dict[str, Any]:
    """Sum the counts of several processes' answers to one load; pool their latency samples."""
    lat: list[float] = []
    dlat: list[float] = []
    errors: dict[str, int] = {}
    for a in answers:
        lat.extend(a["lat"])
        dlat.extend(a["dlat"])
        for k, v in a["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "kind": answers[0]["kind"],
        "offered_per_s": rate,
        "connections": sum(a["connections"] for a in answers),
        "per_s": sum(a["per_s"] for a in answers),
        "delivered_per_s": sum(a["delivered_per_s"] for a in answers),
        "sent": sum(a["sent"] for a in answers),
        "errors": errors,
        "outstanding_after_drain": sum(a["outstanding_after_drain"] for a in answers),
        "undelivered_after_drain": sum(a["undelivered_after_drain"] for a in answers),
        "client_cpu_share": [round(a["cpu_share"], 3) for a in answers],
        "lat_ms": latency_summary(lat),
        "dlat_ms": latency_summary(dlat),
    }


async def _spawn(argv: list[str], log_path: str, **kwargs: Any) -> trio.Process:
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed below
    try:
        return await trio.lowlevel.open_process(
            argv, stderr=log, env=child_env(), start_new_session=True, **kwargs
        )
    finally:
        log.close()


@contextlib.asynccontextmanager
async def open_load(work_dir: str, count: int, name: str = "wsload") -> AsyncIterator[LoadGroup]:
    """``count`` load-generator processes; killed on exit."""
    procs: list[trio.Process] = []
    try:
        group = LoadGroup([])
        for i in range(count):
            log_path = os.path.join(work_dir, f"{name}-{i}.log")
            proc = await _spawn(
                python_cmd("benchmarks.wsload"),
                log_path,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            procs.append(proc)
            lp = LoadProcess(proc, log_path)
            with trio.fail_after(30):
                hello = await lp._line()
            group.procs.append(lp)
            group.pids.append(int(hello["pid"]))
        yield group
    finally:
        for proc in procs:
            _kill(proc)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            for proc in procs:
                await proc.wait()


@dataclass
class EchoServer:
    pid: int
    port: int
    impl: str

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"


@contextlib.asynccontextmanager
async def open_echo_server(work_dir: str, impl: str = "trio") -> AsyncIterator[EchoServer]:
    """A bare echo server process (``benchmarks.echo_server``); killed on exit."""
    log_path = os.path.join(work_dir, f"echo-{impl}.log")
    proc = await _spawn(
        python_cmd("benchmarks.echo_server", "--impl", impl), log_path, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(30):
            while b"echo ready " not in buf:
                data = await proc.stdout.receive_some(65536)
                if not data:
                    raise RuntimeError(f"echo server exited; see {log_path}")
                buf += data
        line = buf.split(b"echo ready ", 1)[1].split(b"\n", 1)[0]
        info = json.loads(line)
        yield EchoServer(int(info["pid"]), int(info["port"]), str(info["impl"]))
    finally:
        _kill(proc)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
