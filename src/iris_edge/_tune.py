"""Auto-tune: size the edge from CPU count, RAM and the open-files limit.

Prints ``[AUTO-TUNE] Detected: N cores, M MB RAM`` and ``[AUTO-TUNE] Target
Capacity: K Connections`` (the guide's lines). Raises the soft open-files
limit to the hard one, and warns when the target needs more than the limit
or when ``net.core.somaxconn`` is small (the guide's sysctl advice, checked).
Explicit ``max_connections`` / ``router_pool_size`` override the figures.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

logger = logging.getLogger("iris_edge.tune")

#: Memory budgeted per connection when sizing (measured RSS is lower; see docs/performance).
BYTES_PER_CONNECTION = 48 * 1024
#: File descriptors kept for everything that is not a client connection.
RESERVED_FDS = 256


@dataclass(frozen=True, slots=True)
class Tuning:
    """What auto-tune decided."""

    cores: int
    ram_mb: int
    nofile: int
    max_connections: int
    router_pool_size: int
    lines: tuple[str, ...]


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 1024**3


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, hard))
            soft = 1 << 20
        except (ValueError, OSError):
            pass
    return int(soft if soft != resource.RLIM_INFINITY else 1 << 20)


def _somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def auto_tune(max_connections: int | None, router_pool_size: int | None) -> Tuning:
    """Decide the edge's capacity and log the ``[AUTO-TUNE]`` lines."""
    cores = os.cpu_count() or 1
    ram = _ram_bytes()
    nofile = _raise_nofile()
    by_memory = max(100, ram // 2 // BYTES_PER_CONNECTION)
    by_files = max(10, nofile - RESERVED_FDS)
    target = max_connections if max_connections is not None else min(by_memory, by_files)
    pool = router_pool_size if router_pool_size is not None else max(2, min(16, cores * 2))
    lines = [
        f"[AUTO-TUNE] Detected: {cores} cores, {ram // (1024 * 1024)} MB RAM",
        f"[AUTO-TUNE] Target Capacity: {target} Connections",
    ]
    for line in lines:
        print(line, flush=True)
    if target > by_files:
        logger.warning(
            "[AUTO-TUNE] max_connections %d exceeds the open-files limit (%d): raise `nofile` "
            "(limits.conf: * soft/hard nofile 1048576)",
            target,
            nofile,
        )
    somax = _somaxconn()
    if somax is not None and somax < 4096 and target > 10_000:
        logger.warning(
            "[AUTO-TUNE] net.core.somaxconn is %d; for %d connections set it to 65535 (sysctl)",
            somax,
            target,
        )
    return Tuning(cores, ram // (1024 * 1024), nofile, target, pool, tuple(lines))
