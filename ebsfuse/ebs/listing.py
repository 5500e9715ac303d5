"""Streaming ListSnapshotBlocks / ListChangedBlocks, for tools that walk a whole snapshot.

`BlockLister` yields one `ListedBlock` at a time, page after page, in ascending block index
order, so a caller never holds more than one page (at most 10,000 entries) whatever the volume
size. It follows NextToken through empty pages, retries each page with the client's
`RetryPolicy`, and keeps its tokens fresh:

- a page token (NextToken) lives about 60 minutes; a caller that stalls longer (a download held
  back by a slow disk) gets INVALID_PAGE_TOKEN, and the lister re-lists from the next index it
  has not yet yielded (StartingBlockIndex);
- block tokens expire (ExpiryTime, 7 days on AWS, seconds in tests): once 80% of a page's
  lifetime has passed, the rest of the page is re-listed from the current index rather than
  handed out stale, and `token_for` fetches a fresh token for one block whose token was refused.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from .client import EbsClient, RetryPolicy, call_with_retries, validate_snapshot_id
from .errors import EbsError

log = logging.getLogger(__name__)

# The largest page both list calls accept: fewest requests (the list quota is 50/s per
# account) for at most ~10,000 small entries in memory.
PAGE_SIZE = 10000
# Re-list when this share of a token's lifetime has passed (the mount's block map does the same),
# leaving 20% of the lifetime -- 33 hours on AWS -- for the blocks of the page to be fetched.
REFRESH_FRACTION = 0.8
# A lifetime shorter than this (clock skew, a test emulator) is not refreshed ahead of time:
# re-listing could not outrun it; a refused token is re-listed on demand instead.
MIN_REFRESH_LIFETIME_S = 2.0
# Smallest MaxResults the API accepts; enough to find one block's fresh token.
SMALL_PAGE = 100


@dataclass(frozen=True)
class ListedBlock:
    """One listed block: its index and the token(s) to read it.

    For ListSnapshotBlocks, `token` is the block's token. For ListChangedBlocks, `token` is the
    second snapshot's token (None when only the first snapshot has the block) and
    `first_token` the first snapshot's (None when only the second has it).
    """

    index: int
    token: str | None
    first_token: str | None
    refresh_at: float  # wall-clock time after which `token` should be re-listed first


@dataclass(frozen=True)
class VolumeInfo:
    volume_size_gib: int
    block_size: int
    expiry: datetime | None

    @property
    def volume_bytes(self) -> int:
        return self.volume_size_gib * 1024**3

    @property
    def nblocks(self) -> int:
        return self.volume_bytes // self.block_size


class BlockLister:
    """Iterate the blocks of a snapshot, or the blocks changed between two snapshots."""

    def __init__(
        self,
        client: EbsClient,
        snapshot_id: str,
        *,
        first_snapshot_id: str | None = None,
        changed: bool = False,
        policy: RetryPolicy | None = None,
        page_size: int = PAGE_SIZE,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.snapshot_id = validate_snapshot_id(snapshot_id)
        self.first_snapshot_id = (
            validate_snapshot_id(first_snapshot_id) if first_snapshot_id else None
        )
        self.changed = changed or first_snapshot_id is not None
        self.policy = policy or RetryPolicy()
        self.page_size = page_size
        self.sleep = sleep
        self.clock = clock
        self.info: VolumeInfo | None = None
        self.pages = 0

    # -- one page ----------------------------------------------------------------------------

    def _call(
        self, start_index: int, next_token: str | None, max_results: int
    ) -> tuple[list[ListedBlock], str | None, datetime | None]:
        listed_at = self.clock()
        # Every page after the first must describe the same volume (pages.block_page checks).
        known_gib = self.info.volume_size_gib if self.info is not None else None

        def once() -> tuple[list[ListedBlock], str | None, datetime | None, int, int]:
            if self.changed:
                page, changed = self.client.list_changed_blocks(
                    self.snapshot_id,
                    self.first_snapshot_id,
                    start_index=start_index or None,
                    next_token=next_token,
                    max_results=max_results,
                    volume_size_gib=known_gib,
                )
                raw = [(c.index, c.second_token, c.first_token) for c in changed]
            else:
                page = self.client.list_blocks(
                    self.snapshot_id,
                    start_index=start_index or None,
                    next_token=next_token,
                    max_results=max_results,
                    volume_size_gib=known_gib,
                )
                raw = [(i, t, None) for i, t in page.blocks]
            refresh_at = _refresh_time(listed_at, page.expiry)
            blocks = [ListedBlock(i, t, f, refresh_at) for i, t, f in raw]
            return blocks, page.next_token, page.expiry, page.volume_size_gib, page.block_size

        blocks, token, expiry, gib, block_size = call_with_retries(
            once, self.policy, sleep=self.sleep
        )
        self.pages += 1
        if self.info is None:
            self.info = VolumeInfo(gib, block_size, expiry)
        return blocks, token, expiry

    def describe(self) -> VolumeInfo:
        """Volume size and block size (one small listing when nothing was listed yet)."""
        if self.info is None:
            self._call(0, None, SMALL_PAGE)
        assert self.info is not None
        return self.info

    # -- streaming ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ListedBlock]:
        return self.iterate(0)

    def iterate(self, start_index: int = 0) -> Iterator[ListedBlock]:
        """Every listed block with index >= start_index, ascending, tokens fresh."""
        position = start_index  # every index below it has been yielded (or is not listed)
        next_token: str | None = None
        while True:
            try:
                blocks, token, _ = self._call(position, next_token, self.page_size)
            except EbsError as error:
                if next_token is None or error.reason != "INVALID_PAGE_TOKEN":
                    raise
                # The page token expired while the caller was busy: list again from here.
                log.info("%s: page token refused, re-listing from block %d", self, position)
                next_token = None
                continue
            relist = False
            yielded = 0
            for block in blocks:
                if block.index < position:
                    continue  # defensive: never go backwards
                if yielded and self.clock() >= block.refresh_at:
                    # Tokens of this page are getting old: fetch fresh ones from here.
                    log.debug("%s: tokens near expiry, re-listing from %d", self, block.index)
                    relist = True
                    break
                yield block
                yielded += 1
                position = block.index + 1
            if relist:
                next_token = None
                continue
            if token is None:
                return
            next_token = token

    def token_for(self, index: int) -> ListedBlock | None:
        """A freshly listed entry for block `index` (after its token was refused), or None."""
        blocks, _, _ = self._call(index, None, SMALL_PAGE)
        for block in blocks:
            if block.index == index:
                return block
        return None

    def fetch(
        self,
        client: EbsClient,
        entry: ListedBlock,
        policy: RetryPolicy,
        sleep: Callable[[float], None] = time.sleep,
    ) -> bytes:
        """GetSnapshotBlock for a listed block, verified, with the policy's retries.

        A token past its refresh time is re-listed first; one the service refuses is
        re-listed and tried once more.
        """
        token = entry.token
        if token is None or time.time() >= entry.refresh_at:
            token = self._fresh_token(entry.index)
        refreshed = False
        while True:
            try:
                return call_with_retries(
                    functools.partial(client.get_block, self.snapshot_id, entry.index, token),
                    policy,
                    sleep=sleep,
                )
            except EbsError as error:
                if not error.token_refused or refreshed:
                    raise
                log.info("%s: token of block %d refused, re-listing", self, entry.index)
                token = self._fresh_token(entry.index)
                refreshed = True

    def _fresh_token(self, index: int) -> str:
        fresh = self.token_for(index)
        if fresh is None or fresh.token is None:
            raise EbsError(
                "block is no longer listed", snapshot_id=self.snapshot_id, block_index=index
            )
        return fresh.token

    def __str__(self) -> str:
        if self.first_snapshot_id:
            return f"{self.first_snapshot_id}..{self.snapshot_id}"
        return self.snapshot_id


def _refresh_time(listed_at: float, expiry: datetime | None) -> float:
    if expiry is None:
        return float("inf")
    lifetime = expiry.timestamp() - listed_at
    if lifetime < MIN_REFRESH_LIFETIME_S:
        return float("inf")
    return listed_at + REFRESH_FRACTION * lifetime
