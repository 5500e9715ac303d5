"""`ebsfuse restore`: copy a file or a directory out of a snapshot, fetching only what it reads.

Builds the chain of chain.py (private FUSE mount, read-only loop device, filesystem mounted with
never-write options) in a private directory, copies PATH to DEST, and tears the chain down on
success, failure and Ctrl-C alike. Only the blocks the filesystem driver reads are fetched: the
superblock, the directories on the way, the inodes and the file's extents.

The copy keeps what `cp -a` keeps: contents (holes stay holes), mode, owner and group (as root),
access and modification times (nanoseconds), symbolic links as links, hard links within the
copied tree as links, extended attributes where the destination supports them, FIFOs and device
nodes (as root). It is written under a temporary name next to DEST and renamed into place only
when complete, so an interrupted or failed restore leaves nothing at DEST.

PATH is resolved inside the snapshot's filesystem: `..` and absolute symbolic links on the way
stay inside it, never reaching the host's files. A symbolic link as PATH's last component is
restored as the link itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import BLOCK_SIZE
from ..ebs.client import validate_snapshot_id
from ..ebs.errors import EbsfuseError, UsageError
from ..fuse.mount import MountOptions
from .chain import Chain, runtime_dir

log = logging.getLogger(__name__)

# Symbolic links followed while resolving PATH, as the kernel's own limit (MAXSYMLINKS).
MAX_SYMLINKS = 40
# Copy buffer: two EBS blocks per read keeps the kernel's readahead and the daemon's prefetcher
# streaming without holding much memory.
COPY_CHUNK = 2 * BLOCK_SIZE


@dataclass
class RestoreResult:
    snapshot_id: str
    source: str
    dest: str
    partition: int
    fstype: str
    files: int
    directories: int
    symlinks: int
    other: int
    bytes_restored: int
    bytes_fetched: int
    blocks_fetched: int
    seconds: float
    blocks_from_cache: int = 0  # from the disk tier, or lent by a related snapshot

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class RestoreInterrupted(EbsfuseError):
    """Ctrl-C or SIGTERM during a restore: everything was cleaned up."""


# -- checks before anything is mounted ---------------------------------------------------------


def plan_destination(path: str, dest: str, snapshot_id: str) -> tuple[str, str]:
    """(directory, name) the restored PATH will get; refuses what cannot work, in one line.

    Like cp: an existing directory DEST receives PATH under its own name; otherwise DEST is
    the new name and its parent must exist. Writability is tested by creating a file.
    """
    dest = os.path.abspath(dest)
    base = os.path.basename(os.path.normpath("/" + path)) or snapshot_id
    if os.path.isdir(dest):
        directory, name = dest, base
    else:
        directory, name = os.path.dirname(dest), os.path.basename(dest)
        if not os.path.isdir(directory):
            what = "does not exist" if not os.path.lexists(directory) else "is not a directory"
            raise UsageError(f"cannot restore to {dest}: {directory} {what}")
    target = os.path.join(directory, name)
    if os.path.lexists(target):
        raise UsageError(f"cannot restore to {target}: it already exists")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ebsfuse-probe-", dir=directory)
    except OSError as exc:
        raise UsageError(f"cannot restore to {directory}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return directory, name


def resolve_in_root(root: str, path: str) -> str:
    """PATH inside the filesystem at `root`, symbolic links on the way kept inside it."""
    queue = [p for p in path.split("/") if p not in ("", ".")]
    current: list[str] = []
    followed = 0
    while queue:
        name = queue.pop(0)
        if name == "..":
            if current:
                current.pop()
            continue
        full = os.path.join(root, *current, name)
        if queue and os.path.islink(full):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise UsageError(f"{path}: too many levels of symbolic links in the snapshot")
            target = os.readlink(full)
            if target.startswith("/"):
                current = []
            queue = [p for p in target.split("/") if p not in ("", ".")] + queue
            continue
        if queue and not os.path.isdir(full):
            break  # a missing or non-directory component: reported below
        current.append(name)
    full = os.path.join(root, *current)
    if queue or not os.path.lexists(full):
        raise UsageError(f"{path}: no such file or directory in the snapshot")
    return full


# -- the copy ---------------------------------------------------------------------------------


class _Copier:
    """Recursive copy keeping metadata; counts what it restored."""

    def __init__(self) -> None:
        self.files = self.directories = self.symlinks = self.other = 0
        self.bytes = 0
        self.links: dict[tuple[int, int], str] = {}
        self.is_root = os.geteuid() == 0
        self.warned: set[str] = set()

    def copy(self, src: str, dst: str) -> None:
        st = os.lstat(src)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)
            self.directories += 1
            with os.scandir(src) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                self.copy(os.path.join(src, name), os.path.join(dst, name))
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            self.symlinks += 1
        else:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], dst)  # a hard link within the restored tree
                return
            if stat.S_ISREG(mode):
                self.bytes += _copy_data(src, dst)
                self.files += 1
            elif stat.S_ISFIFO(mode):
                os.mkfifo(dst, 0o600)
                self.other += 1
            elif (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and self.is_root:
                os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
                self.other += 1
            else:
                self._warn(f"skipped {src}: cannot recreate this kind of file", "kind")
                return
            if st.st_nlink > 1:
                self.links[key] = dst
        self._metadata(src, dst, st)

    def _metadata(self, src: str, dst: str, st: os.stat_result) -> None:
        link = stat.S_ISLNK(st.st_mode)
        self._xattrs(src, dst)
        try:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        except PermissionError:
            self._warn("owners not kept: only root can give files to other users", "chown")
        if not link:
            os.chmod(dst, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _xattrs(self, src: str, dst: str) -> None:
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            return
        for name in names:
            try:
                value = os.getxattr(src, name, follow_symlinks=False)
                os.setxattr(dst, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                    raise
                self._warn(f"extended attribute {name} not kept: {exc.strerror}", name)

    def _warn(self, message: str, key: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)


def _copy_data(src: str, dst: str) -> int:
    """Copy a regular file's bytes, keeping holes as holes; returns the bytes copied."""
    copied = 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end in _data_ranges(fin.fileno(), size):
            offset = start
            while offset < end:
                chunk = os.pread(fin.fileno(), min(COPY_CHUNK, end - offset), offset)
                if not chunk:
                    raise EbsfuseError(f"{src}: the file ended early at byte {offset}")
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fout.fileno(), view, offset)
                    view = view[written:]
                    offset += written
            copied += end - start
        os.ftruncate(fout.fileno(), size)
    return copied


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The file's data as (start, end) ranges: SEEK_DATA/SEEK_HOLE, or everything if unsupported."""
    ranges = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError:
        return [(0, size)] if size else []
    return ranges


