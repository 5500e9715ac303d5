"""Block index -> block token, learned lazily from ListSnapshotBlocks and bounded in memory.

Nothing is listed up front. When a read needs a block that no known range covers, one listing
starts at exactly that block (StartingBlockIndex, MaxResults 10000) and follows empty pages
until the first page with blocks or the end. The answer covers a known index range: from the
start up to the last block returned when more pages remain, or to the end of the volume when
none do. Inside a covered range a block without a token is a hole and reads as zeros.

Ranges expire before their tokens do (`REFRESH_FRACTION` of the lifetime the service gave), and
a token the service refuses drops its range so the next lookup re-lists. Ranges are kept in
least-recently-used order and evicted beyond `max_tokens`, so a 64 TiB volume read end to end
holds a few ranges, never all its tokens.

The same map serves the mount, one block at a time (`lookup`), and the ordered block stream of
the snapshot tools, range by range (`listed`); over ListChangedBlocks it holds each changed
block's pair of tokens instead of a token, for `diff` and `download --base`.

Concurrency: lookups of covered blocks never wait. Listings are serialized by one lock per
snapshot (the service allows only 50 list calls a second per account, and two readers usually
need the same range), and after taking the lock a lookup checks again whether a concurrent
listing already covered its block.
"""

from __future__ import annotations

import bisect
import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

import trio

from ..ebs.errors import EbsError
from ..ebs.pages import BlockPage

log = logging.getLogger(__name__)

# Refresh a range once 80% of its tokens' lifetime has passed: with the service's 7 days that
# is days early, and with a 2 s test TTL it still leaves 0.4 s for requests already under way.
REFRESH_FRACTION = 0.8
# Each dense range holds up to 10000 tokens (about 1 MiB with the index array); 100k tokens
# (~50 GiB of a fully written volume) is plenty for any working set and caps memory near 12 MiB.
DEFAULT_MAX_TOKENS = 100_000
# A service may interleave empty pages; following this many without a block is a broken
# listing, not a slow one, and fails the read rather than looping forever.
MAX_EMPTY_PAGES = 1000
# Known-coverage intervals kept for st_blocks; merging keeps this small for sequential access.
MAX_COVERAGE_INTERVALS = 4096

# What the map keeps per listed block: a token (ListSnapshotBlocks) or a `ChangedBlock`.
V = TypeVar("V")
Lister = Callable[[int | None, str | None], Awaitable[BlockPage[V]]]


@dataclass
class TokenRange(Generic[V]):
    start: int
    end: int  # exclusive
    indexes: array = field(default_factory=lambda: array("q"))
    tokens: list[V] = field(default_factory=list)
    refresh_at: float | None = None  # time.monotonic(); None: no expiry given

    def token_for(self, index: int) -> V | None:
        i = bisect.bisect_left(self.indexes, index)
        if i < len(self.indexes) and self.indexes[i] == index:
            return self.tokens[i]
        return None

    def listed_from(self, index: int) -> list[tuple[int, V]]:
        """The listed blocks of this range at or after `index`, ascending."""
        i = bisect.bisect_left(self.indexes, index)
        return list(zip(self.indexes[i:], self.tokens[i:], strict=True))


