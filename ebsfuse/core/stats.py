"""Counters at the read path's decision points, per snapshot, and a bounded latency histogram.

They answer "why was that read slow": requests and retries by cause, cache hits and misses,
prefetched blocks that were used or wasted, token refreshes, and request latency percentiles.
`ebsfuse stats MOUNTPOINT` reads them as JSON from the mount's hidden stats file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .. import BLOCK_SIZE

# Hidden (not listed, but open-able) file with the mount's counters as JSON, read by
# `ebsfuse stats MOUNTPOINT`: no socket or extra process needed to ask the daemon. Named here,
# in a module with no FUSE in it, so that command reads it without loading pyfuse3 or trio.
STATS_NAME = b".ebsfuse-stats"

# Latency buckets grow by 2^(1/4) (~19%) from 0.1 ms: percentiles within one bucket's width,
# in a fixed 128 counters whatever the number of requests (up to ~400 s).
_BUCKET_BASE_S = 1e-4
_BUCKETS_PER_DOUBLING = 4
_BUCKETS = 128


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def add(self, seconds: float) -> None:
        if seconds <= _BUCKET_BASE_S:
            bucket = 0
        else:
            bucket = int(math.log2(seconds / _BUCKET_BASE_S) * _BUCKETS_PER_DOUBLING) + 1
        self.counts[min(bucket, _BUCKETS - 1)] += 1
        self.total += 1

    def percentile(self, p: float) -> float | None:
        """Upper edge of the bucket holding the p-th percentile, in seconds."""
        if not self.total:
            return None
        rank = math.ceil(self.total * p / 100)
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return _BUCKET_BASE_S * 2 ** (bucket / _BUCKETS_PER_DOUBLING)
        return None


@dataclass
class ReadStats:
    """What one snapshot's reads cost."""

    cache_hits: int = 0
    cache_misses: int = 0
    disk_hits: int = 0
    lineage_hits: int = 0
    hole_reads: int = 0
    shared_flights: int = 0
    get_requests: int = 0
    bytes_fetched: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    token_refusals: int = 0
    failures: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def count_retry(self, code: str | None) -> None:
        key = code or "error"
        self.retries[key] = self.retries.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        percentiles = {
            f"p{p}": (round(v * 1000, 2) if (v := self.latency.percentile(p)) is not None else None)
            for p in (50, 90, 99)
        }
        return {
            "requests": {"GetSnapshotBlock": self.get_requests},  # lists: the block map's
            "retries": dict(self.retries),
            "failures": self.failures,
            "bytes_fetched": self.bytes_fetched,
            "cache": {
                "hits": self.cache_hits,
                "disk_hits": self.disk_hits,
                "lineage_hits": self.lineage_hits,
                "misses": self.cache_misses,
            },
            # Blocks served by a tier below memory: each a GetSnapshotBlock not sent.
            "saved": {
                "requests": self.disk_hits + self.lineage_hits,
                "bytes": (self.disk_hits + self.lineage_hits) * BLOCK_SIZE,
            },
            "hole_reads": self.hole_reads,
            "shared_flights": self.shared_flights,
            "token_refusals": self.token_refusals,
            "prefetch": {
                "blocks": self.prefetched,
                "used": self.prefetch_used,
                "wasted": self.prefetch_wasted,
            },
            "latency_ms": percentiles,
        }
