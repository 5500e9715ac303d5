"""`ebsfuse info`: what a snapshot holds, from one walk of ListSnapshotBlocks.

Volume size and block size come with the first page (`core.pipeline.describe`); written
blocks, written bytes and the first and last written offsets are counted range by range as the
pipeline's block map lists them (nothing is kept per block), and the token expiry is the last
page's ExpiryTime.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from .. import BLOCK_SIZE
from ..core.pipeline import WALK_PAGE, describe, open_snapshot, run_interruptibly, tool_context
from ..core.reader import FetchContext
from ..ebs.client import EbsClient, validate_snapshot_id
from ..ebs.retry import RetryPolicy
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class SnapshotReport:
    """What `ebsfuse info` prints."""

    snapshot_id: str
    volume_size: int = 0
    volume_size_gib: int = 0
    block_size: int = BLOCK_SIZE
    written_blocks: int = 0
    written_bytes: int = 0
    first_written_offset: int | None = None
    last_written_offset: int | None = None  # offset of the last written block
    written_end: int | None = None  # one past its last byte
    share: float = 0.0
    token_expiry: str | None = None
    pages: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def snapshot_info(
    client: EbsClient,
    snapshot_id: str,
    *,
    policy: RetryPolicy | None = None,
    progress: bool = False,
) -> SnapshotReport:
    validate_snapshot_id(snapshot_id)
    ctx = tool_context(client, 1, policy or RetryPolicy())
    return run_interruptibly(_report, ctx, snapshot_id, progress)


async def _report(ctx: FetchContext, snapshot_id: str, progress: bool) -> SnapshotReport:
    info = await describe(ctx, snapshot_id, max_results=WALK_PAGE)
    blockmap = open_snapshot(ctx, info).blockmap
    result = SnapshotReport(
        snapshot_id,
        volume_size=info.size_bytes,
        volume_size_gib=info.volume_size_gib,
        block_size=info.block_size,
    )
    last: int | None = None
    with Progress(snapshot_id, info.num_blocks, enabled=progress) as bar:
        async for index, _ in blockmap.listed():
            if result.first_written_offset is None:
                result.first_written_offset = index * BLOCK_SIZE
            result.written_blocks += 1
            last = index
            bar.advance(0, index + 1)
    result.written_bytes = result.written_blocks * BLOCK_SIZE
    if last is not None:
        result.last_written_offset = last * BLOCK_SIZE
        result.written_end = (last + 1) * BLOCK_SIZE
    if result.volume_size:
        result.share = result.written_bytes / result.volume_size
    expiry = blockmap.expiry or info.first_page.expiry
    if expiry is not None:
        result.token_expiry = expiry.isoformat()
    result.pages = blockmap.list_calls + 1  # and the describe call's
    return result
