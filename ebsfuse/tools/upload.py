"""Upload a raw disk image (a file or a block device) as a new EBS snapshot.

Blocks are read in ascending order by the main thread, compared, hashed and handed to a pool
of worker threads that send them with PutSnapshotBlock, each carrying its SHA-256.
CompleteSnapshot carries the count of blocks sent and the LINEAR aggregate checksum (SHA-256
over the per-block digests in ascending index order, kept as a running hash), so the service
checks the whole upload.

Which blocks are sent:
- without a parent, every block except those of zeros -- unless the snapshot is encrypted: an
  unwritten block of an encrypted snapshot restores as random data, so zeros are sent too;
- with `parent` (ParentSnapshotId), only blocks that differ from the parent. The parent's
  content comes from `parent_image` (the image it was made from) or from a manifest written by
  the upload that made it. A zero block is skipped only where the parent's block also reads as
  zeros, and, for an encrypted lineage, only where the parent is known to have *written* it.

StartSnapshot carries a ClientToken, so a retried request never starts two snapshots.
"Snapshot does not exist" right after StartSnapshot (eventual consistency) is retried for up to
`NOT_FOUND_GRACE_S`.

Manifest (`manifest_out`): a header line, a JSON line, then one 40-byte record per block the
snapshot holds (big-endian block index, SHA-256), ascending: non-zero blocks, or for an
encrypted snapshot every block written in its lineage. It grows with the data, not the volume,
and is read as a stream when it serves as the next upload's parent.

Memory stays bounded: at most `2 * workers` blocks are read ahead of the uploads and the parent
is read in step with the image, so nothing grows with the volume size.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from .. import BLOCK_SIZE, GIB
from ..core.pipeline import describe_snapshot
from ..ebs.client import EbsClient, validate_snapshot_id
from ..ebs.errors import EbsError, EbsfuseError
from ..ebs.retry import RetryPolicy, call_with_retries
from .progress import Progress

log = logging.getLogger(__name__)

ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_DIGEST = hashlib.sha256(ZERO_BLOCK).digest()
# The service documents "snapshot does not exist" for a few seconds after StartSnapshot and
# users report it for up to about two minutes: keep retrying such refusals that long.
NOT_FOUND_GRACE_S = 120.0
# Poll interval of --wait (the status check is one small ListSnapshotBlocks).
WAIT_POLL_S = 2.0
MANIFEST_MAGIC = b"EBSFUSE-MANIFEST 1\n"
_RECORD = struct.Struct(">Q32s")  # block index, SHA-256 digest
MAX_VOLUME_GIB = 65536  # the API's largest VolumeSize


class UploadInterrupted(EbsfuseError):
    """Ctrl-C during an upload."""


class _Stopped(Exception):
    """Raised inside a worker when the upload is being abandoned."""


@dataclass
class UploadOptions:
    description: str = ""
    tags: list[tuple[str, str]] = field(default_factory=list)
    parent_snapshot_id: str | None = None
    parent_image: str | None = None
    parent_manifest: str | None = None
    manifest_out: str | None = None
    encrypted: bool = False
    kms_key_arn: str | None = None
    timeout_minutes: int = 60
    volume_size_gib: int | None = None
    client_token: str | None = None
    pad: bool = False
    wait: bool = False
    wait_timeout_s: float = 6 * 3600.0
    workers: int = 64
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool = False


@dataclass
class UploadResult:
    snapshot_id: str
    volume_size_gib: int
    blocks_written: int
    blocks_skipped: int
    bytes_written: int
    status: str
    parent_snapshot_id: str | None = None
    encrypted: bool = False
    blocks_zero_skipped: int = 0
    blocks_unchanged: int = 0
    image_size: int = 0
    padded_bytes: int = 0
    client_token: str = ""
    manifest: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def image_size(path: str) -> int:
    """Size of a regular file or a block device, in bytes."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


# -- manifests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestHeader:
    snapshot_id: str
    volume_size_gib: int
    image_size: int
    encrypted: bool
    block_size: int = BLOCK_SIZE


