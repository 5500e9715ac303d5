"""The FUSE glue: one read-only directory of `<snapshot-id>.img` files over `SnapshotImage`.

Thin on purpose: inode numbers, attributes and error codes live here; every byte comes from
`SnapshotImage.read`, which is tested without FUSE.

When a snapshot's disk holds an MBR or GPT partition table, the directory also shows one file
per partition, `<snapshot-id>-part<N>.img`, a window onto exactly that byte range of the image
(so `mount -o loop` and the Sleuth Kit work on it without offsets). Detection is lazy: the
first readdir of the root, or the first lookup of a name not yet known, reads each image's
first block (one GetSnapshotBlock, which then sits in the cache) and parses it with
`partitions.detect_partitions`; mounting itself stays one small list call, and opening a known
`<snapshot-id>.img` never waits for it. A failed read is logged and retried on a later lookup
(after `DETECT_RETRY_S`); meanwhile just the whole images are shown.

Inode numbers are fixed by position, never by detection order: image k (0-based, in command
line order) is `FIRST_FILE_INODE + k`, its partition N is
`PARTITION_INODE_BASE + k * PARTITIONS_PER_IMAGE + N`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .. import BLOCK_SIZE
from ..core.image import SnapshotImage
from ..core.lineage import Lineage
from ..core.partitions import Partition, PartitionTable, detect_partitions
from ..core.readahead import ReadaheadWindow
from ..core.stats import STATS_NAME
from ..ebs.errors import EbsError

log = logging.getLogger(__name__)

# Snapshot content and the directory never change while mounted, so the kernel may keep
# names and attributes for as long as it likes; an hour keeps st_blocks reasonably fresh.
ATTR_TIMEOUT_S = 3600.0
ENTRY_TIMEOUT_S = 3600.0
STATS_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FILE_INODE = pyfuse3.ROOT_INODE + 2
# Partition inodes live far above the image inodes (one per snapshot given, so a few), in one
# range per image: 2**16 numbers cover GPT's largest real entry counts (128, rarely 256).
PARTITION_INODE_BASE = 1 << 32
PARTITIONS_PER_IMAGE = 1 << 16
# After a failed partition detection (the first block could not be read), the next lookup of
# an unknown name or readdir tries again only this much later, so `ls` in a loop does not
# hammer a failing service: each attempt can take the retry budget (tens of seconds).
DETECT_RETRY_S = 30.0


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def guarded(handler: Handler) -> Handler:
    """No exception of any kind leaves a FUSE handler: pyfuse3 would end the mount on it.

    A failed block (`EbsError`) was logged once where it failed, in the reader; here it only
    becomes EIO. Anything else is a bug or a surprise: one log line, the traceback at debug
    level, EIO for the caller, and the daemon goes on serving.
    """

    @functools.wraps(handler)
    async def handle(self: SnapshotFS, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except EbsError as error:
            log.debug("%s: %s", handler.__name__, error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:
            log.error("%s failed: %s: %s", handler.__name__, type(exc).__name__, exc)
            log.debug("%s failed", handler.__name__, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handle  # type: ignore[return-value]


@dataclass(frozen=True)
class FileNode:
    """A file of the root directory: a whole image, or one partition's byte range of it."""

    inode: int
    name: bytes
    image: SnapshotImage
    start: int  # image offset of the file's first byte
    size: int
    partition: Partition | None = None

    def attr_blocks(self) -> int:
        """st_blocks: the image's allocation, spread evenly over a partition (an estimate)."""
        allocated = self.image.allocated_bytes()
        if self.partition is not None and self.image.size:
            allocated = allocated * self.size // self.image.size
        return allocated // 512


