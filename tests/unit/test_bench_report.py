"""The benchmark report and plots from hand-made results: errors, missing numbers, baselines."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from benchmarks import plots, report
from benchmarks._common import figure, series, summarize

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def results(smoke: bool = False) -> dict[str, Any]:
    return {
        "machine": {
            "date": "2026-01-02T03:04:05+00:00",
            "host": "bench-host",
            "cpu": "Test CPU @ 2.0GHz",
            "cores": 2,
            "memory_gib": 7.8,
            "kernel": "6.1.0",
            "python": "3.11.2",
            "commit": "abc1234",
            "command": "python -m benchmarks --smoke",
        },
        "smoke": smoke,
        "benchmarks": {
            "core_throughput": {
                "figures": [
                    figure(
                        "commits/s, 3 cores, cp",
                        summarize([12345.6, 11000, 13020.4]),
                        unit="commits/s",
                        target=">= 5,000",
                        met=True,
                        baseline={
                            "raw PySyncObj": summarize([20000, 21000, 19000]),
                            "etcd": summarize([]),  # skipped: median None
                        },
                        note="bounded by fsync",
                    ),
                    figure("p99 latency", None, unit="ms", target="< 10 ms", met=False),
                ],
                "series": {
                    "latency": series(
                        "commit latency vs load",
                        "offered load (commits/s)",
                        "p99 (ms)",
                        {"iris": [(100, 1.5), (1000, 2.5), (10000, 9.0)], "etcd": []},
                        logx=True,
                    ),
                    "empty": series("nothing measured", "x", "y"),
                    "nan/and odd name": series(
                        "non-finite points", "x", "y", {"a": [(1, float("nan")), (2, 3)]}
                    ),
                },
                "notes": ["3 cores on one machine share 2 CPUs"],
                "seconds": 12.34,
            },
            "failover": {
                "figures": [
                    figure(
                        "leader kill -> first write",
                        summarize([1.2, 0.9, 2.4, 1.1, 1.3]),
                        unit="s",
                        baseline={"PySyncObj defaults": 3.5, "zero": 0},
                    )
                ],
                "series": {
                    "hist": series(
                        "failover times",
                        "seconds",
                        "",
                        kind="hist",
                        values={"iris": [1.2, 0.9, 2.4, 1.1, 1.3], "one": [2.0], "none": []},
                    ),
                    "hist-log": series(
                        "log hist",
                        "s",
                        "n",
                        kind="hist",
                        values={"same": [0.5, 0.5, 0.5], "with zero": [0, 1, 10]},
                        logx=True,
                    ),
                },
            },
            "restart": {
                "error": "Traceback (most recent call last):\n  ...\nRuntimeError: core | never came up\n",
                "figures": [],
                "seconds": 3.0,
            },
            "connections": {"figures": [], "series": None},
        },
    }


def test_fmt_three_significant_digits_with_separators() -> None:
    assert report.fmt(12345.6) == "12,300"
    assert report.fmt(1234567) == "1,230,000"
    assert report.fmt(999.6) == "1,000"
    assert report.fmt(1.5) == "1.5"
    assert report.fmt(0.123456) == "0.123"
    assert report.fmt(0.000123456) == "0.000123"
    assert report.fmt(-45.678) == "-45.7"
    assert report.fmt(0) == "0"
    assert report.fmt(7) == "7"
    assert report.fmt(None) == "—"
    assert report.fmt(float("nan")) == "n/a"
    assert report.ratio(1, 0) == "—"
    assert report.ratio(None, 2) == "—"
    assert report.ratio(1, 4) == "0.25\u00d7"


def test_markdown_report() -> None:
    md = report.markdown(results())
    assert md.startswith("# Iris benchmarks\n")
    assert "not meaningful" not in md
    for fact in ("2026-01-02", "Test CPU @ 2.0GHz", "| cores | 2 |", "7.8 GiB", "6.1.0", "3.11.2"):
        assert fact in md
    assert "`abc1234`" in md and "`python -m benchmarks --smoke`" in md
    row = next(line for line in md.splitlines() if "commits/s, 3 cores, cp" in line)
    assert "12,300 commits/s" in row
    assert "11,000\u201313,000, n=3" in row
    assert "raw PySyncObj: 20,000 (0.617\u00d7)" in row
    assert "etcd: n/a" in row
    assert ">= 5,000" in row and "| yes |" in row
    row = next(line for line in md.splitlines() if "p99 latency" in line)
    assert "n/a" in row and "n=0" in row and "**no**" in row
    row = next(line for line in md.splitlines() if "leader kill" in line)
    assert "PySyncObj defaults: 3.5 (0.343\u00d7)" in row
    assert "zero: 0 (—)" in row
    assert "0.9\u20132.4, n=5" in row
    # The error: named at the top, in the table (pipes escaped) and in full in its section.
    assert "**Failed:** `restart`" in md
    assert "**ERROR**: RuntimeError: core \\| never came up" in md
    assert "```\nTraceback (most recent call last):" in md
    assert "| `connections` | no figures |" in md
    # Notes: the benchmark's and the figures'.
    assert "- 3 cores on one machine share 2 CPUs" in md
    assert "- *commits/s, 3 cores, cp*: bounded by fsync" in md
    assert "Took 12.3 s." in md
    # Every table row has the same number of cells.
    section = md.split("## Results", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 5  # header, alignment, 3 figures, 1 error, 1 without figures
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1


def test_markdown_smoke_banner_and_empty_results() -> None:
    assert "Smoke run — figures are not meaningful" in report.markdown(results(smoke=True))
    md = report.markdown({"smoke": True})
    assert "not meaningful" in md and "No benchmark ran." in md
    assert "| cpu | — |" in md


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_render_plots(tmp_path: Path) -> None:
    paths = plots.render(results(smoke=True), str(tmp_path))
    names = sorted(Path(p).name for p in paths)
    assert names == sorted(
        [
            "core_throughput-latency.png",
            "core_throughput-empty.png",
            "core_throughput-nan_and_odd_name.png",
            "failover-hist.png",
            "failover-hist-log.png",
            "summary.png",
        ]
    )
    for p in paths:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [label for label, _, _ in plots.ratios(results())]
    assert labels == [
        "core_throughput: commits/s, 3 cores, cp / raw PySyncObj",
        "failover: leader kill -> first write / PySyncObj defaults",
    ]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib not installed")
def test_render_without_baselines_or_benchmarks(tmp_path: Path) -> None:
    assert [Path(p).name for p in plots.render({}, str(tmp_path / "a"))] == ["summary.png"]
    only_error = {"benchmarks": {"x": {"error": "boom", "figures": []}}}
    assert [Path(p).name for p in plots.render(only_error, str(tmp_path / "b"))] == ["summary.png"]
