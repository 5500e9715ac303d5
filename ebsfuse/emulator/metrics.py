"""Request, error and byte counters, readable in-process and over `GET /_emulator/counters`."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Counters:
    """Thread-safe counters; `snapshot()` returns the documented JSON shape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Zero everything."""
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._injected: Counter[str] = Counter()
            self._errors: Counter[str] = Counter()
            self._bytes_served = 0
            self._bytes_received = 0
            self._held_ms = 0.0

    def request(self, operation: str) -> None:
        """An API request arrived (counted whatever its outcome)."""
        with self._lock:
            self._requests[operation] += 1

    def error(self, code: str) -> None:
        """An error response was sent."""
        with self._lock:
            self._errors[code] += 1

    def injected(self, kind: str) -> None:
        """A fault was injected: an error code, or "truncated" for a cut body."""
        with self._lock:
            self._injected[kind] += 1

    def held(self, seconds: float) -> None:
        """A response was held back this long (latency and jitter)."""
        with self._lock:
            self._held_ms += seconds * 1000

    def served(self, n: int) -> None:
        """Block bytes sent in GetSnapshotBlock bodies."""
        with self._lock:
            self._bytes_served += n

    def received(self, n: int) -> None:
        """Block bytes accepted in PutSnapshotBlock bodies."""
        with self._lock:
            self._bytes_received += n

    def snapshot(self) -> dict[str, Any]:
        """A copy of all counters."""
        with self._lock:
            injected = {"InternalServerException": 0, "RequestThrottledException": 0}
            injected["truncated"] = 0
            injected.update(self._injected)
            return {
                "requests": dict(self._requests),
                "errors_injected": injected,
                "errors": dict(self._errors),
                "bytes_served": self._bytes_served,
                "bytes_received": self._bytes_received,
                "held_ms": round(self._held_ms, 3),
            }
