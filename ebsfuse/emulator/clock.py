"""The emulator's notion of wall-clock time, which tests may move forward.

Token expiry, page-token expiry and the timeout of pending snapshots are all judged against
this clock, so a test can advance it instead of sleeping. Throttling uses the real monotonic
clock instead: it models request rates, which tests exercise by sending requests quickly.
"""

from __future__ import annotations

import threading
import time


class Clock:
    """`time.time()` plus an offset that only grows."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the epoch, as the emulator sees them."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Make `seconds` pass at once (negative values are refused: time does not go back)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds
