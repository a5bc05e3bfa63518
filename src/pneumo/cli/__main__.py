"""``python -m pneumo.cli``, as ``python -m pneumo`` (tests and bench/load_test.py start the CLI so)."""

import sys

from pneumo.cli import main

sys.exit(main())
