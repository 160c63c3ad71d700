"""A local etcd cluster and a lean put client, for the etcd baselines.

Theory of operation
-------------------
:func:`etcd_cluster` starts ``nodes`` etcd 3.4 processes on 127.0.0.1, each
with its own data folder and log under ``work_dir``, on free ports below the
ephemeral range (so a restarted member gets its ports back). It waits until
every member answers ``/health`` and a leader exists, and SIGKILLs every
process on exit, whatever happens (error, cancellation).

etcd fsyncs its WAL before it acknowledges a put (there is no switch to turn
that off in 3.4), so the baseline is as durable as Iris.

Clients talk to the JSON gRPC gateway (``POST /v3/kv/put`` with base64 key
and value) over HTTP/1.1 keep-alive connections. The request bytes of a put
are built once per key/value by :func:`put_request`; reading a reply is one
header split and a ``Content-Length`` read, so a Python load generator spends
a few microseconds per put. Go's HTTP server answers requests of one
connection one at a time, so concurrency comes from many connections.

- :class:`EtcdPutClient` is blocking (raw socket); use it from threads or
  load-generator processes.
- :class:`AsyncEtcdClient` is the same over a trio stream.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

#: Default Raft timing of etcd (ms); failover benchmarks may pass their own.
HEARTBEAT_MS = 100
ELECTION_MS = 1000


def etcd_binary() -> str | None:
    """Path of the ``etcd`` server binary, or None when it is not installed."""
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


def etcdctl_binary() -> str | None:
    """Path of ``etcdctl`` (package etcd-client), or None."""
    return shutil.which("etcdctl")


def etcd_version() -> str:
    binary = etcd_binary()
    if binary is None:
        return ""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.replace("etcd Version:", "").strip()


# ---------------------------------------------------------------- requests


def _host_port(endpoint: str) -> tuple[str, int]:
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def b64(data: bytes) -> str:
    """Base64 text, as etcd's JSON gateway wants keys and values."""
    return base64.b64encode(data).decode("ascii")


def http_request(endpoint: str, path: str, body: dict[str, Any]) -> bytes:
    """The bytes of one keep-alive ``POST path`` with a JSON body."""
    host, port = _host_port(endpoint)
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode("ascii") + payload


def put_request(endpoint: str, key: bytes, value: bytes) -> bytes:
    """The bytes of one ``PUT key=value`` through the JSON gateway."""
    return http_request(endpoint, "/v3/kv/put", {"key": b64(key), "value": b64(value)})


class EtcdError(Exception):
    """etcd answered with a non-200 status; ``status`` and ``body`` say why."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"etcd answered {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class _Response:
    """Incremental HTTP/1.1 response parser (Content-Length or chunked)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        """Add bytes; return ``(status, body)`` once a whole response is in."""
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buf[:end]
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = -1
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        start = end + 4
        if not chunked:
            if length < 0:
                raise EtcdError(status, b"response without Content-Length")
            if len(self.buf) < start + length:
                return None
            body = self.buf[start : start + length]
            self.buf = self.buf[start + length :]
            return status, body
        body_parts: list[bytes] = []
        pos = start
        while True:
            eol = self.buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(self.buf[pos:eol].split(b";")[0], 16)
            if len(self.buf) < eol + 2 + size + 2:
                return None
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", eol)
                if trailer_end < 0:
                    return None
                self.buf = self.buf[trailer_end + 4 :]
                return status, b"".join(body_parts)
            body_parts.append(self.buf[eol + 2 : eol + 2 + size])
            pos = eol + 2 + size + 2


class EtcdPutClient:
    """Blocking keep-alive client of one etcd endpoint (raw socket).

    :meth:`put` raises :class:`EtcdError` on a non-200 answer and ``OSError``
    (``TimeoutError``, ``ConnectionError``) when the member does not answer;
    the connection is then dropped and the next call reconnects.
    """

    def __init__(self, endpoint: str, *, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.address = _host_port(endpoint)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self.address, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> EtcdPutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, raw: bytes) -> bytes:
        """Send prepared request bytes; return the 200 body."""
        sock = self._connect()
        try:
            sock.sendall(raw)
            parser = _Response()
            while True:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("etcd closed the connection")
                done = parser.feed(data)
                if done is not None:
                    break
        except BaseException:
            self.close()
            raise
        status, body = done
        if status != 200:
            raise EtcdError(status, body)
        return body

    def put(self, key: bytes, value: bytes) -> bytes:
        return self.request(put_request(self.endpoint, key, value))


