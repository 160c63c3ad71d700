"""Network namespaces + iptables: real per-node networks for partitions (needs root).

Theory of operation
-------------------
Each core runs in its own network namespace with one veth interface on a
bridge in the host namespace: core ``i`` is ``10.<net>.0.<10+i>``, the host
(harness, edges, tools) is ``10.<net>.0.1``. Cores keep the same ports
(``7001`` Raft, ``7101`` RPC) because each namespace has its own port space.

A cut between cores ``i`` and ``j`` adds ``iptables -j DROP`` rules in both
namespaces for the other's address (INPUT and OUTPUT), so established TCP
connections go silent exactly as with a dead route; the host keeps reaching
every core, so clients see the minority side's behaviour. ``heal`` flushes
the rules. Everything is named with a per-run tag and removed on teardown.

:class:`NetnsNetwork` offers the same ``isolate``/``partition``/``cut``/
``heal`` calls as the per-link proxies (:class:`~jepsen_like.proxy.LinkTable`),
so scenarios run unchanged on both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess


def netns_available() -> str | None:
    """None when namespaces + iptables can be used here, else why not."""
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages iproute2, iptables)"
    probe = f"ijprobe{secrets.token_hex(2)}"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
        subprocess.run(
            ["ip", "netns", "exec", probe, "iptables", "-L", "-n"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces or iptables do not work here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _run(*args: str) -> None:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=15)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


class NetnsNetwork:
    """``count`` namespaces on one bridge; cut and heal links with iptables.

    By default a cut drops packets on both INPUT and OUTPUT. An OUTPUT drop
    fails the sender's transmission locally, and Linux then retries a SYN
    every 0.5 s without backing off, so a connect made during the cut
    succeeds soon after the heal. ``remote_loss=True`` drops only on INPUT:
    every packet leaves and is lost on arrival, as on a real network, and
    SYN retries back off exponentially (1, 3, 7, 15 s ...).
    """

    RAFT_PORT = 7001
    RPC_PORT = 7101

    def __init__(self, count: int, *, remote_loss: bool = False) -> None:
        self.count = count
        self.remote_loss = remote_loss
        self.tag = secrets.token_hex(2)
        self.net = 100 + int(self.tag, 16) % 150
        self.bridge = f"ijb{self.tag}"
        self.host_ip = f"10.{self.net}.0.1"
        self.up = False
        self.nodes = [f"{self.ip(i)}:{self.RAFT_PORT}" for i in range(count)]

    def ip(self, i: int) -> str:
        return f"10.{self.net}.0.{10 + i}"

    def namespace(self, i: int) -> str:
        return f"ij{self.tag}n{i}"

    def setup(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.up = True
        _run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(self.count):
            ns, host_end, ns_end = self.namespace(i), f"ij{self.tag}h{i}", f"ij{self.tag}p{i}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _run("ip", "link", "set", ns_end, "netns", ns)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", ns_end)
            _run("ip", "-n", ns, "link", "set", ns_end, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside core ``i``'s namespace (``ip netns exec`` execs, keeping the pid)."""
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def _index(self, node: str) -> int:
        return self.nodes.index(node)

    def _drop(self, i: int, j: int) -> None:
        ns = self.namespace(i)
        _run("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", self.ip(j), "-j", "DROP")
        if not self.remote_loss:
            _run(
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                "-A",
                "OUTPUT",
                "-d",
                self.ip(j),
                "-j",
                "DROP",
            )

    def cut(self, a: str, b: str, mode: object = None) -> None:
        i, j = self._index(a), self._index(b)
        self._drop(i, j)
        self._drop(j, i)

    def isolate(self, node: str, mode: object = None) -> None:
        for other in self.nodes:
            if other != node:
                self.cut(node, other)

    def partition(self, groups: list[list[str]], mode: object = None) -> None:
        where = {n: k for k, g in enumerate(groups) for n in g}
        for x in range(self.count):
            for y in range(x + 1, self.count):
                a, b = self.nodes[x], self.nodes[y]
                if where.get(a) != where.get(b):
                    self.cut(a, b)

    def heal(self) -> None:
        for i in range(self.count):
            _run("ip", "netns", "exec", self.namespace(i), "iptables", "-F")

    def teardown(self) -> None:
        for i in range(self.count):
            subprocess.run(
                ["ip", "netns", "del", self.namespace(i)], capture_output=True, timeout=15
            )
        if self.up:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=15)
            self.up = False
