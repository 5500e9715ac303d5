"""Errors raised by ebsfuse, each carrying what a user needs to act on it.

An `EbsError` names the snapshot, the block index (where there is one), the service's error
code and reason, and whether trying again can help. The CLI prints `str(error)` as its one line
on stderr; the daemon logs it.
"""

from __future__ import annotations

import copy

# A message is one line of a terminal or a log: whatever a server sent (an HTML page, a stack
# trace of its own) is folded to one line and cut at this many characters.
MAX_MESSAGE_CHARS = 300


class EbsfuseError(Exception):
    """A failure the user can act on; its message is the whole story, no traceback needed."""


class UsageError(EbsfuseError):
    """Bad command-line input."""


class EbsError(EbsfuseError):
    """A failed EBS direct API call, or a block that failed verification."""

    def __init__(
        self,
        message: str,
        *,
        snapshot_id: str | None = None,
        block_index: int | None = None,
        code: str | None = None,
        reason: str | None = None,
        retryable: bool = False,
        throttled: bool = False,
    ) -> None:
        message = " ".join(str(message).split())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.message = message
        self.snapshot_id = snapshot_id
        self.block_index = block_index
        self.code = code
        self.reason = reason
        self.retryable = retryable
        self.throttled = throttled
        self.attempts = 1  # requests made before giving up, set by the retry loop

    def fresh(self) -> EbsError:
        """A copy without a traceback, to raise again for another reader.

        Raising one stored exception object again and again extends its traceback each time,
        and the frames it holds keep their locals (block bodies) alive.
        """
        twin = copy.copy(self)
        twin.__traceback__ = None
        twin.__cause__ = twin.__context__ = None
        return twin

    @property
    def token_refused(self) -> bool:
        """The block token was refused (expired or superseded): re-list and try once more."""
        return self.reason == "INVALID_BLOCK_TOKEN"

    def __str__(self) -> str:
        where = []
        if self.snapshot_id:
            where.append(self.snapshot_id)
        if self.block_index is not None:
            where.append(f"block {self.block_index}")
        what = self.code or "error"
        if self.reason:
            what += f" ({self.reason})"
        prefix = ": ".join(where)
        return f"{prefix}: {what}: {self.message}" if prefix else f"{what}: {self.message}"


class ChecksumMismatch(EbsError):
    """A block whose bytes do not match the SHA-256 or length the service sent with it."""


class NotSent(EbsError):
    """No request went out: no time was left for it (the budget was spent waiting for a slot
    or a retry, or the shared request rate gives no turn before the deadline)."""

    def __init__(self, message: str) -> None:
        # Retryable: a tool's retry loop waits and tries again while its budget lasts (the
        # mount's reader stops at once, its budget being what ran out).
        super().__init__(message, code="ReadTimeout", retryable=True)
