"""`ebsfuse diff`: the blocks changed between two snapshots, as coalesced byte ranges.

ListChangedBlocks is streamed (`BlockLister`) and consecutive block indexes are merged into
ranges as they arrive; each range is handed to the caller as soon as it is closed, so memory
does not grow with the number of changes. A block counts as changed when the two snapshots
read differently there: written in both with different content, or present in one only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .. import BLOCK_SIZE
from ..ebs.client import EbsClient, RetryPolicy, validate_snapshot_id
from ..ebs.errors import EbsfuseError
from ..ebs.listing import BlockLister
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangedRange:
    """Consecutive changed blocks `first_block .. first_block + blocks - 1`."""

    first_block: int
    blocks: int

    @property
    def offset(self) -> int:
        return self.first_block * BLOCK_SIZE

    @property
    def length(self) -> int:
        return self.blocks * BLOCK_SIZE

    def as_dict(self) -> dict[str, int]:
        return {
            "offset": self.offset,
            "length": self.length,
            "first_block": self.first_block,
            "blocks": self.blocks,
        }


@dataclass
class DiffSummary:
    first_snapshot_id: str
    second_snapshot_id: str
    volume_size: int = 0
    block_size: int = BLOCK_SIZE
    changed_blocks: int = 0
    changed_bytes: int = 0
    ranges: int = 0
    only_in_first: int = 0
    only_in_second: int = 0
    in_both: int = 0
    share: float = 0.0  # changed bytes / volume size

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def diff_snapshots(
    client: EbsClient,
    first: str,
    second: str,
    on_range: Callable[[ChangedRange], None],
    *,
    policy: RetryPolicy | None = None,
    progress: bool = False,
) -> DiffSummary:
    """Call `on_range` for each changed range in ascending order; return the totals."""
    validate_snapshot_id(first)
    validate_snapshot_id(second)
    if first == second:
        raise EbsfuseError("the two snapshot ids are the same")
    lister = BlockLister(client, second, first_snapshot_id=first, policy=policy)
    info = lister.describe()
    summary = DiffSummary(first, second, info.volume_bytes, info.block_size)
    bar = Progress(f"{first}..{second}", info.nblocks, enabled=progress)
    start = count = 0
    try:
        for block in lister:
            summary.changed_blocks += 1
            if block.first_token is None:
                summary.only_in_second += 1
            elif block.token is None:
                summary.only_in_first += 1
            else:
                summary.in_both += 1
            if count and block.index == start + count:
                count += 1
            else:
                if count:
                    on_range(ChangedRange(start, count))
                    summary.ranges += 1
                start, count = block.index, 1
            bar.advance(0, block.index + 1)
        if count:
            on_range(ChangedRange(start, count))
            summary.ranges += 1
    finally:
        bar.close()
    summary.changed_bytes = summary.changed_blocks * BLOCK_SIZE
    if summary.volume_size:
        summary.share = summary.changed_bytes / summary.volume_size
    return summary
