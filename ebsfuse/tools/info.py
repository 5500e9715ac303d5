"""`ebsfuse info`: what a snapshot holds, from one streamed walk of ListSnapshotBlocks.

Volume size and block size come with the first page; written blocks, written bytes and the
first and last written offsets are counted page by page (nothing is kept per block), and the
token expiry is the first page's ExpiryTime.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from .. import BLOCK_SIZE
from ..ebs.client import EbsClient, RetryPolicy, validate_snapshot_id
from ..ebs.listing import BlockLister
from .progress import Progress

log = logging.getLogger(__name__)


@dataclass
class SnapshotInfo:
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
) -> SnapshotInfo:
    validate_snapshot_id(snapshot_id)
    lister = BlockLister(client, snapshot_id, policy=policy)
    result = SnapshotInfo(snapshot_id)
    last: int | None = None
    bar: Progress | None = None
    try:
        for block in lister:
            if bar is None:
                bar = _bar(lister, progress)
            if result.first_written_offset is None:
                result.first_written_offset = block.index * BLOCK_SIZE
            result.written_blocks += 1
            last = block.index
            bar.advance(0, block.index + 1)
    finally:
        if bar is not None:
            bar.close()
    info = lister.describe()
    result.volume_size = info.volume_bytes
    result.volume_size_gib = info.volume_size_gib
    result.block_size = info.block_size
    result.written_bytes = result.written_blocks * BLOCK_SIZE
    if last is not None:
        result.last_written_offset = last * BLOCK_SIZE
        result.written_end = (last + 1) * BLOCK_SIZE
    if result.volume_size:
        result.share = result.written_bytes / result.volume_size
    if info.expiry is not None:
        result.token_expiry = info.expiry.isoformat()
    result.pages = lister.pages
    return result


def _bar(lister: BlockLister, enabled: bool) -> Progress:
    info = lister.describe()
    return Progress(lister.snapshot_id, info.nblocks, enabled=enabled)
