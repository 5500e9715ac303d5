"""A one-line progress bar with rate and ETA, drawn only for a person watching a terminal.

It is drawn on stderr, and only when both stdout and stderr are terminals and `--quiet` was not
given: a script that captures stdout (the snapshot id, the JSON) or a log file never sees a
carriage return. Worker threads call `advance`; redraws are rate-limited so that thousands of
blocks a second cost a few string formats, not a few thousand.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

# Redraw at most this often: smooth to the eye, negligible CPU.
REDRAW_INTERVAL_S = 0.2
# The rate is averaged over this window so a pause or a burst shows within seconds.
RATE_WINDOW_S = 5.0


def progress_wanted(quiet: bool) -> bool:
    """True when a person is watching: not --quiet, stdout and stderr both terminals."""
    if quiet:
        return False
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # unreachable, keeps type checkers content


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """Bytes moved and how far through the job (a fraction), shown as bar, rate and ETA.

    `total` is the job's size in the same unit as `position` (bytes of the image for an
    upload, the volume's block index range for a download, whose listing is streamed so the
    count of blocks is not known ahead). `done_bytes` is what was transferred, for the rate.
    """

    def __init__(
        self, label: str, total: int, *, enabled: bool, stream: TextIO | None = None
    ) -> None:
        self.label = label
        self.total = max(1, total)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.position = 0
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._samples: list[tuple[float, int, int]] = [(self._started, 0, 0)]

    def advance(self, nbytes: int = 0, position: int | None = None) -> None:
        """Count `nbytes` transferred; move the position to `position` if given and larger."""
        with self._lock:
            self.done_bytes += nbytes
            if position is not None and position > self.position:
                self.position = min(position, self.total)
            if not self.enabled:
                return
            now = time.monotonic()
            if now - self._last_draw < REDRAW_INTERVAL_S:
                return
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._samples.append((now, self.done_bytes, self.position))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.pop(0)
        t0, b0, p0 = self._samples[0]
        span = max(1e-6, now - t0)
        rate = (self.done_bytes - b0) / span
        position_rate = (self.position - p0) / span
        share = self.position / self.total
        if position_rate > 0:
            eta = human_duration((self.total - self.position) / position_rate)
        else:
            eta = "--:--"
        tail = (
            f" {share * 100:5.1f}% {human_bytes(self.done_bytes)} {human_bytes(rate)}/s ETA {eta}"
        )
        width = shutil.get_terminal_size((80, 24)).columns
        room = max(10, width - len(self.label) - len(tail) - 4)
        filled = int(room * share)
        bar = "#" * filled + "-" * (room - filled)
        self.stream.write(f"\r{self.label} [{bar}]{tail}")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        """Erase the bar for a line of output; the next advance draws it again."""
        if self.enabled:
            with self._lock:
                self._erase()
                self._last_draw = 0.0

    def close(self) -> None:
        """Erase the bar so the command's own output starts on a clean line."""
        if self.enabled:
            with self._lock:
                self._erase()
                self.enabled = False

    def _erase(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r" + " " * (width - 1) + "\r")
        self.stream.flush()
