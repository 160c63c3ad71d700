"""The nemesis: faults injected into a running :class:`LocalCluster`.

Theory of operation
-------------------
A :class:`Nemesis` alternates *fault* and *heal* phases on a schedule drawn
from a seeded RNG, and writes every start and heal into the history (process
``-1``, ``f`` = the fault name), so checkers and plots know the windows.

Faults:

* partitions (``random-halves``, ``isolate-one``, ``isolate-leader``,
  ``bridge``, ``majorities-ring``) through the cluster's per-link proxies
  (:mod:`jepsen_like.proxy`, works without root). ``majorities-ring`` (5
  nodes) gives each node a different majority view; it is applied as
  per-pair cuts.
* ``kill`` (one, leader, minority, all) with ``kill -9`` and a restart at
  heal; ``pause`` (SIGSTOP/SIGCONT) of one node or the leader, longer than an
  election timeout.
* ``clock-skew``: restart a minority under libfaketime with an offset and a
  rate (skipped with a message when libfaketime is not installed).
* ``delay``: per-link delay and jitter through the proxies.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .cluster import LocalCluster
from .history import History
from .proxy import LinkMode, LinkTable

logger = logging.getLogger("jepsen_like.nemesis")

FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
)


def faketime_library() -> str | None:
    """Path of libfaketime, or None when it is not installed."""
    for path in FAKETIME_LIBS:
        if os.path.exists(path):
            return path
    return None


class FaultUnavailable(Exception):
    """This fault cannot run on this machine (the scenario is skipped with the reason)."""


@dataclass
class Nemesis:
    """Injects one kind of fault on a schedule. ``kind`` names the fault."""

    kind: str
    cluster: LocalCluster
    history: History
    rng: random.Random
    fault_time: float = 5.0
    heal_time: float = 5.0
    active: str | None = None

    def check_supported(self) -> None:
        if self.kind in PARTITIONS and self.cluster.links is None:
            raise FaultUnavailable("partitions need per-link proxies or network namespaces")
        if self.kind == "delay" and not isinstance(self.cluster.links, LinkTable):
            raise FaultUnavailable(
                "link delay needs the per-link proxies (this kernel has no netem); run with --mechanism proxy"
            )
        if self.kind == "clock-skew" and faketime_library() is None:
            raise FaultUnavailable("libfaketime is not installed (Debian package 'faketime')")
        if self.kind in ("bridge", "majorities-ring") and len(self.cluster.cores) < 5:
            raise FaultUnavailable(f"{self.kind} needs 5 nodes")

    async def run(self, until: float) -> None:
        """Alternate heal and fault phases until ``trio.current_time() >= until``."""
        await trio.sleep(min(self.heal_time, max(0.0, until - trio.current_time())))
        while trio.current_time() + 1.0 < until:
            await self.start()
            await trio.sleep(min(self.fault_time, max(0.0, until - trio.current_time())))
            await self.heal()
            await trio.sleep(min(self.heal_time, max(0.0, until - trio.current_time())))

    # ---------------------------------------------------------------- faults

    async def _links(self, method: str, *args: Any) -> None:
        """Call the partition control; namespaces shell out, so off the event loop."""
        links = self.cluster.links
        assert links is not None
        fn = getattr(links, method)
        if isinstance(links, LinkTable):
            fn(*args)
        else:
            await trio.to_thread.run_sync(fn, *args)

    async def _leader(self) -> int | None:
        try:
            return await self.cluster.wait_leader(timeout=5.0)
        except trio.TooSlowError:
            return None

    async def start(self) -> None:
        kind = self.kind
        cl = self.cluster
        n = len(cl.cores)
        nodes = cl.raft_nodes
        desc: Any
        if kind == "random-halves":
            shuffled = list(range(n))
            self.rng.shuffle(shuffled)
            half = n // 2
            groups = [[nodes[i] for i in shuffled[:half]], [nodes[i] for i in shuffled[half:]]]
            await self._links("partition", groups)
            desc = groups
        elif kind in ("isolate-one", "isolate-leader"):
            target = (await self._leader()) if kind == "isolate-leader" else None
            if target is None:
                target = self.rng.randrange(n)
            await self._links("isolate", nodes[target])
            desc = [nodes[target]]
        elif kind == "bridge":
            shuffled = list(range(n))
            self.rng.shuffle(shuffled)
            bridge = shuffled[0]
            a, b = shuffled[1 : 1 + (n - 1) // 2], shuffled[1 + (n - 1) // 2 :]
            for i in a:
                for j in b:
                    await self._links("cut", nodes[i], nodes[j])
            desc = {
                "bridge": nodes[bridge],
                "sides": [[nodes[i] for i in a], [nodes[j] for j in b]],
            }
        elif kind == "majorities-ring":
            order = list(range(n))
            self.rng.shuffle(order)
            # Each node keeps links to its two ring neighbours only: every node
            # sees a majority (itself + 2 of 5), but no two see the same one.
            keep = {frozenset((order[i], order[(i + 1) % n])) for i in range(n)}
            for i in range(n):
                for j in range(i + 1, n):
                    if frozenset((i, j)) not in keep:
                        await self._links("cut", nodes[i], nodes[j])
            desc = [nodes[i] for i in order]
        elif kind.startswith("kill"):
            targets = await self._targets(kind.removeprefix("kill-") or "one")
            for i in targets:
                await cl.kill(i)
            desc = [nodes[i] for i in targets]
            self._killed = targets
        elif kind.startswith("pause"):
            targets = await self._targets(kind.removeprefix("pause-") or "one")
            for i in targets:
                cl.pause(i)
            desc = [nodes[i] for i in targets]
            self._paused = targets
        elif kind == "clock-skew":
            lib = faketime_library()
            if lib is None:
                raise FaultUnavailable("libfaketime is not installed")
            targets = self.rng.sample(range(n), (n - 1) // 2)
            offset = self.rng.choice(["+30", "-30", "+300"])
            rate = self.rng.choice(["x1.5", "x0.7", "x1"])
            for i in targets:
                await cl.kill(i)
            cl.env_for = {
                i: {"LD_PRELOAD": lib, "FAKETIME": f"{offset} {rate}", "FAKETIME_NO_CACHE": "1"}
                for i in targets
            }
            for i in targets:
                await cl.start(i)
            desc = {"nodes": [nodes[i] for i in targets], "faketime": f"{offset} {rate}"}
            self._skewed = targets
        elif kind == "delay":
            assert isinstance(cl.links, LinkTable)
            delay = self.rng.choice([0.05, 0.1, 0.2])
            for link in cl.links.links.values():
                link.set_mode(LinkMode.PASS, delay=delay, jitter=delay / 2)
            desc = {"delay": delay, "jitter": delay / 2}
        else:
            raise ValueError(f"unknown fault {kind!r}")
        self.active = kind
        self.history.nemesis("start", {"name": kind, "detail": desc})
        logger.info("fault %s: %s", kind, desc)

    async def heal(self) -> None:
        if self.active is None:
            return
        kind = self.active
        cl = self.cluster
        if cl.links is not None:
            await self._links("heal")
        if kind.startswith("kill"):
            async with trio.open_nursery() as nursery:
                for i in getattr(self, "_killed", []):
                    nursery.start_soon(cl.start, i)
        elif kind.startswith("pause"):
            for i in getattr(self, "_paused", []):
                cl.resume(i)
        elif kind == "clock-skew":
            targets = getattr(self, "_skewed", [])
            for i in targets:
                await cl.kill(i)
            cl.env_for = {}
            for i in targets:
                await cl.start(i)
        self.history.nemesis("stop", {"name": kind})
        logger.info("healed %s", kind)
        self.active = None

    async def _targets(self, which: str) -> Sequence[int]:
        n = len(self.cluster.cores)
        if which == "leader":
            leader = await self._leader()
            return [leader if leader is not None else self.rng.randrange(n)]
        if which == "minority":
            return self.rng.sample(range(n), (n - 1) // 2)
        if which == "all":
            return list(range(n))
        return [self.rng.randrange(n)]


PARTITIONS = frozenset(
    {"random-halves", "isolate-one", "isolate-leader", "bridge", "majorities-ring"}
)
FAULTS = PARTITIONS | {
    "kill-one",
    "kill-leader",
    "kill-minority",
    "kill-all",
    "pause-one",
    "pause-leader",
    "clock-skew",
    "delay",
}
