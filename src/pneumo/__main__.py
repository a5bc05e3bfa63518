"""``python -m pneumo``: the command line (also what ``torchrun -m pneumo`` runs)."""

import sys

from pneumo.cli import main

sys.exit(main())
