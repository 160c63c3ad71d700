"""Shared plumbing of the benchmarks: statistics, machine facts, results, processes.

Every benchmark module exposes ``async def run(opts: Options) -> dict`` and
returns a JSON-able dict::

    {"figures": [figure(...), ...],        # rows of the results table
     "series": {"stem": series(...), ...},  # plots, one PNG per stem
     "notes": ["what bounds the figure", ...]}

``python -m benchmarks`` runs them, writes ``results.json``, ``report.md``
and the plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Options:
    """What every benchmark module receives."""

    smoke: bool = False
    #: Repetitions of each measurement (the median is reported).
    runs: int = 5
    #: Seconds of load per run (smoke runs override this with ~1-2 s).
    duration: float = 5.0
    #: Folder for this module's data folders, logs and raw samples.
    work_dir: str = "bench-results/work"
    #: Baselines that need an outside program (etcd) are skipped when False.
    baselines: bool = True

    def scaled(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated runs: ``{median, min, max, iqr, n, samples}``."""
    values = sorted(float(v) for v in samples)
    if not values:
        return {"median": None, "min": None, "max": None, "iqr": None, "n": 0, "samples": []}
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = values[-1] - values[0]
    return {
        "median": statistics.median(values),
        "min": values[0],
        "max": values[-1],
        "iqr": iqr,
        "n": len(values),
        "samples": values,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[rank]


def figure(
    name: str,
    value: dict[str, Any] | float | None,
    *,
    unit: str,
    target: str | None = None,
    met: bool | None = None,
    baseline: dict[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One row of the results table.

    ``value`` is a :func:`summarize` dict (or a bare number); ``baseline``
    maps a baseline name to its summary, measured in the same run;
    ``met`` says whether the target was reached (None: not applicable).
    """
    if not isinstance(value, dict):
        value = summarize([] if value is None else [value])
    return {
        "name": name,
        "unit": unit,
        "value": value,
        "target": target,
        "met": met,
        "baseline": baseline or {},
        "note": note,
    }


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare figures across machines."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "commit": commit,
        "command": " ".join(["python", "-m", "benchmarks", *sys.argv[1:]]),
    }


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def python_cmd(module: str, *args: str) -> list[str]:
    """Command line running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env() -> dict[str, str]:
    """Environment for helper processes: the repository root on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def which(program: str) -> str | None:
    return shutil.which(program)


def series(
    title: str,
    xlabel: str,
    ylabel: str,
    lines: dict[str, list[tuple[float, float]]] | None = None,
    *,
    kind: str = "line",
    values: dict[str, list[float]] | None = None,
    logx: bool = False,
) -> dict[str, Any]:
    """One plot of a benchmark's result (``result["series"][file_stem] = series(...)``).

    ``kind="line"``: ``lines`` maps a label to ``(x, y)`` points.
    ``kind="hist"``: ``values`` maps a label to raw samples (e.g. failover times).
    """
    return {
        "title": title,
        "xlabel": xlabel,
        "ylabel": ylabel,
        "kind": kind,
        "lines": {k: [list(p) for p in v] for k, v in (lines or {}).items()},
        "values": {k: list(v) for k, v in (values or {}).items()},
        "logx": logx,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return int(soft if soft != resource.RLIM_INFINITY else target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return int(target)
    except (ValueError, OSError):
        return int(soft)
