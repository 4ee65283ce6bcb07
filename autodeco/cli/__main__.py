"""`python -m autodeco.cli ...` (and `accelerate launch -m autodeco.cli train ...`): the `autodeco` command."""

import sys

from autodeco.cli import main

sys.exit(main())
