"""`ebsfuse diff`: the blocks changed between two snapshots, as coalesced byte ranges.

ListChangedBlocks is walked range by range through the pipeline's block map of the pair
(`core.pipeline.open_changes`: checked pages, retries, one range in memory), and consecutive
block indexes are merged into ranges as they arrive; each range is handed to the caller as
soon as it is closed, so memory does not grow with the number of changes. A block counts as
changed when the two snapshots read differently there: written in both with different content,
or present in one only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from .. import BLOCK_SIZE, GIB
from ..core.pipeline import open_changes, run_interruptibly, tool_context
from ..core.reader import FetchContext
from ..core.stats import ReadStats
from ..ebs.client import EbsClient, validate_snapshot_id
from ..ebs.errors import EbsfuseError
from ..ebs.retry import RetryPolicy
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
    ctx = tool_context(client, 1, policy or RetryPolicy())
    return run_interruptibly(_diff, ctx, first, second, on_range, progress)


async def _diff(
    ctx: FetchContext,
    first: str,
    second: str,
    on_range: Callable[[ChangedRange], None],
    progress: bool,
) -> DiffSummary:
    changes, gib = await open_changes(ctx, first, second, ReadStats())
    summary = DiffSummary(first, second, gib * GIB, BLOCK_SIZE)
    ranges = _Coalescer(on_range, summary)
    with Progress(f"{first}..{second}", gib * GIB // BLOCK_SIZE, enabled=progress) as bar:
        async for index, block in changes.listed():
            summary.changed_blocks += 1
            if block.first_token is None:
                summary.only_in_second += 1
            elif block.second_token is None:
                summary.only_in_first += 1
            else:
                summary.in_both += 1
            ranges.add(index)
            bar.advance(0, index + 1)
        ranges.close()
    summary.changed_bytes = summary.changed_blocks * BLOCK_SIZE
    if summary.volume_size:
        summary.share = summary.changed_bytes / summary.volume_size
    return summary


class _Coalescer:
    """Consecutive changed blocks merged into ranges, each handed on as soon as it closes."""

    def __init__(self, on_range: Callable[[ChangedRange], None], summary: DiffSummary) -> None:
        self._on_range = on_range
        self._summary = summary
        self._start = self._count = 0

    def add(self, index: int) -> None:
        if self._count and index == self._start + self._count:
            self._count += 1
            return
        self.close()
        self._start, self._count = index, 1

    def close(self) -> None:
        if self._count:
            self._on_range(ChangedRange(self._start, self._count))
            self._summary.ranges += 1
            self._count = 0
