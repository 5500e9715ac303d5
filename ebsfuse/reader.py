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
4. Prefetches are ordinary flights started in the context's background nursery. A reader that
   needs a block being prefetched joins that flight, so the block is fetched once; a failed
   prefetch passes its error (after the full retry budget) to readers that joined it, and the
   next read tries afresh. Blocks a reader waits for are held by its flight, not by the cache,
   so prefetching can never evict them.
5. A leader can be cancelled (a sibling block of a multi-block read failed, or shutdown). Its
   waiters then look again rather than raise a Cancelled that is not theirs: it would escape
   the FUSE handler and end the mount.

A refused token (INVALID_BLOCK_TOKEN) drops the range from the block map and is retried once
with a fresh token; checksum mismatches, throttling, 5xx and network errors are retried with the
client's `RetryPolicy`; anything else fails at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import cachetools
import trio

from . import BLOCK_SIZE
from .blockmap import BlockMap
from .client import EbsClient, RetryPolicy
from .errors import EbsError
from .stats import ReadStats

log = logging.getLogger(__name__)

Key = tuple[str, int]


class _Flight:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class BlockCache(cachetools.LRUCache):
    """Verified blocks of every snapshot of a mount, LRU, bounded in bytes.

    Remembers which cached blocks were prefetched and not yet read, to count the ones evicted
    unread (wasted prefetch); that set is bounded by the cache itself.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=len)
        self.unread_prefetches: dict[Key, ReadStats] = {}

    def popitem(self) -> tuple[Key, bytes]:
        key, value = super().popitem()
        stats = self.unread_prefetches.pop(key, None)
        if stats is not None:
            stats.prefetch_wasted += 1
        return key, value

    def take(self, key: Key) -> bytes | None:
        data = self.get(key)
        if data is not None:
            stats = self.unread_prefetches.pop(key, None)
            if stats is not None:
                stats.prefetch_used += 1
        return data

    @property
    def current_bytes(self) -> int:
        return int(self.currsize)


class FetchContext:
    """What every snapshot of one mount shares: client, cache, concurrency limit, prefetching."""

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
        self.cache_bytes = cache_bytes
        self.max_concurrency = max_concurrency
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.policy = policy or RetryPolicy()
        self.inflight: dict[Key, _Flight] = {}
        self._nursery: trio.Nursery | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Enables prefetching for the duration: background fetches live in this nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True


class SnapshotReader:
    """One snapshot's blocks: `read_block(index)` gives verified bytes, or None for a hole."""

    def __init__(self, snapshot_id: str, blockmap: BlockMap, ctx: FetchContext) -> None:
        self.snapshot_id = snapshot_id
        self.blockmap = blockmap
        self.ctx = ctx
        self.stats = ReadStats()

    def cached_block(self, index: int) -> bytes | None:
        """The block if the cache holds it (counted as a hit), else None; never waits."""
        data = self.ctx.cache.take((self.snapshot_id, index))
        if data is not None:
            self.stats.cache_hits += 1
        return data

    async def read_block(self, index: int) -> bytes | None:
        key = (self.snapshot_id, index)
        ctx = self.ctx
        while True:
            data = ctx.cache.take(key)
            if data is not None:
                self.stats.cache_hits += 1
                return data
            flight = ctx.inflight.get(key)
            if flight is None:
                return await self._lead(key, prefetch=False)
            self.stats.shared_flights += 1
            await flight.event.wait()
            if flight.error is None:
                if ctx.cache.unread_prefetches.pop(key, None) is not None:
                    self.stats.prefetch_used += 1
                return flight.data
            if not isinstance(flight.error, trio.Cancelled):
                raise flight.error
            # The leader was cancelled (a sibling block of its read failed, or shutdown), not
            # this reader: its Cancelled must not surface here. Look again.

    def prefetch(self, index: int) -> None:
        """Start fetching `index` in the background unless it is cached or under way."""
        key = (self.snapshot_id, index)
        if key in self.ctx.cache or key in self.ctx.inflight:
            return
        if self.ctx.spawn(self._prefetch, key):
            # Registered now, not when the task first runs, so a reader arriving in between
            # joins this flight instead of starting a second request.
            self.ctx.inflight[key] = _Flight()

    async def _prefetch(self, key: Key) -> None:
        try:
            await self._lead(key, prefetch=True)
        except Exception as error:
            # Never let a background fetch end the mount; a reader that joined this flight
            # gets the error (after the full retry budget), and the next read tries afresh.
            log.debug("prefetch failed: %s", error)

    async def _lead(self, key: Key, *, prefetch: bool) -> bytes | None:
        ctx = self.ctx
        flight = ctx.inflight.get(key)
        if flight is None or not prefetch:
            flight = ctx.inflight[key] = _Flight()
        try:
            flight.data = await self._load(key[1])
            if flight.data is not None:
                ctx.cache[key] = flight.data
                if prefetch:
                    self.stats.prefetched += 1
                    ctx.cache.unread_prefetches[key] = self.stats
            return flight.data
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del ctx.inflight[key]
            flight.event.set()

    def _timed_get(self, index: int, token: str) -> tuple[bytes, float]:
        started = time.monotonic()
        data = self.ctx.client.get_block(self.snapshot_id, index, token)
        return data, time.monotonic() - started

    async def _load(self, index: int) -> bytes | None:
        ctx = self.ctx
        stats = self.stats
        token = await self.blockmap.lookup(index)
        if token is None:
            stats.hole_reads += 1
            return None
        stats.cache_misses += 1
        attempt = 1
        token_retried = False
        while True:
            try:
                stats.get_requests += 1
                data, seconds = await trio.to_thread.run_sync(
                    self._timed_get, index, token, limiter=ctx.limiter
                )
                stats.latency.add(seconds)  # here, on the trio thread: no lost updates
                stats.bytes_fetched += len(data)
                if len(data) != BLOCK_SIZE:
                    # Verified against its own headers, but every EBS block is 512 KiB: a
                    # shorter one would shift every later byte of the image.
                    raise EbsError(
                        f"block of {len(data)} bytes, not {BLOCK_SIZE}",
                        snapshot_id=self.snapshot_id,
                        block_index=index,
                        code="UnexpectedBlockLength",
                    )
                return data
            except EbsError as error:
                if error.token_refused and not token_retried:
                    # Tokens expire, and a service may supersede them: re-list once.
                    stats.token_refusals += 1
                    token_retried = True
                    log.info("%s: block %d: token refused, re-listing", self.snapshot_id, index)
                    self.blockmap.invalidate(index, token)
                    token = await self.blockmap.lookup(index)
                    if token is None:
                        return None
                    continue
                if not error.retryable or attempt >= ctx.policy.max_attempts(error):
                    stats.failures += 1
                    log.error("%s (after %d attempts)", error, attempt)
                    raise
                stats.count_retry(error.code)
                log.debug("%s; retrying (attempt %d)", error, attempt)
                await trio.sleep(ctx.policy.delay(attempt))
                attempt += 1
