"""`ebsfuse download`: a snapshot to a sparse file or a block device, verified and resumable.

Data path: the one block pipeline (`core.pipeline.ordered_blocks`) lists the snapshot (or, for
`--base`, ListChangedBlocks) and fetches its blocks `workers` at a time, each checked for length
and SHA-256 before a byte is used and retried by the shared policy; they arrive in ascending
order and are written with `pwrite` at their offsets. Blocks of zeros are not written to a fresh
file, so holes stay holes.

Blocks are written the moment they arrive (the stream's sink), out of order; the stream still
reports them in ascending order, which is what the resume mark follows. Memory is bounded
whatever the volume size: one listing range (at most 10,000 entries), a window of
`WINDOW_PER_WORKER * workers` indexes, and the blocks of the requests in flight.

Resume: the output is written to `DEST.partial` (renamed to DEST only once every block is in
place, so a file named DEST is always complete) and a small JSON sidecar `DEST.partial.state`
records progress as a low-water mark: every block below `done_below` is written. The few
blocks above it that finished early (within the window) are not claimed, and a resume fetches
them again; `done_extra`, such blocks as an older version recorded them, is still honoured. The
sidecar is rewritten every
`CHECKPOINT_INTERVAL_S` seconds, after an `fdatasync` of the data it vouches for, so after a
kill, a crash or Ctrl-C `--resume` lists from `done_below` and fetches only the rest. For a
block device DEST the sidecar lives in the state directory
(`$XDG_STATE_HOME/ebsfuse`, default `~/.local/state/ebsfuse`).

`--base OLD`: DEST holds OLD's image; only the blocks ListChangedBlocks names are fetched, and
blocks the new snapshot no longer has become zeros. A file DEST is renamed to DEST.partial
while it is being changed, so an interrupted update never passes for either snapshot's image.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from .. import BLOCK_SIZE
from ..core.blockmap import BlockMap
from ..core.pipeline import (
    DESCRIBE_PAGE,
    WALK_PAGE,
    describe,
    open_changes,
    open_snapshot,
    ordered_blocks,
    run_interruptibly,
    tool_context,
)
from ..core.reader import FetchContext, SnapshotReader
from ..ebs.client import ChangedBlock, EbsClient, validate_snapshot_id
from ..ebs.errors import EbsfuseError
from ..ebs.retry import RetryPolicy
from .progress import Progress

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
STATE_SUFFIX = ".state"
STATE_VERSION = 1
# How often the resume sidecar is rewritten. Each checkpoint costs one fdatasync (the data it
# vouches for must be on disk first); every 2 s bounds the work a crash loses to 2 s of
# transfer while keeping the syncs rare enough not to matter for throughput.
CHECKPOINT_INTERVAL_S = 2.0
# Blocks listed ahead of the oldest unfinished one, per worker: four keeps every worker busy
# while one block is slow or being retried. Blocks are written as they arrive, so the window
# holds indexes, not bytes: memory is the requests in flight.
WINDOW_PER_WORKER = 4
ZERO_BLOCK = bytes(BLOCK_SIZE)
# ioctl(BLKZEROOUT, [offset, length]): the device zeroes the range itself (loop devices punch
# a hole in their file; SSDs use write-zeroes or discard), far cheaper than writing zeros.
BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class DownloadInterrupted(EbsfuseError):
    """Ctrl-C (or SIGTERM) during a download; the state on disk is resumable."""


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


# -- the download ---------------------------------------------------------------------------


@dataclass
class DownloadOptions:
    workers: int = 64
    force: bool = False
    resume: bool = False
    base_snapshot_id: str | None = None
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    progress: bool = False
    cache_dir: str | None = None
    cache_dir_size: int | None = None


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
    ctx = tool_context(
        client,
        opts.workers,
        opts.policy,
        cache_dir=opts.cache_dir,
        cache_dir_size=opts.cache_dir_size,
    )
    job = _Download(ctx, snapshot_id, plan, opts)
    try:
        result = run_interruptibly(job.run)
    except KeyboardInterrupt:
        raise DownloadInterrupted(job.interrupted_message()) from None
    finally:
        ctx.close()
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


class _Download:
    """One download on trio: what is fetched, where it is written, how far it got."""

    def __init__(
        self, ctx: FetchContext, snapshot_id: str, plan: _Plan, opts: DownloadOptions
    ) -> None:
        self.ctx = ctx
        self.snapshot_id = snapshot_id
        self.plan = plan
        self.opts = opts
        self.done_below = plan.state.done_below if plan.state is not None else 0
        self._fd = -1
        self._last_checkpoint = time.monotonic()
        self._counts = threading.Lock()  # the sink's writer threads count into the result

    async def run(self) -> DownloadResult:
        base = self.opts.base_snapshot_id
        # Unknown or unrelated snapshots fail here, before anything is written.
        # A full download walks the whole listing: its first page is that walk's first.
        page = WALK_PAGE if base is None else DESCRIBE_PAGE
        info = await describe(self.ctx, self.snapshot_id, max_results=page)
        reader = open_snapshot(self.ctx, info)
        changes = base_volume = None
        if base is not None:
            base_volume = (await describe(self.ctx, base)).size_bytes
            changes, _ = await open_changes(self.ctx, base, self.snapshot_id, reader.stats)
        result = DownloadResult(
            snapshot_id=self.snapshot_id,
            base_snapshot_id=base,
            dest=self.plan.dest,
            volume_size=info.size_bytes,
            resumed=self.plan.resumed,
        )
        self._fd = _open_output(
            self.plan, self.opts, self.snapshot_id, info.size_bytes, base_volume
        )
        try:
            await self._transfer(reader, changes, info.num_blocks, result)
            if not self.plan.device and os.fstat(self._fd).st_size != info.size_bytes:
                os.ftruncate(self._fd, info.size_bytes)  # an incremental to a smaller volume
            os.fsync(self._fd)
        except OSError as exc:
            raise _write_error(self.plan, exc) from None
        finally:
            os.close(self._fd)
        return result

    @property
    def _state(self) -> DownloadState:
        assert self.plan.state is not None  # _open_output made or loaded it
        return self.plan.state

    async def _wanted(
        self, reader: SnapshotReader, changes: BlockMap[ChangedBlock] | None, skip: set[int]
    ) -> AsyncGenerator[tuple[int, bool], None]:
        """(index, fetch?) of every block to write from `done_below` on, ascending."""
        if changes is None:
            async for index, _ in reader.blockmap.listed(self.done_below):
                yield index, index not in skip
        else:
            async for index, change in changes.listed(self.done_below):
                # Only the base has it (no second token): the new image reads zeros there.
                yield index, index not in skip and change.second_token is not None

    async def _transfer(
        self,
        reader: SnapshotReader,
        changes: BlockMap[ChangedBlock] | None,
        nblocks: int,
        result: DownloadResult,
    ) -> None:
        skip = set(self._state.done_extra)  # from an older version: bounded by its window
        # A full download to a device must zero what the snapshot does not list; a file starts
        # as one big hole. An incremental leaves unlisted (unchanged) blocks alone.
        zero_gaps = self.plan.device and changes is None
        window = WINDOW_PER_WORKER * self.ctx.max_concurrency
        wanted = self._wanted(reader, changes, skip)
        sink = functools.partial(self._put, skip, changes is not None, result)
        with Progress(self.snapshot_id, nblocks, enabled=self.opts.progress) as bar:
            bar.advance(0, self.done_below)
            try:
                async with ordered_blocks(reader, wanted, window, sink) as blocks:
                    async for index, _ in blocks:
                        if zero_gaps:
                            self._zero_blocks(self.done_below, index)
                        self.done_below = index + 1
                        bar.advance(0, self.done_below)
                        await self._checkpoint()
                if zero_gaps:
                    self._zero_blocks(self.done_below, nblocks)
            finally:
                # Whatever ended the transfer (done, a failure, an interrupt): record how far
                # it got. Blocking, as cleanup under a cancelled scope must be.
                self._save_state()

    def _put(
        self,
        skip: set[int],
        incremental: bool,
        result: DownloadResult,
        index: int,
        data: bytes | None,
    ) -> None:
        """The stream's sink: write one block as it arrives (or zeros where the new image has
        none) at its offset, in a writer thread. Out of order; `done_below` follows the
        stream's order."""
        with self._counts:
            result.blocks_listed += 1
        if index in skip:
            with self._counts:
                result.blocks_already_done += 1
            return
        offset = index * BLOCK_SIZE
        if data is None:
            if incremental or not self.plan.fresh:
                zero_range(self._fd, offset, BLOCK_SIZE, self.plan.device)
            with self._counts:
                result.blocks_zeroed += incremental
            return
        zero = data == ZERO_BLOCK
        if not zero:
            _pwrite_all(self._fd, data, offset)
        elif not self.plan.fresh:
            zero_range(self._fd, offset, BLOCK_SIZE, self.plan.device)
        with self._counts:
            result.blocks_fetched += 1
            result.zero_blocks += zero
            result.bytes_written += 0 if zero else len(data)

    def _zero_blocks(self, start: int, end: int) -> None:
        if end > start:
            zero_range(self._fd, start * BLOCK_SIZE, (end - start) * BLOCK_SIZE, True)

    async def _checkpoint(self) -> None:
        """Every CHECKPOINT_INTERVAL_S: sync the data, then record how far it got."""
        if time.monotonic() - self._last_checkpoint < CHECKPOINT_INTERVAL_S:
            return
        done_below = self.done_below
        # The data first: the state must never vouch for unwritten blocks. In a thread, so
        # fetches go on meanwhile; run to its end even if cancelled.
        await trio.to_thread.run_sync(os.fdatasync, self._fd)
        self._record(done_below)

    def _save_state(self) -> None:
        try:
            os.fdatasync(self._fd)
            self._record(self.done_below)
        except OSError as exc:
            log.warning("could not save the resume state: %s", exc)

    def _record(self, done_below: int) -> None:
        state = self._state
        state.done_below = done_below
        state.done_extra = [i for i in state.done_extra if i >= done_below]
        state.save(self.plan.state_path)
        self._last_checkpoint = time.monotonic()

    def interrupted_message(self) -> str:
        return (
            f"interrupted at block {self.done_below}; the partial download is kept at "
            f"{self.plan.work_path}: run the same command with --resume to continue"
        )


def _write_error(plan: _Plan, exc: OSError) -> EbsfuseError:
    if exc.errno == errno.ENOSPC:
        return EbsfuseError(f"{plan.work_path}: no space left on the device")
    return EbsfuseError(f"cannot write {exc.filename or plan.work_path}: {exc.strerror}")
