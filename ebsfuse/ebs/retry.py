"""How a failed request is retried: the one policy every request of every command follows.

`RetryPolicy` says whether, and after how long, a failure is tried again; `call_with_retries`
applies it to a blocking call.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .. import DEFAULT_TIMEOUT_S
from .errors import EbsError, NotSent

log = logging.getLogger(__name__)


# Past the policy, a caller's `keep_trying` waits grow no further than after this many failures
# (0.2 s doubled 5 times is 6.4 s, capped by max_delay_s at 5 s).
MAX_BACKOFF_DOUBLINGS = 5
# A retry left with less than this is not started: it could not even connect and answer.
MIN_ATTEMPT_S = 0.5


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, within a bounded number of attempts.

    With the defaults a transient fault costs at most about 0.2+0.4+0.8+1.6+3.2 s of waiting
    over 6 attempts (plus the requests' own deadlines), and no retry starts once `budget_s` is
    spent, so a read fails with EIO within the budget rather than hanging. Throttling gets
    more attempts and a longer cap because it is the service asking us to slow down, not a
    fault: giving up early would turn load into errors.
    """

    attempts: int = 6
    throttle_attempts: int = 12
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    # A read gets its bytes, or fails, within this many seconds whatever the server does: no
    # retry starts after it, and the mount gives each request only what is left of it. Within
    # it a transient fault gets several tries; a server that stalls gets three (one third each).
    budget_s: float = DEFAULT_TIMEOUT_S
    # One request may take at most this share of the budget, so a server that stalls once
    # still leaves time for two more tries (20 s each of the default minute).
    attempts_per_budget: int = 3

    def max_attempts(self, error: EbsError) -> int:
        return self.throttle_attempts if error.throttled else self.attempts

    def attempt_timeout(self, remaining_s: float) -> float:
        """How long the next request may take, with `remaining_s` of the budget left."""
        return min(remaining_s, self.budget_s / self.attempts_per_budget)

    def retry_delay(self, error: EbsError, attempt: int, remaining_s: float) -> float | None:
        """Seconds to wait before another try after `attempt` failed with `error`, or None to
        give up: the error is final, the attempts are used up, or the budget is."""
        if not error.retryable or attempt >= self.max_attempts(error):
            return None
        delay = self.delay(attempt)
        # The next attempt needs time of its own after the wait, or it cannot succeed.
        return delay if delay + MIN_ATTEMPT_S < remaining_s else None

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt + 1` (attempt counts from 1)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))


class Attempts:
    """The tries of one request under a policy: the bookkeeping of the one retry loop.

    Its two drivers, `call_with_retries` (blocking) and `FetchContext.with_retries` (on trio),
    are the same loop: try; hand a failure to `retry_after`, which raises it when it is final;
    wait what it says; try again. Whether to retry, how long to wait, how many attempts the
    error reports and which error ends the loop are decided here only.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        remaining_s: Callable[[], float],
        *,
        keep_trying: Callable[[EbsError], bool] | None = None,
    ) -> None:
        self.policy = policy
        self._remaining_s = remaining_s
        # A caller's own reason to go on past the policy (upload: "the snapshot does not exist"
        # for a while after StartSnapshot); its waits grow as the policy's would, capped.
        self._keep_trying = keep_trying
        self.count = 1  # the attempt under way
        # The service's last answer, traceback-free: the failure's frames (and the body they
        # may hold) are not kept alive through the backoff.
        self.last: EbsError | None = None

    def retry_after(self, failure: EbsError) -> float:
        """Seconds to wait before the next try; raises the final error when there is none."""
        delay = self.policy.retry_delay(failure, self.count, self._remaining_s())
        if delay is None and self._keep_trying is not None and self._keep_trying(failure):
            delay = self.policy.delay(min(self.count, MAX_BACKOFF_DOUBLINGS))
        if delay is None:
            raise self._final(failure)
        log.debug("%s; retrying (attempt %d)", failure, self.count)
        if not isinstance(failure, NotSent):
            self.last = failure.fresh()
        self.count += 1
        return delay

    def _final(self, failure: EbsError) -> EbsError:
        if isinstance(failure, NotSent):
            # No request went out this time: what the service said last is the story.
            final = failure if self.last is None else self.last
            final.attempts = self.count - 1
            return final
        failure.attempts = self.count
        return failure


T = TypeVar("T")


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] = time.sleep,
    keep_trying: Callable[[EbsError], bool] | None = None,
) -> T:
    """Run `fn` (which raises `EbsError`) under the policy, blocking, until `policy.budget_s`
    is spent (or `keep_trying` says no more); the error raised carries the attempts made."""
    started = time.monotonic()
    remaining = functools.partial(_remaining, policy.budget_s, started)
    attempts = Attempts(policy, remaining, keep_trying=keep_trying)
    while True:
        try:
            return fn()
        except EbsError as error:
            delay = attempts.retry_after(error)
        # The backoff waits outside the `except` block, which would keep the error (and what
        # its frames hold) alive for the whole wait.
        sleep(delay)


def _remaining(budget_s: float, started: float) -> float:
    return budget_s - (time.monotonic() - started)
