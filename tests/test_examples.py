"""The embedding example runs as documented (a local 3-node Raft group in one process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.cluster


def test_embedded_example(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embedded.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "retried with the same id: same mid? True" in out
    assert "[b'hello, bob']" in out
    assert "after ack: 0 stored" in out
    assert "cas motd welcome->hi: True" in out
