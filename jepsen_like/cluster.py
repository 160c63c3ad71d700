"""Start, kill, pause and restart real ``iris core`` processes on this machine.

Theory of operation
-------------------
A :class:`LocalCluster` gives each core its own data folder and TOML file
under ``base_dir`` and starts it as ``python -m iris_raft core --config F``.
A core prints ``iris core ready {json}`` once it serves; :meth:`start` waits
for that line (the process's stdout is read by a task that tees it to
``core-N.log``), so nothing here sleeps in place of waiting for an event.

With ``proxies=True`` every Raft link goes through a :class:`LinkTable`
proxy (``[core] raft_dial``), so links can be cut per node pair without root.

Ports: Raft and RPC ports are chosen below the ephemeral range and checked
free, so a restarted core gets its ports back.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .netns import NetnsNetwork
from .proxy import LinkTable

SECRET = "jepsen-like-cluster-secret-0123456789abcdef"
JWT_SECRET = "jepsen-like-jwt-secret-0123456789abcdefghijkl"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def allocate_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """``count`` free ports in 20000-31999 (below Linux's default ephemeral range)."""
    rng = rng or random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(20000, 32000)
        if port not in ports and _port_free(port):
            ports.append(port)
    return ports


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_toml(path: str, tables: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    os.chmod(path, 0o600)


@dataclass
class CoreProcess:
    """One core of a :class:`LocalCluster`."""

    index: int
    node: str
    rpc: str
    data_dir: str
    config_path: str
    log_path: str
    process: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    info: dict[str, Any] = field(default_factory=dict)
    paused: bool = False
    kind: str = "core"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class EdgeProcess(CoreProcess):
    """One edge of a :class:`LocalCluster`; ``node`` is unused, ``rpc`` is its WebSocket address."""

    kind: str = "edge"

    @property
    def url(self) -> str:
        return f"ws://{self.rpc}/v1"


class LocalCluster:
    """N core processes on 127.0.0.1. Use :func:`open_cluster`."""

    def __init__(
        self,
        base_dir: str,
        nursery: trio.Nursery,
        *,
        nodes: int = 3,
        mode: str = "cp",
        secret: str | None = SECRET,
        proxies: bool = False,
        netns: bool = False,
        netns_remote_loss: bool = False,
        edges: int = 0,
        cluster_options: dict[str, Any] | None = None,
        core_options: dict[str, Any] | None = None,
        edge_options: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base_dir = base_dir
        self._nursery = nursery
        self.mode = mode
        self.secret = secret
        self.env = dict(env or {})
        #: Extra environment per core index (e.g. libfaketime for clock skew).
        self.env_for: dict[int, dict[str, str]] = {}
        ports = allocate_ports(2 * nodes + edges, rng)
        self.cores: list[CoreProcess] = []
        self.network: NetnsNetwork | None = (
            NetnsNetwork(nodes, remote_loss=netns_remote_loss) if netns else None
        )
        self.edges: list[EdgeProcess] = [
            EdgeProcess(
                index=j,
                node="",
                rpc=f"127.0.0.1:{ports[2 * nodes + j]}",
                data_dir=os.path.join(base_dir, f"edge-{j}"),
                config_path=os.path.join(base_dir, f"edge-{j}.toml"),
                log_path=os.path.join(base_dir, f"edge-{j}.log"),
            )
            for j in range(edges)
        ]
        self._edge_options = dict(edge_options or {})
        self.jwt_secret = JWT_SECRET
        raft_nodes = [f"127.0.0.1:{ports[i]}" for i in range(nodes)]
        rpcs = [f"127.0.0.1:{ports[nodes + i]}" for i in range(nodes)]
        self.links: LinkTable | NetnsNetwork | None = None
        self.mechanism = "none"
        if self.network is not None:
            raft_nodes = list(self.network.nodes)
            rpcs = [f"{self.network.ip(i)}:{NetnsNetwork.RPC_PORT}" for i in range(nodes)]
            self.links = self.network
            self.mechanism = "network namespaces + iptables"
        elif proxies:
            self.links = LinkTable(raft_nodes)
            self.mechanism = "per-link TCP proxies (PySyncObj transport dial map)"
        self._cluster_options = dict(cluster_options or {})
        self._core_options = dict(core_options or {})
        for i in range(nodes):
            data_dir = os.path.join(base_dir, f"core-{i}")
            os.makedirs(data_dir, exist_ok=True)
            self.cores.append(
                CoreProcess(
                    index=i,
                    node=raft_nodes[i],
                    rpc=rpcs[i],
                    data_dir=data_dir,
                    config_path=os.path.join(base_dir, f"core-{i}.toml"),
                    log_path=os.path.join(base_dir, f"core-{i}.log"),
                )
            )

    @property
    def raft_nodes(self) -> list[str]:
        return [c.node for c in self.cores]

    @property
    def rpc_addresses(self) -> list[str]:
        return [c.rpc for c in self.cores]

    def write_configs(self) -> None:
        for core in self.cores:
            cluster = {
                "secret": self.secret,
                "expected_cluster_nodes": self.raft_nodes,
                "consistency_mode": self.mode,
                **self._cluster_options,
            }
            core_table: dict[str, Any] = {
                "node": core.node,
                "rpc": core.rpc,
                "data_dir": core.data_dir,
                **self._core_options,
            }
            if isinstance(self.links, LinkTable):
                core_table["raft_dial"] = self.links.dial_map(core.node)
            write_toml(
                core.config_path,
                {"cluster": cluster, "core": core_table, "edge": {"cores": self.rpc_addresses}},
            )
        for edge in self.edges:
            host, _, port = edge.rpc.rpartition(":")
            write_toml(
                edge.config_path,
                {
                    "cluster": {
                        "secret": self.secret,
                        "expected_cluster_nodes": self.raft_nodes,
                        "consistency_mode": self.mode,
                        **self._cluster_options,
                    },
                    "edge": {
                        "host": host,
                        "port": int(port),
                        "cores": self.rpc_addresses,
                        "jwt_secret": self.jwt_secret,
                        **self._edge_options,
                    },
                },
            )

    async def start_links(self) -> None:
        if isinstance(self.links, LinkTable):
            await self.links.start(self._nursery)
        if self.network is not None:
            await trio.to_thread.run_sync(self.network.setup)

    async def start(self, index: int, *, timeout: float = 30.0) -> CoreProcess:
        """Start core ``index`` and wait until it prints its ready line."""
        return await self._start(self.cores[index], timeout)

    async def start_edge(self, index: int, *, timeout: float = 30.0) -> CoreProcess:
        """Start edge ``index`` and wait until it prints its ready line."""
        return await self._start(self.edges[index], timeout)

    async def _start(self, core: CoreProcess, timeout: float) -> CoreProcess:
        index = core.index
        if core.running:
            return core
        core.ready = trio.Event()
        core.paused = False
        extra = self.env_for.get(index, {}) if core.kind == "core" else {}
        env = {**os.environ, **self.env, **extra, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "iris_edge", core.kind, "--config", core.config_path]
        if self.network is not None and core.kind == "core":
            argv = self.network.wrap(index, argv)
        proc = await trio.lowlevel.open_process(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        core.process = proc
        self._nursery.start_soon(self._tee, core, proc)
        with trio.fail_after(timeout):
            while not core.ready.is_set():
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"{core.kind} {index} exited with {proc.returncode} before it was ready; "
                        f"see {core.log_path}:\n{_tail(core.log_path)}"
                    )
                with trio.move_on_after(0.2):
                    await core.ready.wait()
        return core

    async def _tee(self, core: CoreProcess, proc: trio.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        with open(core.log_path, "ab") as log:
            while True:
                try:
                    data = await proc.stdout.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                if not data:
                    break
                log.write(data)
                log.flush()
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    prefix = f"iris {core.kind} ready ".encode()
                    if line.startswith(prefix):
                        core.info = json.loads(line[len(prefix) :])
                        core.ready.set()
        await proc.wait()

    def tail(self, index: int, lines: int = 30) -> str:
        return _tail(self.cores[index].log_path, lines)

    async def start_all(self) -> None:
        await self.start_links()  # proxies first: their ports go into the configs
        self.write_configs()
        async with trio.open_nursery() as n:
            for i in range(len(self.cores)):
                n.start_soon(self.start, i)
        async with trio.open_nursery() as n:
            for j in range(len(self.edges)):
                n.start_soon(self.start_edge, j)

    async def stop_edge(self, index: int, timeout: float = 15.0) -> None:
        """SIGTERM edge ``index`` (graceful drain), SIGKILL after ``timeout``."""
        edge = self.edges[index]
        if edge.process is None or edge.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(edge.process.pid, signal.SIGTERM)
        with trio.move_on_after(timeout):
            await edge.process.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(edge.process.pid, signal.SIGKILL)
        await edge.process.wait()

    def token(self, user: str, *, ttl: float = 3600, jti: str | None = None) -> str:
        """A valid token for ``user`` on this cluster's edges."""
        from iris_edge._auth import issue_token

        return issue_token(self.jwt_secret, user, ttl=ttl, jti=jti)

    def signal(self, index: int, signum: int) -> None:
        proc = self.cores[index].process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    async def kill(self, index: int) -> None:
        """``kill -9`` core ``index`` and wait for it to be gone."""
        core = self.cores[index]
        if core.paused:
            self.signal(index, signal.SIGCONT)
        self.signal(index, signal.SIGKILL)
        if core.process is not None:
            await core.process.wait()

    async def stop(self, index: int, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        core = self.cores[index]
        if core.process is None or core.process.returncode is not None:
            return
        if core.paused:
            self.signal(index, signal.SIGCONT)
        self.signal(index, signal.SIGTERM)
        with trio.move_on_after(timeout):
            await core.process.wait()
            return
        await self.kill(index)

    def pause(self, index: int) -> None:
        self.signal(index, signal.SIGSTOP)
        self.cores[index].paused = True

    def resume(self, index: int) -> None:
        self.signal(index, signal.SIGCONT)
        self.cores[index].paused = False

    async def restart(self, index: int) -> CoreProcess:
        await self.kill(index)
        return await self.start(index)

    async def statuses(self, timeout: float = 2.0) -> list[dict[str, Any] | None]:
        """Each running core's own status (None when it does not answer)."""
        from iris_raft._rpc import open_rpc_connection

        out: list[dict[str, Any] | None] = [None] * len(self.cores)

        async def one(i: int) -> None:
            core = self.cores[i]
            if not core.running or core.paused:
                return
            with contextlib.suppress(Exception), trio.move_on_after(timeout):
                async with open_rpc_connection(
                    core.rpc,
                    secret=self.secret.encode() if self.secret else None,
                    connect_timeout=timeout,
                ) as conn:
                    out[i] = await conn.call("status", {}, timeout=timeout)

        async with trio.open_nursery() as n:
            for i in range(len(self.cores)):
                n.start_soon(one, i)
        return out

    async def wait_leader(self, timeout: float = 20.0, exclude: Sequence[int] = ()) -> int:
        """Index of the core that leads, as agreed by every answering core outside ``exclude``."""
        with trio.fail_after(timeout):
            while True:
                statuses = await self.statuses()
                leaders = {
                    s["leader"]
                    for i, s in enumerate(statuses)
                    if s is not None and i not in exclude
                }
                if len(leaders) == 1:
                    (leader,) = leaders
                    for core in self.cores:
                        if core.node == leader and core.index not in exclude:
                            st = statuses[core.index]
                            if st is not None and st["safe_for_writes"]:
                                return core.index
                await trio.sleep(0.1)

    async def aclose(self) -> None:
        for edge in self.edges:
            if edge.running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(edge.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        for edge in self.edges:
            if edge.process is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await edge.process.wait()
        for core in self.cores:
            if core.running:
                if core.paused:
                    self.signal(core.index, signal.SIGCONT)
                self.signal(core.index, signal.SIGKILL)
        for core in self.cores:
            if core.process is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await core.process.wait()
        if self.network is not None:
            self.network.teardown()


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def open_cluster(base_dir: str, **kwargs: Any) -> AsyncIterator[LocalCluster]:
    """Start a :class:`LocalCluster`; kill every process on exit, whatever happens."""
    async with trio.open_nursery() as nursery:
        cluster = LocalCluster(base_dir, nursery, **kwargs)
        try:
            await cluster.start_all()
            yield cluster
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()
