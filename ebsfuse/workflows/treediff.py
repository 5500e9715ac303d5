"""File by file, what differs between two directory trees, using which disk blocks changed.

The pure half of `ebsfuse changes`: it knows nothing of EBS, FUSE or loop devices, only two
mounted trees, the byte offset of each tree's filesystem in its volume, and (when the service
could say) which 512 KiB blocks of the volume differ (`ChangedBlocks`). So it is tested on any
two directories of the host.

How a file's content is judged (`ContentJudge`):
- by extents (ext2/3/4 and XFS): FIEMAP gives where each byte range of the file lies on the
  device. A range mapped to the same place in both trees, in blocks the service says did not
  change, holds the same bytes; it is not read. Ranges mapped differently, or lying in changed
  blocks, are read in both trees and compared. This catches a file rewritten in place with its
  size and times put back (timestomping), which metadata alone misses.
- by reading (no extent map: NTFS through ntfs-3g, btrfs whose FIEMAP gives logical addresses,
  unrelated snapshots, `--deep`): both files are read in full and compared.
Either way the answer carries the file's differing byte ranges, to 4 KiB.

The walk (`walk_pair`) visits both trees at once in sorted order, one directory listing per side
at a time, so memory follows the widest directory, not the size of the tree. Entries present
on one side only are matched by inode number and birth time (`RenameMatcher`), so a rename is
reported as one (statx's birth time, or NTFS's creation time through ntfs-3g), up to a bound;
beyond it, as a delete and an add.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import itertools
import os
import stat
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import BLOCK_SIZE

# -- which blocks changed ----------------------------------------------------------------------


# The largest EBS volume (64 TiB) in blocks: the bitmap never grows past 16 MiB.
MAX_BLOCKS = 64 * 1024**4 // BLOCK_SIZE


class ChangedBlocks:
    """The volume's changed 512 KiB blocks as a bitmap: one bit a block, so 2 MiB for an
    8 TiB volume and 16 MiB for the largest (64 TiB), whatever the number of changes. It is
    sized for one volume and grows for an index past it (the other snapshot's volume may be
    larger); a block past its end was listed as no change."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._bits = bytearray((num_blocks + 7) // 8)
        self.count = 0

    def add(self, index: int) -> None:
        if not 0 <= index < MAX_BLOCKS:
            return  # no EBS volume has such a block: nothing of a filesystem lies there
        if index >= self.num_blocks:
            self._bits.extend(bytes(index // 8 + 1 - len(self._bits)))
            self.num_blocks = len(self._bits) * 8
        byte, bit = divmod(index, 8)
        if not self._bits[byte] >> bit & 1:
            self._bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, index: int) -> bool:
        byte, bit = divmod(index, 8)
        return 0 <= index < self.num_blocks and bool(self._bits[byte] >> bit & 1)

    def count_in(self, start: int, end: int) -> int:
        """Changed blocks among those holding volume bytes [start, end)."""
        if end <= start:
            return 0
        first, last = start // BLOCK_SIZE, min((end - 1) // BLOCK_SIZE, self.num_blocks - 1)
        if last < first:
            return 0
        chunk = int.from_bytes(self._bits[first // 8 : last // 8 + 1], "little")
        chunk >>= first % 8
        return (chunk & ((1 << (last - first + 1)) - 1)).bit_count()

    def spans(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts [s, e) of volume bytes [start, end) that lie in changed blocks."""
        if not self.count_in(start, end):
            return
        index = start // BLOCK_SIZE
        while index * BLOCK_SIZE < end:
            if index in self:
                yield max(start, index * BLOCK_SIZE), min(end, (index + 1) * BLOCK_SIZE)
            index += 1


@dataclass
class Evidence:
    """What the comparison may rely on besides the two trees."""

    changed: ChangedBlocks | None  # None: the service could not say (unrelated snapshots...)
    # Where the filesystem starts in the volume (the same in both snapshots, or `changed` is
    # withdrawn: blocks could not be matched to files).
    offset_a: int = 0
    extents: bool = False  # FIEMAP gives device offsets on this filesystem (ext*, XFS)
    deep: bool = False  # read every file of equal size in both, whatever the evidence
    # The service listed no changed block in the filesystem's byte range: its files are the
    # same, and none is read (unless `deep`).
    unchanged: bool = False

    @property
    def by_extents(self) -> bool:
        return self.extents and not self.deep and self.changed is not None


# -- extents -----------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_HEADER = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags (56 bytes)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
# Extents whose physical address does not say where the bytes lie on the device: not yet
# placed, unknown, compressed or encrypted. A file with one is compared by reading.
FIEMAP_UNMAPPABLE = 0x2 | 0x4 | 0x8 | 0x80
# Extents asked for per ioctl: 64 KiB of buffer, enough for most files in one call.
FIEMAP_BATCH = 1170
# Logical window of a file mapped and compared at once, so a file of millions of extents
# never holds them all: 1 GiB of even a badly fragmented file is a few thousand.
WINDOW_BYTES = 1 << 30


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    unwritten: bool


def file_extents(fd: int, start: int, length: int) -> list[Extent] | None:
    """The extents of the file at `fd` overlapping [start, start + length), or None when the
    filesystem gives no usable map (no FIEMAP, or an extent with no device address)."""
    extents: list[Extent] = []
    position, end = start, start + length
    while position < end:
        buffer = bytearray(FIEMAP_HEADER.size + FIEMAP_EXTENT.size * FIEMAP_BATCH)
        FIEMAP_HEADER.pack_into(buffer, 0, position, end - position, 0, 0, FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                return None
            raise
        mapped = FIEMAP_HEADER.unpack_from(buffer, 0)[3]
        if not mapped:
            break
        last = False
        for i in range(mapped):
            logical, physical, size, flags = FIEMAP_EXTENT.unpack_from(
                buffer, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size
            )
            if flags & FIEMAP_UNMAPPABLE:
                return None
            extents.append(Extent(logical, physical, size, bool(flags & FIEMAP_EXTENT_UNWRITTEN)))
            last = bool(flags & FIEMAP_EXTENT_LAST)
            position = max(position, logical + size)
        if last:
            break
    return extents


def _mapping_at(extents: list[Extent], starts: list[int], offset: int) -> tuple[int, bool] | None:
    """(device offset, unwritten) of the file's byte `offset`, None in a hole. `starts` are
    the extents' logical starts, ascending, as FIEMAP returns them."""
    i = bisect.bisect_right(starts, offset) - 1
    if i >= 0 and offset < extents[i].logical + extents[i].length:
        return extents[i].physical + offset - extents[i].logical, extents[i].unwritten
    return None


# -- byte ranges -------------------------------------------------------------------------------

# Granularity of the differing ranges reported: a page, the unit filesystems write in.
PAGE = 4096
# Bytes read from each file per step of a comparison.
READ_CHUNK = 1 << 20
# Differing ranges kept per file; past this the last one grows to cover the rest (a superset,
# never a miss), so a rewritten huge file does not become a huge answer.
MAX_RANGES = 256


class Ranges:
    """Byte ranges (offset, length) in ascending order, adjacent ones merged, at most
    MAX_RANGES of them."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int]] = []

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self.items:
            last_offset, last_length = self.items[-1]
            if offset <= last_offset + last_length or len(self.items) >= MAX_RANGES:
                end = max(last_offset + last_length, offset + length)
                self.items[-1] = (last_offset, end - last_offset)
                return
        self.items.append((offset, length))

    @property
    def total(self) -> int:
        return sum(length for _, length in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


def differing_pages(fd_a: int, fd_b: int, offset: int, length: int, into: Ranges) -> int:
    """Read [offset, offset + length), widened to whole pages, of both files; add the pages
    that differ to `into` (the last one cut at the end of the shorter file). Returns the bytes
    read (of both files)."""
    read = 0
    end = -(-(offset + length) // PAGE) * PAGE
    offset = offset // PAGE * PAGE
    while offset < end:
        a = os.pread(fd_a, min(READ_CHUNK, end - offset), offset)
        b = os.pread(fd_b, min(READ_CHUNK, end - offset), offset)
        read += len(a) + len(b)
        size = min(len(a), len(b))
        if not size:
            break  # the end of the shorter file: the rest is the size's difference
        if a[:size] != b[:size]:
            view_a, view_b = memoryview(a), memoryview(b)
            for page in range(0, size, PAGE):
                if view_a[page : page + PAGE] != view_b[page : page + PAGE]:
                    into.add(offset + page, min(PAGE, size - page))
        offset += size
    return read


# -- the content of one file in both trees -------------------------------------------------------


@dataclass
class ContentVerdict:
    ranges: list[tuple[int, int]]  # differing byte ranges; empty: the same bytes
    method: str  # "extents": only what the changed blocks could alter was read; "read": all


class ContentJudge:
    """Whether a file's bytes differ between the trees, reading as little as the evidence
    allows. Safe to call from several threads; counts what it read."""

    def __init__(self, evidence: Evidence) -> None:
        self.evidence = evidence
        self.bytes_read = 0
        self.files_by_extents = 0
        self.files_read = 0
        self._lock = threading.Lock()

    def judge(self, path_a: str, path_b: str, size_a: int, size_b: int) -> ContentVerdict:
        common = min(size_a, size_b)
        ranges = Ranges()
        with _ReadOnly(path_a) as fd_a, _ReadOnly(path_b) as fd_b:
            mapped, read = False, 0
            if self.evidence.by_extents:
                mapped, read = self._by_extents(fd_a, fd_b, common, ranges)
            if not mapped:
                ranges = Ranges()
                read += differing_pages(fd_a, fd_b, 0, common, ranges)
        with self._lock:
            self.bytes_read += read
            if mapped:
                self.files_by_extents += 1
            else:
                self.files_read += 1
        ranges.add(common, max(size_a, size_b) - common)
        return ContentVerdict(ranges.items, "extents" if mapped else "read")

    def _by_extents(self, fd_a: int, fd_b: int, size: int, ranges: Ranges) -> tuple[bool, int]:
        """Compare what the extents cannot vouch for: (False if either file has no usable map,
        bytes read)."""
        read = 0
        for window in range(0, size, WINDOW_BYTES):
            length = min(WINDOW_BYTES, size - window)
            a, b = file_extents(fd_a, window, length), file_extents(fd_b, window, length)
            if a is None or b is None:
                return False, read
            for start, end in self._suspect(a, b, window, window + length):
                read += differing_pages(fd_a, fd_b, start, end - start, ranges)
        return True, read

    def _suspect(
        self, a: list[Extent], b: list[Extent], start: int, end: int
    ) -> Iterator[tuple[int, int]]:
        """File ranges [s, e) in [start, end) whose bytes may differ: mapped differently in the
        two trees, or mapped alike onto changed blocks."""
        assert self.evidence.changed is not None
        cuts = {start, end}
        for extent in (*a, *b):
            cuts.update(
                c for c in (extent.logical, extent.logical + extent.length) if start < c < end
            )
        points = sorted(cuts)
        base = self.evidence.offset_a
        starts_a, starts_b = [x.logical for x in a], [x.logical for x in b]
        for s, e in itertools.pairwise(points):
            where_a, where_b = _mapping_at(a, starts_a, s), _mapping_at(b, starts_b, s)
            if where_a != where_b:
                yield s, e
            elif where_a is not None and not where_a[1]:
                device = base + where_a[0]
                for cs, ce in self.evidence.changed.spans(device, device + e - s):
                    yield s + cs - device, s + ce - device


class _ReadOnly:
    """A file opened read-only without touching its access time where allowed."""

    def __init__(self, path: str) -> None:
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW)
        except PermissionError:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# -- metadata ----------------------------------------------------------------------------------


def kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "other"


def iso_ns(ns: int) -> str:
    """Nanoseconds since the epoch as ISO 8601 UTC, keeping all nine digits."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{fraction:09d}Z"


@dataclass(frozen=True)
class Meta:
    """One side's metadata of an entry, as compared (access times are not: reading a file
    changes them, so they say nothing about what was done to it)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    target: str | None  # a symbolic link's target

    @classmethod
    def of(cls, path: str, st: os.stat_result) -> Meta:
        kind = kind_of(st.st_mode)
        target = os.readlink(path) if kind == "symlink" else None
        rdev = st.st_rdev if kind in ("char device", "block device") else 0
        return cls(
            kind, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            rdev, target,
        )  # fmt: skip

    def differences(self, other: Meta) -> list[str]:
        names = []
        if stat.S_IMODE(self.mode) != stat.S_IMODE(other.mode):
            names.append("mode")
        for name in ("uid", "gid", "size", "mtime_ns", "ctime_ns", "rdev", "target"):
            if getattr(self, name) != getattr(other, name):
                names.append(name.removesuffix("_ns"))
        return names

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size,
            "mode": f"{stat.S_IMODE(self.mode):04o}",
            "uid": self.uid,
            "gid": self.gid,
            "mtime": iso_ns(self.mtime_ns),
            "ctime": iso_ns(self.ctime_ns),
        }
        if self.target is not None:
            out["target"] = self.target
        return out


@dataclass
class Change:
    """One entry that differs: added, deleted, modified (content), metadata (only), renamed."""

    path: str
    change: str
    kind: str
    before: Meta | None = None
    after: Meta | None = None
    fields: list[str] = field(default_factory=list)  # metadata that differs
    content: ContentVerdict | None = None  # for files in both: their differing bytes
    renamed_from: str | None = None

    @property
    def times_kept(self) -> bool:
        """Content changed while size and times read as before: what timestomping leaves."""
        return bool(
            self.content
            and self.content.ranges
            and not {"size", "mtime", "ctime"} & set(self.fields)
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "change": self.change, "kind": self.kind}
        if self.renamed_from is not None:
            out["from"] = self.renamed_from
        if self.before is not None:
            out["before"] = self.before.as_dict()
        if self.after is not None:
            out["after"] = self.after.as_dict()
        if self.fields:
            out["fields"] = self.fields
        if self.content is not None:
            out["content_changed"] = bool(self.content.ranges)
            out["ranges"] = [[offset, length] for offset, length in self.content.ranges]
            out["judged_by"] = self.content.method
            out["times_kept"] = self.times_kept
        return out


# -- the walk ----------------------------------------------------------------------------------


@dataclass
class Side:
    """One tree: where it is mounted, and the directory inside it the walk starts from."""

    root: str
    start: str = "/"

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))


def _listing(side: Side, rel: str) -> dict[str, os.stat_result]:
    with os.scandir(side.path(rel)) as entries:
        return {e.name: e.stat(follow_symlinks=False) for e in entries}


Pair = tuple[str, os.stat_result | None, os.stat_result | None]


def walk_pair(a: Side, b: Side, rel: str = "/") -> Iterator[Pair]:
    """(path, stat in A or None, stat in B or None) for every entry under `rel` in either tree,
    as `find` lists one tree: `rel` first, then depth first, each directory in sorted order.
    Each level of the descent holds its directory's listing of both sides."""
    st_a, st_b = _lstat(a.path(rel)), _lstat(b.path(rel))
    yield rel, st_a, st_b
    stack = [_entries(a, b, rel, _is_dir(st_a), _is_dir(st_b))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        yield entry
        path, child_a, child_b = entry
        if _is_dir(child_a) or _is_dir(child_b):
            stack.append(_entries(a, b, path, _is_dir(child_a), _is_dir(child_b)))


def _entries(a: Side, b: Side, directory: str, in_a: bool, in_b: bool) -> Iterator[Pair]:
    listed_a = _listing(a, directory) if in_a else {}
    listed_b = _listing(b, directory) if in_b else {}
    for name in sorted(listed_a.keys() | listed_b.keys()):
        yield os.path.join(directory, name), listed_a.get(name), listed_b.get(name)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_dir(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)


# -- renames -----------------------------------------------------------------------------------

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
STATX_BTIME = 0x800
STATX_BUFFER = 256
STATX_BTIME_OFFSET = 80  # struct statx: stx_btime (tv_sec s64, tv_nsec u32)
_libc = ctypes.CDLL(None, use_errno=True)


# ntfs-3g gives an NTFS file's creation time as this attribute (statx has none there): 100 ns
# ticks since 1601, which is this many ticks before the Unix epoch.
NTFS_CRTIME = "system.ntfs_crtime"
NTFS_EPOCH_TICKS = 116_444_736_000_000_000


def birth_ns(path: str) -> int | None:
    """The entry's birth time (statx, or NTFS's creation time through ntfs-3g), None where
    the filesystem does not keep one."""
    statx = getattr(_libc, "statx", None)
    buffer = ctypes.create_string_buffer(STATX_BUFFER)
    if statx is not None and (
        statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, STATX_BTIME, buffer) == 0
    ):
        mask = struct.unpack_from("=I", buffer.raw, 0)[0]
        if mask & STATX_BTIME:
            seconds, nanoseconds = struct.unpack_from("=qI", buffer.raw, STATX_BTIME_OFFSET)
            return int(seconds * 1_000_000_000 + nanoseconds)
    try:
        ticks = os.getxattr(path, NTFS_CRTIME, follow_symlinks=False)
    except OSError:
        return None
    if len(ticks) != 8:
        return None
    return (int.from_bytes(ticks, "little") - NTFS_EPOCH_TICKS) * 100


# Entries on one side only held back to be matched as renames; past this many, the rest are
# reported at once as deleted or added (about 300 bytes each: 100,000 is 30 MB).
MAX_PENDING = 100_000

Identity = tuple[int, int]  # inode number, birth time: an inode reused later is born again


@dataclass
class _Pending:
    path: str
    st: os.stat_result


class RenameMatcher:
    """Entries seen on one side only, matched by identity once the walk is done."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self._limit = limit
        self._gone: dict[Identity, _Pending] = {}
        self._new: dict[Identity, _Pending] = {}

    def hold(self, side: str, path: str, st: os.stat_result, full_path: str) -> bool:
        """Keep an entry of one side to match later; False if it cannot be (no birth time, a
        second name of a held inode, or too many held): the caller reports it now."""
        born = birth_ns(full_path)
        held = self._gone if side == "a" else self._new
        key = (st.st_ino, born or 0)
        if born is None or key in held or len(held) >= self._limit:
            return False
        held[key] = _Pending(path, st)
        return True

    def pairs(self) -> list[tuple[_Pending, _Pending]]:
        """(old, new) of each entry found under both names, parents before children."""
        keys = [key for key in self._new if key in self._gone]
        matched = [(self._gone.pop(key), self._new.pop(key)) for key in keys]
        return sorted(matched, key=lambda pair: pair[1].path)

    def leftovers(self) -> Iterator[tuple[str, _Pending]]:
        """("a", entry) for each deleted and ("b", entry) for each added one not matched."""
        for pending in sorted(self._gone.values(), key=lambda p: p.path):
            yield "a", pending
        for pending in sorted(self._new.values(), key=lambda p: p.path):
            yield "b", pending
        self._gone.clear()
        self._new.clear()


# -- the comparison ----------------------------------------------------------------------------


# Entries compared at once. Each may wait on block fetches (tens of ms each), so the walk keeps
# this many in flight and hands their answers on in walk order. Measured on the 100 GiB bench
# (scripts/bench-changes); the daemon itself serves up to 64 requests at once.
COMPARE_WORKERS = 16
# Answers held back waiting for an earlier entry's: bounds memory, keeps the workers busy.
IN_FLIGHT = 4 * COMPARE_WORKERS


class TreeComparer:
    """Walks both trees and hands each `Change` to `emit`: modified and metadata-only entries as
    the walk meets them, then renamed, deleted and added ones (held to be matched)."""

    def __init__(
        self,
        a: Side,
        b: Side,
        evidence: Evidence,
        emit: Callable[[Change], None],
        on_entry: Callable[[int], None] = lambda walked: None,  # entries walked so far
        workers: int = COMPARE_WORKERS,
    ) -> None:
        self.a, self.b = a, b
        self.evidence = evidence
        self.judge = ContentJudge(evidence)
        self._emit = emit
        self._on_entry = on_entry
        self._renames = RenameMatcher()
        self._workers = workers
        self._queue: deque[Future[Change | None]] = deque()
        self.counts = {name: 0 for name in ("added", "deleted", "modified", "metadata", "renamed")}
        self.entries = 0
        self.moved_with_parent = 0  # entries under a renamed directory, otherwise unchanged

    def run(self, start: str = "/") -> None:
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="compare")
        try:
            for path, st_a, st_b in walk_pair(self.a, self.b, start):
                self.entries += 1
                self._on_entry(self.entries)
                if (
                    st_a is not None
                    and st_b is not None
                    and kind_of(st_a.st_mode) == kind_of(st_b.st_mode)
                ):
                    self._queue.append(pool.submit(self.compare, path, path, st_a, st_b))
                    self._settle(IN_FLIGHT)
                    continue
                if st_a is not None:
                    self._one_side("a", path, st_a)
                if st_b is not None:
                    self._one_side("b", path, st_b)
            self._settle(0)
            self._finish(pool)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _settle(self, keep: int) -> None:
        """Report answers in walk order until at most `keep` wait (and none finished at the
        head)."""
        while self._queue and (len(self._queue) > keep or self._queue[0].done()):
            self._report(self._queue.popleft().result())

    def compare(
        self,
        path_a: str,
        path_b: str,
        st_a: os.stat_result,
        st_b: os.stat_result,
        *,
        renamed: bool = False,
    ) -> Change | None:
        """The change of one entry seen in both trees (under two names if `renamed`), or None."""
        before, after = Meta.of(self.a.path(path_a), st_a), Meta.of(self.b.path(path_b), st_b)
        fields = before.differences(after)
        content = None
        if before.kind == "file" and self._may_differ():
            content = self.judge.judge(
                self.a.path(path_a), self.b.path(path_b), before.size, after.size
            )
        if content is not None and content.ranges:
            change = "modified"
        elif fields:
            change = "metadata"
        elif renamed:
            change = "renamed"
        else:
            return None
        return Change(path_b, change, before.kind, before, after, fields, content)

    def _may_differ(self) -> bool:
        """False only when the service vouches that no block of the filesystem changed."""
        return self.evidence.deep or not self.evidence.unchanged

    def _report(self, change: Change | None) -> None:
        if change is not None:
            self.counts[change.change] += 1
            self._emit(change)

    def _one_side(self, side: str, path: str, st: os.stat_result) -> None:
        tree = self.a if side == "a" else self.b
        if not self._renames.hold(side, path, st, tree.path(path)):
            self._report(_only(side, tree, path, st))

    def _finish(self, pool: ThreadPoolExecutor) -> None:
        renamed_dirs: dict[str, str] = {}
        waiting: deque[tuple[_Pending, _Pending, Future[Change | None]]] = deque()
        for old, new in self._renames.pairs():
            compared = pool.submit(self.compare, old.path, new.path, old.st, new.st, renamed=True)
            waiting.append((old, new, compared))
            while len(waiting) > IN_FLIGHT:
                self._renamed(*waiting.popleft(), renamed_dirs)
        while waiting:
            self._renamed(*waiting.popleft(), renamed_dirs)
        for side, pending in self._renames.leftovers():
            tree = self.a if side == "a" else self.b
            self._report(_only(side, tree, pending.path, pending.st))

    def _renamed(
        self,
        old: _Pending,
        new: _Pending,
        compared: Future[Change | None],
        renamed_dirs: dict[str, str],
    ) -> None:
        """Report one rename, in order of the new path (so parents come before children)."""
        change = compared.result()
        assert change is not None
        if stat.S_ISDIR(new.st.st_mode):
            renamed_dirs[old.path] = new.path
        if change.change == "renamed" and _moved_along(old.path, new.path, renamed_dirs):
            self.moved_with_parent += 1
            return
        change.change = "renamed"
        change.renamed_from = old.path
        self._report(change)


def _moved_along(old: str, new: str, renamed_dirs: dict[str, str]) -> bool:
    """The entry kept its name inside a directory that was renamed: its parent says it all."""
    parent = renamed_dirs.get(os.path.dirname(old))
    return parent == os.path.dirname(new) and os.path.basename(old) == os.path.basename(new)


def _only(side: str, tree: Side, path: str, st: os.stat_result) -> Change:
    meta = Meta.of(tree.path(path), st)
    if side == "a":
        return Change(path, "deleted", meta.kind, before=meta)
    return Change(path, "added", meta.kind, after=meta)
