"""The EBS direct API client that the mount and the snapshot tools share.

Each method makes exactly one request: botocore's own retries are switched off so that the
retry policy (`RetryPolicy`) lives in one place and is the same for every caller, and every
failure comes back as an `EbsError` that says whether retrying can help. `get_block` verifies
a block's length and SHA-256 against the headers the service sent before returning a byte.

Calls block; the trio side runs them through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from . import BLOCK_SIZE
from .errors import ChecksumMismatch, EbsError
from .ids import validate_snapshot_id as validate_snapshot_id

log = logging.getLogger(__name__)


# Connect fails fast (a loopback or VPC endpoint answers in milliseconds); a read may wait on
# a slow block but never forever: the service answers a 512 KiB block in tens of milliseconds,
# so 30 s means something is broken and the attempt is retried.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0

# Errors the service documents as transient, plus the ones seen in the wild.
_RETRYABLE_CODES = {
    "InternalServerException",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
}
_THROTTLE_CODES = {
    "RequestThrottledException",
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "SlowDown",
}
# Errors no retry can fix: reported at once with the service's reason.
_FATAL_CODES = {"AccessDeniedException", "ResourceNotFoundException", "ConflictException"}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, within a bounded number of attempts.

    With the defaults a transient fault costs at most about 0.2+0.4+0.8+1.6+3.2 s of waiting
    over 6 attempts (plus the timeouts above), so a read fails with EIO in well under a minute
    rather than hanging. Throttling gets more attempts and a longer cap because it is the
    service asking us to slow down, not a fault: giving up early would turn load into errors.
    """

    attempts: int = 6
    throttle_attempts: int = 12
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def max_attempts(self, error: EbsError) -> int:
        return self.throttle_attempts if error.throttled else self.attempts

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 1)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class ClientSettings:
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    max_pool_connections: int = 64
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    read_timeout_s: float = READ_TIMEOUT_S
    audit_log: str | None = None


@dataclass(frozen=True)
class BlockPage:
    """One page of ListSnapshotBlocks or ListChangedBlocks."""

    blocks: list[tuple[int, str]]
    next_token: str | None
    expiry: datetime | None
    volume_size_gib: int
    block_size: int


@dataclass(frozen=True)
class ChangedBlock:
    index: int
    first_token: str | None
    second_token: str | None