class BlockMap(Generic[V]):
    """Tokens for one snapshot (or one pair, for ListChangedBlocks), learned lazily by range.

    `lister(start_index, next_token)` performs one checked list call. The mount looks blocks up
    one at a time (`lookup`); the ordered block stream walks the listed blocks (`listed`).
    """

    def __init__(
        self,
        snapshot_id: str,
        num_blocks: int,
        lister: Lister[V],
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.snapshot_id = snapshot_id
        self.num_blocks = num_blocks
        self._lister = lister
        self._max_tokens = max_tokens
        self._clock = clock
        self._wall_clock = wall_clock
        self._ranges: OrderedDict[int, TokenRange[V]] = OrderedDict()  # by start, in LRU order
        self._starts: list[int] = []  # sorted starts of self._ranges
        self._token_count = 0
        self._lock = trio.Lock()
        # (start, end, allocated) intervals known from listings, merged when adjacent.
        self._coverage: list[tuple[int, int, int]] = []
        self.list_calls = 0
        self.refreshes = 0
        self.evictions = 0
        self.expiry: datetime | None = None  # the ExpiryTime of the latest page

    # -- lookup -----------------------------------------------------------------------------

    def _find(self, index: int) -> TokenRange[V] | None:
        i = bisect.bisect_right(self._starts, index) - 1
        if i < 0:
            return None
        rng = self._ranges[self._starts[i]]
        if index >= rng.end:
            return None
        return rng

    def _fresh(self, rng: TokenRange[V]) -> bool:
        return rng.refresh_at is None or self._clock() < rng.refresh_at

    def _cached_range(self, index: int) -> TokenRange[V] | None:
        rng = self._find(index)
        if rng is None or not self._fresh(rng):
            return None
        self._ranges.move_to_end(rng.start)
        return rng

    def cached_lookup(self, index: int) -> tuple[bool, V | None]:
        """(known, token) without listing: known is False when a listing is needed."""
        rng = self._cached_range(index)
        if rng is None:
            return False, None
        return True, rng.token_for(index)

    async def lookup(self, index: int) -> V | None:
        """The token of block `index`, or None if the block was never written (a hole)."""
        known, token = self.cached_lookup(index)
        if known:
            return token
        return (await self.covering(index)).token_for(index)

    async def listed(self, start: int = 0) -> AsyncIterator[tuple[int, V]]:
        """Every listed block from `start` to the end of the volume, ascending, with its token.

        Walks range by range (one list call per 10,000 listed blocks), so holes cost nothing
        and memory holds one range whatever the volume. A token handed out here may be old by
        the time it is used; `lookup` at the time of use gives a fresh one.
        """
        position = start
        while position < self.num_blocks:
            rng = await self.covering(position)
            for entry in rng.listed_from(position):
                yield entry
            position = rng.end

    async def covering(self, index: int) -> TokenRange[V]:
        """A fresh range holding `index`, listed now if none is known."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        rng = self._cached_range(index)
        if rng is not None:
            return rng
        async with self._lock:
            rng = self._cached_range(index)
            if rng is not None:
                return rng
            stale = self._find(index)
            if stale is not None:
                self.refreshes += 1
            rng = await self._list_from(index)
            if not rng.start <= index < rng.end:
                # Never serve an uncovered block as a hole: that would be wrong bytes.
                raise EbsError(
                    "the listing did not cover this block",
                    snapshot_id=self.snapshot_id,
                    block_index=index,
                    code="ListingGap",
                    retryable=True,
                )
            self._insert(rng)
            return rng

    def invalidate(self, index: int, token: str | None = None) -> None:
        """Forget the range holding `index` (its token was refused); the next lookup re-lists.

        With `token`, only if the range still holds that token: after a mass expiry (a host
        that slept past the tokens' lifetime) the first refusal re-lists, and the other
        readers' refusals keep the fresh range instead of each re-listing again.
        """
        rng = self._find(index)
        if rng is not None and (token is None or rng.token_for(index) == token):
            self._remove(rng)

    # -- listing ----------------------------------------------------------------------------

    async def _list_from(self, index: int) -> TokenRange[V]:
        next_token: str | None = None
        empty_pages = 0
        while True:
            self.list_calls += 1
            page = await self._lister(None if next_token else index, next_token)
            # A page helps once it reaches the needed block; one ending below it (a service
            # that paginates from elsewhere) says nothing about it, so keep following.
            if not page.next_token or (page.blocks and page.blocks[-1][0] >= index):
                break
            empty_pages += 1
            if empty_pages >= MAX_EMPTY_PAGES:
                raise EbsError(
                    f"listing returned {empty_pages} empty pages in a row",
                    snapshot_id=self.snapshot_id,
                    block_index=index,
                    code="ListingStalled",
                    retryable=True,
                )
            next_token = page.next_token
        return self._range_from_page(index, page)

    def seed(self, page: BlockPage[V]) -> None:
        """Keep what a first listing from block 0 (the mount's describe call) already told."""
        self._insert(self._range_from_page(0, page))

    def _range_from_page(self, index: int, page: BlockPage[V]) -> TokenRange[V]:
        """The index range a page proves, and the tokens in it.

        THE RULE FOR HOLES: a block is a hole (zeros, no request) only inside a range that a
        checked page proves holds no written block other than those it lists. Only
        `pages.block_page` makes a `BlockPage`, so every page here arrived whole, parsed, and
        describes this volume; a cut, empty, foreign or malformed answer raised instead and
        taught nothing. A page with NextToken proves [index, its last block]; the last page
        (no NextToken) proves [index, end of the volume); an empty page with NextToken proves
        nothing. Anything a page does not prove is listed again, never guessed.
        """
        blocks = [(i, t) for i, t in page.blocks if index <= i < self.num_blocks]
        end = blocks[-1][0] + 1 if page.next_token and blocks else self.num_blocks
        if page.next_token and not blocks:
            end = index  # an empty page with more to come says nothing
        rng: TokenRange[V] = TokenRange(start=index, end=end)
        rng.indexes.extend(i for i, _ in blocks)
        rng.tokens.extend(t for _, t in blocks)
        self.expiry = page.expiry or self.expiry
        if page.expiry is not None:
            lifetime = page.expiry.timestamp() - self._wall_clock()
            if lifetime > 0:
                rng.refresh_at = self._clock() + lifetime * REFRESH_FRACTION
            else:
                # Clock skew or an already-expired answer: do not re-list in a loop; a refused
                # token will invalidate the range instead.
                log.warning(
                    "%s: block tokens from the listing at %d expire in the past (%s); "
                    "check the system clock",
                    self.snapshot_id,
                    index,
                    page.expiry.isoformat(),
                )
        if rng.end > rng.start:
            self._record_coverage(rng)
        log.debug(
            "%s: listed blocks %d..%d: %d tokens", self.snapshot_id, rng.start, rng.end, len(blocks)
        )
        return rng

    # -- bookkeeping ------------------------------------------------------------------------

    def _insert(self, rng: TokenRange[V]) -> None:
        if rng.end <= rng.start:
            return
        # Ranges never overlap: drop any that the new one touches.
        i = bisect.bisect_right(self._starts, rng.start) - 1
        i = max(i, 0)
        doomed = []
        while i < len(self._starts) and self._starts[i] < rng.end:
            other = self._ranges[self._starts[i]]
            if other.end > rng.start:
                doomed.append(other)
            i += 1
        for other in doomed:
            self._remove(other)
        bisect.insort(self._starts, rng.start)
        self._ranges[rng.start] = rng
        self._token_count += len(rng.tokens)
        while self._token_count > self._max_tokens and len(self._ranges) > 1:
            _, oldest = next(iter(self._ranges.items()))
            self._remove(oldest)
            self.evictions += 1

    def _remove(self, rng: TokenRange[V]) -> None:
        del self._ranges[rng.start]
        self._starts.pop(bisect.bisect_left(self._starts, rng.start))
        self._token_count -= len(rng.tokens)

    def _record_coverage(self, rng: TokenRange[V]) -> None:
        """Add what a listing taught about allocation, for st_blocks.

        Snapshots are immutable, so only the parts of the new range no earlier listing covered
        add knowledge; their allocated counts come straight from the new range's indexes.
        """
        intervals = list(self._coverage)
        cursor = rng.start
        for s, e, _ in self._coverage:
            if e <= cursor or s >= rng.end:
                continue
            if s > cursor:
                intervals.append(self._counted(rng, cursor, s))
            cursor = max(cursor, e)
        if cursor < rng.end:
            intervals.append(self._counted(rng, cursor, rng.end))
        intervals.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, a in intervals:
            if merged and merged[-1][1] == s:
                ps, _, pa = merged[-1]
                merged[-1] = (ps, e, pa + a)
            else:
                merged.append((s, e, a))
        if len(merged) <= MAX_COVERAGE_INTERVALS:
            self._coverage = merged

    def _counted(self, rng: TokenRange[V], start: int, end: int) -> tuple[int, int, int]:
        lo = bisect.bisect_left(rng.indexes, start)
        hi = bisect.bisect_left(rng.indexes, end)
        return (start, end, hi - lo)

    @property
    def token_count(self) -> int:
        return self._token_count

    @property
    def range_count(self) -> int:
        return len(self._ranges)

    def known_hole_blocks(self) -> int:
        """Blocks known never to have been written, from every listing so far."""
        return sum((e - s) - a for s, e, a in self._coverage)
