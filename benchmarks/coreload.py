"""Load generator for the core throughput benchmark; prints one JSON line.

    python -m benchmarks.coreload iris --cores H:P,H:P --secret S --duration 5 ...
    python -m benchmarks.coreload etcd --endpoints http://H:P --duration 5 ...
    python -m benchmarks.coreload raw  --endpoints H:P --duration 5 ...
    python -m benchmarks.coreload null-core --secret S     # the generator's ceiling

Theory of operation
-------------------
Every target gets the same work: store ``--body`` byte messages as fast as the
system acknowledges them, with ``--concurrency`` requests outstanding at all
times. With ``--sync`` the generator connects, prints ``ready``, and reads
the start of the measurement window (epoch seconds) from stdin, so several
generator processes measure the same window and their rates add up; the load
starts at once (what comes before the window is warm-up). Only requests that
complete inside ``[start, start + --duration]`` count. It reports its own
CPU time in that window, so a reader can see whether the generator was the
bottleneck. ``--progress S`` prints ``{"t", "ops"}`` lines every S seconds
and ``--total N`` stops after N acknowledged requests (the growth curve).

* ``iris``: :func:`iris_raft.open_client` (the real client: handshake,
  AES-GCM frames, retries, leader following), ``--connections`` clients,
  each with its share of the concurrent tasks calling ``client.send``.
  Sender ids and client ids are unique per process, recipients rotate over
  ``--recipients`` inboxes (each inbox holds at most 10,000 messages).
* ``etcd``: ``PUT`` through the JSON gateway over ``--concurrency``
  keep-alive connections (Go's server answers one request per connection at
  a time), driven by one ``selectors`` loop with prepared request bytes.
* ``raw``: the length-prefixed protocol of :mod:`benchmarks.raw_pysyncobj`,
  ``--concurrency`` requests pipelined over ``--connections`` connections,
  same ``selectors`` loop.
* ``null-core``: an RPC server speaking Iris's protocol (same handshake and
  cipher) that answers ``send`` and ``send_batch`` at once without
  replicating anything. Load against it measures the generator plus the RPC
  layer alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time
from collections import deque
from typing import Any

_LEN = struct.Struct(">I")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Window:
    """Counts completions inside [start, end] and keeps their latencies.

    With ``progress`` > 0 it also prints ``{"t", "ops"}`` lines (every
    acknowledged op since the load began) every ``progress`` seconds, and
    ``total`` > 0 ends the load once that many ops were acknowledged.
    """

    def __init__(self, duration: float, progress: float = 0.0, total: int = 0) -> None:
        self.duration = duration
        self.start = float("inf")
        self.end = float("inf")
        self.stop_at = float("inf")
        self.progress = progress
        self.total = total
        self.all_ops = 0
        self._next_progress = 0.0
        self.ops = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def begin(self, start: float) -> None:
        self.start = start
        self.end = start + self.duration
        self.stop_at = self.end + 0.05
        self._next_progress = time.time() + self.progress

    def finished(self, now: float) -> bool:
        return now >= self.stop_at or (self.total > 0 and self.all_ops >= self.total)

    def done(self, sent: float, now: float) -> None:
        self.all_ops += 1
        if self.start <= now <= self.end:
            self.ops += 1
            if len(self.latencies) < 200_000:
                self.latencies.append(now - sent)

    def tick(self, now: float) -> None:
        if self.progress and now >= self._next_progress:
            self._next_progress = now + self.progress
            print(json.dumps({"t": round(now, 3), "ops": self.all_ops}), flush=True)
        if self.cpu_start is None and now >= self.start:
            self.cpu_start = _cpu()
        if self.cpu_end is None and now >= self.end:
            self.cpu_end = _cpu()

    def result(self, **extra: Any) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3)

        duration = self.duration
        cpu = (
            (self.cpu_end - self.cpu_start)
            if self.cpu_start is not None and self.cpu_end is not None
            else None
        )
        return {
            "ops": self.ops,
            "rate": self.ops / duration if duration > 0 else 0.0,
            "all_ops": self.all_ops,
            "errors": self.errors,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "cpu_s": None if cpu is None else round(cpu, 3),
            "cpu_share": None if cpu is None or duration <= 0 else round(cpu / duration, 3),
            **extra,
        }


def _wait_start(args: argparse.Namespace) -> float:
    """With ``--sync``: say ready, read the window's start (epoch) from stdin."""
    if not args.sync:
        return args.start_at or time.time() + 1.0
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("no start time on stdin")
    return float(line)


# ------------------------------------------------------------------- iris


