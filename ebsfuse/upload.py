"""Upload a raw disk image as a new EBS snapshot through the direct APIs.

Blocks are read, hashed and sent by a pool of worker threads; each PutSnapshotBlock carries
the block's SHA-256, and CompleteSnapshot carries the count of blocks sent and the LINEAR
aggregate checksum, so the service checks the whole upload. All-zero blocks are skipped: an
unwritten block of an unencrypted snapshot without a parent reads as zeros.

Memory stays bounded: at most `2 * workers` blocks are read ahead of the uploads, and the
aggregate checksum is a running hash (blocks are read in ascending order, which is the order
LINEAR aggregation wants), so nothing grows with the volume size.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass

from . import BLOCK_SIZE, GIB
from .client import EbsClient, RetryPolicy, call_with_retries
from .errors import EbsfuseError

log = logging.getLogger(__name__)

_ZERO_DIGEST = hashlib.sha256(bytes(BLOCK_SIZE)).digest()


@dataclass(frozen=True)
class UploadResult:
    snapshot_id: str
    volume_size_gib: int
    blocks_written: int
    blocks_skipped: int
    bytes_written: int
    status: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def image_size(path: str) -> int:
    """Size of a regular file or a block device, in bytes."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def upload_image(
    client: EbsClient,
    path: str,
    *,
    description: str = "",
    workers: int = 64,
    policy: RetryPolicy | None = None,
) -> UploadResult:
    policy = policy or RetryPolicy()
    try:
        size = image_size(path)
    except OSError as exc:
        raise EbsfuseError(f"cannot read {path}: {exc.strerror}") from None
    if size == 0:
        raise EbsfuseError(f"{path} is empty")
    if size % BLOCK_SIZE:
        raise EbsfuseError(f"{path} is {size} bytes, not a multiple of the 512 KiB block size")
    volume_gib = max(1, math.ceil(size / GIB))
    started = call_with_retries(
        lambda: client.start_snapshot(VolumeSize=volume_gib, Description=description, Timeout=60),
        policy,
    )
    snapshot_id = started["SnapshotId"]
    log.info("%s: started for %s (%d GiB)", snapshot_id, path, volume_gib)
    linear = hashlib.sha256()
    written = 0
    skipped = 0

    def send(index: int, data: bytes, digest: bytes) -> None:
        checksum = base64.b64encode(digest).decode()
        call_with_retries(lambda: client.put_block(snapshot_id, index, data, checksum), policy)

    with (
        open(path, "rb", buffering=0) as image,
        concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        pending: set[concurrent.futures.Future[None]] = set()
        for index in range(size // BLOCK_SIZE):
            data = image.read(BLOCK_SIZE)
            digest = hashlib.sha256(data).digest()
            if digest == _ZERO_DIGEST:
                skipped += 1
                continue
            linear.update(digest)
            written += 1
            pending.add(pool.submit(send, index, data, digest))
            if len(pending) >= 2 * workers:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    future.result()
        for future in concurrent.futures.as_completed(pending):
            future.result()

    aggregate = base64.b64encode(linear.digest()).decode()
    status = call_with_retries(
        lambda: client.complete_snapshot(snapshot_id, written, aggregate), policy
    )
    log.info("%s: %s, %d blocks written, %d skipped", snapshot_id, status, written, skipped)
    return UploadResult(
        snapshot_id=snapshot_id,
        volume_size_gib=volume_gib,
        blocks_written=written,
        blocks_skipped=skipped,
        bytes_written=written * BLOCK_SIZE,
        status=status,
    )
