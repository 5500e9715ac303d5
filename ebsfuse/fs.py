"""The FUSE glue: one read-only directory of `<snapshot-id>.img` files over `SnapshotImage`.

Thin on purpose: inode numbers, attributes and error codes live here; every byte comes from
`SnapshotImage.read`, which is tested without FUSE.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import time

import pyfuse3

from . import BLOCK_SIZE
from .errors import EbsError
from .image import SnapshotImage
from .readahead import ReadaheadWindow

log = logging.getLogger(__name__)

# Snapshot content and the directory never change while mounted, so the kernel may keep
# names and attributes for as long as it likes; an hour keeps st_blocks reasonably fresh.
ATTR_TIMEOUT_S = 3600.0
ENTRY_TIMEOUT_S = 3600.0
STATS_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FILE_INODE = pyfuse3.ROOT_INODE + 2
# Hidden (not listed, but open-able) file with the mount's counters as JSON, read by
# `ebsfuse stats MOUNTPOINT`: no socket or extra process needed to ask the daemon.
STATS_NAME = b".ebsfuse-stats"


class SnapshotFS(pyfuse3.Operations):
    """Read-only root directory holding one image file per snapshot."""

    enable_writeback_cache = False

    def __init__(self, images: list[SnapshotImage], *, uid: int, gid: int) -> None:
        super().__init__()
        self.images: dict[int, SnapshotImage] = {
            FIRST_FILE_INODE + i: image for i, image in enumerate(images)
        }
        self.by_name = {
            f"{image.snapshot_id}.img".encode(): ino for ino, image in self.images.items()
        }
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
            image = self.images.get(inode)
            if image is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = image.size
            attr.st_blocks = image.allocated_bytes() // 512
            if image.start_time is not None:
                mtime_ns = int(image.start_time.timestamp() * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

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
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    # -- directory --------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # next_id is the position after an entry; inodes are dense from FIRST_FILE_INODE.
        for inode in sorted(self.images):
            if inode < start_id:
                continue
            name = f"{self.images[inode].snapshot_id}.img".encode()
            if not pyfuse3.readdir_reply(token, name, self._attrs(inode), inode + 1):
                return

    # -- files ------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode != STATS_INODE and inode not in self.images:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._handles)
        if inode == STATS_INODE:
            self.stats_files[fh] = (json.dumps(self.stats(), indent=2) + "\n").encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        self.open_files[fh] = (inode, self.images[inode].new_window())
        # keep_cache: the content never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def stats(self) -> dict[str, object]:
        windows: dict[int, list[int]] = {}
        for inode, window in self.open_files.values():
            windows.setdefault(inode, []).append(window.window)
        snapshots = {}
        for inode, image in self.images.items():
            snapshot_stats = image.stats()
            snapshot_stats["readahead_windows"] = windows.get(inode, [])
            snapshots[image.snapshot_id] = snapshot_stats
        any_image = next(iter(self.images.values()))
        ctx = any_image.reader.ctx
        return {
            "cache": {"bytes": ctx.cache.current_bytes, "limit": ctx.cache_bytes},
            "requests_in_flight": len(ctx.inflight),
            "max_concurrency": ctx.max_concurrency,
            "snapshots": snapshots,
        }

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh in self.stats_files:
            return self.stats_files[fh][off : off + size]
        inode, window = self.open_files[fh]
        image = self.images[inode]
        try:
            return await image.read(off, size, window)
        except EbsError as error:
            log.error("read of %d bytes at %d failed: %s", size, off, error)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s: read of %d bytes at %d failed", image.snapshot_id, size, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh: int) -> None:
        self.open_files.pop(fh, None)
        self.stats_files.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        total = sum(image.size for image in self.images.values())
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = total // BLOCK_SIZE
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(self.images) + 1
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data