class AsyncEtcdClient:
    """The trio twin of :class:`EtcdPutClient` (one keep-alive connection).

    Calls raise :class:`EtcdError` on a non-200 answer, ``OSError`` or
    ``trio.BrokenResourceError`` when the member is gone, and
    ``trio.TooSlowError`` after ``timeout``; the connection is then dropped.
    Not safe for concurrent calls: use one client per task.
    """

    def __init__(self, endpoint: str, *, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.address = _host_port(endpoint)
        self.timeout = timeout
        self._stream: trio.SocketStream | None = None

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def __aenter__(self) -> AsyncEtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, raw: bytes, timeout: float | None = None) -> bytes:
        try:
            with trio.fail_after(self.timeout if timeout is None else timeout):
                if self._stream is None:
                    self._stream = await trio.open_tcp_stream(*self.address)
                stream = self._stream
                await stream.send_all(raw)
                parser = _Response()
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError("etcd closed the connection")
                    done = parser.feed(data)
                    if done is not None:
                        break
        except BaseException:
            await self.aclose()
            raise
        status, body = done
        if status != 200:
            raise EtcdError(status, body)
        return body

    async def put(self, key: bytes, value: bytes, timeout: float | None = None) -> bytes:
        return await self.request(put_request(self.endpoint, key, value), timeout)

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        body = await self.request(
            http_request(self.endpoint, "/v3/maintenance/status", {}), timeout
        )
        result: dict[str, Any] = json.loads(body)
        return result


