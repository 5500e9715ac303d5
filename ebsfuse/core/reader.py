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
with a fresh token; checksum mismatches, throttling, 5xx and network errors are retried by the
one retry loop (`ebs.retry.Attempts` under the context's `RetryPolicy`); anything else fails at
once. The mount calls `read_block` directly; the snapshot tools reach it through
`core.pipeline.ordered_blocks`.

Bounds (README, "How a read works"): a flight gets its block or fails within the policy's
budget (60 s by default) whatever the server does. Every request is given only what is left of
it (and has its own deadline in the transport), no retry starts after it, and a cancel scope
at the budget ends any wait (the block map's lock, a listing, the concurrency limit). A failed
flight is logged once, with its attempts (by the daemon; a tool raises it to its command),
and remembered for `FAILED_HOLD_S`: the kernel re-issues a failed read at once, and that
re-issue fails at once instead of starting a new budget.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import cachetools
import trio

from ..ebs.client import EbsClient
from ..ebs.errors import EbsError, NotSent
from ..ebs.pages import BlockPage
from ..ebs.retry import MIN_ATTEMPT_S, Attempts, RetryPolicy, call_with_retries
from .blockmap import BlockMap, V
from .diskcache import DiskCache
from .stats import ReadStats

if TYPE_CHECKING:
    from .fetchpool import FetchPool

log = logging.getLogger(__name__)

Key = tuple[str, int]
T = TypeVar("T")
# A verified block: bytes, or a read-only view of it where a fetch worker wrote it, in memory
# shared with the daemon (`fetchpool`, the daemon's only). Either is 512 KiB long, sliced and
# compared as bytes are, and taken by anything that reads a buffer.
BlockData = bytes | memoryview


# Threads reading the disk tier at once: enough to keep a local disk busy, few enough that
# they never crowd out the requests to the service.
DISK_THREADS = 8
# How long a failed block fails again at once. The kernel re-issues a failed read straight
# away (and again in smaller pieces); each would otherwise start a new budget, so a reader
# waited minutes. Short enough that a user trying again a little later gets a fresh attempt.
FAILED_HOLD_S = 5.0
# Failures remembered at most (a few hundred bytes each): a whole failing region of a large
# read, without growing with the volume.
MAX_REMEMBERED_FAILURES = 4096
# The budget's cancel scope fires this much after the budget, as a backstop: requests are
# given only what is left and end by then on their own.
DEADLINE_GRACE_S = 1.0
# trio 0.23 renamed `cancellable` to `abandon_on_cancel`: a thread left behind by a cancelled
# wait ends at its request's own deadline.
ABANDON_ON_CANCEL = (
    {"abandon_on_cancel": True}
    if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
    else {"cancellable": True}
)


def attempt_timeout(policy: RetryPolicy, wall_deadline: float) -> float:
    """What an attempt starting now may take of what is left of the budget, if enough is."""
    left = wall_deadline - time.monotonic()
    if left < MIN_ATTEMPT_S:
        raise NotSent(f"the {policy.budget_s:g} s budget was spent waiting")
    return policy.attempt_timeout(left)


def attempt_by(policy: RetryPolicy, request: Callable[..., T], wall_deadline: float) -> T:
    """In a worker thread: `request` with what is left of the budget, if enough is."""
    return request(timeout=attempt_timeout(policy, wall_deadline))


@dataclass
class Fetched:
    """What a blocking fetch (`SnapshotReader.fetch_blocking`) came to, for the counters."""

    data: bytes | None = None  # None once handed to a sink: the bytes are not held longer
    nbytes: int = 0
    error: EbsError | None = None
    from_disk: bool = False
    seconds: float = 0.0
    sent: int = 0  # requests that went out
    retried: list[str] = field(default_factory=list)  # the error codes retried


class _Stopped(EbsError):
    """A blocking fetch given up because its stream ended (nobody waits for the block)."""

    def __init__(self) -> None:
        super().__init__("the stream ended", code="Cancelled")


class _Flight:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: BlockData | None = None
        self.error: BaseException | None = None


class Borrower(Protocol):
    """A tier that may serve one snapshot's block from another's cached bytes (`lineage`)."""

    async def borrow(self, snapshot_id: str, index: int) -> BlockData | None: ...


class BlockCache(cachetools.LRUCache):
    """Verified blocks of every snapshot of a mount, LRU, bounded in bytes.

    Remembers which cached blocks were prefetched and not yet read, to count the ones evicted
    unread (wasted prefetch); that set is bounded by the cache itself.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=len)
        self.unread_prefetches: dict[Key, ReadStats] = {}

    def popitem(self) -> tuple[Key, BlockData]:
        key, value = super().popitem()
        stats = self.unread_prefetches.pop(key, None)
        if stats is not None:
            stats.prefetch_wasted += 1
        return key, value

    def peek(self, key: Key) -> BlockData | None:
        """The block if held, without making it recently used. A lender's block read for a
        borrower keeps its place, so a borrower reading in order evicts the lender's blocks it
        has passed, not those it is about to borrow."""
        try:
            return cachetools.Cache.__getitem__(self, key)
        except KeyError:
            return None

    def take(self, key: Key) -> BlockData | None:
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
        log_failures: bool = True,
    ) -> None:
        self.client = client
        # The daemon logs each failed block once (the kernel only sees EIO); a tool raises it
        # to its command, which prints it as its one line.
        self.failure_level = logging.ERROR if log_failures else logging.DEBUG
        self.cache = BlockCache(cache_bytes)
        self.cache_bytes = cache_bytes
        self.max_concurrency = max_concurrency
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.policy = policy or RetryPolicy()
        self.inflight: dict[Key, _Flight] = {}
        self.failed: OrderedDict[Key, tuple[float, EbsError]] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        # The tiers below memory, set by whoever opens the context (`pipeline`): blocks on disk
        # (`--cache-dir`), and blocks borrowed from related snapshots' caches.
        self.disk: DiskCache | None = None
        self.lineage: Borrower | None = None
        # Called in the worker thread with each block just fetched and verified (the ordered
        # stream's sink: a download writes it there, as it arrives, with no hand-off).
        self.on_fetched: Callable[[str, int, bytes], None] | None = None
        # Disk reads get threads of their own: a cached block is not queued behind 64
        # requests to the service.
        self.disk_limiter = trio.CapacityLimiter(DISK_THREADS)
        # Fetch worker processes (the daemon's, `--fetch-workers`); None: threads fetch.
        self.pool: FetchPool | None = None

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    async def from_disk(self, snapshot_id: str, index: int) -> bytes | None:
        """The block from the disk tier (checked there), or None; never raises."""
        if self.disk is None:
            return None
        return await trio.to_thread.run_sync(
            self.disk.get, snapshot_id, index, limiter=self.disk_limiter
        )

    def held(self, snapshot_id: str, index: int) -> bool:
        """Whether memory or disk holds the block, without reading it."""
        key = (snapshot_id, index)
        return key in self.cache or (self.disk is not None and key in self.disk)

    async def with_retries(
        self,
        request: Callable[..., T],
        stats: ReadStats,
        deadline: float,
        *,
        count_requests: bool = False,
        awaited: bool = False,
    ) -> T:
        """`request(timeout=...)` in a worker thread under the concurrency limit, retried by the
        policy until trio's clock reaches `deadline`; the error raised carries its attempts.
        If `awaited`, `request(time_left=...)` is awaited here instead: it hands its work to a
        fetch worker process, whose pool bounds the requests in flight with its slots.

        The trio driver of the one retry loop (`retry.Attempts`), for everything the pipeline
        sends: block fetches (`count_requests` adds each request sent to `stats.get_requests`)
        and listings. The time an attempt may take is
        worked out when a worker starts it, not before it waits for a slot: queued behind 64
        others, a request gets what is left, or is not sent.
        """
        # Worker threads have no trio clock: the same deadline on the monotonic clock.
        wall_deadline = time.monotonic() + (deadline - trio.current_time())
        attempts = Attempts(self.policy, lambda: deadline - trio.current_time())
        while True:
            try:
                result = await self._attempt(request, wall_deadline, awaited)
            except EbsError as error:
                if count_requests and not isinstance(error, NotSent):
                    stats.get_requests += 1  # here, on the trio thread: no lost updates
                delay = attempts.retry_after(error)
                stats.count_retry(error.code)
            else:
                if count_requests:
                    stats.get_requests += 1
                return result
            await trio.sleep(delay)

    async def _attempt(
        self, request: Callable[..., Any], wall_deadline: float, awaited: bool
    ) -> Any:
        """One attempt: `request(timeout=)` in a worker thread under the concurrency limit, or
        `request(time_left=)` awaited here (`awaited`). The fetch pool's slot is held from
        sending to the answer, also by an attempt abandoned, so it is the exact limit of
        requests in flight; `time_left` gives what the attempt may take when it has one."""
        if awaited:
            return await request(
                time_left=functools.partial(attempt_timeout, self.policy, wall_deadline)
            )
        return await trio.to_thread.run_sync(
            attempt_by, self.policy, request, wall_deadline, limiter=self.limiter,
            **ABANDON_ON_CANCEL,
        )  # fmt: skip

    def remember_failure(self, key: Key, error: EbsError) -> None:
        # The monotonic clock, not trio's: trio's starts anew (at a random offset) in each run.
        self.failed[key] = (time.monotonic() + FAILED_HOLD_S, error.fresh())
        self.failed.move_to_end(key)
        while len(self.failed) > MAX_REMEMBERED_FAILURES:
            self.failed.popitem(last=False)

    def recent_failure(self, key: Key) -> EbsError | None:
        """The error of `key`'s flight if it failed less than FAILED_HOLD_S ago."""
        entry = self.failed.get(key)
        if entry is None:
            return None
        until, error = entry
        if time.monotonic() >= until:
            del self.failed[key]
            return None
        return error.fresh()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Enables prefetching for the duration: background fetches live in this nursery, and
        the fetch workers when there are any."""
        async with trio.open_nursery() as nursery:
            if self.pool is not None:
                await nursery.start(self.pool.serve)
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

    def __init__(
        self,
        snapshot_id: str,
        blockmap: BlockMap[str],
        ctx: FetchContext,
        stats: ReadStats | None = None,
    ) -> None:
        self.snapshot_id = snapshot_id
        self.blockmap = blockmap
        self.ctx = ctx
        self.stats = stats or ReadStats()
        self._gone_reported = False  # a SNAPSHOT_NOT_FOUND already logged

    def cached_block(self, index: int) -> BlockData | None:
        """The block if the cache holds it (counted as a hit), else None; never waits."""
        data = self.ctx.cache.take((self.snapshot_id, index))
        if data is not None:
            self.stats.cache_hits += 1
        return data

    async def read_block(self, index: int) -> BlockData | None:
        key = (self.snapshot_id, index)
        ctx = self.ctx
        # This reader's own budget, from its first ask: leading again after a cancelled or
        # starved flight it joined does not start a new one.
        deadline = trio.current_time() + ctx.policy.budget_s
        while True:
            data = ctx.cache.take(key)
            if data is not None:
                self.stats.cache_hits += 1
                return data
            flight = ctx.inflight.get(key)
            if flight is None:
                failure = ctx.recent_failure(key)
                if failure is not None:
                    # Logged once already, when it failed; this is the kernel asking again.
                    log.debug("%s (failed moments ago)", failure)
                    raise failure
                return await self._lead(key, deadline, prefetch=False)
            self.stats.shared_flights += 1
            await flight.event.wait()
            if flight.error is None:
                if ctx.cache.unread_prefetches.pop(key, None) is not None:
                    self.stats.prefetch_used += 1
                return flight.data
            if isinstance(flight.error, NotSent) and not flight.error.attempts:
                continue  # a prefetch that never got a slot: this reader asks for itself
            if isinstance(flight.error, EbsError):
                raise flight.error.fresh()
            if not isinstance(flight.error, trio.Cancelled):
                raise flight.error
            # The leader was cancelled (a sibling block of its read failed, or shutdown), not
            # this reader: its Cancelled must not surface here. Look again.

    def prefetch(self, index: int) -> None:
        """Start fetching `index` in the background unless it is cached or under way."""
        key = (self.snapshot_id, index)
        ctx = self.ctx
        if key in ctx.cache or key in ctx.inflight or ctx.recent_failure(key) is not None:
            return
        if ctx.spawn(self._prefetch, key):
            # Registered now, not when the task first runs, so a reader arriving in between
            # joins this flight instead of starting a second request.
            self.ctx.inflight[key] = _Flight()

    async def _prefetch(self, key: Key) -> None:
        # Never let a background fetch end the mount; a reader that joined this flight gets
        # the error (logged once by _lead), and so do later reads within FAILED_HOLD_S.
        with contextlib.suppress(Exception):
            await self._lead(key, trio.current_time() + self.ctx.policy.budget_s, prefetch=True)

    def _log_failure(self, error: EbsError) -> None:
        """One line per failed block; for a snapshot that is gone (deleted while mounted) one
        line in all, since every later block of it fails the same way."""
        level = self.ctx.failure_level
        if error.reason == "SNAPSHOT_NOT_FOUND":
            if self._gone_reported:
                level = logging.DEBUG
            self._gone_reported = True
        log.log(level, "%s (after %d attempts)", error, error.attempts)

    async def _lead(self, key: Key, deadline: float, *, prefetch: bool) -> BlockData | None:
        ctx = self.ctx
        flight = ctx.inflight.get(key)
        if flight is None or not prefetch:
            flight = ctx.inflight[key] = _Flight()
        try:
            flight.data = await self._load(key[1], deadline)
            if flight.data is not None:
                ctx.cache[key] = flight.data
                if prefetch:
                    self.stats.prefetched += 1
                    ctx.cache.unread_prefetches[key] = self.stats
            return flight.data
        except EbsError as error:
            flight.error = error.fresh()
            if prefetch and isinstance(error, NotSent) and not error.attempts:
                # Readahead that never got a slot: nothing failed, nothing to remember.
                log.debug("%s: prefetch of block %d not sent: %s", *key, error)
                raise
            self.stats.failures += 1
            ctx.remember_failure(key, error)
            self._log_failure(error)
            raise
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del ctx.inflight[key]
            flight.event.set()

    def _timed_get(self, index: int, token: str, *, timeout: float) -> tuple[bytes, float]:
        """In a worker thread: the verified block, stored on disk too when there is a disk tier."""
        started = time.monotonic()
        client = self.ctx.client
        data = client.get_block(self.snapshot_id, index, token, timeout=timeout)
        seconds = time.monotonic() - started
        if self.ctx.disk is not None:
            digest = client.verified_digest(data)
            self.ctx.disk.put(self.snapshot_id, index, data, digest)
        if self.ctx.on_fetched is not None:
            self.ctx.on_fetched(self.snapshot_id, index, data)
        return data, seconds

    async def _pooled_get(
        self, index: int, token: str, *, time_left: Callable[[], float]
    ) -> tuple[BlockData, float]:
        """`_timed_get` through a fetch worker process: the audit line and the disk tier are
        the daemon's to write, from the worker's answer."""
        ctx = self.ctx
        assert ctx.pool is not None
        data, checksum, seconds = await ctx.pool.get(self.snapshot_id, index, token, time_left)
        if ctx.client.audit is not None:
            ctx.client.audit.record(self.snapshot_id, index, len(data), checksum)
        if ctx.disk is not None:
            digest = base64.b64decode(checksum)
            await trio.to_thread.run_sync(
                ctx.disk.put, self.snapshot_id, index, data, digest, limiter=ctx.disk_limiter
            )
        return data, seconds

    def fetch_blocking(self, index: int, token: str, stop: threading.Event) -> Fetched:
        """In a worker thread of a bulk stream: the verified block from the disk tier, or
        fetched under the policy's retry loop and budget (`call_with_retries`, the blocking
        driver of the same `Attempts`); never raises. `stop` ends the backoff and the retries.

        The counters are left to `count` on the trio thread; the one re-list on a refused
        token is left to the caller, which owns the block map.
        """
        outcome = Fetched()
        if self.ctx.disk is not None:
            outcome.data = self.ctx.disk.get(self.snapshot_id, index)
            if outcome.data is not None:
                outcome.from_disk = True
                return outcome
        wall_deadline = time.monotonic() + self.ctx.policy.budget_s

        def attempt() -> tuple[bytes, float]:
            if stop.is_set():
                raise _Stopped()
            try:
                request = functools.partial(self._timed_get, index, token)
                return attempt_by(self.ctx.policy, request, wall_deadline)
            except EbsError as error:
                if not isinstance(error, NotSent):
                    outcome.sent += 1
                outcome.retried.append(error.code or "error")
                raise

        try:
            outcome.data, outcome.seconds = call_with_retries(
                attempt, self.ctx.policy, sleep=stop.wait
            )
            outcome.nbytes = len(outcome.data)
            outcome.sent += 1
        except EbsError as error:
            outcome.error = error
            outcome.retried.pop()  # the last failure was final, not retried
        return outcome

    def count(self, outcome: Fetched) -> None:
        """On the trio thread: a blocking fetch's outcome in the counters, as `read_block`
        counts its own; a failure logged once."""
        stats = self.stats
        if outcome.from_disk:
            stats.disk_hits += 1
            return
        stats.cache_misses += 1
        stats.get_requests += outcome.sent
        for code in outcome.retried:
            stats.count_retry(code)
        if outcome.error is not None:
            if not isinstance(outcome.error, _Stopped):
                stats.failures += 1
                self._log_failure(outcome.error)
            return
        stats.latency.add(outcome.seconds)
        stats.bytes_fetched += outcome.nbytes

    async def _load(self, index: int, deadline: float) -> BlockData | None:
        """The verified block, or None for a hole, by trio's clock reaching `deadline`."""
        with trio.CancelScope(deadline=deadline + DEADLINE_GRACE_S) as scope:
            return await self._load_by(index, deadline)
        assert scope.cancelled_caught
        raise EbsError(
            f"no verified block within the {self.ctx.policy.budget_s:g} s budget",
            snapshot_id=self.snapshot_id,
            block_index=index,
            code="ReadTimeout",
        )

    async def _load_by(self, index: int, deadline: float) -> BlockData | None:
        known, token = self.blockmap.cached_lookup(index)
        tiers = self.ctx.disk is not None or self.ctx.lineage is not None
        if tiers and not (known and token is None):  # a known hole needs no tier
            data = await self._from_tiers(index)
            if data is not None:
                return data
        token = await self.blockmap.lookup(index)
        if token is None:
            self.stats.hole_reads += 1
            return None
        self.stats.cache_misses += 1
        try:
            return await self._fetch(index, token, deadline)
        except EbsError as error:
            if not error.token_refused:
                raise
        token = await self.relist(index, token)
        if token is None:
            return None
        return await self._fetch(index, token, deadline)

    async def relist(self, index: int, refused: str) -> str | None:
        """Tokens expire, and a service may supersede them: after a refusal the block's token
        is listed again, once; the caller tries once more with it (None: now a hole)."""
        self.stats.token_refusals += 1
        log.info("%s: block %d: token refused, re-listing", self.snapshot_id, index)
        self.blockmap.invalidate(index, refused)
        return await self.blockmap.lookup(index)

    async def _from_tiers(self, index: int) -> BlockData | None:
        """The block from disk, or borrowed from a related snapshot, before any request."""
        data: BlockData | None = await self.ctx.from_disk(self.snapshot_id, index)
        if data is not None:
            self.stats.disk_hits += 1
            return data
        if self.ctx.lineage is not None:
            data = await self.ctx.lineage.borrow(self.snapshot_id, index)
            if data is not None:
                self.stats.lineage_hits += 1
                if self.ctx.disk is not None:
                    await trio.to_thread.run_sync(
                        self.ctx.disk.put,
                        self.snapshot_id,
                        index,
                        data,
                        limiter=self.ctx.disk_limiter,
                    )
                return data
        return None

    async def _fetch(self, index: int, token: str, deadline: float) -> BlockData:
        pooled = self.ctx.pool is not None
        request: Callable[..., Any] = functools.partial(
            self._pooled_get if pooled else self._timed_get, index, token
        )
        data, seconds = await self.ctx.with_retries(
            request, self.stats, deadline, count_requests=True, awaited=pooled
        )
        self.stats.latency.add(seconds)  # here, on the trio thread: no lost updates
        self.stats.bytes_fetched += len(data)
        return data


class PageLister(Generic[V]):
    """One checked listing page for a block map, retried within the context's budget."""

    def __init__(
        self, ctx: FetchContext, stats: ReadStats, request: Callable[..., BlockPage[V]]
    ) -> None:
        self._ctx = ctx
        self._stats = stats
        self._request = request  # request(start_index=, next_token=, timeout=) -> page

    async def __call__(self, start_index: int | None, next_token: str | None) -> BlockPage[V]:
        # From block 0 the listing starts at the volume's start: no StartingBlockIndex, and an
        # error names the snapshot, not a "block 0".
        request = functools.partial(
            self._request, start_index=start_index or None, next_token=next_token
        )
        deadline = trio.current_time() + self._ctx.policy.budget_s
        return await self._ctx.with_retries(request, self._stats, deadline)
