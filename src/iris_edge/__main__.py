"""``python -m iris_edge`` is the ``iris`` command."""

import sys

from ._cli import main

sys.exit(main())
