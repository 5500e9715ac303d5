"""`ebsfuse download`: a snapshot to a sparse file or a block device, verified and resumable.

Data path: the main thread streams the listing (`BlockLister`: ListSnapshotBlocks, or
ListChangedBlocks for `--base`) and submits one task per listed block to a pool of worker
threads; each worker fetches its block through `EbsClient.get_block` (length and SHA-256
checked before a byte is used), retries with the shared `RetryPolicy`, and writes it with
`pwrite` at its offset. Blocks of zeros are not written to a fresh file, so holes stay holes.

Memory is bounded whatever the volume size: one listing page (at most 10,000 entries), a
window of at most `WINDOW_PER_WORKER * workers` blocks between the oldest unfinished block and
the newest submitted one (index and token only), and one 512 KiB buffer per worker.

Resume: the output is written to `DEST.partial` (renamed to DEST only once every block is in
place, so a file named DEST is always complete) and a small JSON sidecar `DEST.partial.state`
records progress as a low-water mark -- every block below `done_below` is written -- plus the
few blocks above it that finished early (fewer than the window). The sidecar is rewritten every
`CHECKPOINT_INTERVAL_S` seconds, after an `fdatasync` of the data it vouches for, so after a
kill, a crash or Ctrl-C `--resume` lists from `done_below`, skips the recorded blocks, and
fetches only the rest. For a block device DEST the sidecar lives in the state directory
(`$XDG_STATE_HOME/ebsfuse`, default `~/.local/state/ebsfuse`).

`--base OLD`: DEST holds OLD's image; only the blocks ListChangedBlocks names are fetched, and
blocks the new snapshot no longer has become zeros. A file DEST is renamed to DEST.partial
while it is being changed, so an interrupted update never passes for either snapshot's image.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import BLOCK_SIZE
from ..ebs.client import EbsClient, RetryPolicy, validate_snapshot_id
from ..ebs.errors import EbsfuseError
from ..ebs.listing import BlockLister, ListedBlock, VolumeInfo
from .progress import Progress

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STATE_SUFFIX = ".state"
STATE_VERSION = 1
# How often the resume sidecar is rewritten. Each checkpoint costs one fdatasync (the data it
# vouches for must be on disk first); every 2 s bounds the work a crash loses to 2 s of
# transfer while keeping the syncs rare enough not to matter for throughput.
CHECKPOINT_INTERVAL_S = 2.0
# Blocks allowed between the oldest unfinished block and the newest submitted one. It bounds
# the resume sidecar (blocks done above the low-water mark) and the listing entries in memory,
# and keeps every worker busy while one block is slow or being retried.
WINDOW_PER_WORKER = 4
ZERO_BLOCK = bytes(BLOCK_SIZE)
# ioctl(BLKZEROOUT, [offset, length]): the device zeroes the range itself (loop devices punch
# a hole in their file; SSDs use write-zeroes or discard), far cheaper than writing zeros.
BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class DownloadInterrupted(EbsfuseError):
    """Ctrl-C (or SIGTERM) during a download; the state on disk is resumable."""


class _Stopped(Exception):
    """Raised inside a worker when the download is being abandoned."""


@dataclass
class DownloadResult:
    snapshot_id: str
    base_snapshot_id: str | None
    dest: str
    volume_size: int
    blocks_listed: int = 0
    blocks_fetched: int = 0
    blocks_already_done: int = 0
    zero_blocks: int = 0
    blocks_zeroed: int = 0
    bytes_written: int = 0
    resumed: bool = False
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DownloadState:
    """The resume sidecar: what is being downloaded where, and how far it got."""

    snapshot_id: str
    base_snapshot_id: str | None
    dest: str
    work_path: str
    device: bool
    volume_size: int
    done_below: int = 0
    done_extra: list[int] = field(default_factory=list)
    version: int = STATE_VERSION

    @classmethod
    def load(cls, path: str) -> DownloadState:
        try:
            with open(path) as f:
                doc = json.load(f)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            return cls(**doc)
        except (OSError, ValueError, TypeError) as exc:
            raise EbsfuseError(f"cannot read the resume state {path}: {exc}") from None

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "ebsfuse")


def device_state_path(device: str) -> str:
    name = os.path.realpath(device).strip("/").replace("/", "_")
    return os.path.join(state_dir(), f"download-{name}{STATE_SUFFIX}")


# -- zeroing ------------------------------------------------------------------------------

_libc: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _libc.fallocate(fd, mode, offset, length) == 0


def zero_range(fd: int, offset: int, length: int, device: bool) -> None:
    """Make [offset, offset+length) read as zeros: punch a hole, zero out, or write zeros."""
    if length <= 0:
        return
    if device:
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError:
            pass
    elif _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        return
    end = offset + length
    while offset < end:
        n = min(BLOCK_SIZE, end - offset)
        _pwrite_all(fd, ZERO_BLOCK[:n], offset)
        offset += n


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# -- progress bookkeeping -----------------------------------------------------------------


class Tracker:
    """Which submitted blocks are done, as a low-water mark plus a bounded window.

    `inflight` maps block index -> done, in submission (= ascending index) order; finished
    entries at its head are dropped, so its length is the window the producer bounds.
    """

    def __init__(self, start: int) -> None:
        self._cond = threading.Condition()
        self._inflight: dict[int, bool] = {}
        self._next = start  # every index below this was submitted or is a hole
        self.error: BaseException | None = None

    def submitted(self, index: int, done: bool = False) -> None:
        with self._cond:
            self._inflight[index] = done
            self._next = index + 1
            self._trim()

    def finished(self, index: int) -> None:
        with self._cond:
            self._inflight[index] = True
            self._trim()
            self._cond.notify_all()

    def failed(self, error: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self._cond.notify_all()

    def _trim(self) -> None:
        inflight = self._inflight
        while inflight:
            head = next(iter(inflight))
            if not inflight[head]:
                break
            del inflight[head]

    def wait_room(self, window: int, timeout: float) -> None:
        with self._cond:
            if len(self._inflight) >= window and self.error is None:
                self._cond.wait(timeout)

    def room(self, window: int) -> bool:
        with self._cond:
            return len(self._inflight) < window

    def mark(self) -> tuple[int, list[int]]:
        """(done_below, done blocks above it): what a checkpoint may claim."""
        with self._cond:
            # After _trim the head of `inflight`, if any, is the oldest unfinished block.
            low = next(iter(self._inflight), self._next)
            extra = [i for i, done in self._inflight.items() if done and i > low]
            return low, extra


# -- the download ---------------------------------------------------------------------------


@dataclass
class DownloadOptions:
    workers: int = 64
    force: bool = False
    resume: bool = False
    base_snapshot_id: str | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool = False


class _Plan:
    """Where the bytes go and what the output already holds."""

    def __init__(self) -> None:
        self.dest = ""
        self.work_path = ""
        self.state_path = ""
        self.device = False
        self.state: DownloadState | None = None
        self.fresh = True  # the output was created here: unwritten regions already read as zeros
        self.resumed = False


def _is_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _plan(snapshot_id: str, dest: str, opts: DownloadOptions) -> _Plan:
    plan = _Plan()
    plan.dest = os.path.abspath(dest)
    plan.device = _is_device(plan.dest)
    base = opts.base_snapshot_id
    if plan.device:
        plan.work_path = plan.dest
        plan.state_path = device_state_path(plan.dest)
    else:
        if os.path.isdir(plan.dest):
            raise EbsfuseError(f"{dest} is a directory; give the path of the image file to write")
        if os.path.exists(plan.dest) and not os.path.isfile(plan.dest):
            # --force would otherwise rename a regular file over a character device or FIFO.
            raise EbsfuseError(f"{dest} is neither a regular file nor a block device")
        parent = os.path.dirname(plan.dest)
        if not os.path.isdir(parent):
            raise EbsfuseError(f"cannot write {dest}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise EbsfuseError(f"cannot write {dest}: directory {parent} is not writable")
        plan.work_path = plan.dest + PARTIAL_SUFFIX
        plan.state_path = plan.work_path + STATE_SUFFIX
    have_state = os.path.exists(plan.state_path)
    have_partial = plan.device or os.path.exists(plan.work_path)
    if have_state and opts.resume:
        state = DownloadState.load(plan.state_path)
        if state.snapshot_id != snapshot_id or state.base_snapshot_id != base:
            was = state.snapshot_id + (
                f" --base {state.base_snapshot_id}" if state.base_snapshot_id else ""
            )
            raise EbsfuseError(
                f"the interrupted download at {plan.work_path} is of {was}, not this one; "
                "delete it (or use --force without --resume) to start over"
            )
        if not plan.device and not have_partial:
            if base and os.path.exists(plan.dest):
                # Interrupted between writing the state and renaming DEST aside.
                os.rename(plan.dest, plan.work_path)
            else:
                raise EbsfuseError(
                    f"cannot resume: {plan.work_path} is gone; start again without --resume"
                )
        plan.state = state
        plan.resumed = True
        plan.fresh = not plan.device and base is None
        if not plan.device and not base and os.path.exists(plan.dest) and not opts.force:
            raise EbsfuseError(f"{dest} already exists; use --force to overwrite it")
        return plan
    if have_state or (have_partial and not plan.device):
        if opts.resume and not opts.force:
            raise EbsfuseError(
                f"cannot resume: {plan.work_path} has no state file {plan.state_path}; "
                "use --force to start over"
            )
        if not opts.force:
            hint = "continue it with --resume, or use --force to start over"
            raise EbsfuseError(f"an interrupted download is at {plan.work_path}; {hint}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(plan.state_path)
        if not plan.device and not (base and not os.path.exists(plan.dest)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(plan.work_path)
    if base:
        if not plan.device and not os.path.isfile(plan.dest):
            raise EbsfuseError(f"{dest} does not exist; --base needs it to hold {base}'s image")
        plan.fresh = False
    else:
        if plan.device and not opts.force:
            raise EbsfuseError(f"{dest} is a block device; use --force to overwrite it")
        if not plan.device and os.path.exists(plan.dest) and not opts.force:
            raise EbsfuseError(f"{dest} already exists; use --force to overwrite it")
        plan.fresh = not plan.device
    return plan


def download_snapshot(
    client: EbsClient,
    snapshot_id: str,
    dest: str,
    opts: DownloadOptions | None = None,
) -> DownloadResult:
    """Download `snapshot_id` to `dest`; see the module docstring. Raises EbsfuseError."""
    opts = opts or DownloadOptions()
    validate_snapshot_id(snapshot_id)
    base = opts.base_snapshot_id
    if base is not None:
        validate_snapshot_id(base)
        if base == snapshot_id:
            raise EbsfuseError(f"--base {base} is the snapshot being downloaded")
    started = time.monotonic()
    plan = _plan(snapshot_id, dest, opts)
    lister = BlockLister(client, snapshot_id, first_snapshot_id=base, policy=opts.policy)
    info = lister.describe()  # unknown or unrelated snapshots fail here, before any write
    volume = info.volume_bytes
    base_volume = None
    if base is not None:
        base_volume = BlockLister(client, base, policy=opts.policy).describe().volume_bytes
    result = DownloadResult(
        snapshot_id=snapshot_id,
        base_snapshot_id=base,
        dest=plan.dest,
        volume_size=volume,
        resumed=plan.resumed,
    )
    fd = _open_output(plan, opts, snapshot_id, volume, base_volume)
    try:
        _run(client, lister, info, plan, fd, opts, result)
        if plan.device:
            os.fsync(fd)
        else:
            if os.fstat(fd).st_size != volume:
                os.ftruncate(fd, volume)  # an incremental to a smaller volume
            os.fsync(fd)
    finally:
        os.close(fd)
    if not plan.device:
        os.replace(plan.work_path, plan.dest)
        _fsync_dir(os.path.dirname(plan.dest))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(plan.state_path)
    result.seconds = time.monotonic() - started
    log.info(
        "%s: %d blocks fetched, %d zero, %d already done, into %s",
        snapshot_id,
        result.blocks_fetched,
        result.zero_blocks,
        result.blocks_already_done,
        plan.dest,
    )
    return result


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_output(
    plan: _Plan,
    opts: DownloadOptions,
    snapshot_id: str,
    volume: int,
    base_volume: int | None,
) -> int:
    """Open (creating or renaming as needed) the file the blocks go to; write the first state."""
    try:
        if plan.device:
            fd = os.open(plan.work_path, os.O_RDWR)
            size = _device_size(fd)
            if size < volume:
                os.close(fd)
                raise EbsfuseError(
                    f"{plan.dest} is too small: {size} bytes, the volume is {volume} bytes"
                )
            if plan.state is None:
                os.makedirs(os.path.dirname(plan.state_path), exist_ok=True)
                if base_volume is not None and volume > base_volume:
                    # Past OLD's image the device holds anything; the new image reads zeros
                    # there except where ListChangedBlocks names a block. Done before the first
                    # state is saved, so a resume never zeroes blocks already written.
                    zero_range(fd, base_volume, volume - base_volume, True)
        elif plan.state is not None:
            fd = os.open(plan.work_path, os.O_RDWR)
        elif opts.base_snapshot_id is not None:
            size = os.stat(plan.dest).st_size
            if size != base_volume:
                raise EbsfuseError(
                    f"{plan.dest} is {size} bytes but {opts.base_snapshot_id}'s volume is "
                    f"{base_volume} bytes: it does not hold that snapshot's image"
                )
            state = _new_state(plan, snapshot_id, opts, volume)
            state.save(plan.state_path)
            os.rename(plan.dest, plan.work_path)
            plan.state = state
            fd = os.open(plan.work_path, os.O_RDWR)
        else:
            fd = os.open(plan.work_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        if plan.state is not None and plan.state.volume_size != volume:
            os.close(fd)
            raise EbsfuseError(
                f"the interrupted download at {plan.work_path} was of a {plan.state.volume_size}"
                f"-byte volume, the snapshot's is {volume}; start over with --force"
            )
        if not plan.device and os.fstat(fd).st_size != volume:
            # Exactly the volume: grown with zeros, or cut where OLD's volume was larger.
            os.ftruncate(fd, volume)
        if plan.state is None:
            plan.state = _new_state(plan, snapshot_id, opts, volume)
            plan.state.save(plan.state_path)
        return fd
    except OSError as exc:
        raise EbsfuseError(
            f"cannot write {exc.filename or plan.work_path}: {exc.strerror}"
        ) from None


def _new_state(plan: _Plan, snapshot_id: str, opts: DownloadOptions, volume: int) -> DownloadState:
    return DownloadState(
        snapshot_id=snapshot_id,
        base_snapshot_id=opts.base_snapshot_id,
        dest=plan.dest,
        work_path=plan.work_path,
        device=plan.device,
        volume_size=volume,
    )


def _run(
    client: EbsClient,
    lister: BlockLister,
    info: VolumeInfo,
    plan: _Plan,
    fd: int,
    opts: DownloadOptions,
    result: DownloadResult,
) -> None:
    assert plan.state is not None
    state = plan.state
    snapshot_id = lister.snapshot_id
    start = state.done_below
    skip = set(state.done_extra)  # bounded by the previous run's window
    incremental = opts.base_snapshot_id is not None
    # A full download to a device must zero what the snapshot does not list; a file starts
    # as one big hole. An incremental leaves unlisted (unchanged) blocks alone.
    zero_gaps = plan.device and not incremental
    tracker = Tracker(start)
    stop = threading.Event()
    counts_lock = threading.Lock()
    progress = Progress(f"{snapshot_id}", info.nblocks, enabled=opts.progress)
    progress.advance(0, start)
    window = max(16, WINDOW_PER_WORKER * opts.workers)

    def stoppable_sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Stopped()

    def fetch(entry: ListedBlock) -> bytes:
        return lister.fetch(client, entry, opts.policy, sleep=stoppable_sleep)

    def work(entry: ListedBlock) -> None:
        if stop.is_set():
            raise _Stopped()
        offset = entry.index * BLOCK_SIZE
        written = fetched = zero = zeroed = 0
        if entry.token is None:
            # Only the base snapshot has this block: the new image reads zeros there.
            zero_range(fd, offset, BLOCK_SIZE, plan.device)
            zeroed = 1
        else:
            data = fetch(entry)
            fetched = 1
            if data == ZERO_BLOCK:
                zero = 1
                if not plan.fresh:
                    zero_range(fd, offset, BLOCK_SIZE, plan.device)
            else:
                _pwrite_all(fd, data, offset)
                written = len(data)
        tracker.finished(entry.index)
        with counts_lock:
            result.blocks_fetched += fetched
            result.zero_blocks += zero
            result.blocks_zeroed += zeroed
            result.bytes_written += written
        progress.advance(BLOCK_SIZE * fetched)

    def done_callback(future: concurrent.futures.Future[None]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None and not isinstance(error, _Stopped):
            stop.set()
            tracker.failed(error)

    last_checkpoint = time.monotonic()

    def checkpoint(force: bool = False) -> None:
        nonlocal last_checkpoint
        now = time.monotonic()
        if not force and now - last_checkpoint < CHECKPOINT_INTERVAL_S:
            return
        last_checkpoint = now
        low, extra = tracker.mark()
        os.fdatasync(fd)  # the data first: the state must never vouch for unwritten blocks
        state.done_below = low
        state.done_extra = extra
        state.save(plan.state_path)
        progress.advance(0, low)

    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=opts.workers, thread_name_prefix="ebsfuse-download"
    )
    zeroed_to = start  # device: every index below this is written, zeroed or pending
    try:
        try:
            for entry in lister.iterate(start):
                if zero_gaps and entry.index > zeroed_to:
                    zero_range(
                        fd, zeroed_to * BLOCK_SIZE, (entry.index - zeroed_to) * BLOCK_SIZE, True
                    )
                zeroed_to = entry.index + 1
                result.blocks_listed += 1
                if entry.index in skip:
                    tracker.submitted(entry.index, done=True)
                    result.blocks_already_done += 1
                    continue
                while not tracker.room(window) and tracker.error is None:
                    tracker.wait_room(window, 0.5)
                    checkpoint()
                if tracker.error is not None:
                    break
                tracker.submitted(entry.index)
                pool.submit(work, entry).add_done_callback(done_callback)
                checkpoint()
            if zero_gaps and tracker.error is None and info.nblocks > zeroed_to:
                zero_range(
                    fd, zeroed_to * BLOCK_SIZE, (info.nblocks - zeroed_to) * BLOCK_SIZE, True
                )
            while not tracker.room(1) and tracker.error is None:
                tracker.wait_room(1, 0.5)
                checkpoint()
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        _final_checkpoint(checkpoint)
        progress.close()
        raise DownloadInterrupted(_interrupted_message(plan, tracker)) from None
    except EbsfuseError:
        _final_checkpoint(checkpoint)
        progress.close()
        raise
    except OSError as exc:
        _final_checkpoint(checkpoint)
        progress.close()
        raise EbsfuseError(f"cannot write {plan.work_path}: {exc.strerror}") from None
    progress.close()
    if tracker.error is not None:
        _final_checkpoint(checkpoint)
        error = tracker.error
        if isinstance(error, EbsfuseError):
            raise error
        if isinstance(error, OSError):
            if error.errno == errno.ENOSPC:
                raise EbsfuseError(f"{plan.work_path}: no space left on the device") from None
            raise EbsfuseError(f"cannot write {plan.work_path}: {error.strerror}") from None
        raise error


def _final_checkpoint(checkpoint: Callable[..., None]) -> None:
    try:
        checkpoint(True)
    except OSError as exc:
        log.warning("could not save the resume state: %s", exc)


def _interrupted_message(plan: _Plan, tracker: Tracker) -> str:
    low, _ = tracker.mark()
    where = plan.work_path
    return (
        f"interrupted at block {low}; the partial download is kept at {where}: "
        "run the same command with --resume to continue"
    )
