"""``python -m graphopt``: the ``graphopt`` command line (see :mod:`graphopt.frontends.cli`)."""

import sys

from graphopt.frontends.cli import main

sys.exit(main())