class ManifestWriter:
    """Writes a manifest to `path + '.tmp'`, renamed into place by `commit` only."""

    def __init__(self, path: str, header: ManifestHeader) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        self.f: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 -- closed by commit/abort
        self.f.write(MANIFEST_MAGIC)
        self.f.write(json.dumps(asdict(header)).encode() + b"\n")

    def add(self, index: int, digest: bytes) -> None:
        self.f.write(_RECORD.pack(index, digest))

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def read_manifest(path: str) -> tuple[ManifestHeader, Iterator[tuple[int, bytes]]]:
    """The header, and a streaming iterator over (index, digest) records."""
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed by the iterator
    except OSError as exc:
        raise EbsfuseError(f"cannot read manifest {path}: {exc.strerror}") from None
    try:
        if f.readline() != MANIFEST_MAGIC:
            raise ValueError("not an ebsfuse manifest")
        header = ManifestHeader(**json.loads(f.readline()))
    except (ValueError, TypeError) as exc:
        f.close()
        raise EbsfuseError(f"{path} is not a valid manifest: {exc}") from None

    def records() -> Iterator[tuple[int, bytes]]:
        with f:
            last = -1
            while chunk := f.read(_RECORD.size * 4096):
                if len(chunk) % _RECORD.size:
                    raise EbsfuseError(f"{path} is truncated")
                for index, digest in _RECORD.iter_unpack(chunk):
                    if index <= last:
                        raise EbsfuseError(f"{path} is corrupt (indexes out of order)")
                    last = index
                    yield index, digest

    return header, records()


class _ManifestParent:
    """Parent digests by index, from a manifest stream read in step with the image."""

    def __init__(self, records: Iterator[tuple[int, bytes]]) -> None:
        self._records = records
        self._next: tuple[int, bytes] | None = next(records, None)

    def digest(self, index: int) -> bytes | None:
        while self._next is not None and self._next[0] < index:
            self._next = next(self._records, None)
        if self._next is not None and self._next[0] == index:
            return self._next[1]
        return None


# -- the upload -------------------------------------------------------------------------------


def _check_image(path: str, pad: bool) -> tuple[int, int]:
    """(image size, bytes of padding needed); EbsfuseError for what cannot be uploaded."""
    try:
        size = image_size(path)
    except IsADirectoryError:
        raise EbsfuseError(f"{path} is a directory, not an image") from None
    except OSError as exc:
        raise EbsfuseError(f"cannot read {path}: {exc.strerror}") from None
    if size == 0:
        raise EbsfuseError(f"{path} is empty")
    remainder = size % BLOCK_SIZE
    if remainder and not pad:
        raise EbsfuseError(
            f"{path} is {size} bytes, not a multiple of the 512 KiB block size; "
            "--pad pads the last block with zeros"
        )
    return size, (BLOCK_SIZE - remainder) % BLOCK_SIZE


