"""Sequential-read detection and the prefetch window of one open file.

The kernel hands a FUSE filesystem reads of 128 KiB to 1 MiB (1 MiB here, by strace), a few at
a time and slightly out of order (its own async readahead). Fetching only what each read asks
for would cost a round trip every block or two: 10-20 MiB/s at 50 ms. So each open file keeps
a window of blocks to fetch ahead of the reader: it opens at `MIN_WINDOW_BLOCKS` on the second
read that continues the first, doubles each time the reader moves into a new block (the reader
keeps up), stops at `max_blocks`, and collapses to nothing on a jump elsewhere, so a random
4 KiB read costs one request and no more.

This module is pure logic: `observe` says which block indexes to prefetch; the image starts
those fetches. It knows nothing of trio or FUSE.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import BLOCK_SIZE

# Two blocks (1 MiB) on the first sign of sequential reading: enough to hide one round trip
# without betting much on a guess.
MIN_WINDOW_BLOCKS = 2
# 64 blocks = 32 MiB ahead: at the service's ~50-100 ms per block that keeps 64 requests in
# flight, the mount's default concurrency, i.e. about the 1000 blocks/s per-snapshot quota.
MAX_WINDOW_BLOCKS = 64
# Reads count as sequential when they start within this distance of where the previous one
# ended, before or after: with 2 MiB of kernel readahead (kernel.py) a few reads of up to 1 MiB
# are in flight at once, and they may arrive in any order.
REORDER_TOLERANCE_BYTES = 4 * 1024 * 1024


@dataclass
class ReadaheadWindow:
    """Per open file: where the reader is, how far ahead to fetch, what was already asked."""

    num_blocks: int
    max_blocks: int = MAX_WINDOW_BLOCKS
    next_offset: int | None = None
    streak: int = 0
    window: int = 0
    last_block: int = -1
    issued_until: int = -1  # highest block index already handed out for prefetch
    growths: int = 0
    collapses: int = 0

    def observe(self, offset: int, size: int) -> range:
        """Record a read; return the block indexes to prefetch now (possibly none)."""
        end = offset + size
        expected = self.next_offset
        if expected is not None and abs(offset - expected) <= REORDER_TOLERANCE_BYTES:
            self.streak += 1
            self.next_offset = max(expected, end)
        else:
            if self.window:
                self.collapses += 1
            self.streak = 0
            self.window = 0
            self.issued_until = -1
            self.last_block = -1
            self.next_offset = end
            return range(0)
        current = (max(end, 1) - 1) // BLOCK_SIZE
        if self.window == 0:
            self.window = min(MIN_WINDOW_BLOCKS, self.max_blocks)
            self.growths += 1
        elif current > self.last_block and self.window < self.max_blocks:
            self.window = min(self.max_blocks, self.window * 2)
            self.growths += 1
        self.last_block = max(self.last_block, current)
        start = max(self.last_block + 1, self.issued_until + 1)
        stop = min(self.num_blocks, self.last_block + 1 + self.window)
        if stop <= start:
            return range(0)
        self.issued_until = stop - 1
        return range(start, stop)
