"""The FUSE glue: a read-only tree of `<snapshot-id>.img` files over `SnapshotImage`.

Thin on purpose: inode numbers, attributes, names and error codes live here; every byte comes
from `SnapshotImage.read`, which is tested without FUSE, and which snapshots exist comes from a
`Catalog` (core/catalog.py): the ids named at mount, or a DescribeSnapshots query (a volume's
snapshots, or any filter) refreshed at most every `--catalog-ttl` seconds when a directory is
listed or an unknown name looked up. Images open on first use (`ImageSet`), so listing costs no
EBS call: st_size comes from VolumeSize and st_mtime from StartTime.

    <snapshot-id>.img, <snapshot-id>-part<N>.img      every snapshot, and its partitions
    by-volume/<volume-id>/<start time>.img -> ../../<snapshot-id>.img   (catalogue mounts)
    by-volume/<volume-id>/latest           -> the newest of the volume

When a snapshot's disk holds an MBR or GPT partition table, the root also shows one file per
partition, a window onto exactly that byte range of the image (so `mount -o loop` and the
Sleuth Kit work on it without offsets). Detection is lazy: listing the root reads the first
block of each open image (every image, on a mount of named snapshots), and looking up a
partition name not yet known reads that snapshot's. A failed read is logged and retried on a
later lookup (after `DETECT_RETRY_S`); meanwhile just the whole images are shown.

Inode numbers never depend on detection or listing order: a snapshot gets a position when
first named (on a mount of named snapshots, its place on the command line), its image is
`FIRST_FILE_INODE + position` and its partition N `PARTITION_INODE_BASE + position *
PARTITIONS_PER_IMAGE + N`; directories and links of the volume view live in ranges of their own.
"""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from .. import BLOCK_SIZE
from ..core.catalog import Catalog
from ..core.imageset import ImageSet
from ..core.lineage import Lineage
from ..core.partitions import Partition, PartitionTable, detect_partitions
from ..core.readahead import ReadaheadWindow
from ..core.stats import STATS_NAME
from ..ebs.ec2 import SnapshotRecord
from ..ebs.errors import EbsError

log = logging.getLogger(__name__)

# Snapshot content never changes while mounted, so on a mount of named snapshots the kernel
# may keep names and attributes for as long as it likes; an hour keeps st_blocks reasonably
# fresh. A catalogue's names may come and go: there the kernel keeps them for the TTL.
ATTR_TIMEOUT_S = 3600.0
ENTRY_TIMEOUT_S = 3600.0
STATS_INODE = pyfuse3.ROOT_INODE + 1
FIRST_FILE_INODE = pyfuse3.ROOT_INODE + 2
# Partition inodes live far above the image inodes, in one range per image: 2**16 numbers
# cover GPT's largest real entry counts (128, rarely 256).
PARTITION_INODE_BASE = 1 << 32
PARTITIONS_PER_IMAGE = 1 << 16
# The volume view's directories and links, above every partition inode (2**28 snapshots).
BY_VOLUME_INODE = 1 << 60
VOLUME_DIR_INODE_BASE = BY_VOLUME_INODE + 1  # + the volume's position
LINK_INODE_BASE = 1 << 61  # + the snapshot's position: its entry in its volume's directory
LATEST_INODE_BASE = 1 << 62  # + the volume's position
BY_VOLUME_NAME = b"by-volume"
LATEST_NAME = b"latest"
_PARTITION_NAME = re.compile(rb"^(snap-[0-9a-f]+)-part[0-9]+\.img$")
# After a failed partition detection (the first block could not be read), the next lookup of
# an unknown name or listing tries again only this much later, so `ls` in a loop does not
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
    snapshot_id: str
    start: int  # image offset of the file's first byte
    size: int
    start_time: float  # the snapshot's StartTime, seconds since the epoch: the file's mtime
    partition: Partition | None = None


