"""`python -m rlx COMMAND ...`: the `rlx` command (rlx/cli.py)."""

import sys

from rlx.cli import main

sys.exit(main())
