"""The lineage tier: a block of one snapshot served from another snapshot's cached bytes.

Snapshots of one volume share almost all their blocks. When a block of snapshot B is in no
cache, and another snapshot A known to this process (mounted beside it, or named with `--base`)
holds the same block index in memory or on disk, ListChangedBlocks between A and B says whether
the two differ there. If it does not list the block, inside a range its checked page proves,
B's block is A's verified bytes, and no GetSnapshotBlock is sent.

The changed blocks of a pair are learned like tokens: lazily, by range, from the block index
asked for, expiring with the page's ExpiryTime (`BlockMap[ChangedBlock]`). Anything the
listing cannot vouch for (a listed block, a range not yet proven, a pair whose listing fails)
counts as changed, and the block is fetched as usual. Two snapshots of different lineages
answer UNRELATED_SNAPSHOTS: an answer, remembered, not an error.

Memory is bounded: at most `MAX_PAIRS` pair maps of at most `PAIR_TOKENS` entries each, and at
most `MAX_VERDICTS` remembered unrelated pairs, whatever the number of snapshots.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import OrderedDict

import trio

from ..ebs.errors import EbsError
from ..ebs.pages import ChangedBlock
from .blockmap import BlockMap
from .reader import BlockData, FetchContext, PageLister
from .stats import ReadStats

log = logging.getLogger(__name__)

# Pair maps kept at once (least recently used dropped): a mount of 30 daily snapshots reads
# mostly neighbours, and a dropped map is only re-listed.
MAX_PAIRS = 32
# Changed blocks held per pair map (about 100 bytes each): 20,000 is 10 GiB of changes.
PAIR_TOKENS = 20_000
# Share of a read's budget that finding out whether a block changed may take, so a slow
# ListChangedBlocks still leaves most of the budget to fetch the block itself.
LISTING_SHARE = 0.25
# Pairs known to be unrelated, remembered so that they are not asked again.
MAX_VERDICTS = 10_000


class Lineage:
    """The snapshots of one process that may lend each other blocks."""

    def __init__(self, ctx: FetchContext) -> None:
        self._ctx = ctx
        self._members: dict[str, int] = {}  # snapshot id -> its volume's block count
        self._order: dict[str, int] = {}  # snapshot id -> when it joined
        self._joined = itertools.count()
        self._pairs: OrderedDict[tuple[str, str], BlockMap[ChangedBlock]] = OrderedDict()
        self._unrelated: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.stats = ReadStats()  # the ListChangedBlocks calls' retries
        self._evicted_list_calls = 0
        self._first_listing = trio.Lock()

    def add(self, snapshot_id: str, num_blocks: int) -> None:
        self._order.setdefault(snapshot_id, next(self._joined))
        self._members[snapshot_id] = num_blocks

    def remove(self, snapshot_id: str) -> None:
        """Forget a snapshot that left the process (a catalogue's image closed when idle)."""
        self._members.pop(snapshot_id, None)
        self._order.pop(snapshot_id, None)
        for key in [k for k in self._pairs if snapshot_id in k]:
            self._evicted_list_calls += self._pairs.pop(key).list_calls

    @property
    def list_calls(self) -> int:
        """ListChangedBlocks calls made for the pairs."""
        return self._evicted_list_calls + sum(p.list_calls for p in self._pairs.values())

    @property
    def members(self) -> list[str]:
        return list(self._members)

    async def borrow(self, snapshot_id: str, index: int) -> BlockData | None:
        """Verified bytes of `snapshot_id`'s block `index` from a related snapshot's cache."""
        for other in self._members:
            if other == snapshot_id or not self._ctx.held(other, index):
                continue
            key = self._key(other, snapshot_id)
            pair = self._pair(key)
            if pair is None:
                continue
            # A slow listing must not eat the read's budget: past this, fetch the block.
            unchanged = False
            with trio.move_on_after(self._ctx.policy.budget_s * LISTING_SHARE):
                unchanged = await self._unchanged(key, pair, index)
            if not unchanged:
                continue
            data = self._ctx.cache.peek((other, index)) or await self._ctx.from_disk(other, index)
            if data is not None:
                return data
        return None

    def _key(self, a: str, b: str) -> tuple[str, str]:
        """A pair as (first, second), in the order the two joined."""
        first, second = sorted((a, b), key=self._order.__getitem__)
        return first, second

    def _pair(self, key: tuple[str, str]) -> BlockMap[ChangedBlock] | None:
        """The changed blocks between the pair, or None when it is known to be unrelated."""
        first, second = key
        if key in self._unrelated:
            return None
        pair = self._pairs.get(key)
        if pair is None:
            request = functools.partial(self._ctx.client.list_changed_blocks, second, first)
            pair = BlockMap(
                f"{first}..{second}",
                max(self._members[first], self._members[second]),
                PageLister(self._ctx, self.stats, request),
                max_tokens=PAIR_TOKENS,
            )
            self._pairs[key] = pair
            while len(self._pairs) > MAX_PAIRS:
                _, dropped = self._pairs.popitem(last=False)
                self._evicted_list_calls += dropped.list_calls
        self._pairs.move_to_end(key)
        return pair

    async def _unchanged(
        self, key: tuple[str, str], pair: BlockMap[ChangedBlock], index: int
    ) -> bool:
        """Whether the pair's checked listing proves block `index` the same in both."""
        if pair.range_count:
            return await self._lookup(key, pair, index)
        # Until one listing of the pair has succeeded it may be unrelated: readers of several
        # blocks ask one at a time, so an unrelated pair is asked once, not once per reader.
        async with self._first_listing:
            if key in self._unrelated:
                return False
            return await self._lookup(key, pair, index)

    async def _lookup(self, key: tuple[str, str], pair: BlockMap[ChangedBlock], index: int) -> bool:
        try:
            return await pair.lookup(index) is None
        except EbsError as error:
            if error.reason == "UNRELATED_SNAPSHOTS" or not error.retryable:
                log.info("%s and %s share no blocks: %s", *key, error)
                self._forget(key)
            else:
                log.debug("%s: changed blocks unknown for %d: %s", pair.snapshot_id, index, error)
            return False
        except IndexError:
            return False

    def _forget(self, key: tuple[str, str]) -> None:
        self._pairs.pop(key, None)
        self._unrelated[key] = None
        while len(self._unrelated) > MAX_VERDICTS:
            self._unrelated.popitem(last=False)