class SnapshotFS(pyfuse3.Operations):
    """Read-only tree of the catalogue's snapshots as image files."""

    enable_writeback_cache = False

    def __init__(
        self, catalog: Catalog, images: ImageSet, *, uid: int, gid: int, by_volume: bool = False
    ) -> None:
        super().__init__()
        self.catalog = catalog
        self.images = images
        self.by_volume = by_volume
        self.uid = uid
        self.gid = gid
        self.mount_time_ns = time.time_ns()
        timeout = catalog.ttl_s if catalog.refreshing else ENTRY_TIMEOUT_S
        self.entry_timeout = timeout
        self.attr_timeout = min(timeout, ATTR_TIMEOUT_S)
        # Positions: a snapshot's (or volume's) number, fixed for the mount once given.
        self.positions: dict[str, int] = {}
        self.position_ids: dict[int, str] = {}
        self._next_position = itertools.count()
        self.volume_positions: dict[str, int] = {}
        self.volume_at: dict[int, str] = {}
        for image in images.live():  # a fixed mount's command-line order
            self._position(image.snapshot_id)
        # Partition tables by snapshot id; a snapshot is absent until detected.
        self.tables: dict[str, PartitionTable] = {}
        self.partition_nodes: dict[int, FileNode] = {}
        self.partition_names: dict[bytes, int] = {}
        self._detect_lock: trio.Lock | None = None
        self._detect_again_at = 0.0
        self._handles = itertools.count(1)
        # Open files: fh -> (node, its readahead window); the stats snapshot for STATS_INODE;
        # open directories: fh -> their entries as listed at opendir.
        self.open_files: dict[int, tuple[FileNode, ReadaheadWindow]] = {}
        self.stats_files: dict[int, bytes] = {}
        self.open_dirs: dict[int, list[tuple[bytes, int]]] = {}

    # -- positions and nodes ----------------------------------------------------------------

    def _position(self, snapshot_id: str) -> int:
        position = self.positions.get(snapshot_id)
        if position is None:
            position = self.positions[snapshot_id] = next(self._next_position)
            self.position_ids[position] = snapshot_id
        return position

    def _volume_position(self, volume_id: str) -> int:
        position = self.volume_positions.get(volume_id)
        if position is None:
            position = self.volume_positions[volume_id] = len(self.volume_positions)
            self.volume_at[position] = volume_id
        return position

    def image_inode(self, snapshot_id: str) -> int:
        return FIRST_FILE_INODE + self._position(snapshot_id)

    def record(self, snapshot_id: str) -> SnapshotRecord | None:
        """The catalogue's record, or, for a snapshot gone from it, its open image's."""
        record = self.catalog.view.records.get(snapshot_id)
        if record is not None:
            return record
        image = self.images.get(snapshot_id)
        if image is None or not self.images.pinned(snapshot_id):
            return None
        started = image.start_time.timestamp() if image.start_time else self.mount_time_ns / 1e9
        return SnapshotRecord(snapshot_id, "", started, image.size)

    def file_node(self, inode: int) -> FileNode | None:
        if FIRST_FILE_INODE <= inode < PARTITION_INODE_BASE:
            snapshot_id = self.position_ids.get(inode - FIRST_FILE_INODE)
            record = self.record(snapshot_id) if snapshot_id else None
            if snapshot_id is None or record is None:
                return None
            name = f"{snapshot_id}.img".encode()
            return FileNode(inode, name, snapshot_id, 0, record.size_bytes, record.start_time)
        return self.partition_nodes.get(inode)

    def link_target(self, inode: int) -> tuple[bytes, SnapshotRecord] | None:
        """A volume view link's target and the snapshot it names, or None if gone."""
        if inode >= LATEST_INODE_BASE:
            volume = self.catalog.view.volumes.get(
                self.volume_at.get(inode - LATEST_INODE_BASE, "")
            )
            snapshot_id = volume.latest if volume else None
        else:
            snapshot_id = self.position_ids.get(inode - LINK_INODE_BASE)
        record = self.catalog.view.records.get(snapshot_id) if snapshot_id else None
        if record is None:
            return None
        return f"../../{record.snapshot_id}.img".encode(), record

    def is_directory(self, inode: int) -> bool:
        if inode in (pyfuse3.ROOT_INODE, BY_VOLUME_INODE):
            return inode == pyfuse3.ROOT_INODE or self.by_volume
        if VOLUME_DIR_INODE_BASE <= inode < LINK_INODE_BASE:
            volume_id = self.volume_at.get(inode - VOLUME_DIR_INODE_BASE)
            return volume_id is not None and volume_id in self.catalog.view.volumes
        return False

    # -- attributes -------------------------------------------------------------------------

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = self.entry_timeout
        attr.attr_timeout = self.attr_timeout
        attr.st_uid = self.uid
        attr.st_gid = self.gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_nlink = 1
        attr.st_blocks = 0
        mtime_ns = self.mount_time_ns
        if self.is_directory(inode):
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        elif inode == STATS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = 0  # generated at open; read with direct I/O
            attr.attr_timeout = 0
        elif inode >= LINK_INODE_BASE:
            link = self.link_target(inode)
            if link is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_size = len(link[0])
            mtime_ns = int(link[1].start_time * 1e9)
        else:
            node = self.file_node(inode)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = node.size
            attr.st_blocks = self._allocated(node) // 512
            # StartTime from EC2; a fixed mount that could not ask recorded its mount time.
            mtime_ns = int(node.start_time * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        return attr

    def _allocated(self, node: FileNode) -> int:
        """st_blocks' bytes: the image's allocation (all of it until the image is open),
        spread evenly over a partition (an estimate)."""
        image = self.images.get(node.snapshot_id)
        if image is None or not image.size:
            return node.size
        allocated = image.allocated_bytes()
        if node.partition is not None:
            allocated = allocated * node.size // image.size
        return allocated

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    # -- names ------------------------------------------------------------------------------

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not self.is_directory(parent_inode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        inode = self._child(parent_inode, name)
        if inode is None and await self._refresh():
            inode = self._child(parent_inode, name)
        if inode is None and parent_inode == pyfuse3.ROOT_INODE:
            # Perhaps a partition file not yet discovered; known names never wait for this.
            match = _PARTITION_NAME.match(name)
            if match and self.record(match.group(1).decode()) is not None:
                await self.detect_partitions([match.group(1).decode()])
                inode = self._child(parent_inode, name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(inode)

    def _child(self, parent_inode: int, name: bytes) -> int | None:
        """The inode `name` in directory `parent_inode` names now, or None."""
        if name in (b".", b".."):
            return pyfuse3.ROOT_INODE if name == b".." else parent_inode
        if parent_inode == pyfuse3.ROOT_INODE:
            return self._root_child(name)
        view = self.catalog.view
        text = name.decode("utf-8", "replace")
        if parent_inode == BY_VOLUME_INODE:
            return (
                VOLUME_DIR_INODE_BASE + self._volume_position(text)
                if text in view.volumes
                else None
            )
        volume = view.volumes.get(self.volume_at[parent_inode - VOLUME_DIR_INODE_BASE])
        if volume is None:
            return None
        if name == LATEST_NAME:
            return LATEST_INODE_BASE + self.volume_positions[volume.volume_id]
        snapshot_id = volume.by_name.get(text)
        return None if snapshot_id is None else LINK_INODE_BASE + self._position(snapshot_id)

    def _root_child(self, name: bytes) -> int | None:
        if name == STATS_NAME:
            return STATS_INODE
        if name == BY_VOLUME_NAME and self.by_volume:
            return BY_VOLUME_INODE
        inode = self.partition_names.get(name)
        if inode is not None:
            return inode
        if name.endswith(b".img"):
            snapshot_id = name[: -len(b".img")].decode("utf-8", "replace")
            if self.record(snapshot_id) is not None:
                return self.image_inode(snapshot_id)
        return None

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if inode < LINK_INODE_BASE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # not a symbolic link
        link = self.link_target(inode)
        if link is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return link[0]

    # -- partitions -------------------------------------------------------------------------

    async def detect_partitions(self, snapshot_ids: list[str]) -> None:
        """Read these snapshots' partition tables once (concurrently); failures retried later."""
        pending = [sid for sid in snapshot_ids if sid not in self.tables]
        if not pending or trio.current_time() < self._detect_again_at:
            return
        if self._detect_lock is None:
            self._detect_lock = trio.Lock()
        async with self._detect_lock:
            failed: list[str] = []
            async with trio.open_nursery() as nursery:
                for snapshot_id in pending:
                    if snapshot_id not in self.tables:
                        nursery.start_soon(self._detect_one, snapshot_id, failed)
            if failed:
                self._detect_again_at = trio.current_time() + DETECT_RETRY_S

    async def _detect_one(self, snapshot_id: str, failed: list[str]) -> None:
        record = self.record(snapshot_id)
        if record is None:
            return
        try:
            image = await self.images.open(snapshot_id, record.start_datetime)
            table = await detect_partitions(image.read, image.size)
        except EbsError as error:
            log.warning(
                "%s: cannot read the partition table (%s); showing the whole image only",
                snapshot_id,
                error,
            )
            failed.append(snapshot_id)
            return
        except Exception:
            log.exception("%s: partition table detection failed", snapshot_id)
            table = PartitionTable(None, reason="detection failed (see the log)")
        self._add_partitions(record, table)

    def _add_partitions(self, record: SnapshotRecord, table: PartitionTable) -> None:
        snapshot_id = record.snapshot_id
        self.tables[snapshot_id] = table
        if not table.partitions:
            log.info("%s: no partition files: %s", snapshot_id, table.reason)
            return
        log.info("%s: %s", snapshot_id, table.describe())
        position = self._position(snapshot_id)
        for part in table.partitions:
            if not 0 < part.number < PARTITIONS_PER_IMAGE:
                continue
            inode = PARTITION_INODE_BASE + position * PARTITIONS_PER_IMAGE + part.number
            name = f"{snapshot_id}-part{part.number}.img".encode()
            node = FileNode(
                inode, name, snapshot_id, part.start, part.size, record.start_time, part
            )
            self.partition_nodes[inode] = node
            self.partition_names[name] = inode

    # -- directories ------------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.is_directory(inode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        await self._refresh()
        if inode == pyfuse3.ROOT_INODE:
            await self.detect_partitions([image.snapshot_id for image in self.images.live()])
        if not self.is_directory(inode):  # a volume whose last snapshot just went
            raise pyfuse3.FUSEError(errno.ENOENT)
        fh = next(self._handles)
        # The entries as they are now: the offsets readdir hands out stay valid however the
        # catalogue changes while the directory is read.
        self.open_dirs[fh] = self._entries(inode)
        return fh

    def _entries(self, inode: int) -> list[tuple[bytes, int]]:
        view = self.catalog.view
        if inode == BY_VOLUME_INODE:
            return [
                (volume.encode(), VOLUME_DIR_INODE_BASE + self._volume_position(volume))
                for volume in view.volumes
            ]
        if inode != pyfuse3.ROOT_INODE:
            volume = view.volumes[self.volume_at[inode - VOLUME_DIR_INODE_BASE]]
            entries = [
                (name.encode(), LINK_INODE_BASE + self._position(sid))
                for name, sid in zip(volume.names, volume.snapshot_ids, strict=True)
            ]
            latest = LATEST_INODE_BASE + self.volume_positions[volume.volume_id]
            return [*entries, (LATEST_NAME, latest)]
        entries = [(BY_VOLUME_NAME, BY_VOLUME_INODE)] if self.by_volume else []
        for snapshot_id in view.records:
            entries.append((f"{snapshot_id}.img".encode(), self.image_inode(snapshot_id)))
            table = self.tables.get(snapshot_id)
            for part in table.partitions if table else ():
                name = f"{snapshot_id}-part{part.number}.img".encode()
                if name in self.partition_names:
                    entries.append((name, self.partition_names[name]))
        return entries

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # next_id is the position after an entry in the list opendir took.
        entries = self.open_dirs.get(fh, [])
        for position in range(start_id, len(entries)):
            name, inode = entries[position]
            try:
                attrs = self._attrs(inode)
            except pyfuse3.FUSEError:
                continue  # gone since opendir (a refresh by another reader)
            if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                return

    @guarded
    async def releasedir(self, fh: int) -> None:
        self.open_dirs.pop(fh, None)

    async def _refresh(self) -> bool:
        """Refresh a stale catalogue; whether names came or went."""
        changed = await self.catalog.refresh_if_stale()
        if changed:
            self.forget_gone()
        return changed

    def forget_gone(self) -> None:
        """Drop positions and tables of snapshots gone from the catalogue and not open, so
        they stay bounded by the catalogue however long the mount lives."""
        records = self.catalog.view.records
        for snapshot_id in [s for s in self.positions if s not in records]:
            if self.images.get(snapshot_id) is not None:
                continue
            position = self.positions.pop(snapshot_id)
            del self.position_ids[position]
            self.tables.pop(snapshot_id, None)
            for inode in [
                i for i, n in self.partition_nodes.items() if n.snapshot_id == snapshot_id
            ]:
                del self.partition_names[self.partition_nodes.pop(inode).name]

    # -- files ------------------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.is_directory(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        node = self.file_node(inode) if inode != STATS_INODE else None
        if inode != STATS_INODE and node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._handles)
        if node is None:
            self.stats_files[fh] = (json.dumps(self.stats(), indent=2) + "\n").encode()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        record = self.record(node.snapshot_id)
        start = record.start_datetime if record else None
        image = await self.images.open(node.snapshot_id, start)
        self.images.pin(node.snapshot_id)
        # Offsets a window sees are image offsets, so a partition file's window works as is.
        self.open_files[fh] = (node, image.new_window())
        # keep_cache: the content never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def stats(self) -> dict[str, object]:
        windows: dict[str, list[int]] = {}
        for node, window in self.open_files.values():
            windows.setdefault(node.snapshot_id, []).append(window.window)
        snapshots = {}
        for image in self.images.live():
            snapshot_stats = image.stats()
            snapshot_stats["readahead_windows"] = windows.get(image.snapshot_id, [])
            snapshots[image.snapshot_id] = snapshot_stats
        ctx = self.images.ctx
        out: dict[str, object] = {
            "cache": {"bytes": ctx.cache.current_bytes, "limit": ctx.cache_bytes},
        }
        if self.catalog.refreshing:
            out["catalogue"] = {
                "snapshots": len(self.catalog.view),
                "volumes": len(self.catalog.view.volumes),
                "refreshes": self.catalog.refreshes,
                "failed_refreshes": self.catalog.failed_refreshes,
                "images_open": len(snapshots),
                "images_opened": self.images.opened,
                "images_closed": self.images.closed,
            }
        if ctx.disk is not None:
            out["disk_cache"] = {
                "directory": ctx.disk.directory,
                "limit": ctx.disk.max_bytes,
                "storing": ctx.disk.writable,
                **ctx.disk.stats.as_dict(),
            }
        if ctx.pool is not None:
            out["fetch_workers"] = ctx.pool.stats()
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
    # pyfuse3 replies from any contiguous buffer (PyObject_GetBuffer); its stub says bytes. A
    # view of blocks a fetch worker left in shared memory is replied with no copy of our own.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        if fh in self.stats_files:
            return self.stats_files[fh][off : off + size]
        node, window = self.open_files[fh]
        image = self.images.get(node.snapshot_id)
        if image is None:
            raise pyfuse3.FUSEError(errno.EIO)  # cannot happen: an open file pins its image
        if off >= node.size:
            return b""
        return await image.read_buffer(node.start + off, min(size, node.size - off), window)

    @guarded
    async def release(self, fh: int) -> None:
        opened = self.open_files.pop(fh, None)
        self.stats_files.pop(fh, None)
        if opened is not None:
            self.images.unpin(opened[0].snapshot_id)

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        view = self.catalog.view
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = BLOCK_SIZE
        data.f_blocks = view.total_bytes // BLOCK_SIZE
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = len(view) + len(self.partition_nodes) + 1
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data
