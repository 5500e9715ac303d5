"""Whatever boto3, botocore, urllib3 or the lean transport raised, as one `EbsError`.

The one place that decides what an answer means: retryable or not, throttling or not, with the
service's code and reason, the snapshot and the block.
"""

from __future__ import annotations

from typing import Any

import botocore.exceptions
import urllib3.exceptions

from .errors import EbsError

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


def is_throttling(status: int, code: str | None) -> bool:
    """Whether an answer asks us to slow down: a throttling error type, or a 429 or an untyped
    503 (a proxy's, a load balancer's), as botocore's standard retry mode reads them too."""
    untyped = not code or code == str(status)
    return code in _THROTTLE_CODES or status == 429 or (status == 503 and untyped)


def translate(
    exc: BaseException, *, snapshot_id: str | None = None, block_index: int | None = None
) -> EbsError:
    """Turn whatever boto3, botocore or urllib3 raised into an `EbsError`."""
    if isinstance(exc, EbsError):
        # One raised below boto3 (the transport's) knows no snapshot or block: this call does.
        if exc.snapshot_id is None:
            exc.snapshot_id = snapshot_id
        if exc.block_index is None:
            exc.block_index = block_index
        return exc
    where: dict[str, Any] = {"snapshot_id": snapshot_id, "block_index": block_index}
    if isinstance(exc, botocore.exceptions.ClientError):
        response = exc.response
        err = response.get("Error", {})
        code = err.get("Code") or "ClientError"
        message = err.get("Message") or str(exc)
        reason = response.get("Reason") or err.get("Reason")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        throttled = is_throttling(status, code)
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
