"""Verified blocks on demand: cache lookup, single flight per block, fetch with bounded retries.

Concurrency protocol (everything here runs on the one trio thread; only the blocking HTTP
request and its SHA-256 check run in worker threads):

1. `read_block` checks the cache, then the in-flight table. These checks and the insertion of
   a new `_Flight` happen with no `await` between them, so exactly one task (the leader) fetches
   a given block while the others wait on its event and share its result or its error.
2. The leader looks up the token (which may list), then fetches through
   `trio.to_thread.run_sync` under the shared `CapacityLimiter`, which bounds requests in flight
   for the whole mount (`--max-concurrency`) and matches the HTTP connection pool.
3. Only verified bytes enter the cache. The flight is removed and its event set in a `finally`,
   so a cancelled or failed leader never strands its waiters.

A refused token (INVALID_BLOCK_TOKEN) drops the range from the block map and is retried once
with a fresh token; checksum mismatches, throttling, 5xx and network errors are retried with the
client's `RetryPolicy`; anything else fails at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import cachetools
import trio

from .blockmap import BlockMap
from .client import EbsClient, RetryPolicy
from .errors import EbsError

log = logging.getLogger(__name__)


@dataclass
class ReadStats:
    """Counters at the read path's decision points, per mount."""

    cache_hits: int = 0
    cache_misses: int = 0
    hole_reads: int = 0
    shared_flights: int = 0
    get_requests: int = 0
    bytes_fetched: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    token_refusals: int = 0
    failures: int = 0

    def count_retry(self, error: EbsError) -> None:
        key = error.code or "error"
        self.retries[key] = self.retries.get(key, 0) + 1


class _Flight:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class BlockCache:
    """Verified blocks of every snapshot of a mount, LRU, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: cachetools.LRUCache[tuple[str, int], bytes] = cachetools.LRUCache(
            maxsize=max_bytes, getsizeof=len
        )

    def get(self, key: tuple[str, int]) -> bytes | None:
        return self._lru.get(key)

    def put(self, key: tuple[str, int], data: bytes) -> None:
        self._lru[key] = data

    @property
    def current_bytes(self) -> int:
        return int(self._lru.currsize)


class FetchContext:
    """What every snapshot of one mount shares: client, cache, concurrency limit, stats."""

    def __init__(
        self,
        client: EbsClient,
        *,
        cache_bytes: int,
        max_concurrency: int,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.cache = BlockCache(cache_bytes)
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.policy = policy or RetryPolicy()
        self.stats = ReadStats()
        self.inflight: dict[tuple[str, int], _Flight] = {}


class SnapshotReader:
    """One snapshot's blocks: `read_block(index)` gives verified bytes, or None for a hole."""

    def __init__(
        self,
        snapshot_id: str,
        blockmap: BlockMap,
        ctx: FetchContext,
        *,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.snapshot_id = snapshot_id
        self.blockmap = blockmap
        self.ctx = ctx
        self._sleep = sleep or trio.sleep

    async def read_block(self, index: int) -> bytes | None:
        key = (self.snapshot_id, index)
        ctx = self.ctx
        data = ctx.cache.get(key)
        if data is not None:
            ctx.stats.cache_hits += 1
            return data
        flight = ctx.inflight.get(key)
        if flight is not None:
            ctx.stats.shared_flights += 1
            await flight.event.wait()
            if flight.error is not None:
                raise flight.error
            return flight.data
        flight = ctx.inflight[key] = _Flight()
        try:
            flight.data = await self._load(index)
            if flight.data is not None:
                ctx.cache.put(key, flight.data)
            return flight.data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del ctx.inflight[key]
            flight.event.set()

    async def _load(self, index: int) -> bytes | None:
        ctx = self.ctx
        token = await self.blockmap.lookup(index)
        if token is None:
            ctx.stats.hole_reads += 1
            return None
        ctx.stats.cache_misses += 1
        attempt = 1
        token_retried = False
        while True:
            try:
                ctx.stats.get_requests += 1
                data = await trio.to_thread.run_sync(
                    ctx.client.get_block, self.snapshot_id, index, token, limiter=ctx.limiter
                )
                ctx.stats.bytes_fetched += len(data)
                return data
            except EbsError as error:
                if error.token_refused and not token_retried:
                    # Tokens expire, and a service may supersede them: re-list once.
                    ctx.stats.token_refusals += 1
                    token_retried = True
                    log.info("%s: block %d: token refused, re-listing", self.snapshot_id, index)
                    self.blockmap.invalidate(index)
                    token = await self.blockmap.lookup(index)
                    if token is None:
                        return None
                    continue
                if not error.retryable or attempt >= ctx.policy.max_attempts(error):
                    ctx.stats.failures += 1
                    log.error("%s (after %d attempts)", error, attempt)
                    raise
                ctx.stats.count_retry(error)
                log.debug("%s; retrying (attempt %d)", error, attempt)
                await self._sleep(ctx.policy.delay(attempt))
                attempt += 1
