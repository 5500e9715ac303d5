"""The service's error vocabulary: one exception type carrying code, HTTP status and reason.

Handlers raise `ApiError`; the HTTP layer turns it into the wire form botocore's rest-json
parser expects (header `x-amzn-ErrorType`, JSON body with `message` and, when there is one,
`Reason`). The status codes follow the `error.httpStatusCode` of each shape in botocore's model.
"""

from __future__ import annotations

STATUS_BY_CODE: dict[str, int] = {
    "ValidationException": 400,
    "ResourceNotFoundException": 404,
    "RequestThrottledException": 400,  # 400, not 429: botocore's legacy retry keys on it
    "ServiceQuotaExceededException": 402,
    "ConcurrentLimitExceededException": 400,
    "ConflictException": 409,
    "AccessDeniedException": 403,
    "InternalServerException": 500,
    # Not in the ebs model: what AWS's rest-json front ends answer for a path they do not know.
    "UnknownOperationException": 404,
}


class ApiError(Exception):
    """An error response of the EBS direct APIs."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.status = STATUS_BY_CODE[code]

    def body(self) -> dict[str, str]:
        """The JSON error document: lower-case `message` (what AWS sends) plus `Reason`."""
        doc = {"message": self.message}
        if self.reason is not None:
            doc["Reason"] = self.reason
        return doc


def validation(message: str, reason: str = "INVALID_PARAMETER_VALUE") -> ApiError:
    """A ValidationException; most bad input ends up here."""
    return ApiError("ValidationException", message, reason)


def not_found(snapshot_id: str) -> ApiError:
    """The snapshot id is well formed but no such snapshot exists."""
    return ApiError(
        "ResourceNotFoundException",
        f"The snapshot '{snapshot_id}' does not exist.",
        "SNAPSHOT_NOT_FOUND",
    )