async def _iris(args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from iris_raft import IrisError, open_client

    window = _Window(args.duration, args.progress, args.total)
    cores = [c for c in args.cores.split(",") if c]
    body = os.urandom(args.body)
    tag = f"g{args.gen_id}-{os.getpid()}"
    per_conn = [args.concurrency // args.connections] * args.connections
    for i in range(args.concurrency % args.connections):
        per_conn[i] += 1
    recipients = [f"r{i}" for i in range(args.recipients)]
    counter = [0]
    errors: list[str] = []
    go = trio.Event()

    async def worker(client: Any, sender: str) -> None:
        await go.wait()
        n = 0
        while True:
            now = time.time()
            if window.finished(now):
                return
            n += 1
            counter[0] += 1
            recipient = recipients[counter[0] % len(recipients)]
            try:
                await client.send(sender, str(n), recipient, body)
            except IrisError as exc:
                window.errors += 1
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.01)
                continue
            window.done(now, time.time())

    async def ticker() -> None:
        await go.wait()
        while window.cpu_end is None and not window.finished(time.time()):
            window.tick(time.time())
            await trio.sleep(0.01)

    async def one_connection(
        index: int, tasks: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with (
            open_client(cores, secret=args.secret, timeout=args.timeout) as client,
            trio.open_nursery() as nursery,
        ):
            await client.status()  # connect (and move to the leader) before the start
            task_status.started()
            for t in range(tasks):
                nursery.start_soon(worker, client, f"{tag}-c{index}-t{t}")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        for index, tasks in enumerate(per_conn):
            if tasks:
                await nursery.start(one_connection, index, tasks)
        start = await trio.to_thread.run_sync(_wait_start, args)
        window.begin(start)
        go.set()
    return window.result(target="iris", first_errors=errors)


# --------------------------------------------------------- etcd and raw


def _http_done(buf: bytearray) -> int:
    """Bytes of the first complete HTTP response in ``buf`` (0: not complete)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return 0
    head = bytes(buf[:end]).lower()
    pos = head.find(b"content-length:")
    if pos < 0:
        raise RuntimeError(f"etcd answered without Content-Length: {bytes(buf[:200])!r}")
    eol = head.find(b"\r\n", pos)
    length = int(head[pos + 15 : eol if eol >= 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return 0
    if not buf.startswith(b"HTTP/1.1 200"):
        raise _Refused(total, bytes(buf[:total])[:300])
    return total


def _raw_done(buf: bytearray) -> int:
    if len(buf) < 4:
        return 0
    length: int = _LEN.unpack_from(buf, 0)[0]
    if len(buf) < 4 + length:
        return 0
    if buf[4:5] != b"\x00":
        raise _Refused(4 + length, bytes(buf[4 : 4 + length]))
    return 4 + length


class _Refused(Exception):
    """A complete answer of ``size`` bytes that is not a success."""

    def __init__(self, size: int, answer: bytes) -> None:
        super().__init__(answer)
        self.size = size
        self.answer = answer


def _etcd_put_maker(endpoint: str, prefix: str, body: bytes) -> Any:
    """``make(k)``: the bytes of a put of key ``prefix + k`` (12 digits)."""
    import base64

    from benchmarks._etcd import put_request

    # Base64 of a 3-byte-aligned prefix is a fixed prefix of the key's base64.
    pad = (-len(prefix.encode())) % 3
    fixed = (prefix + "_" * pad).encode()
    template = put_request(endpoint, fixed + b"000000000000", body)
    key64 = base64.b64encode(fixed + b"000000000000")
    head64 = base64.b64encode(fixed)
    at = template.index(key64) + len(head64)
    before, after = template[:at], template[at + len(key64) - len(head64) :]

    def make(k: int) -> bytes:
        return before + base64.b64encode(b"%012d" % k) + after

    return make


def _selector_load(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """One thread, non-blocking sockets, ``depth`` requests pipelined per connection."""
    window = _Window(args.duration, args.progress, args.total)
    body = os.urandom(args.body)
    endpoints = [e for e in args.endpoints.split(",") if e]
    tag = f"g{args.gen_id}-{os.getpid()}"
    if target == "etcd":
        conns = args.concurrency
        depth = 1
        # Every put stores a new key (as every send stores a new message).
        makers = [
            _etcd_put_maker(endpoints[c % len(endpoints)], f"{tag}/{c}/", body)
            for c in range(conns)
        ]
        parse = _http_done
    else:
        conns = args.connections
        depth = max(1, args.concurrency // conns)
        frame = _LEN.pack(len(body)) + body
        makers = [lambda k, frame=frame: frame for _ in range(conns)]
        parse = _raw_done
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    state: list[dict[str, Any]] = []
    for c in range(conns):
        address = endpoints[c % len(endpoints)].split("://", 1)[-1]
        host, _, port = address.rpartition(":")
        s = socket.create_connection((host, int(port)), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
        st = {"i": c, "buf": bytearray(), "sent": deque(), "k": 0, "out": bytearray(), "w": False}
        state.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    refused: list[str] = []

    def fill(st: dict[str, Any], now: float) -> None:
        make = makers[st["i"]]
        while len(st["sent"]) < depth:
            st["out"] += make(st["k"])
            st["k"] += 1
            st["sent"].append(now)
        flush(st)

    def flush(st: dict[str, Any]) -> None:
        out = st["out"]
        if out:
            try:
                n = socks[st["i"]].send(out)
            except BlockingIOError:
                n = 0
            del out[:n]
        want = bool(out)
        if want != st["w"]:  # epoll_ctl only when the interest changes
            st["w"] = want
            sel.modify(
                socks[st["i"]], selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), st
            )

    window.begin(_wait_start(args))
    now = time.time()
    for st in state:
        fill(st, now)
    try:
        while True:
            now = time.time()
            window.tick(now)
            if window.finished(now):
                break
            for key, mask in sel.select(timeout=0.01):
                st = key.data
                if mask & selectors.EVENT_WRITE:
                    flush(st)
                if not mask & selectors.EVENT_READ:
                    continue
                data = socks[st["i"]].recv(262144)
                if not data:
                    raise ConnectionError(f"{target} closed a connection")
                buf = st["buf"]
                buf += data
                t = time.time()
                while True:
                    try:
                        n = parse(buf)
                    except _Refused as exc:
                        window.errors += 1
                        if len(refused) < 5:
                            refused.append(repr(exc.answer))
                        del buf[: exc.size]
                        st["sent"].popleft()
                        continue
                    if not n:
                        break
                    del buf[:n]
                    window.done(st["sent"].popleft(), t)
                fill(st, t)
    finally:
        for s in socks:
            s.close()
    return window.result(target=target, connections=conns, depth=depth, first_errors=refused)


# --------------------------------------------------------------- null core


async def _null_core(args: argparse.Namespace) -> None:
    """Serve Iris's RPC protocol; answer ``send`` at once (nothing is stored)."""
    import trio

    from iris_raft._ops import mid_for, send_op_id
    from iris_raft._rpc import serve_rpc

    def answer(sender: str, client_id: str) -> dict[str, Any]:
        op_id = send_op_id(sender, client_id)
        return {"mid": mid_for(op_id), "ts": int(time.time() * 1000), "duplicate": False}

    async def handler(conn: Any, method: str, params: dict[str, Any]) -> Any:
        if method == "send":
            return answer(params["sender"], params["client_id"])
        if method == "send_batch":  # what the client sends when sends pile up
            return {"r": [answer(item[0], item[1]) for item in params["items"]]}
        if method == "status":
            return {"nodes": [], "leader_rpc": None}
        return None

    secret = args.secret.encode() if args.secret else None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve_rpc(
                handler, "127.0.0.1", 0, secret=secret, task_status=task_status
            )
        )
        port = listeners[0].socket.getsockname()[1]
        print(f"ready 127.0.0.1:{port}", flush=True)


# -------------------------------------------------------------------- main


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coreload")
    p.add_argument("target", choices=["iris", "etcd", "raw", "null-core"])
    p.add_argument("--cores", default="", help="iris: core RPC addresses, comma-separated")
    p.add_argument("--secret", default="", help="iris / null-core: the cluster secret")
    p.add_argument("--endpoints", default="", help="etcd URLs or raw host:port, comma-separated")
    p.add_argument("--concurrency", type=int, default=256, help="requests outstanding")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--start-at", type=float, default=0.0, help="epoch seconds; default now+1")
    p.add_argument(
        "--sync", action="store_true", help="print ready once connected, read --start-at from stdin"
    )
    p.add_argument("--progress", type=float, default=0.0, help="print progress every N seconds")
    p.add_argument("--total", type=int, default=0, help="stop after this many acknowledged ops")
    p.add_argument("--body", type=int, default=100, help="message bytes")
    p.add_argument("--recipients", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--gen-id", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.target == "null-core":
        import trio

        trio.run(_null_core, args)
        return 0
    if args.target == "iris":
        import trio

        result = trio.run(_iris, args)
    else:
        result = _selector_load(args, args.target)
    result.update(concurrency=args.concurrency, duration=args.duration, pid=os.getpid())
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
