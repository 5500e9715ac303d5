"""The disk tier: verified blocks kept in a directory, shared by every command and process.

Layout of a cache directory (created 0700, entries 0600):

    ebsfuse-cache            marker: this directory is an ebsfuse block cache, version 1
    lock                     flock(2) for the usage count and eviction (all processes)
    usage                    bytes held by entries, as decimal text, rewritten under the lock
    tmp/<pid>-<random>       an entry being written
    blocks/<snapshot-id>/<block index, 12 hex digits>

An entry is `MAGIC`, the block's SHA-256 (32 bytes, the digest the service sent and the block was
verified against), then the 512 KiB block. Only verified blocks are stored, and every read
checks the whole entry again: length, magic, and the SHA-256 of the bytes. A corrupted or
truncated entry is dropped (logged with its path) and the caller fetches the block again, so a
damaged cache costs requests, never a wrong byte.

Crash safety: an entry is written whole under `tmp/` and renamed into place, so a name under
`blocks/` only ever points at a complete file; the check on read covers what no rename can (a
power cut before the data reached the disk, a flipped bit later). A process killed mid-write
leaves a file under `tmp/`, removed by the next process that opens the cache once its writer is
gone.

Size: the usage count is shared through the `usage` file under the lock, so any number of
processes filling one directory keep it under its limit together. Before an entry is renamed
into place, entries are evicted, least recently used first (a hit sets an entry's mtime), until
the new one fits under `EVICT_TO` of the limit; eviction re-counts the directory as it goes,
so the count heals after a crash.

Every method is blocking and thread-safe: the reader calls them from its worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from .. import BLOCK_SIZE
from ..ebs.errors import EbsfuseError
from ..ebs.ids import validate_snapshot_id
from .procs import pid_alive

log = logging.getLogger(__name__)

MARKER = "ebsfuse-cache"
MARKER_TEXT = "ebsfuse block cache 1\n"
MAGIC = b"EBSFBLK1"
_OWN_NAMES = {MARKER, "lock", "usage", "blocks", "tmp"}
DIGEST_SIZE = 32
ENTRY_SIZE = len(MAGIC) + DIGEST_SIZE + BLOCK_SIZE
# Eviction frees room down to this share of the limit, so one scan of the directory serves
# many stores instead of one scan per block once the cache is full.
EVICT_TO = 0.9
# Without --cache-dir-size: this share of the file system's free space (plus what the cache
# already holds), so a cache never fills a disk by default.
DEFAULT_SHARE_OF_FREE = 0.10


# A disk that answers these will not take the next block either: stop writing, go on reading.
_DISK_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class CacheDirError(EbsfuseError):
    """A cache directory that cannot be used, said in one line."""


@dataclass
class DiskStats:
    """What the disk tier did in this process, and what the directory holds."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    corrupt_dropped: int = 0
    write_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DiskCache:
    """Verified blocks of any snapshot in one directory, bounded by `max_bytes`."""

    def __init__(self, directory: str, max_bytes: int | None = None) -> None:
        self.directory = os.path.abspath(directory)
        _prepare(self.directory)
        self._blocks = os.path.join(self.directory, "blocks")
        self._tmp = os.path.join(self.directory, "tmp")
        self._thread_lock = threading.Lock()  # flock excludes processes, not threads
        self._lock_fd = _open_private(os.path.join(self.directory, "lock"))
        self._usage_fd = _open_private(os.path.join(self.directory, "usage"))
        self.stats = DiskStats()
        self.writable = True  # False once the disk refused a write: reads go on
        with self._locked():
            self._remove_orphans()
            usage = self._recount()
        if max_bytes is None:
            free = shutil.disk_usage(self.directory).free
            max_bytes = int((free + usage) * DEFAULT_SHARE_OF_FREE)
        if max_bytes < ENTRY_SIZE:
            raise CacheDirError(
                f"cache directory {self.directory}: a size of {max_bytes} bytes holds no block"
            )
        self.max_bytes = max_bytes

    def close(self) -> None:
        os.close(self._lock_fd)
        os.close(self._usage_fd)

    # -- reading ----------------------------------------------------------------------------

    def get(self, snapshot_id: str, index: int) -> bytes | None:
        """The verified block, or None when the cache does not hold it whole and correct."""
        path = self._path(snapshot_id, index)
        try:
            with open(path, "rb") as f:
                entry = f.read(ENTRY_SIZE + 1)  # buffered: read() loops until n or EOF
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as exc:
            log.warning("disk cache: cannot read %s: %s", path, exc.strerror)
            self.stats.misses += 1
            return None
        data = _checked(entry)
        if data is None:
            log.warning("disk cache: %s is damaged (%d bytes); dropped", path, len(entry))
            self.stats.corrupt_dropped += 1
            self._discard(path)
            self.stats.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: evicted last
        self.stats.hits += 1
        return data

    def __contains__(self, key: tuple[str, int]) -> bool:
        return os.path.exists(self._path(*key))

    # -- writing ----------------------------------------------------------------------------

    def put(
        self, snapshot_id: str, index: int, data: bytes | memoryview, digest: bytes | None = None
    ) -> None:
        """Store a verified block with its SHA-256 (`digest`, the one it was just checked
        against, else computed here). Never raises: a disk that refuses the write turns the
        tier's writing off, with one log line."""
        if not self.writable or len(data) != BLOCK_SIZE:
            return
        path = self._path(snapshot_id, index)
        if os.path.exists(path):
            return
        if digest is None or len(digest) != DIGEST_SIZE:
            digest = hashlib.sha256(data).digest()
        tmp = os.path.join(self._tmp, f"{os.getpid()}-{secrets.token_hex(8)}")
        try:
            _write_new(tmp, MAGIC + digest, data)
            with self._locked():
                if os.path.exists(path):
                    os.unlink(tmp)  # another process stored it meanwhile
                    return
                self._make_room(ENTRY_SIZE)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                os.rename(tmp, path)
                self._add_usage(ENTRY_SIZE)
            self.stats.stores += 1
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        with self._thread_lock:
            self.stats.write_errors += 1
            first = self.writable
            if exc.errno in _DISK_REFUSALS:
                self.writable = False
        if exc.errno in _DISK_REFUSALS:
            if first:  # one line, however many workers were writing when the disk refused
                log.warning(
                    "disk cache %s: %s; going on without storing blocks there",
                    self.directory,
                    exc.strerror,
                )
        else:
            log.warning("disk cache %s: cannot store a block: %s", self.directory, exc)

    # -- maintenance ------------------------------------------------------------------------

    def drop(self, snapshot_id: str) -> int:
        """Remove every entry of one snapshot; returns how many there were."""
        validate_snapshot_id(snapshot_id)
        with self._locked():
            folder = os.path.join(self._blocks, snapshot_id)
            count = len(os.listdir(folder)) if os.path.isdir(folder) else 0
            shutil.rmtree(folder, ignore_errors=True)
            self._recount()
        return count

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        with self._locked():
            count = sum(1 for _ in self._entries())
            for name in os.listdir(self._blocks):
                shutil.rmtree(os.path.join(self._blocks, name), ignore_errors=True)
            self._recount()
        return count

    def summary(self) -> dict[str, object]:
        """Entries and bytes per snapshot, from the directory itself."""
        per_snapshot: dict[str, int] = {}
        for snapshot_id, _ in self._entries():
            per_snapshot[snapshot_id] = per_snapshot.get(snapshot_id, 0) + 1
        entries = sum(per_snapshot.values())
        return {
            "directory": self.directory,
            "entries": entries,
            "bytes": entries * ENTRY_SIZE,
            "snapshots": {
                sid: {"blocks": n, "bytes": n * ENTRY_SIZE}
                for sid, n in sorted(per_snapshot.items())
            },
        }

    # -- internals --------------------------------------------------------------------------

    def _path(self, snapshot_id: str, index: int) -> str:
        return os.path.join(self._blocks, snapshot_id, f"{index:012x}")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _usage(self) -> int:
        text = os.pread(self._usage_fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0

    def _set_usage(self, value: int) -> None:
        encoded = f"{max(0, value)}\n".encode()
        os.pwrite(self._usage_fd, encoded.ljust(24), 0)

    def _add_usage(self, delta: int) -> None:
        self._set_usage(self._usage() + delta)

    def _make_room(self, needed: int) -> None:
        """Under the lock: evict least recently used entries until `needed` more bytes fit."""
        if self._usage() + needed <= self.max_bytes:
            return
        entries = []
        for snapshot_id, name in self._entries():
            path = os.path.join(self._blocks, snapshot_id, name)
            with contextlib.suppress(FileNotFoundError):
                entries.append((os.stat(path).st_mtime_ns, path))
        entries.sort()
        usage = len(entries) * ENTRY_SIZE
        target = int(self.max_bytes * EVICT_TO) - needed
        for _, path in entries:
            if usage <= target:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                self.stats.evictions += 1
            usage -= ENTRY_SIZE
        self._set_usage(usage)

    def _discard(self, path: str) -> None:
        with self._locked():
            try:
                os.unlink(path)
            except FileNotFoundError:
                return
            self._add_usage(-ENTRY_SIZE)

    def _entries(self) -> Iterator[tuple[str, str]]:
        for snapshot_id in os.listdir(self._blocks):
            folder = os.path.join(self._blocks, snapshot_id)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(folder):
                    yield snapshot_id, name

    def _recount(self) -> int:
        usage = sum(1 for _ in self._entries()) * ENTRY_SIZE
        self._set_usage(usage)
        return usage

    def _remove_orphans(self) -> None:
        """Entries being written by processes that no longer run (killed mid-write)."""
        for name in os.listdir(self._tmp):
            pid_text = name.split("-", 1)[0]
            if pid_text.isdigit() and pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._tmp, name))


