"""`python -m autodeco ...`: the `autodeco` command (autodeco.cli.main)."""

import sys

from autodeco.cli import main

sys.exit(main())
