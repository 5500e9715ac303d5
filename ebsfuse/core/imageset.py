"""The open images of a mount: made on first use, kept while in use, closed when idle.

A mount of named snapshots opens them all before it serves (an unknown id refuses the mount)
and keeps them for good. A catalogue mount lists thousands and opens none: an image is made
when a file is first opened (one ListSnapshotBlocks call, which also proves the snapshot
readable), joins the lineage tier so that snapshots of one volume lend each other blocks, and
is kept while a file of it is open. At most `MAX_IDLE_IMAGES` idle ones stay (least recently
used closed first), so their block maps and lineage pairs stay bounded however many snapshots
are read over a mount's life; the block cache is shared and bounded on its own.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from datetime import datetime

import trio

from ..ebs.errors import EbsError
from .image import SnapshotImage
from .lineage import Lineage
from .pipeline import SnapshotInfo, describe
from .reader import FetchContext

log = logging.getLogger(__name__)

# Images kept open with no file of them open: a `for` loop over 30 days of a volume reads each
# once, and keeping the last few lets a second pass start warm. Each holds a block map of at
# most its token bound.
MAX_IDLE_IMAGES = 32


class _Opening:
    """One describe in flight for a snapshot, which later openers wait for (single flight)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.image: SnapshotImage | None = None
        self.error: EbsError | None = None


class ImageSet:
    """Images by snapshot id; `pin`ned ones (open files, a fixed mount's) are never closed."""

    def __init__(
        self, ctx: FetchContext, lineage: Lineage | None = None, *, max_idle: int = MAX_IDLE_IMAGES
    ) -> None:
        self.ctx = ctx
        self.lineage = lineage
        self.max_idle = max_idle
        self._images: OrderedDict[str, SnapshotImage] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._opening: dict[str, _Opening] = {}
        self.opened = 0
        self.closed = 0

    def add(
        self, info: SnapshotInfo, start_time: datetime | None, *, pinned: bool = False
    ) -> SnapshotImage:
        """The image of a described snapshot, kept (for the mount's life when `pinned`: a fixed
        mount's), and lent to and from the others through the lineage tier."""
        image = SnapshotImage(info, self.ctx, start_time=start_time)
        self._images[info.snapshot_id] = image
        self.opened += 1
        if pinned:
            self._pins[info.snapshot_id] += 1
        if self.lineage is not None:
            self.lineage.add(info.snapshot_id, info.num_blocks)
        return image

    def get(self, snapshot_id: str) -> SnapshotImage | None:
        return self._images.get(snapshot_id)

    def live(self) -> list[SnapshotImage]:
        return list(self._images.values())

    async def open(self, snapshot_id: str, start_time: datetime | None) -> SnapshotImage:
        """The image of `snapshot_id`, made now if need be; EbsError if it cannot be read."""
        image = self._images.get(snapshot_id)
        if image is not None:
            self._images.move_to_end(snapshot_id)
            return image
        opening = self._opening.get(snapshot_id)
        if opening is None:
            opening = self._opening[snapshot_id] = _Opening()
            try:
                await self._make(snapshot_id, start_time, opening)
            finally:
                del self._opening[snapshot_id]
                opening.done.set()
        else:
            await opening.done.wait()
        if opening.error is not None:
            raise opening.error.fresh()
        assert opening.image is not None
        return opening.image

    async def _make(self, snapshot_id: str, start_time: datetime | None, into: _Opening) -> None:
        try:
            info = await describe(self.ctx, snapshot_id)
        except EbsError as error:
            log.warning("%s: cannot open the image: %s", snapshot_id, error)
            into.error = error
            return
        log.info("%s: opened, %d GiB", snapshot_id, info.volume_size_gib)
        into.image = self.add(info, start_time)
        self._close_idle()

    def pin(self, snapshot_id: str) -> None:
        self._pins[snapshot_id] += 1

    def pinned(self, snapshot_id: str) -> bool:
        return snapshot_id in self._pins

    def unpin(self, snapshot_id: str) -> None:
        self._pins[snapshot_id] -= 1
        if self._pins[snapshot_id] <= 0:
            del self._pins[snapshot_id]
            self._close_idle()

    def _close_idle(self) -> None:
        idle = [sid for sid in self._images if sid not in self._pins]
        for snapshot_id in idle[: max(0, len(idle) - self.max_idle)]:
            del self._images[snapshot_id]
            self.closed += 1
            if self.lineage is not None:
                self.lineage.remove(snapshot_id)
            log.debug("%s: closed (idle)", snapshot_id)
