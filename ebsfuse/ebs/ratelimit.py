"""One request rate per process and endpoint, taught by the service's throttling answers.

Every request a process sends to one endpoint first takes a token from one shared bucket, so
64 workers back off together instead of each on its own schedule (against the per-account
quota they otherwise keep colliding; coldsnap's issue #451 is that failure). Until the service
first throttles there is no limit, unless `--max-rps` sets one. A throttling answer (the
service's, a bare 429, an untyped 503) cuts the rate to `BETA` of what was being sent; after
that the rate grows back along a cubic curve that reaches the old rate in about `K` seconds and
then probes beyond it, the shape TCP CUBIC uses and botocore's adaptive retry mode borrows.
All throttles within `COOLDOWN_S` of a cut count as one congestion event: the 64 requests that
were in flight when the quota ran out must not cut the rate 64 times.

Thread-safe; callers are the transport's worker threads. The clock and sleep are injectable.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from .errors import NotSent

# Multiplicative decrease on a throttle, and CUBIC's scaling constant (rate units per s^3):
# from a rate W the cut leaves 0.7 W, and the curve is back at W after (W * 0.3 / 0.4)^(1/3)
# seconds: 9 s from 1000 requests/s, 2.5 s from 40.
BETA = 0.7
CUBIC_C = 0.4
# Throttles this close to the last cut are the same congestion event.
COOLDOWN_S = 0.5
# Never slower than this: a throttled service still answers some requests.
MIN_RPS = 1.0
# A bucket holds this many seconds of the rate (at least one token): enough to absorb the
# jitter of 64 threads, small enough that a burst cannot outrun the quota by much.
BURST_S = 0.1
# Once the curve has grown past this with no new throttle, the limit is lifted again (only
# --max-rps, if given, remains): ten times the service's per-account GetSnapshotBlock quota.
UNLIMITED_RPS = 10_000.0
# The sending rate at the first throttle is measured over this many recent requests.
RATE_SAMPLE = 256


class RateLimiter:
    """An adaptive token bucket; `rps` is None while nothing limits the rate."""

    def __init__(
        self,
        max_rps: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.max_rps = max_rps
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._learned: float | None = None  # the rate throttling taught; None: not limited
        self._w_max = 0.0  # the rate when the service last throttled
        self._cut_at = float("-inf")
        self._tokens = 1.0
        self._stamp = clock()
        # When the last requests were sent: the rate to cut from at the first throttle.
        self._sent: collections.deque[float] = collections.deque(maxlen=RATE_SAMPLE)
        self.throttles = 0  # throttling answers seen
        self.cuts = 0  # congestion events (rate cuts)
        self.waited_s = 0.0

    @property
    def rps(self) -> float | None:
        """The rate requests are sent at now, or None for no limit."""
        with self._lock:
            return self._rate(self._clock())

    def _rate(self, now: float) -> float | None:
        learned = self._learned
        if learned is not None:
            elapsed = now - self._cut_at
            k = (self._w_max * (1 - BETA) / CUBIC_C) ** (1 / 3)
            learned = max(MIN_RPS, CUBIC_C * (elapsed - k) ** 3 + self._w_max)
            if learned > UNLIMITED_RPS:
                self._learned = learned = None
        if learned is None:
            return self.max_rps
        return learned if self.max_rps is None else min(learned, self.max_rps)

    def acquire(self, deadline: float) -> bool:
        """Wait for this request's turn; False (and no token taken) if it would come after
        `deadline` (a `time.monotonic()` value)."""
        wait = self.reserve(deadline)
        if wait is None:
            return False
        if wait > 0:
            self._sleep(wait)
        return True

    def reserve(self, deadline: float) -> float | None:
        """Take this request's turn without waiting for it: the seconds to wait before
        sending, or None (and no token taken) if the turn would come after `deadline`. For a
        caller that waits its own way (the daemon's trio thread)."""
        with self._lock:
            now = self._clock()
            rate = self._rate(now)
            if rate is None:
                self._count(now)
                return 0.0
            capacity = max(1.0, rate * BURST_S)
            self._tokens = min(capacity, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            wait = (1.0 - self._tokens) / rate if self._tokens < 1.0 else 0.0
            if now + wait > deadline:
                return None
            self._tokens -= 1.0  # reserved now: later callers queue behind this one
            self.waited_s += wait
            self._count(now)
        return wait

    def no_turn(self, within_s: float) -> NotSent:
        """The error for a request `reserve` or `acquire` found no turn for in `within_s`."""
        return NotSent(
            f"the request rate ({self.rps or 0.0:.1f}/s, lowered by throttling or --max-rps) "
            f"leaves no turn within {within_s:.1f} s"
        )

    def throttled(self) -> None:
        """The service asked us to slow down."""
        with self._lock:
            now = self._clock()
            self.throttles += 1
            if now - self._cut_at < COOLDOWN_S:
                return
            current = self._rate(now)
            if current is None:
                # The first throttle: what was being sent is what the bucket allowed, measured
                # as the tokens spent over the last second, at least the floor.
                current = max(MIN_RPS, self._sent_rate(now))
            self._w_max = current
            self._learned = max(MIN_RPS, current * BETA)
            self._cut_at = now
            self.cuts += 1

    def _count(self, now: float) -> None:
        self._sent.append(now)

    def _sent_rate(self, now: float) -> float:
        """Requests per second over the recent ones (a burst counts as at least 1 s apart
        from nothing: a quota that allowed a burst of N at once allowed N per second)."""
        if not self._sent:
            return MIN_RPS
        return len(self._sent) / max(now - self._sent[0], 1.0)

    def snapshot(self) -> dict[str, float | int | None]:
        """For `ebsfuse stats`: the rate now, its cap, throttles seen and time spent waiting."""
        rate = self.rps
        return {
            "rps": None if rate is None else round(rate, 1),
            "max_rps": self.max_rps,
            "throttles": self.throttles,
            "rate_cuts": self.cuts,
            "waited_s": round(self.waited_s, 3),
        }


class Unpaced(RateLimiter):
    """No pacing and no learning: for a fetch worker process, whose requests the daemon paces
    with its own limiter (one rate for the whole mount, as above)."""

    def reserve(self, deadline: float) -> float | None:
        return 0.0

    def throttled(self) -> None:
        return None
