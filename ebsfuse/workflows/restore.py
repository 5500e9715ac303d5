"""`ebsfuse restore`: copy files and directories out of a snapshot, fetching only what it reads.

Builds the chain of chain.py (private FUSE mount, read-only loop device, filesystem mounted with
never-write options) in a private directory, copies each PATH to DEST, and tears the chain down
on success, failure and Ctrl-C alike. Only the blocks the filesystem driver reads are fetched:
the superblock, the directories on the way, the inodes and the files' extents. Several PATHs
share one chain.

The copy keeps what a system restore needs: contents (holes stay holes), owner and group (as
root), mode with its set-id bits, extended attributes (user, security, POSIX ACLs, file
capabilities) where the destination accepts them, access and modification times to the
nanosecond, symbolic links as links, hard links within the copied tree as links, FIFOs and
device nodes (as root). Metadata goes on in the order the kernel needs: ownership first (chown
clears set-id bits and `security.capability`), then the mode, then the extended attributes,
then the times; a directory's times after its children. An attribute the destination refuses
is reported once by name. Each PATH is written under a temporary name next to its destination
and renamed into place only when complete, so an interrupted or failed restore leaves nothing
half-written under a final name.

`--manifest FILE` writes one JSON line per restored entry (path in the snapshot, path written,
kind, size, the SHA-256 of the snapshot's bytes as they were copied, mode, owner, mtime in ns,
extended attribute names), aside and renamed into place at the end; `--verify` reads every
restored file back and compares its SHA-256 with that of the snapshot's bytes.

PATH is resolved inside the snapshot's filesystem: `..` and absolute symbolic links on the way
stay inside it, never reaching the host's files. A symbolic link as PATH's last component is
restored as the link itself.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    source: str  # the first PATH (of `paths`), kept for scripts that restore one
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
    paths: list[dict[str, str]] = field(default_factory=list)  # each {"source", "dest"}
    missing: list[str] = field(default_factory=list)  # PATHs not in the snapshot
    not_kept: list[str] = field(default_factory=list)  # what DEST refused: ownership, xattrs
    verified: int | None = None  # files read back and matched (with --verify)
    mismatched: list[str] = field(default_factory=list)  # files that did not match
    manifest: str | None = None

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


class EntryLog:
    """The restored entries as JSON lines, written aside and renamed into place at the end.

    Opened before anything is mounted, so a path that cannot be written is refused first. The
    manifest of `--manifest`; with only `--verify`, a private file the check reads back (the
    list of a large tree is not held in memory).
    """

    def __init__(self, path: str, *, keep: bool) -> None:
        self.path = os.path.abspath(path)
        self.keep = keep
        directory, name = os.path.split(self.path)
        self.temporary = os.path.join(directory, f".{name}.ebsfuse-{secrets.token_hex(4)}")
        if keep and os.path.isdir(self.path):
            raise UsageError(f"cannot write the manifest {self.path}: it is a directory")
        try:
            self._file = open(self.temporary, "x", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise UsageError(f"cannot write the manifest {self.path}: {exc.strerror}") from None

    def write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def entries(self) -> Any:
        """The entries written so far (for the check), read back one at a time."""
        self._file.flush()
        with open(self.temporary, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def close(self, *, complete: bool) -> None:
        self._file.close()
        if complete and self.keep:
            os.rename(self.temporary, self.path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temporary)


class _Copier:
    """Recursive copy keeping metadata; counts what it restored, logs each entry."""

    def __init__(self, log_to: EntryLog | None = None) -> None:
        self.files = self.directories = self.symlinks = self.other = 0
        self.bytes = 0
        self.links: dict[tuple[int, int], str] = {}
        self.is_root = os.geteuid() == 0
        self.warned: set[str] = set()
        self.not_kept: list[str] = []
        self.log_to = log_to
        self.renaming = ("", "")  # (temporary name, final name) of the PATH being copied

    def copy(self, src: str, dst: str, inside: str) -> None:
        """Copy `src` (at `inside` in the snapshot) to `dst`, a name that does not exist."""
        st = os.lstat(src)
        mode = st.st_mode
        entry: dict[str, Any] = {"path": inside, "written": dst}
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)
            self.directories += 1
            entry["kind"] = "directory"
            with os.scandir(src) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                child = os.path.join(inside, name)
                self.copy(os.path.join(src, name), os.path.join(dst, name), child)
        elif stat.S_ISLNK(mode):
            entry.update(kind="symlink", target=os.readlink(src))
            os.symlink(entry["target"], dst)
            self.symlinks += 1
        else:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], dst)  # a hard link within the restored tree
                self._log(entry | {"kind": "hardlink", "link_to": self.links[key]})
                return
            if stat.S_ISREG(mode):
                copied, digest = _copy_data(src, dst)
                self.bytes += copied
                self.files += 1
                entry.update(kind="file", size=st.st_size, sha256=digest)
            elif stat.S_ISFIFO(mode):
                os.mkfifo(dst, 0o600)
                self.other += 1
                entry["kind"] = "fifo"
            elif (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and self.is_root:
                os.mknod(dst, stat.S_IFMT(mode) | 0o600, st.st_rdev)
                self.other += 1
                entry.update(kind="device", rdev=st.st_rdev)
            else:
                self._warn(f"skipped {src}: cannot recreate this kind of file", "kind")
                return
            if st.st_nlink > 1:
                self.links[key] = dst
        entry["xattrs"] = self._metadata(src, dst, st)
        entry.update(
            mode=f"{stat.S_IMODE(mode):04o}", uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns
        )
        self._log(entry)

    def _log(self, entry: dict[str, Any]) -> None:
        if self.log_to is not None:
            for key in ("written", "link_to"):
                if key in entry:
                    entry[key] = self.final_name(entry[key])
            self.log_to.write(entry)

    def final_name(self, path: str) -> str:
        """Where `path`, written under the PATH's temporary name, will be once renamed."""
        temporary, final = self.renaming
        return final + path[len(temporary) :] if path.startswith(temporary) else path

    def _metadata(self, src: str, dst: str, st: os.stat_result) -> list[str]:
        """Owner, mode, extended attributes, times: in that order, which the kernel needs.

        chown clears the set-id bits and `security.capability`, so it goes first; the mode
        next; then the attributes (a POSIX ACL agrees with the mode it came with); the times
        last, since every change before them moves ctime and some move mtime.
        """
        link = stat.S_ISLNK(st.st_mode)
        try:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        except PermissionError:  # not root, or a destination without owners (vfat)
            if "ownership" not in self.not_kept:
                self.not_kept.append("ownership")  # reported once, in the summary
        if not link:
            os.chmod(dst, stat.S_IMODE(st.st_mode))
        names = self._xattrs(src, dst)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return names

    def _xattrs(self, src: str, dst: str) -> list[str]:
        """Copy the extended attributes; the names kept."""
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            return []
        kept = []
        for name in sorted(names):
            try:
                value = os.getxattr(src, name, follow_symlinks=False)
                os.setxattr(dst, name, value, follow_symlinks=False)
                kept.append(name)
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL):
                    raise
                if name not in self.not_kept:
                    self.not_kept.append(name)  # reported once, in the summary
        return kept

    def _warn(self, message: str, key: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)


def _copy_data(src: str, dst: str) -> tuple[int, str]:
    """Copy a regular file's bytes, keeping holes as holes: (bytes copied, SHA-256 of the
    content as read, holes as zeros)."""
    copied = 0
    digest = hashlib.sha256()
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        size = os.fstat(fin.fileno()).st_size
        at = 0
        for start, end in _data_ranges(fin.fileno(), size):
            _hash_zeros(digest, start - at)
            offset = start
            while offset < end:
                chunk = os.pread(fin.fileno(), min(COPY_CHUNK, end - offset), offset)
                if not chunk:
                    raise EbsfuseError(f"{src}: the file ended early at byte {offset}")
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fout.fileno(), view, offset)
                    view = view[written:]
                    offset += written
            copied += end - start
            at = end
        _hash_zeros(digest, size - at)
        os.ftruncate(fout.fileno(), size)
    return copied, digest.hexdigest()


_ZEROS = bytes(COPY_CHUNK)


def _hash_zeros(digest: Any, count: int) -> None:
    while count > 0:
        digest.update(_ZEROS[: min(count, COPY_CHUNK)])
        count -= COPY_CHUNK


def file_sha256(path: str) -> str:
    """SHA-256 of a file's content as it reads now."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_entries(entries: Any) -> tuple[int, list[str]]:
    """Read every restored file back: (files that matched, paths written that did not)."""
    matched, mismatched = 0, []
    for entry in entries:
        if entry.get("kind") != "file":
            continue
        try:
            same = file_sha256(entry["written"]) == entry["sha256"]
        except OSError:
            same = False
        if same:
            matched += 1
        else:
            mismatched.append(entry["written"])
    return matched, mismatched


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


def plan_destinations(paths: list[str], dest: str, snapshot_id: str) -> list[tuple[str, str]]:
    """(directory, name) for each PATH, like cp with several sources: DEST must then be an
    existing directory, and no two PATHs may end in the same name there."""
    if len(paths) == 1:
        return [plan_destination(paths[0], dest, snapshot_id)]
    dest = os.path.abspath(dest)
    if not os.path.isdir(dest):
        raise UsageError(
            f"cannot restore {len(paths)} paths to {dest}: "
            "with several, DEST must be an existing directory"
        )
    planned: list[tuple[str, str]] = []
    by_name: dict[str, str] = {}
    for path in paths:
        directory, name = plan_destination(path, dest, snapshot_id)
        if name in by_name:
            raise UsageError(
                f"{by_name[name]} and {path} would both be restored as {os.path.join(dest, name)}"
            )
        by_name[name] = path
        planned.append((directory, name))
    return planned


def restore(
    snapshot_id: str,
    paths: list[str] | str,
    dest: str,
    *,
    partition: int | None,
    mount_options: MountOptions,
    manifest: str | None = None,
    verify: bool = False,
    before_verify: Callable[[], None] | None = None,
) -> RestoreResult:
    """Restore each PATH from the snapshot to DEST; raise `RestoreInterrupted` on Ctrl-C.

    PATHs missing in the snapshot are skipped and named in `missing`; files that did not read
    back right (`verify`) are named in `mismatched`. `before_verify` runs between the copy and
    the check (a caller's own step there; the tests alter a restored file with it).
    """
    started = time.monotonic()
    paths = [paths] if isinstance(paths, str) else list(paths)
    validate_snapshot_id(snapshot_id)
    planned = plan_destinations(paths, dest, snapshot_id)
    # The manifest is opened first: a path that cannot be written is refused before any mount.
    # With --verify alone, the check's own list goes beside the chains' directories.
    private = os.path.join(runtime_dir(), f"restore-{os.getpid()}-{secrets.token_hex(4)}")
    entry_log = EntryLog(manifest, keep=True) if manifest else None
    if entry_log is None and verify:
        os.makedirs(runtime_dir(), mode=0o700, exist_ok=True)
        entry_log = EntryLog(f"{private}.entries", keep=False)
    complete = False
    try:
        copier = _Copier(entry_log)
        job = _Job(snapshot_id, paths, planned, dest, partition, mount_options, private)
        result = _restore_through_chain(job, copier)
        result.seconds = time.monotonic() - started
        if entry_log is not None and verify:
            if before_verify is not None:
                before_verify()
            result.verified, result.mismatched = verify_entries(entry_log.entries())
        result.manifest = entry_log.path if entry_log is not None and manifest else None
        complete = True
    finally:
        if entry_log is not None:
            entry_log.close(complete=complete)
    return result


@dataclass
class _Job:
    """What one restore copies from where to where, through which private mount."""

    snapshot_id: str
    paths: list[str]
    planned: list[tuple[str, str]]  # each PATH's (directory, name)
    dest: str
    partition: int | None
    mount_options: MountOptions
    private: str  # the chain's own directory


def _restore_through_chain(job: _Job, copier: _Copier) -> RestoreResult:
    """Mount the snapshot's filesystem privately, copy each PATH, tear everything down."""
    os.makedirs(job.private, mode=0o700)
    chain = Chain(job.snapshot_id, job.private, os.path.join(job.private, "fs"), owns_target=True)
    planned = job.planned
    restored: list[dict[str, str]] = []
    missing: list[str] = []
    try:
        chain.start_daemon(job.mount_options)
        selected = chain.select(job.partition)
        chain.attach(selected)
        chain.mount_filesystem()
        for path, (directory, name) in zip(job.paths, planned, strict=True):
            final = os.path.join(directory, name)
            if _restore_one(chain.target, path, final, copier):
                restored.append({"source": inside(path), "dest": final})
            else:
                missing.append(path)
        counters = chain.stats()
    except KeyboardInterrupt:
        raise RestoreInterrupted(_interrupted(restored, planned)) from None
    except OSError as exc:
        where = exc.filename or job.dest
        if chain.target and isinstance(where, str) and where.startswith(chain.target):
            where = where[len(chain.target) :] or "/"
        raise EbsfuseError(f"restore failed: {where}: {exc.strerror or exc}") from None
    finally:
        chain.teardown()
    return _result(job.snapshot_id, selected, copier, counters, restored, missing)


def inside(path: str) -> str:
    """PATH as an absolute path inside the snapshot (`a//b/` -> `/a/b`)."""
    return "/" + "/".join(p for p in path.split("/") if p)


def _restore_one(root: str, path: str, final: str, copier: _Copier) -> bool:
    """Copy PATH to `final` through a temporary name; False if the snapshot has no PATH."""
    try:
        source = resolve_in_root(root, path)
    except UsageError:
        return False  # named in the result's `missing`, and by the command
    temporary = os.path.join(
        os.path.dirname(final), f".{os.path.basename(final)}.ebsfuse-restore-{secrets.token_hex(4)}"
    )
    copier.renaming = (temporary, final)
    try:
        copier.copy(source, temporary, inside(path))
        os.rename(temporary, final)
    except BaseException:
        _remove(temporary)
        raise
    st = os.lstat(source)
    # Renaming touched nothing but ctime; set the times again anyway (cheap, certain).
    os.utime(final, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    return True


def _interrupted(restored: list[dict[str, str]], planned: list[tuple[str, str]]) -> str:
    if not restored:
        finals = ", ".join(os.path.join(d, n) for d, n in planned)
        return f"interrupted; nothing was restored to {finals}"
    done = ", ".join(r["dest"] for r in restored)
    return f"interrupted; restored only {done} (nothing half-written left)"


def _result(
    snapshot_id: str,
    selected: Any,
    copier: _Copier,
    counters: dict[str, Any],
    restored: list[dict[str, str]],
    missing: list[str],
) -> RestoreResult:
    fetched = int(counters.get("bytes_fetched", 0))
    first = restored[0] if restored else {"source": "", "dest": ""}
    return RestoreResult(
        snapshot_id=snapshot_id,
        source=first["source"],
        dest=first["dest"],
        partition=selected.partition,
        fstype=selected.fstype,
        files=copier.files,
        directories=copier.directories,
        symlinks=copier.symlinks,
        other=copier.other,
        bytes_restored=copier.bytes,
        bytes_fetched=fetched,
        blocks_fetched=fetched // BLOCK_SIZE,
        seconds=0.0,  # set by the caller, which knows when the restore began
        blocks_from_cache=int(counters.get("saved", {}).get("requests", 0)),
        paths=restored,
        missing=missing,
        not_kept=list(copier.not_kept),
    )


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
