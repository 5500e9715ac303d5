"""`ebsfuse hash`: the SHA-256 (and MD5) of a snapshot's whole disk image, as an acquisition would.

The digest equals `sha256sum` of a downloaded copy of `<snapshot-id>.img`: every byte of the
volume in order, unwritten blocks as zeros. The blocks come from the one block pipeline
(`core.pipeline.ordered_blocks`: listed, fetched `workers` at a time, each verified against
the service's SHA-256 and written to the audit log) in ascending order, and are hashed as they
arrive. Holes cost no request: the gaps between listed blocks are hashed from a buffer of zeros.

Memory stays bounded: at most `WINDOW_PER_WORKER * workers` fetched-but-not-yet-hashed blocks
(512 KiB each) exist at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import BLOCK_SIZE
from ..core.pipeline import (
    WALK_PAGE,
    borrow_from_bases,
    describe,
    listed_blocks,
    open_snapshot,
    ordered_blocks,
    run_interruptibly,
    tool_context,
)
from ..core.reader import FetchContext
from ..ebs.client import EbsClient
from ..ebs.errors import EbsfuseError
from ..ebs.retry import RetryPolicy
from .progress import Progress

log = logging.getLogger(__name__)

# 32 requests in flight: at the service's ~50-100 ms per block about 300-600 blocks/s, well
# inside the 1000/s per-snapshot quota, so a hash can run beside a live mount of the same
# snapshot without throttling it.
DEFAULT_WORKERS = 32
# Fetched blocks waiting to be hashed, per worker: two keeps every worker busy while the trio
# thread hashes (SHA-256 runs at ~1 GB/s, faster than blocks arrive) and bounds memory to
# 2 x 32 x 512 KiB = 32 MiB by default.
WINDOW_PER_WORKER = 2
# Holes are hashed from this many zero bytes at a time (hashlib drops the GIL on large
# buffers, so the fetch threads keep running meanwhile).
ZERO_CHUNK = 32 * BLOCK_SIZE
_ZEROS = bytes(ZERO_CHUNK)


class HashInterrupted(EbsfuseError):
    """Ctrl-C or SIGTERM while hashing: nothing to clean up, nothing printed as a digest."""


@dataclass
class HashResult:
    snapshot_id: str
    size: int
    sha256: str
    md5: str | None
    blocks_fetched: int  # blocks that took a GetSnapshotBlock (retries not counted)
    bytes_fetched: int
    hole_blocks: int
    seconds: float
    blocks_cached: int = 0  # written blocks served by the disk tier or a base's

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Digests:
    """SHA-256 and optionally MD5, fed in order."""

    def __init__(self, md5: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.position = 0  # bytes hashed so far

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.position += len(data)

    def zeros(self, nbytes: int) -> None:
        while nbytes > 0:
            chunk = min(nbytes, ZERO_CHUNK)
            self.update(memoryview(_ZEROS)[:chunk])
            nbytes -= chunk


def hash_snapshot(
    client: EbsClient,
    snapshot_id: str,
    *,
    workers: int = DEFAULT_WORKERS,
    md5: bool = False,
    policy: RetryPolicy | None = None,
    progress: bool = False,
    cache_dir: str | None = None,
    cache_dir_size: int | None = None,
    base_ids: list[str] | None = None,
) -> HashResult:
    """Hash the whole image of `snapshot_id`; raise `HashInterrupted` on Ctrl-C or SIGTERM.

    With `cache_dir` blocks come from and go to the disk tier; `base_ids` lend their blocks
    stored there where the service says they are unchanged.
    """
    ctx = tool_context(
        client, workers, policy or RetryPolicy(), cache_dir=cache_dir, cache_dir_size=cache_dir_size
    )
    try:
        return run_interruptibly(_hash, ctx, snapshot_id, md5, progress, base_ids or [])
    except KeyboardInterrupt:
        raise HashInterrupted(f"interrupted; {snapshot_id} was not hashed") from None
    finally:
        ctx.close()


async def _hash(
    ctx: FetchContext, snapshot_id: str, md5: bool, progress: bool, base_ids: list[str]
) -> HashResult:
    started = time.monotonic()
    info = await describe(ctx, snapshot_id, max_results=WALK_PAGE)
    await borrow_from_bases(ctx, info, base_ids)
    reader = open_snapshot(ctx, info)
    size = info.size_bytes
    digests = _Digests(md5)
    written = 0
    window = WINDOW_PER_WORKER * ctx.max_concurrency
    with Progress(snapshot_id, size, enabled=progress) as bar:
        async with ordered_blocks(reader, listed_blocks(reader), window) as blocks:
            async for index, data in blocks:
                assert data is not None  # listed blocks are fetched; 512 KiB, verified
                digests.zeros(index * BLOCK_SIZE - digests.position)
                digests.update(data)
                written += 1
                bar.advance(len(data), digests.position)
        digests.zeros(size - digests.position)
        bar.advance(0, size)
    return HashResult(
        snapshot_id=snapshot_id,
        size=size,
        sha256=digests.sha256.hexdigest(),
        md5=digests.md5.hexdigest() if digests.md5 is not None else None,
        blocks_fetched=reader.stats.cache_misses,
        bytes_fetched=reader.stats.cache_misses * BLOCK_SIZE,
        blocks_cached=written - reader.stats.cache_misses,
        hole_blocks=info.num_blocks - written,
        seconds=time.monotonic() - started,
    )
