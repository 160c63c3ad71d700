"""``python -m benchmarks --smoke`` runs every benchmark for real and writes all its outputs.

The figures of a smoke run mean nothing; this only proves the scripts work:
each benchmark starts its processes, measures at least one figure and does not
fail, and ``results.json``, ``report.md`` and the plots are written.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks.__main__ import BENCHMARKS
from benchmarks.plots import png_name

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


@pytest.mark.timeout(700)
def test_benchmarks_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]

    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] is True
    ran = results["benchmarks"]
    assert sorted(ran) == sorted(BENCHMARKS)
    for name, bench in ran.items():
        assert "error" not in bench, f"{name}: {bench['error']}"
        assert bench["figures"], f"{name} measured no figure"
        for fig in bench["figures"]:
            # A zero means that part did not run (n=0 is a skipped baseline, e.g. no etcd).
            samples = fig["value"]["samples"]
            assert all(v > 0 for v in samples), f"{name}: {fig['name']}: {samples}"

    report = (out / "report.md").read_text()
    assert "figures are not meaningful" in report
    for name in BENCHMARKS:
        assert f"## {name}" in report

    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "summary.png").is_file()
        for name, bench in ran.items():
            for stem in bench.get("series") or {}:
                assert (out / png_name(name, stem)).is_file(), f"{name}: no plot of {stem}"
