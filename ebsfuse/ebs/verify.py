"""The one check a block passes before anyone sees a byte: its length and its SHA-256 against
what the service sent with it."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from .. import BLOCK_SIZE
from .errors import ChecksumMismatch, EbsError


def b64_sha256(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def verify_block(
    data: bytes | memoryview,
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


def require_whole_block(data: bytes | memoryview, *, snapshot_id: str, block_index: int) -> None:
    """Every EBS block is 512 KiB: a shorter one, though it matches its own headers, would
    shift every later byte of an image. Refused for the mount, its workers and the tools."""
    if len(data) != BLOCK_SIZE:
        raise EbsError(
            f"block of {len(data)} bytes, not {BLOCK_SIZE}",
            snapshot_id=snapshot_id,
            block_index=block_index,
            code="UnexpectedBlockLength",
        )
