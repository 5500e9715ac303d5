"""`python -m ebsfuse.emulator`: run the EBS direct API emulator."""

import sys

from .cli import main

sys.exit(main())
