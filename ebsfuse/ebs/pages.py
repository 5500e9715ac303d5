"""Listing pages as evidence: a ListSnapshotBlocks or ListChangedBlocks answer is checked whole
before anything may believe it.

A block is verified by its SHA-256, but a listing decides which blocks are *holes*, and a hole
reads as zeros without a request. So a page that is not the service's complete, well-formed
answer must never teach anything: botocore parses a cut body, `{}` or a proxy's HTML page into
"no blocks, no NextToken", which reads as "holes to the end of the volume". Here a page is
accepted only if:

- it is a JSON object (the transport has already checked that the whole body arrived);
- `VolumeSize` is an integer from 1 to 65,536 GiB (the EBS maximum) and, once the caller knows
  the volume, equal to it; `BlockSize` is present and 524,288;
- `Blocks` (or `ChangedBlocks`; absent means none) is a list whose entries each have an
  integer index inside the volume (for changed blocks, inside the largest EBS volume: the first
  snapshot may be larger than the second, whose size the page gives) and a token string (for
  changed blocks: at least one of the two tokens), no index twice;
- `ExpiryTime`, where present, is a time, and `NextToken`, where present, is a string.

Anything else raises a retryable `EbsError` (code `MalformedListing`), never a page: it is
neither a hole nor the end of a listing. A VolumeSize outside the EBS range is refused without
retry (`InvalidVolumeSize`): no real snapshot has one, and a mount of it would overflow `stat`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, NoReturn, TypeVar

from .. import BLOCK_SIZE, GIB
from .errors import EbsError

# The largest EBS volume (and StartSnapshot's VolumeSize limit): 64 TiB.
MAX_VOLUME_GIB = 65536
# Tokens are at most 256 characters by the API's model; a longer string is not a token.
MAX_TOKEN_CHARS = 1024


# What a page says of each block it lists: its token (ListSnapshotBlocks), or a `ChangedBlock`
# with both snapshots' tokens (ListChangedBlocks).
V = TypeVar("V")


@dataclass(frozen=True)
class BlockPage(Generic[V]):
    """One checked page of ListSnapshotBlocks or ListChangedBlocks, blocks ascending."""

    blocks: list[tuple[int, V]]
    next_token: str | None
    expiry: datetime | None
    volume_size_gib: int
    block_size: int


@dataclass(frozen=True)
class ChangedBlock:
    index: int
    first_token: str | None
    second_token: str | None


class _Checker:
    """Raises the one error a malformed page gets, naming the snapshot and what is wrong."""

    def __init__(self, snapshot_id: str, start_index: int | None) -> None:
        self.snapshot_id = snapshot_id
        self.start_index = start_index

    def fail(
        self, what: str, *, code: str = "MalformedListing", retryable: bool = True
    ) -> NoReturn:
        raise EbsError(
            f"the listing page is not a valid answer: {what}",
            snapshot_id=self.snapshot_id,
            block_index=self.start_index,
            code=code,
            retryable=retryable,
        )

    def volume(self, doc: dict[str, Any], expected_gib: int | None) -> int:
        gib = doc.get("VolumeSize")
        if not isinstance(gib, int) or isinstance(gib, bool):
            self.fail(f"VolumeSize is {_shown(gib)}")
        if not 1 <= gib <= MAX_VOLUME_GIB:
            self.fail(
                f"VolumeSize {gib} GiB is outside 1..{MAX_VOLUME_GIB} (the EBS limits)",
                code="InvalidVolumeSize",
                retryable=False,
            )
        if expected_gib is not None and gib != expected_gib:
            self.fail(f"VolumeSize {gib} GiB, but the snapshot has {expected_gib} GiB")
        block_size = doc.get("BlockSize")
        if not isinstance(block_size, int) or isinstance(block_size, bool):
            self.fail(f"BlockSize is {_shown(block_size)}")
        if block_size != BLOCK_SIZE:
            self.fail(
                f"block size {block_size} is not the {BLOCK_SIZE} bytes EBS uses",
                code="UnsupportedBlockSize",
                retryable=False,
            )
        return gib

    def index(self, entry: dict[str, Any], nblocks: int) -> int:
        value = entry.get("BlockIndex")
        # An integer; a string of digits too (moto sends the index as text).
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(f"an entry's BlockIndex is {_shown(value)}")
        if not 0 <= value < nblocks:
            self.fail(f"block index {value} is outside the volume's {nblocks} blocks")
        return value

    def token(self, entry: dict[str, Any], key: str, *, required: bool) -> str | None:
        value = entry.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TOKEN_CHARS:
            self.fail(f"an entry's {key} is {_shown(value)}")
        return str(value)

    def entries(self, doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
        entries = doc.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            self.fail(f"{key} is not a list of entries")
        return entries

    def tail(self, doc: dict[str, Any]) -> tuple[str | None, datetime | None]:
        next_token = doc.get("NextToken")
        if next_token == "":
            next_token = None
        if next_token is not None and not isinstance(next_token, str):
            self.fail(f"NextToken is {_shown(next_token)}")
        return next_token, self.expiry(doc.get("ExpiryTime"))

    def expiry(self, value: object) -> datetime | None:
        # Absent: moto sends none; tokens are then renewed only when the service refuses one.
        if value is None:
            return None
        try:
            if _is_number(value):
                return datetime.fromtimestamp(float(value), UTC)  # type: ignore[arg-type]
            if isinstance(value, str):
                parsed = datetime.fromisoformat(value)
                return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        except (ValueError, OverflowError, OSError):
            pass
        self.fail(f"ExpiryTime is {_shown(value)}")

    def unique(self, indexes: list[int]) -> None:
        if any(a == b for a, b in itertools.pairwise(indexes)):
            self.fail("a block index is listed twice")


def block_page(
    doc: object,
    *,
    snapshot_id: str,
    start_index: int | None = None,
    volume_size_gib: int | None = None,
) -> BlockPage[str]:
    """A checked ListSnapshotBlocks page from its parsed JSON body; raises `EbsError`."""
    check = _Checker(snapshot_id, start_index)
    if not isinstance(doc, dict):
        check.fail(f"the body is {type(doc).__name__}, not a JSON object")
    gib = check.volume(doc, volume_size_gib)
    nblocks = _nblocks(gib)
    blocks = sorted(
        (check.index(e, nblocks), str(check.token(e, "BlockToken", required=True)))
        for e in check.entries(doc, "Blocks")
    )
    check.unique([i for i, _ in blocks])
    next_token, expiry = check.tail(doc)
    return BlockPage(blocks, next_token, expiry, gib, BLOCK_SIZE)


def changed_page(
    doc: object,
    *,
    snapshot_id: str,
    start_index: int | None = None,
    volume_size_gib: int | None = None,
) -> BlockPage[ChangedBlock]:
    """A checked ListChangedBlocks page: each changed block with both snapshots' tokens."""
    check = _Checker(snapshot_id, start_index)
    if not isinstance(doc, dict):
        check.fail(f"the body is {type(doc).__name__}, not a JSON object")
    gib = check.volume(doc, volume_size_gib)
    # VolumeSize is the second snapshot's; a block only the (larger) first one has lies past
    # it, so the bound here is the largest volume EBS has.
    nblocks = _nblocks(MAX_VOLUME_GIB)
    changed = []
    for entry in check.entries(doc, "ChangedBlocks"):
        index = check.index(entry, nblocks)
        first = check.token(entry, "FirstBlockToken", required=False)
        second = check.token(entry, "SecondBlockToken", required=False)
        if first is None and second is None:
            check.fail(f"changed block {index} has neither token")
        changed.append(ChangedBlock(index, first, second))
    changed.sort(key=lambda c: c.index)
    check.unique([c.index for c in changed])
    next_token, expiry = check.tail(doc)
    return BlockPage([(c.index, c) for c in changed], next_token, expiry, gib, BLOCK_SIZE)


def _nblocks(gib: int) -> int:
    return math.ceil(gib * GIB / BLOCK_SIZE)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: object) -> str:
    """A value for an error message: short, one line."""
    text = repr(value)
    return "missing" if value is None else (text if len(text) <= 40 else text[:37] + "...")
