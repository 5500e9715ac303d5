"""Injected faults and the per-snapshot request-rate limit.

`Faults` is the live configuration (every field may change while requests are in flight; each
request reads the fields it needs once). `Throttle` is a token bucket per snapshot for
GetSnapshotBlock and PutSnapshotBlock, like the service's per-snapshot quota.

Besides the service's own errors, the faults include what networks, proxies and overloaded
services do to answers (`server.py` carries them out):
- listing pages (ListSnapshotBlocks, ListChangedBlocks) answered 200 but `cut` halfway, `empty`
  (`{}`), `html` (a captive portal's page) or `malformed` (an entry without a token and an
  index past the volume), at `list_fault_rate`;
- block bodies that `trickle` (a byte a second), `stall` (half, then silence) or announce an
  `oversize` Content-Length (64 MiB), at `body_fault_rate`; bodies with one byte flipped (a
  checksum mismatch) at `corrupt_rate`;
- a bare 429 with an HTML page and no AWS error type (a proxy's), at `bare_429_rate`;
- a VolumeSize reported in every listing instead of the true one (`report_volume_size`).
`max_faults` stops all injection after that many faults (0: no limit), so "fail once" is
`max_faults=1` with a rate of 1; setting it starts the count again.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_TOKEN_TTL = 7 * 86400  # block tokens: the FAQ's 7 days
DEFAULT_PAGE_TOKEN_TTL = 3600  # page tokens: 60 minutes
DEFAULT_THROTTLE_RPS = 1000  # the real per-snapshot quota for Get/PutSnapshotBlock
LIST_FAULTS = ("cut", "empty", "html", "malformed")
BODY_FAULTS = ("trickle", "stall", "oversize")
_CHOICES = {"list_fault": LIST_FAULTS, "body_fault": BODY_FAULTS}
_RATES = (
    "fail_rate",
    "truncate_rate",
    "corrupt_rate",
    "list_fault_rate",
    "body_fault_rate",
    "bare_429_rate",
)


@dataclass
class Faults:
    """What the emulator does wrong on purpose, and its time-to-live settings."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    throttle_rps: float = DEFAULT_THROTTLE_RPS
    fail_rate: float = 0.0
    truncate_rate: float = 0.0
    corrupt_rate: float = 0.0
    list_fault: str = "cut"
    list_fault_rate: float = 0.0
    body_fault: str = "stall"
    body_fault_rate: float = 0.0
    bare_429_rate: float = 0.0
    report_volume_size: float = 0.0
    max_faults: float = 0.0
    empty_pages: bool = False
    token_ttl: float = DEFAULT_TOKEN_TTL
    page_token_ttl: float = DEFAULT_PAGE_TOKEN_TTL
    # Access key ids answered AccessDeniedException, comma-separated: a caller whose IAM
    # policy lacks the ebs: actions, for testing how clients report it.
    denied_access_keys: str = ""
    # Share of EC2 DescribeSnapshots calls answered RequestLimitExceeded (503), as EC2 throttles.
    ec2_throttle_rate: float = 0.0
    # Seconds (emulator clock) a snapshot stays "pending" after CompleteSnapshot, as AWS's do
    # while it finishes them; advance_clock() ends the wait without sleeping.
    complete_after_s: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._spent = 0  # faults injected since max_faults was last set

    def take(self, rate: float, rng: random.Random) -> bool:
        """Decide one injection at `rate`, within what `max_faults` still allows."""
        if rate <= 0:
            return False
        with self._lock:
            if rng.random() >= rate:
                return False
            if self.max_faults and self._spent >= self.max_faults:
                return False
            self._spent += 1
            return True

    def update(self, **changes: Any) -> None:
        """Validate and apply changes; raises ValueError (nothing applied) on a bad one."""
        known = {f.name for f in fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown fault setting {name!r}")
            if name == "denied_access_keys":
                if not isinstance(value, str):
                    raise ValueError("denied_access_keys must be a comma-separated string")
                checked[name] = value
                continue
            if name in _CHOICES:
                if value not in _CHOICES[name]:
                    raise ValueError(f"{name} must be one of {', '.join(_CHOICES[name])}")
                checked[name] = value
                continue
            if name == "empty_pages":
                if not isinstance(value, bool):
                    raise ValueError("empty_pages must be true or false")
                checked[name] = value
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            value = float(value)
            if value != value or value < 0:  # NaN or negative
                raise ValueError(f"{name} must be a number >= 0")
            if name in _RATES and value > 1:
                raise ValueError(f"{name} must be between 0 and 1")
            if name in ("token_ttl", "page_token_ttl") and value < 1:
                raise ValueError(f"{name} must be at least 1 second")
            checked[name] = value
        with self._lock:
            for name, value in checked.items():
                setattr(self, name, value)
            if "max_faults" in checked:
                self._spent = 0

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def denies(self, authorization: str) -> bool:
        """Whether the SigV4 Authorization header's access key is on the denied list."""
        if not self.denied_access_keys:
            return False
        _, _, credential = authorization.partition("Credential=")
        access_key = credential.split("/", 1)[0]
        return access_key in {k.strip() for k in self.denied_access_keys.split(",")}

    def delay(self, rng: random.Random) -> float:
        """Seconds to hold a response back: latency plus uniform jitter."""
        ms = self.latency_ms
        if self.jitter_ms > 0:
            ms += rng.uniform(0, self.jitter_ms)
        return ms / 1000.0


class Throttle:
    """Token buckets keyed by snapshot id, refilled at `rate` per second, burst = `rate`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def allow(self, key: str, rate: float) -> bool:
        """Take one token from `key`'s bucket; False when the request is over the rate."""
        if rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (rate, now))
            tokens = min(rate, tokens + (now - last) * rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return False
            self._buckets[key] = (tokens - 1, now)
            return True
