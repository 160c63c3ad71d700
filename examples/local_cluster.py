"""Run a local Iris cluster on 127.0.0.1: 3 ``iris core`` and 2 ``iris edge`` processes.

Run::

    python examples/local_cluster.py [--mode cp|hardened_ap] [--base-dir ./local-cluster]
                                     [--users alice,bob]

It writes one TOML file per process into ``--base-dir`` (``core-0.toml`` ..
``core-2.toml``, ``edge-0.toml``, ``edge-1.toml``: a shared ``[cluster]``
secret and ``expected_cluster_nodes``, each core's ``node``/``rpc``/
``data_dir``, each edge's ``port``, ``cores`` and ``jwt_secret``; see
``docs/configuration.md``), starts the cores, waits for each to print
``iris core ready {json}``, starts the edges, waits for
``iris edge ready {json}``, then prints the two edge URLs and a token per
user, and a last line for programs::

    local_cluster ready {"edges": [...], "tokens": {...}, "pids": [...], ...}

Each process's output goes to ``<name>.log`` in the base folder. Ctrl-C (or
SIGTERM) stops everything: SIGTERM to the edges (they drain: queued sends
finish, clients get close 1001), then to the cores, SIGKILL to any process
still there after a grace period.

The ports and secrets are kept in ``cluster.json`` in the base folder, so
running again with the same folder restarts the same cluster with its stored
messages (and the tokens printed before stay valid until they expire).

Chat through it (see ``examples/chat.py``)::

    python examples/chat.py --url ws://127.0.0.1:PORT0/v1 --token ALICE_TOKEN
    python examples/chat.py --url ws://127.0.0.1:PORT1/v1 --token BOB_TOKEN
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from iris_edge._auth import issue_token

CORES = 3
EDGES = 2
#: Seconds a process may take to print its ready line.
START_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL.
STOP_GRACE = 10.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def allocate_ports(count: int) -> list[int]:
    """``count`` free ports in 20000-31999: below the ephemeral range, so a rerun gets them."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        if port not in ports and _port_free(port):
            ports.append(port)
    return ports


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_toml(path: str, tables: dict[str, dict[str, Any]]) -> None:
    lines: list[str] = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))


