"""`ebsfuse hash`: the SHA-256 (and MD5) of a snapshot's whole disk image, as an acquisition would.

The digest equals `sha256sum` of a downloaded copy of `<snapshot-id>.img`: every byte of the
volume in order, unwritten blocks as zeros. Blocks are listed with `BlockLister` (streamed, tokens
kept fresh) and fetched in parallel by worker threads through `EbsClient.get_block`, which
verifies each block's SHA-256 against the service's and writes the audit log line; the main
thread feeds the digests strictly in block order. Holes cost no request: the gaps between listed
blocks are hashed from a buffer of zeros.

Memory stays bounded: at most `window` fetched-but-not-yet-hashed blocks (512 KiB each) exist at
once; the main thread waits on the oldest before submitting more.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import BLOCK_SIZE
from ..ebs.client import EbsClient, RetryPolicy
from ..ebs.errors import EbsError, EbsfuseError
from ..ebs.listing import BlockLister, ListedBlock
from .progress import Progress

log = logging.getLogger(__name__)

# 32 requests in flight: at the service's ~50-100 ms per block about 300-600 blocks/s, well
# inside the 1000/s per-snapshot quota, so a hash can run beside a live mount of the same
# snapshot without throttling it.
DEFAULT_WORKERS = 32
# Fetched blocks waiting to be hashed, per worker: two keeps every worker busy while the main
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
    blocks_fetched: int
    bytes_fetched: int
    hole_blocks: int
    seconds: float

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
) -> HashResult:
    """Hash the whole image of `snapshot_id`; raise `HashInterrupted` on Ctrl-C."""
    policy = policy or RetryPolicy()
    started = time.monotonic()
    lister = BlockLister(client, snapshot_id, policy=policy)
    info = lister.describe()
    size = info.volume_bytes
    digests = _Digests(md5)
    stop = threading.Event()
    bar = Progress(snapshot_id, size, enabled=progress)
    fetched = 0

    def stoppable_sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise EbsError("interrupted", snapshot_id=snapshot_id)

    def fetch(entry: ListedBlock) -> bytes:
        return lister.fetch(client, entry, policy, sleep=stoppable_sleep)

    pending: collections.deque[tuple[int, concurrent.futures.Future[bytes]]] = collections.deque()

    def hash_oldest() -> None:
        nonlocal fetched
        index, future = pending.popleft()
        data = future.result()
        digests.zeros(index * BLOCK_SIZE - digests.position)
        digests.update(data)  # 512 KiB: EbsClient.get_block refuses any other length
        fetched += 1
        bar.advance(len(data), digests.position)

    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="ebsfuse-hash"
    )
    window = max(2, WINDOW_PER_WORKER * workers)
    try:
        for entry in lister:
            if entry.token is None or entry.index * BLOCK_SIZE >= size:
                continue
            pending.append((entry.index, pool.submit(fetch, entry)))
            while len(pending) >= window:
                hash_oldest()
        while pending:
            hash_oldest()
        digests.zeros(size - digests.position)
        bar.advance(0, size)
    except KeyboardInterrupt:
        raise HashInterrupted(f"interrupted; {snapshot_id} was not hashed") from None
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return HashResult(
        snapshot_id=snapshot_id,
        size=size,
        sha256=digests.sha256.hexdigest(),
        md5=digests.md5.hexdigest() if digests.md5 is not None else None,
        blocks_fetched=fetched,
        bytes_fetched=fetched * BLOCK_SIZE,
        hole_blocks=info.nblocks - fetched,
        seconds=time.monotonic() - started,
    )
