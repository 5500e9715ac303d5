"""The command line: argument parsing and one function per command; imports every layer below.

`commands` holds the parser, `main` and the mount family (mount, unmount, stats, emulator);
`tools` the snapshot tools and `workflows` browse, restore and hash. Heavy modules (pyfuse3,
trio, boto3) are imported inside the commands that need them, so `ebsfuse --help` and
`ebsfuse stats` start light.
"""

from .commands import main

__all__ = ["main"]