@dataclass
class Layout:
    """Ports and secrets of the cluster, kept in ``cluster.json`` so a rerun finds them again."""

    raft_ports: list[int]
    rpc_ports: list[int]
    edge_ports: list[int]
    cluster_secret: str
    jwt_secret: str

    @classmethod
    def load_or_create(cls, base_dir: str) -> Layout:
        path = os.path.join(base_dir, "cluster.json")
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            pass
        ports = allocate_ports(2 * CORES + EDGES)
        layout = cls(
            raft_ports=ports[:CORES],
            rpc_ports=ports[CORES : 2 * CORES],
            edge_ports=ports[2 * CORES :],
            cluster_secret=secrets.token_urlsafe(48),
            jwt_secret=secrets.token_urlsafe(48),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(layout.__dict__, f, indent=2)
        return layout


@dataclass(eq=False)
class Child:
    """One ``iris core`` or ``iris edge`` process."""

    name: str
    role: str
    config_path: str
    log_path: str
    process: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def write_configs(base_dir: str, layout: Layout, mode: str) -> tuple[list[Child], list[Child]]:
    raft = [f"127.0.0.1:{p}" for p in layout.raft_ports]
    rpc = [f"127.0.0.1:{p}" for p in layout.rpc_ports]
    cluster = {
        "secret": layout.cluster_secret,
        "expected_cluster_nodes": raft,
        "consistency_mode": mode,
    }
    cores, edges = [], []
    for i in range(CORES):
        name = f"core-{i}"
        data_dir = os.path.join(base_dir, name)
        os.makedirs(data_dir, exist_ok=True)
        config = os.path.join(base_dir, f"{name}.toml")
        write_toml(
            config,
            {"cluster": cluster, "core": {"node": raft[i], "rpc": rpc[i], "data_dir": data_dir}},
        )
        cores.append(Child(name, "core", config, os.path.join(base_dir, f"{name}.log")))
    for i in range(EDGES):
        name = f"edge-{i}"
        config = os.path.join(base_dir, f"{name}.toml")
        edge = {
            "host": "127.0.0.1",
            "port": layout.edge_ports[i],
            "cores": rpc,
            "jwt_secret": layout.jwt_secret,
        }
        write_toml(config, {"cluster": cluster, "edge": edge})
        edges.append(Child(name, "edge", config, os.path.join(base_dir, f"{name}.log")))
    return cores, edges


async def _tee(child: Child, proc: trio.Process) -> None:
    """Copy the process's output to its log; notice its ready line."""
    assert proc.stdout is not None
    marker = f"iris {child.role} ready ".encode()
    pending = b""
    with open(child.log_path, "ab") as log:
        while True:
            try:
                data = await proc.stdout.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if not data:
                break
            log.write(data)
            log.flush()
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(marker):
                    child.info = json.loads(line[len(marker) :])
                    child.ready.set()
    await proc.wait()
    if not child.ready.is_set():
        child.ready.set()  # wake the starter: it sees the exit


async def start(child: Child, nursery: trio.Nursery) -> None:
    """Start ``child`` and wait for its ready line (RuntimeError if it exits first)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "iris_edge", child.role, "--config", child.config_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
    )
    child.process = proc
    nursery.start_soon(_tee, child, proc)
    with trio.move_on_after(START_TIMEOUT):
        await child.ready.wait()
    if not child.info:
        why = (
            f"exited with {proc.returncode}"
            if proc.returncode is not None
            else f"not ready in {START_TIMEOUT} s"
        )
        raise RuntimeError(f"{child.name} {why}; the end of {child.log_path}:\n{child.tail()}")
    print(f"local_cluster: {child.name} ready (pid {proc.pid})", flush=True)


def _signal(child: Child, signum: int) -> None:
    if child.running:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.process.pid, signum)


async def stop(children: list[Child], grace: float = STOP_GRACE) -> None:
    """SIGTERM every child, wait up to ``grace`` s, then SIGKILL the rest."""
    for child in children:
        _signal(child, signal.SIGTERM)
    with trio.move_on_after(grace):
        for child in children:
            if child.process is not None:
                await child.process.wait()
    for child in children:
        if child.running:
            print(f"local_cluster: {child.name} did not stop in {grace} s: SIGKILL", flush=True)
            _signal(child, signal.SIGKILL)
    for child in children:
        if child.process is not None:
            await child.process.wait()


async def run(base_dir: str, mode: str, users: list[str], token_ttl: float) -> None:
    base_dir = os.path.abspath(base_dir)
    os.makedirs(base_dir, exist_ok=True)
    layout = Layout.load_or_create(base_dir)
    cores, edges = write_configs(base_dir, layout, mode)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running = trio.CancelScope()

            async def on_signal() -> None:
                async for signum in signals:
                    print(f"local_cluster: {signal.Signals(signum).name}: stopping", flush=True)
                    running.cancel()
                    return

            nursery.start_soon(on_signal)
            try:
                with running:
                    async with trio.open_nursery() as starting:
                        for core in cores:
                            starting.start_soon(start, core, nursery)
                    async with trio.open_nursery() as starting:
                        for edge in edges:
                            starting.start_soon(start, edge, nursery)
                    report(base_dir, mode, cores, edges, layout, users, token_ttl)
                    await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await stop(edges)
                    await stop(cores)
                nursery.cancel_scope.cancel()
    print("local_cluster: stopped", flush=True)


def report(
    base_dir: str,
    mode: str,
    cores: list[Child],
    edges: list[Child],
    layout: Layout,
    users: list[str],
    token_ttl: float,
) -> None:
    urls = [str(edge.info["url"]) for edge in edges]
    tokens = {user: issue_token(layout.jwt_secret, user, ttl=token_ttl) for user in users}
    print(f"local_cluster: {len(cores)} cores ({mode}), configs and logs in {base_dir}")
    for i, url in enumerate(urls):
        print(f"local_cluster: edge {i}: {url}")
    for user, token in tokens.items():
        print(f"local_cluster: token for {user} ({token_ttl:g} s): {token}")
    if len(users) >= 2 and urls:
        first, second = users[0], users[1]
        print("local_cluster: chat with:")
        print(f"  python examples/chat.py --url {urls[0]} --token {tokens[first]}")
        print(f"  python examples/chat.py --url {urls[-1]} --token {tokens[second]}")
    print("local_cluster: Ctrl-C stops everything")
    summary = {
        "edges": urls,
        "tokens": tokens,
        "mode": mode,
        "base_dir": base_dir,
        "pids": [c.process.pid for c in cores + edges if c.process is not None],
    }
    print(f"local_cluster ready {json.dumps(summary)}", flush=True)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run 3 Iris cores and 2 edges on 127.0.0.1")
    parser.add_argument("--mode", choices=["cp", "hardened_ap"], default="hardened_ap")
    parser.add_argument("--base-dir", default="./local-cluster", help="configs, data and logs")
    parser.add_argument("--users", default="alice,bob", help="comma-separated users to get tokens")
    parser.add_argument("--token-ttl", type=float, default=24 * 3600.0, help="seconds")
    args = parser.parse_args(argv)
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    try:
        trio.run(run, args.base_dir, args.mode, users, args.token_ttl)
    except BaseExceptionGroup as group:
        errors = group.subgroup(RuntimeError)
        if errors is None:
            raise
        for exc in _leaves(errors):
            print(f"local_cluster: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"local_cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
