"""``python -m iris_raft`` is the ``iris`` command."""

import sys

from ._cli import main

sys.exit(main())
