"""``python -m qcompile``: the ``lowbit`` command line (qcompile/cli.py)."""

import sys

from .cli import main

sys.exit(main())