# -- the command ------------------------------------------------------------------------------


def restore(
    snapshot_id: str,
    path: str,
    dest: str,
    *,
    partition: int | None,
    mount_options: MountOptions,
) -> RestoreResult:
    """Restore PATH from the snapshot to DEST; raise `RestoreInterrupted` on Ctrl-C."""
    started = time.monotonic()
    validate_snapshot_id(snapshot_id)
    directory, name = plan_destination(path, dest, snapshot_id)
    final = os.path.join(directory, name)
    base = os.path.join(runtime_dir(), f"restore-{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(base, mode=0o700)
    chain = Chain(snapshot_id, base, os.path.join(base, "fs"), owns_target=True)
    temporary = os.path.join(directory, f".{name}.ebsfuse-restore-{secrets.token_hex(4)}")
    try:
        chain.start_daemon(mount_options)
        selected = chain.select(partition)
        chain.attach(selected)
        chain.mount_filesystem()
        source = resolve_in_root(chain.target, path)
        copier = _Copier()
        copier.copy(source, temporary)
        os.rename(temporary, final)
        st = os.lstat(source)
        # Renaming touched nothing but ctime; set the times again anyway (cheap, certain).
        os.utime(final, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        counters = chain.stats()
    except KeyboardInterrupt:
        _remove(temporary)
        raise RestoreInterrupted(f"interrupted; nothing was restored to {final}") from None
    except OSError as exc:
        _remove(temporary)
        where = exc.filename or final
        if chain.target and isinstance(where, str) and where.startswith(chain.target):
            where = where[len(chain.target) :] or "/"
        raise EbsfuseError(f"restore failed: {where}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(temporary)
        raise
    finally:
        chain.teardown()
    fetched = int(counters.get("bytes_fetched", 0))
    return RestoreResult(
        snapshot_id=snapshot_id,
        source="/" + "/".join(p for p in path.split("/") if p),
        dest=final,
        partition=selected.partition,
        fstype=selected.fstype,
        files=copier.files,
        directories=copier.directories,
        symlinks=copier.symlinks,
        other=copier.other,
        bytes_restored=copier.bytes,
        bytes_fetched=fetched,
        blocks_fetched=fetched // BLOCK_SIZE,
        seconds=time.monotonic() - started,
        blocks_from_cache=int(counters.get("saved", {}).get("requests", 0)),
    )


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
