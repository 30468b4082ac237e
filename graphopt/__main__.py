"""``python -m graphopt``: the ``graphopt`` command line (see :mod:`graphopt.cli`)."""

import sys

from graphopt.cli import main

sys.exit(main())
