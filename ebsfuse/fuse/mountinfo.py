"""What the kernel says is mounted at a path, from /proc/self/mountinfo.

Read from mountinfo rather than stat(): a stat of a FUSE mount point sends the daemon a request
it may not be able to serve (not yet, or not any more).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    major: int
    minor: int
    fstype: str  # e.g. "fuse.ebsfuse", "ext4"
    source: str  # e.g. "ebsfuse", "/dev/loop3"


def topmost(path: str) -> MountEntry | None:
    """The mount on top at `path` (a resolved path, as the kernel records it), or None."""
    found = None
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[4].replace("\\040", " ") != path:
                continue
            major, minor = fields[2].split(":")
            sep = fields.index("-")
            found = MountEntry(int(major), int(minor), fields[sep + 1], fields[sep + 2])
    return found
