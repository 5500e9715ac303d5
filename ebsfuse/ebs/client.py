"""The EBS direct API client that the mount and the snapshot tools share.

Each method makes exactly one request: botocore's own retries are switched off so that the
retry policy (`RetryPolicy`) lives in one place and is the same for every caller, and every
failure comes back as an `EbsError` that says whether retrying can help. `get_block` verifies
a block's length and SHA-256 against the headers the service sent before returning a byte.

Calls block; the trio side runs them through `trio.to_thread.run_sync`.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import boto3
import botocore.config
import botocore.exceptions

from .errors import EbsError
from .fastget import FastBlockGetter
from .ids import validate_snapshot_id as validate_snapshot_id
from .pages import BlockPage, ChangedBlock, block_page, changed_page
from .ratelimit import RateLimiter
from .retry import MIN_ATTEMPT_S as MIN_ATTEMPT_S
from .retry import RetryPolicy as RetryPolicy
from .retry import call_with_retries as call_with_retries
from .settings import ClientSettings, signing_region
from .translate import translate
from .verify import b64_sha256, require_whole_block, verify_block

# Re-exported: callers reach the client's answers, settings and checks through the client.
__all__ = [
    "BlockPage",
    "ChangedBlock",
    "ClientSettings",
    "b64_sha256",
    "translate",
    "validate_snapshot_id",
    "verify_block",
]

log = logging.getLogger(__name__)


def _page_params(
    max_results: int, start_index: int | None, next_token: str | None
) -> dict[str, str]:
    """Query parameters of both list calls; NextToken takes precedence, as the API says."""
    params = {"maxResults": str(max_results)}
    if next_token:
        params["pageToken"] = next_token
    elif start_index:
        params["startingBlockIndex"] = str(start_index)
    return params


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
        # Per worker thread: the identity and checksum of the last block get_block returned.
        self._verified = threading.local()
        try:
            session = boto3.session.Session(profile_name=self.settings.profile)
        except botocore.exceptions.BotoCoreError as exc:  # e.g. ProfileNotFound
            raise translate(exc) from None
        region = signing_region(self.settings, session.region_name)
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
        self._fast = FastBlockGetter(
            replace(self.settings, region=region), credentials_provider=session.get_credentials()
        )
        # boto3's requests (upload's writes, the reference GET) go out through the same
        # transport, for its total deadline: urllib3's timeout is per socket read.
        self._ebs.meta.events.register_first("before-send.ebs", self._fast.send_prepared)

    @property
    def rate_limiter(self) -> RateLimiter:
        """The process's request rate to this client's endpoint (shared with other clients)."""
        return self._fast.limiter

    def close(self) -> None:
        self._fast.close()
        if self.audit is not None:
            self.audit.close()

    # -- reading ---------------------------------------------------------------------------

    def list_blocks(
        self,
        snapshot_id: str,
        *,
        start_index: int | None = None,
        next_token: str | None = None,
        max_results: int = 10000,
        volume_size_gib: int | None = None,
        timeout: float | None = None,
    ) -> BlockPage[str]:
        """One ListSnapshotBlocks page, checked whole (`pages.block_page`) before it is returned.

        `volume_size_gib`, once known, must be the page's VolumeSize too. Lists go through the
        lean transport, not boto3: botocore turns a cut or foreign body into an empty page, and
        its socket timeout is per read, never for the whole answer.
        """
        params = _page_params(max_results, start_index, next_token)
        doc = self._get_page(snapshot_id, "blocks", params, start_index, timeout)
        return block_page(
            doc, snapshot_id=snapshot_id, start_index=start_index, volume_size_gib=volume_size_gib
        )

    def list_changed_blocks(
        self,
        second_snapshot_id: str,
        first_snapshot_id: str | None = None,
        *,
        start_index: int | None = None,
        next_token: str | None = None,
        max_results: int = 10000,
        volume_size_gib: int | None = None,
        timeout: float | None = None,
    ) -> BlockPage[ChangedBlock]:
        """One ListChangedBlocks page, checked whole (`pages.changed_page`)."""
        params = _page_params(max_results, start_index, next_token)
        if first_snapshot_id:
            params["firstSnapshotId"] = first_snapshot_id
        doc = self._get_page(second_snapshot_id, "changedblocks", params, start_index, timeout)
        return changed_page(
            doc,
            snapshot_id=second_snapshot_id,
            start_index=start_index,
            volume_size_gib=volume_size_gib,
        )

    def _get_page(
        self,
        snapshot_id: str,
        resource: str,
        params: dict[str, str],
        start_index: int | None,
        timeout: float | None,
    ) -> object:
        """One list call's parsed body (`/snapshots/{id}/{resource}`), for `pages` to check."""
        return self._fast.get_json(
            f"/snapshots/{quote(snapshot_id, safe='')}/{resource}",
            params,
            where={"snapshot_id": snapshot_id, "block_index": start_index},
            timeout=timeout,
        )

    def get_block(
        self, snapshot_id: str, index: int, token: str, *, timeout: float | None = None
    ) -> bytes:
        """Fetch one block: its bytes only if they are 512 KiB and match the SHA-256 sent.

        Every EBS block is 512 KiB, so a shorter one, though it matches its own headers, would
        shift every later byte of an image: refused here, for the mount and the tools alike.
        The traceback of a failure is dropped: its frames would keep the refused body alive
        for as long as anyone holds the error. It is raised outside the `except` block, or
        Python would chain the original (and its frames) to it as `__context__`.
        """
        failure: EbsError | None = None
        try:
            data, checksum = self._fast.get_verified_block(snapshot_id, index, token, timeout)
        except EbsError as error:
            failure = error.fresh()
        if failure is not None:
            raise failure
        require_whole_block(data, snapshot_id=snapshot_id, block_index=index)
        if self.audit is not None:
            # The SHA-256 the body was just checked against: the service's, no second hash.
            self.audit.record(snapshot_id, index, len(data), checksum)
        self._verified.last = (id(data), checksum)
        return data

    def verified_digest(self, data: bytes) -> bytes | None:
        """The SHA-256 that `data`, the block this thread's last `get_block` returned, was
        checked against; None for any other object. Lets the disk tier store a block without
        hashing it a second time (SHA-256 costs about 1 ms of CPU per block)."""
        last = getattr(self._verified, "last", None)
        if last is None or last[0] != id(data):
            return None
        return base64.b64decode(last[1])

    def get_block_boto3(self, snapshot_id: str, index: int, token: str) -> bytes:
        """The same through boto3: the reference `get_block` is measured and tested against."""
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
            raise translate(exc, snapshot_id=snapshot_id, block_index=index) from None
        verify_block(
            data,
            r.get("DataLength"),
            r.get("ChecksumAlgorithm"),
            r.get("Checksum"),
            snapshot_id=snapshot_id,
            block_index=index,
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
