"""Per-link TCP proxies for fault injection without root.

Theory of operation
-------------------
Each core dials each peer through its own proxy (``[core] raft_dial``), so a
link between two cores is a proxy we control. A :class:`LinkProxy` forwards
bytes in both directions and has a mode:

* ``PASS``: forward (optionally after ``delay`` ± ``jitter`` seconds per chunk);
* ``BLACKHOLE``: accept and hold connections but forward nothing (the peers'
  TCP connections stay up and go silent, like a dropped route);
* ``RESET``: close every connection at once and refuse new ones.

Changing the mode affects existing connections immediately. The proxies run
as trio tasks in the harness (or test) process.
"""

from __future__ import annotations

import contextlib
import enum
import random
from dataclasses import dataclass, field

import trio


class LinkMode(enum.Enum):
    """What a link does with traffic."""

    #: Forward bytes (with the configured delay and jitter).
    PASS = "pass"
    #: Hold connections, forward nothing.
    BLACKHOLE = "blackhole"
    #: Close connections, refuse new ones.
    RESET = "reset"


@dataclass
class LinkProxy:
    """One directed dial path: connections to ``listen_port`` go to ``target``."""

    name: str
    target: tuple[str, int]
    mode: LinkMode = LinkMode.PASS
    delay: float = 0.0
    jitter: float = 0.0
    port: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)
    _streams: set[trio.SocketStream] = field(default_factory=set)
    _rng: random.Random = field(default_factory=random.Random)

    def set_mode(
        self, mode: LinkMode, *, delay: float | None = None, jitter: float | None = None
    ) -> None:
        self.mode = mode
        if delay is not None:
            self.delay = delay
        if jitter is not None:
            self.jitter = jitter
        self._changed.set()
        self._changed = trio.Event()
        if mode is LinkMode.RESET:
            for stream in list(self._streams):
                stream.socket.close()
            self._streams.clear()

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.mode is LinkMode.RESET:
            await client.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        self._streams.update((client, upstream))
        try:
            async with trio.open_nursery() as nursery:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        while True:
                            data = await src.receive_some(65536)
                            if not data:
                                break
                            while self.mode is LinkMode.BLACKHOLE:
                                await self._changed.wait()
                            if self.mode is LinkMode.RESET:
                                break
                            if self.delay or self.jitter:
                                await trio.sleep(
                                    max(
                                        0.0,
                                        self.delay + self._rng.uniform(-self.jitter, self.jitter),
                                    )
                                )
                            await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)
        finally:
            self._streams.discard(client)
            self._streams.discard(upstream)
            with trio.CancelScope(shield=True):
                for s in (client, upstream):
                    with contextlib.suppress(
                        OSError, trio.BrokenResourceError, trio.ClosedResourceError
                    ):
                        await s.aclose()


class LinkTable:
    """Proxies for every ordered pair of nodes; cut and heal by node."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = list(nodes)
        self.links: dict[tuple[str, str], LinkProxy] = {}
        for a in nodes:
            for b in nodes:
                if a != b:
                    host, _, port = b.rpartition(":")
                    self.links[(a, b)] = LinkProxy(f"{a}->{b}", (host, int(port)))

    async def start(self, nursery: trio.Nursery) -> None:
        for link in self.links.values():
            await nursery.start(link.serve)

    def dial_map(self, node: str) -> dict[str, str]:
        """For ``node``'s config: peer Raft address -> the proxy address to dial."""
        return {b: f"127.0.0.1:{link.port}" for (a, b), link in self.links.items() if a == node}

    def _set(self, pairs: list[tuple[str, str]], mode: LinkMode) -> None:
        for a, b in pairs:
            self.links[(a, b)].set_mode(mode)
            self.links[(b, a)].set_mode(mode)

    def isolate(self, node: str, mode: LinkMode = LinkMode.BLACKHOLE) -> None:
        """Cut every link between ``node`` and the others."""
        self._set([(node, other) for other in self.nodes if other != node], mode)

    def partition(self, groups: list[list[str]], mode: LinkMode = LinkMode.BLACKHOLE) -> None:
        """Cut every link between different groups."""
        where = {n: i for i, g in enumerate(groups) for n in g}
        pairs = [
            (a, b) for a in self.nodes for b in self.nodes if a < b and where.get(a) != where.get(b)
        ]
        self._set(pairs, mode)

    def cut(self, a: str, b: str, mode: LinkMode = LinkMode.BLACKHOLE) -> None:
        self._set([(a, b)], mode)

    def heal(self) -> None:
        for link in self.links.values():
            link.set_mode(LinkMode.PASS, delay=0.0, jitter=0.0)