def member_status(endpoint: str, timeout: float = 0.5) -> dict[str, Any] | None:
    """``/v3/maintenance/status`` of one member (None when it does not answer)."""
    host, port = _host_port(endpoint)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v3/maintenance/status", body=b"{}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        result: dict[str, Any] = json.loads(body)
        return result
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def member_healthy(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether ``GET /health`` says the member is healthy (has a leader, can commit)."""
    host, port = _host_port(endpoint)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read()
        return resp.status == 200 and json.loads(body).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False
    finally:
        conn.close()


# ---------------------------------------------------------------- processes


@dataclass
class EtcdMember:
    index: int
    name: str
    client_url: str
    peer_url: str
    data_dir: str
    log_path: str
    process: trio.Process | None = None
    member_id: str = ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class EtcdCluster:
    """``nodes`` etcd members on 127.0.0.1. Use :func:`etcd_cluster`."""

    def __init__(
        self,
        work_dir: str,
        nodes: int = 3,
        *,
        heartbeat_ms: int = HEARTBEAT_MS,
        election_ms: int = ELECTION_MS,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        from jepsen_like.cluster import allocate_ports

        found = binary or etcd_binary()
        if found is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.binary = found
        self.work_dir = os.path.abspath(work_dir)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.extra_args = list(extra_args)
        ports = allocate_ports(2 * nodes)
        self.members = [
            EtcdMember(
                index=i,
                name=f"etcd-{i}",
                client_url=f"http://127.0.0.1:{ports[2 * i]}",
                peer_url=f"http://127.0.0.1:{ports[2 * i + 1]}",
                data_dir=os.path.join(self.work_dir, f"etcd-{i}"),
                log_path=os.path.join(self.work_dir, f"etcd-{i}.log"),
            )
            for i in range(nodes)
        ]
        self.token = f"bench-{os.getpid()}-{ports[0]}"

    @property
    def endpoints(self) -> list[str]:
        """Client URLs, ``http://127.0.0.1:PORT``, by member index."""
        return [m.client_url for m in self.members]

    @property
    def procs(self) -> list[trio.Process | None]:
        return [m.process for m in self.members]

    @property
    def pids(self) -> list[int | None]:
        return [m.process.pid if m.process is not None else None for m in self.members]

    def pid(self, i: int) -> int:
        proc = self.members[i].process
        if proc is None:
            raise RuntimeError(f"etcd member {i} was never started")
        return proc.pid

    def argv(self, i: int) -> list[str]:
        m = self.members[i]
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self.binary,
            "--name",
            m.name,
            "--data-dir",
            m.data_dir,
            "--listen-client-urls",
            m.client_url,
            "--advertise-client-urls",
            m.client_url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-token",
            self.token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
            *self.extra_args,
        ]

    async def start(self, i: int) -> None:
        """Start member ``i`` (its data folder is kept across restarts)."""
        m = self.members[i]
        if m.running:
            return
        os.makedirs(m.data_dir, exist_ok=True)
        with open(m.log_path, "ab") as log:
            m.process = await trio.lowlevel.open_process(
                self.argv(i),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    async def wait_member(self, i: int, timeout: float = 30.0) -> None:
        """Wait until member ``i`` answers ``/health`` with true."""
        m = self.members[i]
        with trio.fail_after(timeout):
            while True:
                if m.process is not None and m.process.returncode is not None:
                    raise RuntimeError(
                        f"etcd member {i} exited with {m.process.returncode}; "
                        f"see {m.log_path}:\n{self.tail(i)}"
                    )
                if await trio.to_thread.run_sync(member_healthy, m.client_url):
                    break
                await trio.sleep(0.05)
        status = await trio.to_thread.run_sync(member_status, m.client_url)
        if status is not None:
            m.member_id = str(status.get("header", {}).get("member_id", ""))

    async def start_all(self, timeout: float = 30.0) -> None:
        for i in range(len(self.members)):
            await self.start(i)
        async with trio.open_nursery() as n:
            for i in range(len(self.members)):
                n.start_soon(self.wait_member, i, timeout)

    async def kill(self, i: int) -> None:
        """``kill -9`` member ``i`` and wait for it to be gone."""
        m = self.members[i]
        if m.process is None:
            return
        if m.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await m.process.wait()

    async def restart(self, i: int, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Kill member ``i`` if it runs, start it again on its data folder."""
        await self.kill(i)
        await self.start(i)
        if wait:
            await self.wait_member(i, timeout)

    def statuses(self, timeout: float = 0.5) -> list[dict[str, Any] | None]:
        return [member_status(m.client_url, timeout) if m.running else None for m in self.members]

    def leader(self, timeout: float = 0.5) -> int | None:
        """Index of the member every answering member names as leader (None: no agreement).

        Blocks for at most ``timeout`` per member; from trio prefer
        :meth:`aleader`.
        """
        statuses = self.statuses(timeout)
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for i, st in enumerate(statuses):
            if st is None:
                continue
            ids[str(st.get("header", {}).get("member_id", ""))] = i
            leaders.add(str(st.get("leader", "")))
        if len(leaders) != 1:
            return None
        (lead,) = leaders
        if lead in ids:
            return ids[lead]
        for m in self.members:
            if m.member_id == lead and m.running:
                return m.index
        return None

    async def aleader(self, timeout: float = 0.5) -> int | None:
        return await trio.to_thread.run_sync(self.leader, timeout)

    async def wait_leader(self, timeout: float = 30.0, exclude: Sequence[int] = ()) -> int:
        """Index of the leader once the members agree on one outside ``exclude``."""
        with trio.fail_after(timeout):
            while True:
                lead = await self.aleader()
                if lead is not None and lead not in exclude:
                    return lead
                await trio.sleep(0.05)

    def tail(self, i: int, lines: int = 20) -> str:
        try:
            with open(self.members[i].log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    async def aclose(self) -> None:
        for m in self.members:
            if m.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        for m in self.members:
            if m.process is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await m.process.wait()


@contextlib.asynccontextmanager
async def etcd_cluster(
    work_dir: str,
    nodes: int = 3,
    *,
    heartbeat_ms: int = HEARTBEAT_MS,
    election_ms: int = ELECTION_MS,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> AsyncIterator[EtcdCluster]:
    """Start ``nodes`` etcd members, wait until healthy with a leader; SIGKILL all on exit.

    Raises RuntimeError when etcd is not installed or a member exits early,
    ``trio.TooSlowError`` when the cluster is not healthy within ``timeout``.
    """
    os.makedirs(work_dir, exist_ok=True)
    cluster = EtcdCluster(
        work_dir,
        nodes,
        heartbeat_ms=heartbeat_ms,
        election_ms=election_ms,
        extra_args=extra_args,
    )
    try:
        await cluster.start_all(timeout)
        await cluster.wait_leader(timeout)
        yield cluster
    finally:
        await cluster.aclose()