class SnapshotFS(pyfuse3.Operations):
    """Read-only root directory holding one image file per snapshot."""

    enable_writeback_cache = False

    def __init__(self, images: list[SnapshotImage], *, uid: int, gid: int) -> None:
        super().__init__()
        self.images: dict[int, SnapshotImage] = {
            FIRST_FILE_INODE + i: image for i, image in enumerate(images)
        }
        self.nodes: dict[int, FileNode] = {}
        for inode, image in self.images.items():
            name = f"{image.snapshot_id}.img".encode()
            self.nodes[inode] = FileNode(inode, name, image, 0, image.size)
        self.by_name = {node.name: inode for inode, node in self.nodes.items()}
        # Partition tables by image position; an image is absent until detected.
        self.tables: dict[int, PartitionTable] = {}
        self._detect_lock: trio.Lock | None = None
        self._detect_again_at = 0.0
        self.uid = uid
        self.gid = gid
        self.mount_time_ns = time.time_ns()
        self._handles = itertools.count(1)
        # Open files: fh -> (inode, its readahead window), or the stats snapshot for STATS_INODE.
        self.open_files: dict[int, tuple[int, ReadaheadWindow]] = {}
        self.stats_files: dict[int, bytes] = {}

    # -- attributes -------------------------------------------------------------------------

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT_S
        attr.attr_timeout = ATTR_TIMEOUT_S
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        mtime_ns = self.mount_time_ns
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_blocks = 0
        elif inode == STATS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = 0  # generated at open; read with direct I/O
            attr.st_blocks = 0
            attr.attr_timeout = 0
        else:
            node = self.nodes.get(inode)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = node.size
            attr.st_blocks = node.attr_blocks()
            if node.image.start_time is not None:
                mtime_ns = int(node.image.start_time.timestamp() * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attrs(pyfuse3.ROOT_INODE)
        if name == STATS_NAME:
            return self._attrs(STATS_INODE)
        inode = self.by_name.get(name)
        if inode is None:
            # Perhaps a partition file not yet discovered; known names never wait for this.
            await self.detect_partitions()
            inode = self.by_name.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    # -- partitions -------------------------------------------------------------------------

    async def detect_partitions(self) -> None:
        """Read each image's partition table once (concurrently); failures retried later."""
        if len(self.tables) == len(self.images) or trio.current_time() < self._detect_again_at:
            return
        if self._detect_lock is None:
            self._detect_lock = trio.Lock()
        async with self._detect_lock:
            if len(self.tables) == len(self.images):
                return
            failed = False

            async def detect(position: int, image: SnapshotImage) -> None:
                nonlocal failed
                try:
                    table = await detect_partitions(image.read, image.size)
                except EbsError as error:
                    log.warning(
                        "%s: cannot read the partition table (%s); showing the whole image only",
                        image.snapshot_id,
                        error,
                    )
                    failed = True
                    return
                except Exception:
                    log.exception("%s: partition table detection failed", image.snapshot_id)
                    table = PartitionTable(None, reason="detection failed (see the log)")
                self._add_partitions(position, image, table)

            async with trio.open_nursery() as nursery:
                for position, (_, image) in enumerate(sorted(self.images.items())):
                    if position not in self.tables:
                        nursery.start_soon(detect, position, image)
            if failed:
                self._detect_again_at = trio.current_time() + DETECT_RETRY_S

    def _add_partitions(self, position: int, image: SnapshotImage, table: PartitionTable) -> None:
        self.tables[position] = table
        if not table.partitions:
            log.info("%s: no partition files: %s", image.snapshot_id, table.reason)
            return
        log.info("%s: %s", image.snapshot_id, table.describe())
        for part in table.partitions:
            if not 0 < part.number < PARTITIONS_PER_IMAGE:
                continue
            inode = PARTITION_INODE_BASE + position * PARTITIONS_PER_IMAGE + part.number
            name = f"{image.snapshot_id}-part{part.number}.img".encode()
            self.nodes[inode] = FileNode(inode, name, image, part.start, part.size, part)
            self.by_name[name] = inode

    def listing(self) -> list[FileNode]:
        """The root's entries in a stable order: each image, then its partitions by number."""
        return sorted(
            self.nodes.values(),
            key=lambda n: (n.image.snapshot_id, n.partition.number if n.partition else 0),
        )

    # -- directory --------------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            await self.detect_partitions()
        # next_id is the position after an entry in `listing()`, stable once detected.
        entries = self.listing()
        for position in range(start_id, len(entries)):
            node = entries[position]
            if not pyfuse3.readdir_reply(token, node.name, self._attrs(node.inode), position + 1):
                return

    # -- files ------------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode != STATS_INODE and inode not in self.nodes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._handles)
        if inode == STATS_INODE:
            self.stats_files[fh] = (json.dumps(self.stats(), indent=2) + "\n").encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        # Offsets a window sees are image offsets, so a partition file's window works as is.
        self.open_files[fh] = (inode, self.nodes[inode].image.new_window())
        # keep_cache: the content never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def stats(self) -> dict[str, object]:
        windows: dict[str, list[int]] = {}
        for inode, window in self.open_files.values():
            sid = self.nodes[inode].image.snapshot_id
            windows.setdefault(sid, []).append(window.window)
        snapshots = {}
        for image in self.images.values():
            snapshot_stats = image.stats()
            snapshot_stats["readahead_windows"] = windows.get(image.snapshot_id, [])
            snapshots[image.snapshot_id] = snapshot_stats
        any_image = next(iter(self.images.values()))
        ctx = any_image.reader.ctx
        out: dict[str, object] = {
            "cache": {"bytes": ctx.cache.current_bytes, "limit": ctx.cache_bytes},
        }
        if ctx.disk is not None:
            out["disk_cache"] = {
                "directory": ctx.disk.directory,
                "limit": ctx.disk.max_bytes,
                "storing": ctx.disk.writable,
                **ctx.disk.stats.as_dict(),
            }
        if isinstance(ctx.lineage, Lineage):
            out["lineage"] = {
                "snapshots": ctx.lineage.members,
                "requests": {"ListChangedBlocks": ctx.lineage.list_calls},
            }
        return out | {
            "requests_in_flight": len(ctx.inflight),
            "max_concurrency": ctx.max_concurrency,
            "rate": ctx.client.rate_limiter.snapshot(),
            "snapshots": snapshots,
        }

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self.stats_files:
            return self.stats_files[fh][off : off + size]
        inode, window = self.open_files[fh]
        node = self.nodes[inode]
        image = node.image
        if off >= node.size:
            return b""
        return await image.read(node.start + off, min(size, node.size - off), window)

    @guarded
    async def release(self, fh: int) -> None:
        self.open_files.pop(fh, None)
        self.stats_files.pop(fh, None)

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        total = sum(image.size for image in self.images.values())
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = total // BLOCK_SIZE
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(self.nodes) + 1
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data
