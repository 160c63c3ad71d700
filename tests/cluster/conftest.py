"""Fixtures for the real-process cluster tests (``pytest -m cluster``).

Every test here starts ``iris core`` processes on 127.0.0.1 through
``jepsen_like.cluster.open_cluster``. Two guards run around each test:

* ``jepsen_like`` lives at the repository root, which is not on ``sys.path``
  when pytest is run as a console script, so the root is added here;
* no process may outlive its test: after each test, any process whose command
  line names the test's ``tmp_path`` (every core's ``--config`` file is under
  it) is reported as a leak, then killed so one leak does not cascade.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry), cmdline))
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes(tmp_path: Path) -> Iterator[None]:
    yield
    leaked = _processes_mentioning(str(tmp_path))
    for pid, _ in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes outlived the test: {leaked}"
