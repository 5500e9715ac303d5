"""`python -m ebsfuse`: the same as the `ebsfuse` command (the daemon re-executes itself so)."""

import sys

from .cli import main

sys.exit(main())
