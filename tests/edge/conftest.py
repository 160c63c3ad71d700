"""Edge conformance tests: real ``iris core`` and ``iris edge`` processes, a real WebSocket client.

The helpers live in ``edge_helpers`` (this folder is on ``sys.path`` under
pytest's default import mode, like ``tests/cluster/cluster_helpers``);
``jepsen_like`` lives at the repository root, which is added here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
