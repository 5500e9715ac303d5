"""A snapshot as a flat disk image: byte ranges -> blocks, holes as zeros, reads clamped at EOF.

`SnapshotImage.read` is what the filesystem's read handler calls, and what tests call without
FUSE. It knows nothing of pyfuse3.
"""

from __future__ import annotations

import logging
from datetime import datetime

import trio

from .. import BLOCK_SIZE
from ..ebs.errors import EbsError
from .fetchpool import adjoining
from .pipeline import SnapshotInfo, open_snapshot
from .readahead import MAX_WINDOW_BLOCKS, ReadaheadWindow
from .reader import BlockData, FetchContext

log = logging.getLogger(__name__)

_ZEROS = bytes(BLOCK_SIZE)


class SnapshotImage:
    """Random-access reads of one snapshot's disk image."""

    def __init__(
        self,
        info: SnapshotInfo,
        ctx: FetchContext,
        *,
        start_time: datetime | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.info = info
        self.snapshot_id = info.snapshot_id
        self.size = info.size_bytes
        self.start_time = start_time
        self.reader = open_snapshot(ctx, info, max_tokens=max_tokens)
        self.blockmap = self.reader.blockmap
        self._ctx = ctx

    def new_window(self) -> ReadaheadWindow:
        """A readahead window for one open file.

        Capped at a quarter of the cache per reader, so blocks prefetched for one reader are
        not evicted by its own later prefetches (or a few other readers') before it gets there.
        """
        cache_blocks = self._ctx.cache_bytes // BLOCK_SIZE
        cap = max(1, min(MAX_WINDOW_BLOCKS, cache_blocks // 4, self._ctx.max_concurrency))
        return ReadaheadWindow(self.info.num_blocks, max_blocks=cap)

    def stats(self) -> dict[str, object]:
        out = self.reader.stats.as_dict()
        # The describe call that opened the image was a listing of this snapshot too.
        out["requests"]["ListSnapshotBlocks"] = self.blockmap.list_calls + 1
        out["token_refreshes"] = self.blockmap.refreshes
        out["token_ranges"] = self.blockmap.range_count
        out["tokens_held"] = self.blockmap.token_count
        return out

    def allocated_bytes(self) -> int:
        """Bytes possibly written: the volume less the blocks known to be holes."""
        return max(0, self.size - self.blockmap.known_hole_blocks() * BLOCK_SIZE)

    async def read(self, offset: int, size: int, window: ReadaheadWindow | None = None) -> bytes:
        """`size` bytes from `offset`, fewer at EOF; blocks of the range fetched concurrently.

        With a `window` (one per open file) sequential reading prefetches the blocks ahead.
        """
        data = await self.read_buffer(offset, size, window)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_buffer(
        self, offset: int, size: int, window: ReadaheadWindow | None = None
    ) -> BlockData:
        """`read`, as bytes or as a read-only view of blocks where a fetch worker left them
        (held for as long as the view is): a FUSE reply needs no copy of its own then."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if window is not None:
            for index in window.observe(offset, end - offset):
                self.reader.prefetch(index)
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        base = first * BLOCK_SIZE
        if first == last:
            block = await self.reader.read_block(first)
            # Bytes sliced whole are the same bytes; a view sliced is a view: no copy either way.
            return (_ZEROS if block is None else block)[offset - base : end - base]
        blocks = await self._blocks(first, last)
        span = adjoining(blocks)
        if span is not None:
            return span[offset - base : end - base]
        # One copy into the reply, from views of the blocks.
        parts = []
        for index, block in enumerate(blocks, first):
            lo = max(offset, index * BLOCK_SIZE) - index * BLOCK_SIZE
            hi = min(end, (index + 1) * BLOCK_SIZE) - index * BLOCK_SIZE
            parts.append(memoryview(_ZEROS if block is None else block)[lo:hi])
        return b"".join(parts)

    async def _blocks(self, first: int, last: int) -> list[BlockData | None]:
        """Blocks `first` to `last`, None for holes. The kernel asks for up to 1 MiB at a time,
        i.e. two or three blocks: what the cache holds is taken without a task each, and only
        the rest fetched, concurrently."""
        blocks: dict[int, BlockData | None] = {}
        missing = []
        for index in range(first, last + 1):
            cached = self.reader.cached_block(index)
            if cached is None:
                missing.append(index)
            else:
                blocks[index] = cached

        async def fetch(index: int) -> None:
            blocks[index] = await self.reader.read_block(index)

        if len(missing) == 1:
            await fetch(missing[0])
        elif missing:
            try:
                async with trio.open_nursery() as nursery:
                    for index in missing:
                        nursery.start_soon(fetch, index)
            except BaseExceptionGroup as group:
                # Report one block's failure, not a group: callers handle EbsError.
                matched, _ = group.split(EbsError)
                if matched is None:
                    raise
                failure: BaseException = matched
                while isinstance(failure, BaseExceptionGroup):
                    failure = failure.exceptions[0]
                raise failure from None
        return [blocks[index] for index in range(first, last + 1)]