def b64_sha256(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def translate(
    exc: BaseException, *, snapshot_id: str | None = None, block_index: int | None = None
) -> EbsError:
    """Turn whatever boto3, botocore or urllib3 raised into an `EbsError`."""
    if isinstance(exc, EbsError):
        return exc
    where: dict[str, Any] = {"snapshot_id": snapshot_id, "block_index": block_index}
    if isinstance(exc, botocore.exceptions.ClientError):
        response = exc.response
        err = response.get("Error", {})
        code = err.get("Code") or "ClientError"
        message = err.get("Message") or str(exc)
        reason = response.get("Reason") or err.get("Reason")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        throttled = code in _THROTTLE_CODES
        retryable = (
            throttled
            or code in _RETRYABLE_CODES
            or (code not in _FATAL_CODES and status >= 500)
            or (code == "ValidationException" and "failed to read block data" in message.lower())
        )
        return EbsError(
            message, code=code, reason=reason, retryable=retryable, throttled=throttled, **where
        )
    if isinstance(
        exc,
        botocore.exceptions.NoCredentialsError
        | botocore.exceptions.NoRegionError
        | botocore.exceptions.ProfileNotFound,
    ):
        return EbsError(str(exc), code=type(exc).__name__, **where)
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return EbsError(str(exc), code="ParamValidationError", **where)
    if isinstance(
        exc,
        botocore.exceptions.BotoCoreError
        | urllib3.exceptions.HTTPError
        | ConnectionError
        | TimeoutError
        | OSError,
    ):
        # Connection refused or reset, timeouts, cut bodies: the network, not the request.
        return EbsError(
            str(exc) or type(exc).__name__, code=type(exc).__name__, retryable=True, **where
        )
    return EbsError(f"{type(exc).__name__}: {exc}", code=type(exc).__name__, **where)


def verify_block(
    data: bytes,
    expected_length: int | None,
    algorithm: str | None,
    checksum: str | None,
    *,
    snapshot_id: str,
    block_index: int,
) -> None:
    """Raise ChecksumMismatch unless `data` has the announced length and SHA-256."""
    where: dict[str, Any] = {"snapshot_id": snapshot_id, "block_index": block_index}
    if expected_length is not None and len(data) != expected_length:
        raise ChecksumMismatch(
            f"got {len(data)} bytes, the service announced {expected_length}",
            code="LengthMismatch",
            retryable=True,
            **where,
        )
    algorithm = algorithm or "SHA256"
    if algorithm != "SHA256" or not checksum:
        # Without a checksum nothing can be verified; refuse rather than pass bytes on.
        raise ChecksumMismatch(
            f"no SHA256 checksum in the response (algorithm {algorithm!r})",
            code="ChecksumMissing",
            retryable=True,
            **where,
        )
    actual = b64_sha256(data)
    if actual != checksum:
        raise ChecksumMismatch(
            f"SHA-256 {actual} does not match the service's {checksum}",
            code="ChecksumMismatch",
            retryable=True,
            **where,
        )


def _page_args(max_results: int, start_index: int | None, next_token: str | None) -> dict[str, Any]:
    """Paging parameters of both list calls; NextToken takes precedence, as the API says."""
    kwargs: dict[str, Any] = {"MaxResults": max_results}
    if next_token:
        kwargs["NextToken"] = next_token
    elif start_index:
        kwargs["StartingBlockIndex"] = start_index
    return kwargs


def _page(response: dict[str, Any], blocks: list[tuple[int, str]]) -> BlockPage:
    return BlockPage(
        blocks=blocks,
        next_token=response.get("NextToken") or None,
        expiry=response.get("ExpiryTime"),
        volume_size_gib=int(response.get("VolumeSize", 0)),
        block_size=int(response.get("BlockSize", BLOCK_SIZE)),
    )


T = TypeVar("T")


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[EbsError], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `fn` (which raises `EbsError`) with the policy's bounded backoff, blocking."""
    attempt = 1
    while True:
        try:
            return fn()
        except EbsError as error:
            if not error.retryable or attempt >= policy.max_attempts(error):
                raise
            if on_retry:
                on_retry(error)
            log.debug("retrying after %s (attempt %d)", error, attempt)
            sleep(policy.delay(attempt))
            attempt += 1


class AuditLog:
    """Evidence: one JSON line per verified block fetched (time, snapshot, index, bytes, SHA-256).

    Written as each block passes verification, so the log lists exactly the blocks whose bytes
    anyone saw, with the checksum the service vouched for. Appends; thread-safe; line-buffered
    so a crash loses nothing already served.
    """

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise EbsError(f"cannot open audit log {path}: {exc.strerror}") from None
        self._lock = threading.Lock()

    def record(self, snapshot_id: str, index: int, length: int, checksum: str) -> None:
        line = json.dumps(
            {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "snapshot": snapshot_id,
                "block": index,
                "bytes": length,
                "sha256": checksum,
            }
        )
        with self._lock:
            self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


class EbsClient:
    """Thin, thread-safe wrapper over boto3's `ebs` client: one request per call, errors typed."""

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings()
        self.audit = AuditLog(self.settings.audit_log) if self.settings.audit_log else None
        try:
            session = boto3.session.Session(profile_name=self.settings.profile)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. ProfileNotFound
            raise translate(exc) from None
        region = self.settings.region or session.region_name
        if region is None and self._endpoint_given():
            # A local endpoint (the emulator) needs some region to sign with.
            region = "us-east-1"
        config = botocore.config.Config(
            region_name=region,
            connect_timeout=self.settings.connect_timeout_s,
            read_timeout=self.settings.read_timeout_s,
            max_pool_connections=self.settings.max_pool_connections,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        try:
            self._ebs = session.client(
                "ebs", endpoint_url=self.settings.endpoint_url, config=config
            )
        except botocore.exceptions.BotoCoreError as exc:
            raise translate(exc) from None
        # GetSnapshotBlock, the one call on the hot path, skips boto3: about 0.7 ms of CPU per
        # block instead of 2.5-3 ms (scripts/bench-fetch), which is what lets one process
        # approach the service's 1000 blocks/s. Same credentials chain, errors and checks.
        from .fastget import FastBlockGetter  # it builds on this module's settings and errors

        self._fast = FastBlockGetter(
            replace(self.settings, region=region), credentials_provider=session.get_credentials()
        )

    def close(self) -> None:
        self._fast.close()
        if self.audit is not None:
            self.audit.close()

    def _endpoint_given(self) -> bool:
        import os

        return bool(
            self.settings.endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_EBS")
            or os.environ.get("AWS_ENDPOINT_URL")
        )

    # -- reading ---------------------------------------------------------------------------

    def list_blocks(
        self,
        snapshot_id: str,
        *,
        start_index: int | None = None,
        next_token: str | None = None,
        max_results: int = 10000,
    ) -> BlockPage:
        kwargs = _page_args(max_results, start_index, next_token)
        try:
            r = self._ebs.list_snapshot_blocks(SnapshotId=snapshot_id, **kwargs)
        except Exception as exc:
            raise translate(exc, snapshot_id=snapshot_id, block_index=start_index) from None
        # Sorted and coerced defensively: the API promises ascending integers, but a stand-in
        # (moto) sends strings in insertion order, and bisect needs order.
        blocks = sorted((int(b["BlockIndex"]), b["BlockToken"]) for b in r.get("Blocks", []))
        return _page(r, blocks)

    def list_changed_blocks(
        self,
        second_snapshot_id: str,
        first_snapshot_id: str | None = None,
        *,
        start_index: int | None = None,
        next_token: str | None = None,
        max_results: int = 10000,
    ) -> tuple[BlockPage, list[ChangedBlock]]:
        kwargs = _page_args(max_results, start_index, next_token)
        if first_snapshot_id:
            kwargs["FirstSnapshotId"] = first_snapshot_id
        try:
            r = self._ebs.list_changed_blocks(SecondSnapshotId=second_snapshot_id, **kwargs)
        except Exception as exc:
            raise translate(exc, snapshot_id=second_snapshot_id) from None
        changed = [
            ChangedBlock(int(b["BlockIndex"]), b.get("FirstBlockToken"), b.get("SecondBlockToken"))
            for b in r.get("ChangedBlocks", [])
        ]
        changed.sort(key=lambda c: c.index)
        page = _page(r, [(c.index, c.second_token or "") for c in changed])
        return page, changed

    def get_block(self, snapshot_id: str, index: int, token: str) -> bytes:
        """Fetch one block and return its bytes only if length and SHA-256 match the headers."""
        data = self._fast.get_block(snapshot_id, index, token)
        if self.audit is not None:
            self.audit.record(snapshot_id, index, len(data), b64_sha256(data))
        return data

    def get_block_boto3(self, snapshot_id: str, index: int, token: str) -> bytes:
        """The same through boto3: the reference `get_block` is measured and tested against."""
        where = {"snapshot_id": snapshot_id, "block_index": index}
        try:
            r = self._ebs.get_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token
            )
            body = r["BlockData"]
            try:
                data = body.read()
            finally:
                body.close()
        except Exception as exc:
            raise translate(exc, **where) from None
        verify_block(
            data, r.get("DataLength"), r.get("ChecksumAlgorithm"), r.get("Checksum"), **where
        )
        return data

    # -- writing ---------------------------------------------------------------------------

    def start_snapshot(self, **kwargs: Any) -> dict[str, Any]:
        try:
            return self._ebs.start_snapshot(**kwargs)
        except Exception as exc:
            raise translate(exc, snapshot_id=kwargs.get("ParentSnapshotId")) from None

    def put_block(self, snapshot_id: str, index: int, data: bytes, checksum: str) -> None:
        try:
            self._ebs.put_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=index,
                BlockData=data,
                DataLength=len(data),
                Checksum=checksum,
                ChecksumAlgorithm="SHA256",
            )
        except Exception as exc:
            error = translate(exc, snapshot_id=snapshot_id, block_index=index)
            if error.code == "ResourceNotFoundException":
                # Right after StartSnapshot the new snapshot may not be visible yet
                # (eventual consistency); the service documents retrying.
                error.retryable = True
            raise error from None

    def complete_snapshot(
        self, snapshot_id: str, changed_blocks: int, linear_checksum: str | None
    ) -> str:
        kwargs: dict[str, Any] = {"SnapshotId": snapshot_id, "ChangedBlocksCount": changed_blocks}
        if linear_checksum:
            kwargs.update(
                Checksum=linear_checksum,
                ChecksumAlgorithm="SHA256",
                ChecksumAggregationMethod="LINEAR",
            )
        try:
            return self._ebs.complete_snapshot(**kwargs)["Status"]
        except Exception as exc:
            error = translate(exc, snapshot_id=snapshot_id)
            if error.code == "ResourceNotFoundException":
                error.retryable = True
            raise error from None