def upload_image(
    client: EbsClient,
    path: str,
    opts: UploadOptions | None = None,
    *,
    description: str | None = None,
    workers: int | None = None,
    policy: RetryPolicy | None = None,
) -> UploadResult:
    """Upload `path` as a new snapshot; see the module docstring. Raises EbsfuseError."""
    opts = opts or UploadOptions()
    if description is not None:
        opts.description = description
    if workers is not None:
        opts.workers = workers
    if policy is not None:
        opts.policy = policy
    started_clock = time.monotonic()
    size, padding = _check_image(path, opts.pad)
    parent = opts.parent_snapshot_id
    if parent is not None:
        validate_snapshot_id(parent)
        if opts.encrypted or opts.kms_key_arn:
            raise EbsfuseError(
                "--encrypted and --kms-key-arn cannot be combined with --parent: "
                "a child snapshot takes its parent's encryption"
            )
        if not (opts.parent_image or opts.parent_manifest):
            raise EbsfuseError(
                "--parent needs --parent-image or --parent-manifest to know which blocks changed"
            )
    elif opts.parent_image or opts.parent_manifest:
        raise EbsfuseError("--parent-image and --parent-manifest need --parent SNAPSHOT_ID")
    if opts.kms_key_arn and not opts.encrypted:
        raise EbsfuseError("--kms-key-arn needs --encrypted")

    manifest_parent: _ManifestParent | None = None
    parent_image_file: BinaryIO | None = None
    parent_gib = 0
    if parent is not None:
        # One small listing: the parent exists, is completed, and how large its volume is.
        parent_gib = describe_snapshot(client, parent, opts.policy).volume_size_gib
        if opts.parent_manifest:
            header, records = read_manifest(opts.parent_manifest)
            if header.snapshot_id != parent:
                raise EbsfuseError(
                    f"{opts.parent_manifest} describes {header.snapshot_id}, not {parent}"
                )
            manifest_parent = _ManifestParent(records)
        else:
            assert opts.parent_image is not None
            try:
                parent_image_file = open(opts.parent_image, "rb", buffering=0)  # noqa: SIM115
            except OSError as exc:
                raise EbsfuseError(f"cannot read {opts.parent_image}: {exc.strerror}") from None

    needed_gib = max(1, math.ceil((size + padding) / GIB), parent_gib)
    volume_gib = opts.volume_size_gib or needed_gib
    if volume_gib < needed_gib:
        raise EbsfuseError(
            f"--volume-size {volume_gib} GiB is smaller than the {needed_gib} GiB needed"
        )
    if volume_gib > MAX_VOLUME_GIB:
        raise EbsfuseError(f"{path} is larger than the largest EBS volume (64 TiB)")

    if opts.manifest_out:
        # Checked before StartSnapshot: failing after it would leave a pending snapshot behind.
        folder = os.path.dirname(os.path.abspath(opts.manifest_out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise EbsfuseError(
                f"cannot write manifest {opts.manifest_out}: {folder} is not a writable directory"
            )

    client_token = opts.client_token or str(uuid.uuid4())
    request: dict[str, Any] = {
        "VolumeSize": volume_gib,
        "Timeout": opts.timeout_minutes,
        "ClientToken": client_token,
    }
    if opts.description:
        request["Description"] = opts.description
    if opts.tags:
        request["Tags"] = [{"Key": k, "Value": v} for k, v in opts.tags]
    if parent is not None:
        request["ParentSnapshotId"] = parent
    if opts.encrypted:
        request["Encrypted"] = True
        if opts.kms_key_arn:
            request["KmsKeyArn"] = opts.kms_key_arn
    try:
        started = call_with_retries(lambda: client.start_snapshot(**request), opts.policy)
        snapshot_id = started["SnapshotId"]
        encrypted = bool(
            opts.encrypted or started.get("SseType") == "sse-kms" or started.get("KmsKeyArn")
        )
        log.info(
            "%s: started for %s (%d GiB, parent %s, encrypted %s)",
            snapshot_id,
            path,
            volume_gib,
            parent,
            encrypted,
        )
        result = UploadResult(
            snapshot_id=snapshot_id,
            volume_size_gib=volume_gib,
            blocks_written=0,
            blocks_skipped=0,
            bytes_written=0,
            status=str(started.get("Status", "pending")),
            parent_snapshot_id=parent,
            encrypted=encrypted,
            image_size=size,
            padded_bytes=padding,
            client_token=client_token,
            manifest=opts.manifest_out,
        )
        manifest = None
        if opts.manifest_out:
            header = ManifestHeader(snapshot_id, volume_gib, size + padding, encrypted)
            try:
                manifest = ManifestWriter(opts.manifest_out, header)
            except OSError as exc:
                raise EbsfuseError(
                    f"cannot write manifest {opts.manifest_out}: {exc.strerror}"
                ) from None
        try:
            aggregate = _send_blocks(
                client, path, size + padding, opts, result, manifest_parent, parent_image_file,
                manifest,
            )  # fmt: skip
        except BaseException:
            if manifest is not None:
                manifest.abort()
            raise
        result.status = call_with_retries(
            lambda: client.complete_snapshot(snapshot_id, result.blocks_written, aggregate),
            opts.policy,
            keep_trying=_NotFoundGrace(),
        )
        if manifest is not None:
            manifest.commit()
        if opts.wait and result.status != "completed":
            result.status = wait_completed(client, snapshot_id, opts.wait_timeout_s, opts.policy)
    finally:
        if parent_image_file is not None:
            parent_image_file.close()
    result.seconds = time.monotonic() - started_clock
    log.info(
        "%s: %s, %d blocks written, %d skipped",
        snapshot_id,
        result.status,
        result.blocks_written,
        result.blocks_skipped,
    )
    return result


class _NotFoundGrace:
    """Retry "the snapshot does not exist" past the policy until `NOT_FOUND_GRACE_S` after it
    starts: right after StartSnapshot the new snapshot may not be visible yet."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + NOT_FOUND_GRACE_S

    def __call__(self, error: EbsError) -> bool:
        if error.code != "ResourceNotFoundException" or time.monotonic() >= self.deadline:
            return False
        log.info("%s; retrying (eventual consistency)", error)
        return True


def _send_blocks(
    client: EbsClient,
    path: str,
    total: int,
    opts: UploadOptions,
    result: UploadResult,
    manifest_parent: _ManifestParent | None,
    parent_image: BinaryIO | None,
    manifest: ManifestWriter | None,
) -> str:
    """Send the blocks that need sending; returns the LINEAR aggregate checksum."""
    snapshot_id = result.snapshot_id
    encrypted = result.encrypted
    linear = hashlib.sha256()
    stop = threading.Event()
    errors: list[BaseException] = []
    errors_lock = threading.Lock()
    not_found = _NotFoundGrace()
    progress = Progress(snapshot_id, total, enabled=opts.progress)

    def stoppable_sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped()

    def send(index: int, data: bytes, digest: bytes) -> None:
        if stop.is_set():
            raise _Stopped()
        checksum = base64.b64encode(digest).decode()
        call_with_retries(
            lambda: client.put_block(snapshot_id, index, data, checksum),
            opts.policy,
            sleep=stoppable_sleep,
            keep_trying=not_found,
        )
        progress.advance(len(data))

    def done_callback(future: concurrent.futures.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None and not isinstance(error, _Stopped):
            with errors_lock:
                errors.append(error)
            stop.set()

    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=opts.workers, thread_name_prefix="ebsfuse-upload"
    )
    pending: set[concurrent.futures.Future[None]] = set()
    try:
        try:
            with open(path, "rb", buffering=0) as image:
                for index in range(total // BLOCK_SIZE):
                    if stop.is_set():
                        break
                    data = _read_block(image, path)
                    zero = data == ZERO_BLOCK
                    digest = _ZERO_DIGEST if zero else hashlib.sha256(data).digest()
                    if _unchanged(
                        index, data, digest, zero, encrypted, manifest_parent, parent_image
                    ):
                        result.blocks_skipped += 1
                        if zero and manifest_parent is None and parent_image is None:
                            result.blocks_zero_skipped += 1
                        else:
                            result.blocks_unchanged += 1
                        # Blocks the snapshot holds (inherited or not) go into its manifest.
                        if manifest is not None and (encrypted or not zero):
                            manifest.add(index, digest)
                        progress.advance(0, (index + 1) * BLOCK_SIZE)
                        continue
                    if manifest is not None and (encrypted or not zero):
                        manifest.add(index, digest)
                    linear.update(digest)
                    result.blocks_written += 1
                    result.bytes_written += BLOCK_SIZE
                    future = pool.submit(send, index, data, digest)
                    future.add_done_callback(done_callback)
                    pending.add(future)
                    progress.advance(0, (index + 1) * BLOCK_SIZE)
                    if len(pending) >= 2 * opts.workers:
                        _, pending = concurrent.futures.wait(
                            pending, return_when=concurrent.futures.FIRST_COMPLETED
                        )
            concurrent.futures.wait(pending)
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
    except KeyboardInterrupt:
        raise UploadInterrupted(
            f"interrupted; {snapshot_id} stays pending and expires after "
            f"{opts.timeout_minutes} minutes"
        ) from None
    except OSError as exc:
        raise EbsfuseError(f"cannot read {path}: {exc.strerror}") from None
    if errors:
        raise errors[0]
    return base64.b64encode(linear.digest()).decode()


def _read_block(f: BinaryIO, path: str) -> bytes:
    data = f.read(BLOCK_SIZE)
    if data is None:
        data = b""
    while len(data) < BLOCK_SIZE:
        more = f.read(BLOCK_SIZE - len(data))
        if not more:
            # The end of the image: the last block is padded with zeros (--pad).
            return data + bytes(BLOCK_SIZE - len(data))
        data += more
    return data


def _unchanged(
    index: int,
    data: bytes,
    digest: bytes,
    zero: bool,
    encrypted: bool,
    manifest_parent: _ManifestParent | None,
    parent_image: BinaryIO | None,
) -> bool:
    """True when the new snapshot reads `data` at `index` without this block being sent."""
    if manifest_parent is not None:
        known = manifest_parent.digest(index)  # recorded: the parent holds this content
        if known is not None:
            return known == digest
        # Not recorded: the parent reads zeros there -- unless the lineage is encrypted, where
        # an unwritten block restores as random data.
        return zero and not encrypted
    if parent_image is not None:
        # Whole blocks even from a source that returns short reads (FUSE, pipes, NFS): a short
        # one must not shift every later parent block. Past its end: zeros.
        parent = _read_block(parent_image, "")
        if encrypted:
            # Only a non-zero parent block is known to have been written.
            return not zero and parent == data
        return parent == data
    return zero and not encrypted


def wait_completed(
    client: EbsClient, snapshot_id: str, timeout_s: float, policy: RetryPolicy
) -> str:
    """Poll until the snapshot can be listed (completed); EbsfuseError on error or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call_with_retries(lambda: client.list_blocks(snapshot_id, max_results=100), policy)
            return "completed"
        except EbsError as error:
            text = str(error).lower()
            if "pending" in text or error.code == "ResourceNotFoundException":
                pass
            elif " error" in text and error.code == "ValidationException":
                raise EbsfuseError(f"{snapshot_id} failed: {error.message}") from None
            else:
                raise
        if time.monotonic() >= deadline:
            raise EbsfuseError(f"{snapshot_id} is still pending after {timeout_s:.0f} s")
        time.sleep(WAIT_POLL_S)
