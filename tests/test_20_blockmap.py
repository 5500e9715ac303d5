"""BlockMap alone, with an in-process lister: coverage, holes, refresh, eviction, empty pages.

A fake lister is enough here: what is tested is the map's bookkeeping, which a real request
would not change (the emulator-backed tests in test_21 cover the same paths over HTTP).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import pytest
import trio

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.blockmap import BlockMap
from ebsfuse.ebs.client import BlockPage


class FakeListing:
    """Pages of `page_size` blocks over `allocated`, with optional empty pages and expiry."""

    def __init__(
        self,
        allocated: list[int],
        *,
        page_size: int = 10000,
        empty_pages: int = 0,
        ttl_s: float | None = 3600,
        now: list[float] | None = None,
    ) -> None:
        self.allocated = sorted(allocated)
        self.page_size = page_size
        self.empty_pages = empty_pages
        self.ttl_s = ttl_s
        self.calls: list[tuple[int | None, str | None]] = []
        self.now = now if now is not None else [0.0]

    async def __call__(self, start: int | None, token: str | None) -> BlockPage:
        self.calls.append((start, token))
        if token and token.startswith("empty"):
            _, remaining, start_s = token.split(":")
            start = int(start_s)
            if int(remaining) > 0:
                return self._page([], f"empty:{int(remaining) - 1}:{start}")
        elif token:
            start = int(token)
        elif self.empty_pages:
            return self._page([], f"empty:{self.empty_pages - 1}:{start or 0}")
        chosen = [i for i in self.allocated if i >= (start or 0)][: self.page_size]
        more = chosen and chosen[-1] < self.allocated[-1]
        return self._page([(i, f"t{i}") for i in chosen], str(chosen[-1] + 1) if more else None)

    def _page(self, blocks: list[tuple[int, str]], next_token: str | None) -> BlockPage:
        expiry = None
        if self.ttl_s is not None:
            expiry = datetime.fromtimestamp(self.now[0] + self.ttl_s, UTC)
        return BlockPage(blocks, next_token, expiry, 1, BLOCK_SIZE)


T = TypeVar("T")


def run(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    return trio.run(fn, *args)


def make_map(listing: FakeListing, num_blocks: int = 2048, **kw) -> BlockMap:
    return BlockMap(
        "snap-0123456789abcdef0",
        num_blocks,
        listing,
        clock=lambda: listing.now[0],
        wall_clock=lambda: listing.now[0],
        **kw,
    )


def test_one_listing_covers_its_range_and_knows_holes() -> None:
    listing = FakeListing([3, 5, 900])
    bm = make_map(listing)

    async def main() -> None:
        assert await bm.lookup(3) == "t3"
        assert await bm.lookup(4) is None  # a hole inside the covered range
        assert await bm.lookup(900) == "t900"
        assert await bm.lookup(2047) is None
        assert len(listing.calls) == 1
        assert await bm.lookup(0) is None  # below the first listing's start: listed anew

    run(main)
    assert len(listing.calls) == 2
    assert bm.known_hole_blocks() == 2048 - 3


def test_listing_starts_at_the_needed_block_and_pages_bound_the_range() -> None:
    listing = FakeListing(list(range(0, 2048, 2)), page_size=100)
    bm = make_map(listing)

    async def main() -> None:
        assert await bm.lookup(1000) == "t1000"
        assert listing.calls == [(1000, None)]
        # The page ended at block 1198 with more to come: 1199 and beyond are unknown.
        assert await bm.lookup(1198) == "t1198"
        assert len(listing.calls) == 1
        assert await bm.lookup(1199) is None
        assert listing.calls[-1] == (1199, None)
        # Below the first listing's start is unknown too.
        assert await bm.lookup(999) is None
        assert listing.calls[-1] == (999, None)

    run(main)


def test_empty_pages_are_followed() -> None:
    listing = FakeListing([7], empty_pages=3)
    bm = make_map(listing)

    async def main() -> None:
        assert await bm.lookup(7) == "t7"

    run(main)
    assert len(listing.calls) == 4
    assert listing.calls[1][1] is not None  # followed by NextToken, not by index


def test_ranges_refresh_before_tokens_expire() -> None:
    listing = FakeListing([1, 2], ttl_s=10)
    bm = make_map(listing)

    async def main() -> None:
        await bm.lookup(1)
        listing.now[0] = 7.9  # before 80 % of the lifetime: still fresh
        await bm.lookup(2)
        assert len(listing.calls) == 1
        listing.now[0] = 8.1  # past it: re-listed before the service would refuse the token
        await bm.lookup(2)
        assert len(listing.calls) == 2

    run(main)
    assert bm.refreshes == 1


def test_listing_without_expiry_is_accepted_and_invalidate_relists() -> None:
    listing = FakeListing([1], ttl_s=None)
    bm = make_map(listing)

    async def main() -> None:
        assert await bm.lookup(1) == "t1"
        listing.now[0] = 10**9
        assert await bm.lookup(1) == "t1"
        assert len(listing.calls) == 1
        bm.invalidate(1)
        assert await bm.lookup(1) == "t1"
        assert len(listing.calls) == 2

    run(main)


def test_token_memory_is_bounded_by_evicting_least_recently_used_ranges() -> None:
    # A fully written volume, read end to end: the map never holds more than max_tokens.
    num_blocks = 50_000
    listing = FakeListing(list(range(num_blocks)), page_size=1000)
    bm = make_map(listing, num_blocks=num_blocks, max_tokens=3000)
    peak = 0

    async def main() -> None:
        nonlocal peak
        for index in range(0, num_blocks, 7):
            assert await bm.lookup(index) == f"t{index}"
            peak = max(peak, bm.token_count)

    run(main)
    assert peak <= 3000
    assert bm.evictions > 0
    assert len(listing.calls) == num_blocks // 1000


def test_concurrent_lookups_share_one_listing() -> None:
    listing = FakeListing(list(range(100)))
    bm = make_map(listing, num_blocks=100)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(bm.lookup, 40)
        # Blocks after the first listing's start are covered by it.
        for index in range(40, 100):
            assert await bm.lookup(index) == f"t{index}"

    run(main)
    assert len(listing.calls) == 1


def test_lookup_outside_the_volume_is_an_error() -> None:
    bm = make_map(FakeListing([1]), num_blocks=10)
    with pytest.raises(IndexError):
        run(bm.lookup, 10)


def test_seeded_first_page_costs_no_listing() -> None:
    listing = FakeListing([0, 1, 2])
    bm = make_map(listing, num_blocks=16)

    async def main() -> None:
        bm.seed(await listing(None, None))
        assert await bm.lookup(2) == "t2"
        assert await bm.lookup(15) is None

    run(main)
    assert len(listing.calls) == 1  # only the seed's own


def test_pages_that_end_below_the_needed_block_are_followed_not_read_as_holes() -> None:
    # A service that paginates from block 0 whatever StartingBlockIndex says: the first page
    # (blocks 0..9999) says nothing about block 15000, which is written.
    written = [*range(10000), 15000]

    async def ignores_start(start: int | None, token: str | None) -> BlockPage:
        first = int(token) if token else 0
        chosen = [i for i in written if i >= first][:10000]
        more = chosen[-1] < written[-1]
        return BlockPage(
            [(i, f"t{i}") for i in chosen], str(chosen[-1] + 1) if more else None, None, 16, 524288
        )

    bm = BlockMap("snap-0123456789abcdef0", 32768, ignores_start)
    assert run(bm.lookup, 15000) == "t15000"


def test_a_refused_stale_token_does_not_drop_a_fresh_range() -> None:
    listing = FakeListing([1, 2])
    bm = make_map(listing)

    async def main() -> None:
        stale = await bm.lookup(1)
        bm.invalidate(1, stale)  # the first refusal drops the range...
        fresh = await bm.lookup(1)
        assert len(listing.calls) == 2
        bm.invalidate(1, "an-older-token")  # ...a later one for an older token does not
        assert await bm.lookup(1) == fresh
        assert len(listing.calls) == 2

    run(main)
