"""Snapshot ids: the one shape check every command makes before any request."""

from __future__ import annotations

import re

from .errors import EbsError

# The API's pattern is ^snap-[0-9a-f]+$ in at most 64 characters; real ids have 17 hex digits.
SNAPSHOT_ID_RE = re.compile(r"^snap-[0-9a-f]{1,59}$")


def validate_snapshot_id(snapshot_id: str) -> str:
    if not SNAPSHOT_ID_RE.match(snapshot_id):
        raise EbsError(
            "not a snapshot id (expected snap- and hex digits, e.g. snap-0123456789abcdef0)",
            snapshot_id=snapshot_id,
            code="InvalidSnapshotId",
        )
    return snapshot_id
