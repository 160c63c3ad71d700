"""The harness's CI smoke set: real clusters, real faults, checked histories.

Runs `python -m jepsen_like run --scenario smoke` (both canaries included) and
requires every verdict to match its expectation: the real scenarios valid,
the canaries (local reads without the barrier; acknowledging before the WAL
fsync) caught as invalid. A harness that stops catching them fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


def test_smoke_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jepsen_like",
            "run",
            "--scenario",
            "smoke",
            "--nodes",
            "3",
            "--time",
            os.environ.get("IRIS_HARNESS_SMOKE_TIME", "8"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    by_name = {(r["scenario"], r["mode"]): r for r in summary}
    canary = by_name[("register-canary-local-reads", "cp")]
    assert canary["valid"] is False and canary["passed"]
    unsafe = by_name[("messages-canary-unsafe-ack", "hardened_ap")]
    assert unsafe["valid"] is False and unsafe["passed"]
    lost = next(c for c in unsafe["checks"] if c["name"] == "messages")["counts"]["lost"]
    assert lost > 0
    for (name, mode), r in by_name.items():
        if r["expected_valid"] and not r["skipped"]:
            assert r["valid"] is True, (name, mode, r["checks"])
    # Every run wrote its outputs.
    for r in summary:
        if not r["skipped"]:
            for f in (
                "history.jsonl",
                "results.json",
                "report.txt",
                "latency.png",
                "throughput.png",
            ):
                assert os.path.exists(os.path.join(r["out"], f)), (r["out"], f)
    # A stored history can be re-checked.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "jepsen_like",
            "check",
            by_name[("messages-kill-leader", "cp")]["out"],
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr


def test_list_names_at_least_ten_scenarios() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jepsen_like", "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    names = [
        line.split()[0] for line in result.stdout.splitlines() if line and not line.startswith(" ")
    ]
    assert len(names) >= 10
    assert "register-canary-local-reads" in names


def test_unknown_scenario_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jepsen_like", "run", "--scenario", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "unknown scenario" in result.stderr