def _checked(entry: bytes) -> bytes | None:
    """The block of a whole, intact entry, else None."""
    if len(entry) != ENTRY_SIZE or not entry.startswith(MAGIC):
        return None
    digest = entry[len(MAGIC) : len(MAGIC) + DIGEST_SIZE]
    data = entry[len(MAGIC) + DIGEST_SIZE :]
    if hashlib.sha256(data).digest() != digest:
        return None
    return data


def _write_new(path: str, header: bytes, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for part in (header, data):
            view = memoryview(part)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _open_private(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _prepare(directory: str) -> None:
    """Create or check a cache directory: ours, private, writable; else one clear line."""
    where = f"cache directory {directory}"
    try:
        if not os.path.lexists(directory):
            os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it meanwhile
                os.mkdir(directory, 0o700)
        info = os.stat(directory)
        if not stat.S_ISDIR(info.st_mode):
            raise CacheDirError(f"{where} is not a directory")
        if info.st_uid != os.geteuid():
            raise CacheDirError(f"{where} belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o022:
            raise CacheDirError(
                f"{where} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                "chmod 700 it or choose another"
            )
        marker = os.path.join(directory, MARKER)
        if not os.path.exists(marker):
            # Only what a cache holds (another process may be creating one right now).
            if set(os.listdir(directory)) - _OWN_NAMES:
                raise CacheDirError(f"{where} is not empty and not an ebsfuse cache")
            with open(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(MARKER_TEXT)
        for sub in ("blocks", "tmp"):
            os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
        probe = os.path.join(directory, "tmp", f"{os.getpid()}-{secrets.token_hex(8)}")
        _write_new(probe, b"", b"")
        os.unlink(probe)
    except CacheDirError:
        raise
    except OSError as exc:
        raise CacheDirError(f"{where}: {exc.strerror}") from None
