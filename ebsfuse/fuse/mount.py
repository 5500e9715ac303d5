"""The mount's life cycle: checks, background start with readiness, signals, clean unmount.

`ebsfuse mount` without `--foreground` checks what it can cheaply (ids, mount point,
/dev/fuse), then starts the daemon as a new session (`python -m ebsfuse mount --foreground
--ready-fd N ...`) and waits on a pipe. The daemon describes each snapshot, mounts, and writes
`ok` once the mount is live, or `error <reason>` if it is not; the command exits 0 or prints
that reason. So the command returns only when the image can be read, which is what mount(8),
fstab and scripts need. A daemon started by systemd (`Type=notify`) signals READY=1 instead.

The daemon mounts with `auto_unmount`, so if it dies the kernel helper unmounts; SIGINT and
SIGTERM end the FUSE loop and unmount cleanly with exit status 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import logging.handlers
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from .. import BLOCK_SIZE, DEFAULT_TIMEOUT_S
from ..core.catalog import DEFAULT_TTL_S
from ..core.diskcache import DiskCache
from ..ebs.ec2 import SnapshotQuery, parse_filter, validate_volume_id
from ..ebs.errors import EbsfuseError, UsageError
from ..ebs.ids import validate_snapshot_id
from . import mountinfo

if TYPE_CHECKING:
    from ..core.catalog import Catalog
    from ..core.imageset import ImageSet
    from ..core.reader import FetchContext
    from ..ebs.client import EbsClient
    from .fs import SnapshotFS

# pyfuse3, trio, boto3 and the read path are imported by the daemon only: the command that
# starts it in the background needs none of them, and starts in a fraction of the time.

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 256 * 1024**2
# 64 requests in flight reach ~640 blocks/s at the service's typical 100 ms, within its
# 1000/s per-snapshot quota; the connection pool is sized to match.
DEFAULT_MAX_CONCURRENCY = 64
# How long `ebsfuse mount` waits for the daemon: describing a snapshot retries within the
# retry budget (under a minute), so two minutes means the daemon is stuck, not slow.
READY_TIMEOUT_S = 120.0


@dataclass
class MountOptions:
    snapshot_ids: list[str]
    mountpoint: str
    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    audit_log: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_rps: float | None = None
    foreground: bool = False
    allow_other: bool = False
    log_level: str = "INFO"
    log_file: str | None = None
    ready_fd: int | None = None
    kernel_tuning: bool = True
    cache_dir: str | None = None
    cache_dir_size: int | None = None
    base_ids: list[str] = field(default_factory=list)
    # A catalogue mount: every completed snapshot these select, refreshed every catalog_ttl_s.
    volume_ids: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)  # the AWS CLI's --filters values
    owner_ids: list[str] = field(default_factory=list)
    catalog_ttl_s: float = DEFAULT_TTL_S
    # Processes that fetch and verify blocks beside the daemon (0: threads of the daemon).
    fetch_workers: int = 0

    @property
    def is_catalogue(self) -> bool:
        return bool(self.volume_ids or self.filters)

    def query(self) -> SnapshotQuery:
        """The DescribeSnapshots query of a catalogue mount; UsageError on a bad filter."""
        filters = [f for text in self.filters for f in parse_filter(text)]
        return SnapshotQuery(list(self.volume_ids), filters, list(self.owner_ids))

    def daemon_argv(self, ready_fd: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "ebsfuse",
            "mount",
            "--foreground",
            "--ready-fd",
            str(ready_fd),
        ]
        for flag, value in (
            ("--region", self.region),
            ("--profile", self.profile),
            ("--endpoint-url", self.endpoint_url),
            ("--log-file", self.log_file),
            ("--audit-log", self.audit_log),
        ):
            if value:
                argv += [flag, value]
        argv += ["--cache-size", str(self.cache_bytes)]
        argv += ["--max-concurrency", str(self.max_concurrency)]
        argv += ["--block-timeout", repr(self.timeout_s)]
        if self.max_rps is not None:
            argv += ["--max-rps", repr(self.max_rps)]
        argv += ["--log-level", self.log_level]
        if self.cache_dir:
            argv += ["--cache-dir", self.cache_dir]
        if self.cache_dir_size is not None:
            argv += ["--cache-dir-size", str(self.cache_dir_size)]
        for base in self.base_ids:
            argv += ["--base", base]
        for flag, values in (
            ("--volume", self.volume_ids),
            ("--filters", self.filters),
            ("--owner-ids", self.owner_ids),
        ):
            for value in values:
                argv += [flag, value]
        if self.is_catalogue:
            argv += ["--catalog-ttl", repr(self.catalog_ttl_s)]
        if self.allow_other:
            argv.append("--allow-other")
        if not self.kernel_tuning:
            argv.append("--no-kernel-tuning")
        argv += ["--fetch-workers", str(self.fetch_workers)]
        return [*argv, "--", *self.snapshot_ids, self.mountpoint]


# -- checks that need no network ----------------------------------------------------------


def check_options(opts: MountOptions) -> None:
    """Everything that can be refused before starting a daemon, each with one clear line."""
    if opts.is_catalogue and opts.snapshot_ids:
        raise UsageError("give snapshot ids or --volume/--filters, not both")
    if not opts.snapshot_ids and not opts.is_catalogue:
        raise UsageError("no snapshot id given (or --volume VOLUME_ID, --filters ...)")
    if opts.owner_ids and not opts.is_catalogue:
        raise UsageError("--owner-ids goes with --volume or --filters")
    for volume_id in opts.volume_ids:
        validate_volume_id(volume_id)
    opts.query()  # a malformed --filters is refused here
    seen: set[str] = set()
    for sid in opts.snapshot_ids:
        validate_snapshot_id(sid)
        if sid in seen:
            raise UsageError(f"{sid} is given twice")
        seen.add(sid)
    if opts.max_concurrency < 1:
        raise UsageError("--max-concurrency must be at least 1")
    for base in opts.base_ids:
        validate_snapshot_id(base)
        if base in seen:
            raise UsageError(f"--base {base} is also mounted")
    if opts.base_ids and not opts.cache_dir:
        raise UsageError("--base needs --cache-dir: the base's blocks are read from there")
    if opts.cache_dir:
        DiskCache(opts.cache_dir, opts.cache_dir_size).close()  # refused here, in one line
    check_mountpoint(opts.mountpoint)
    check_fuse_device()
    if opts.log_file:
        try:
            with open(opts.log_file, "a"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write the log file {opts.log_file}: {exc.strerror}") from None


def check_mountpoint(path: str) -> None:
    if not os.path.lexists(path):
        raise UsageError(f"mount point {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"{path} is already a mount point (unmount it first)")


def check_fuse_device() -> None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        hint = "is the fuse kernel module loaded, or is /dev/fuse passed into this container?"
        raise EbsfuseError(f"cannot open /dev/fuse: {exc.strerror}; {hint}") from None
    os.close(fd)


# -- logging ------------------------------------------------------------------------------


def setup_daemon_logging(opts: MountOptions) -> None:
    root = logging.getLogger()
    root.setLevel(opts.log_level.upper())
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if opts.log_file:
        handler = logging.FileHandler(opts.log_file)
    elif opts.ready_fd is None:
        handler = logging.StreamHandler(sys.stderr)  # a foreground run: journald or a terminal
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        fmt = "ebsfuse[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root.handlers[:] = [handler]
    # Their debug output is per request and per worker task: it drowns ours.
    for noisy in ("pyfuse3", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.INFO))


# -- background start ---------------------------------------------------------------------


def spawn_daemon(
    opts: MountOptions, interrupted: Callable[[], bool] = lambda: False
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the mount daemon in its own session; return it with its readiness message.

    Its own session: a Ctrl-C at the terminal reaches the caller, which takes things down in
    order rather than the daemon first. The message is 'ok', 'error REASON' or '' (it died).
    """
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            opts.daemon_argv(write_fd),
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(write_fd)
    try:
        return proc, wait_ready(read_fd, interrupted)
    except BaseException:
        # Ctrl-C or a timeout while waiting: take the daemon down with its mount.
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        os.close(read_fd)


def start_background(opts: MountOptions) -> None:
    """Start the daemon and return once its mount is live; raise with its reason otherwise."""
    proc, message = spawn_daemon(opts)
    if message == "ok":
        return
    # The daemon failed and is on its way out: let it finish, so nothing outlives the command.
    try:
        status = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        status = proc.wait()
    if message.startswith("error "):
        raise EbsfuseError(message[len("error ") :])
    raise EbsfuseError(
        f"the mount daemon exited with status {status} before the mount was live"
        + (f"; see {opts.log_file}" if opts.log_file else "; see the system log")
    )


def wait_ready(read_fd: int, interrupted: Callable[[], bool] = lambda: False) -> str:
    """A daemon's one-line readiness message ('ok' or 'error REASON'), or '' if it died.

    Polls `interrupted` a few times a second, so a caller's signal flag ends the wait.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    chunks: list[bytes] = []
    while True:
        if interrupted():
            raise KeyboardInterrupt
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EbsfuseError(f"the mount daemon was not ready in {READY_TIMEOUT_S:.0f} s")
        try:
            readable, _, _ = select.select([read_fd], [], [], min(remaining, 0.2))
        except InterruptedError:
            continue
        if not readable:
            continue
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break  # one line is the whole message
    return b"".join(chunks).decode("utf-8", "replace").strip()


# -- the daemon ---------------------------------------------------------------------------


class Readiness:
    """Tells whoever started us how the mount went: the ready pipe and/or systemd."""

    def __init__(self, ready_fd: int | None) -> None:
        self._fd = ready_fd
        if ready_fd is not None:
            # Not inherited by auto_unmount's fusermount3 helper, which outlives our message
            # and would otherwise keep the pipe open after we close it.
            os.set_inheritable(ready_fd, False)

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, (line + "\n").encode())
            os.close(self._fd)
        self._fd = None

    def ready(self) -> None:
        self._send("ok")
        sd_notify("READY=1")

    def failed(self, reason: str) -> None:
        self._send("error " + reason)


def sd_notify(state: str) -> None:
    """systemd's readiness protocol, without a dependency: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.connect(address)
        sock.sendall(state.encode())


def build_filesystem(opts: MountOptions, client: EbsClient) -> tuple[SnapshotFS, FetchContext]:
    from ..core.imageset import ImageSet
    from ..core.lineage import Lineage
    from ..core.pipeline import describe_snapshot
    from ..core.reader import FetchContext
    from ..ebs.client import RetryPolicy
    from .fs import SnapshotFS

    policy = RetryPolicy(budget_s=opts.timeout_s)
    ctx = FetchContext(
        client, cache_bytes=opts.cache_bytes, max_concurrency=opts.max_concurrency, policy=policy
    )
    if opts.cache_dir:
        ctx.disk = DiskCache(opts.cache_dir, opts.cache_dir_size)
        log.info("disk cache %s: up to %d bytes", ctx.disk.directory, ctx.disk.max_bytes)
    if opts.fetch_workers:
        from ..core.fetchpool import FetchPool, homes_for

        keep = homes_for(opts.cache_bytes // BLOCK_SIZE, opts.max_concurrency)
        ctx.pool = FetchPool(
            client.settings, opts.fetch_workers, opts.max_concurrency, client.rate_limiter, keep
        )
        log.info("%d fetch worker processes", opts.fetch_workers)
    lineage = Lineage(ctx)
    images = ImageSet(ctx, lineage)
    catalog = open_catalogue(opts) if opts.is_catalogue else fixed_catalogue(opts, client, images)
    for base in opts.base_ids:
        info = describe_snapshot(client, base, policy)
        lineage.add(base, info.num_blocks)
        log.info("%s: a base, read from the disk cache only", base)
    # A catalogue's images join the lineage as they open; a fixed mount's are all there.
    if opts.is_catalogue or len(lineage.members) > 1:
        ctx.lineage = lineage
    fs = SnapshotFS(catalog, images, uid=os.getuid(), gid=os.getgid(), by_volume=opts.is_catalogue)
    return fs, ctx


def fixed_catalogue(opts: MountOptions, client: EbsClient, images: ImageSet) -> Catalog:
    """The snapshots named on the command line, each described (and so proven readable) now."""
    from ..core.catalog import Catalog, CatalogView
    from ..core.pipeline import describe_snapshot
    from ..ebs.ec2 import SnapshotRecord

    start_times = snapshot_start_times(opts)
    now = time.time()
    records = []
    for sid in opts.snapshot_ids:
        info = describe_snapshot(client, sid, images.ctx.policy)
        log.info("%s: %d GiB, block size %d", sid, info.volume_size_gib, info.block_size)
        started = start_times.get(sid)
        images.add(info, started, pinned=True)
        start = started.timestamp() if started else now
        records.append(SnapshotRecord(sid, "", start, info.size_bytes))
    return Catalog(CatalogView(records))


def open_catalogue(opts: MountOptions) -> Catalog:
    """The snapshots a DescribeSnapshots query selects, asked now and again after the TTL.

    A query that matches nothing refuses the mount: an empty directory that might fill later
    would hide a mistyped volume id or filter, which is far more likely.
    """
    from ..core.catalog import Catalog, CatalogView
    from ..ebs.ec2 import ec2_client, list_snapshots

    query = opts.query()
    fetch = functools.partial(list_snapshots, ec2_client(opts.region, opts.profile), query)
    view = CatalogView(fetch())
    if not len(view):
        raise EbsfuseError(f"no completed snapshot matches {query.describe()}: nothing to mount")
    log.info(
        "catalogue of %s: %d snapshots of %d volumes; asked again after %g s",
        query.describe(),
        len(view),
        len(view.volumes),
        opts.catalog_ttl_s,
    )
    return Catalog(view, fetch, ttl_s=opts.catalog_ttl_s)


def snapshot_start_times(opts: MountOptions) -> dict[str, datetime]:
    """StartTime of each snapshot from EC2 DescribeSnapshots, for the images' mtime.

    The EBS direct APIs do not tell it. Asked only where EC2 is reachable the same way as EBS:
    on AWS itself, or where an EC2 endpoint is configured next to a custom EBS one. One quick
    attempt; without it mtime is the mount time.
    """
    from ..ebs.ec2 import ec2_client, start_times

    custom_ebs = opts.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_EBS")
    if custom_ebs and not os.environ.get("AWS_ENDPOINT_URL_EC2"):
        return {}
    try:
        return start_times(ec2_client(opts.region, opts.profile, quick=True), opts.snapshot_ids)
    except Exception as exc:
        log.info("snapshot start times unknown (%s); mtime is the mount time", exc)
        return {}


def fuse_options(opts: MountOptions) -> set[str]:
    import pyfuse3

    options = set(pyfuse3.default_options)
    options |= {"ro", "fsname=ebsfuse", "subtype=ebsfuse", "auto_unmount"}
    if opts.allow_other:
        options.add("allow_other")
    return options


def tune_collector() -> None:
    """Start-up's objects (boto3's service models among them) live as long as the daemon:
    frozen, no collection walks them again. The collector's share of a cold read's daemon CPU
    fell from 3.5% to 2% (#16, perf). Collecting the young generation less often took it to
    0.2%, but cycles made by failures (an exception's traceback holding a read's blocks) then
    lived longer: the fault soak's peak RSS rose from 141 to 279 MiB, past its bound."""
    gc.freeze()


def use_one_malloc_arena() -> None:
    """One glibc malloc arena for the whole daemon, so freed blocks are reused, not hoarded.

    glibc gives each thread that allocates its own arena; with 64 fetch threads each holding
    freed 512 KiB blocks, RSS drifted ~160 MiB above the cache (420 MiB for a 256 MiB cache).
    Pinning the mmap threshold instead kept RSS down but cost a munmap and fresh zeroed pages
    per block (156 MB/s, 15 s CPU per 2 GiB); one arena measured 232 MB/s, 10.6 s CPU and
    341 MiB peak (scripts/bench-mount's dd, 50 ms latency). The GIL already serializes most
    allocation, so the arena lock costs nothing measurable.
    """
    m_arena_max = -8  # from <malloc.h>
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, 1)
    except (OSError, AttributeError):
        log.debug("not glibc: leaving malloc as it is")


def run_daemon(opts: MountOptions) -> int:
    """Mount and serve until unmounted or signalled. Returns the exit status."""
    import pyfuse3
    import trio

    from ..ebs.client import ClientSettings, EbsClient

    readiness = Readiness(opts.ready_fd)
    try:
        setup_daemon_logging(opts)
    except OSError as exc:
        reason = f"cannot write the log file {opts.log_file}: {exc.strerror}"
        readiness.failed(reason)
        if opts.ready_fd is None:
            print(f"ebsfuse: {reason}", file=sys.stderr)
        return 1
    use_one_malloc_arena()
    try:
        client = EbsClient(
            ClientSettings(
                region=opts.region,
                profile=opts.profile,
                endpoint_url=opts.endpoint_url,
                max_pool_connections=opts.max_concurrency,
                max_rps=opts.max_rps,
                audit_log=opts.audit_log,
            )
        )
        fs, ctx = build_filesystem(opts, client)
        check_mountpoint(opts.mountpoint)
        try:
            pyfuse3.init(fs, opts.mountpoint, fuse_options(opts))
        except RuntimeError as exc:
            raise EbsfuseError(f"cannot mount at {opts.mountpoint}: {exc}") from None
    except Exception as error:
        if not isinstance(error, EbsfuseError):
            # A bug, not bad input: keep the traceback in the log, give the caller one line.
            log.exception("the mount failed")
            error = EbsfuseError(f"the mount failed: {type(error).__name__}: {error}")
        log.error("%s", error)
        readiness.failed(str(error))
        if opts.ready_fd is None:
            print(f"ebsfuse: {error}", file=sys.stderr)
        return 1
    what = ", ".join(opts.snapshot_ids) or opts.query().describe()
    log.info("mounted %s at %s", what, opts.mountpoint)
    tune_collector()
    try:
        trio.run(_serve, readiness, ctx, opts.mountpoint if opts.kernel_tuning else None)
    except BaseException:
        log.exception("the filesystem loop failed")
        raise
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", opts.mountpoint)
    return 0


async def _serve(readiness: Readiness, ctx: FetchContext, tune_mountpoint: str | None) -> None:
    import pyfuse3
    import trio

    async with trio.open_nursery() as nursery, ctx.running():
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        if tune_mountpoint:
            nursery.start_soon(_tune_kernel, tune_mountpoint)
        readiness.ready()
        await pyfuse3.main()
        # Unmounted from outside (fusermount3 -u / umount): the loop ended on its own.
        nursery.cancel_scope.cancel()


async def _tune_kernel(mountpoint: str) -> None:
    """Kernel settings, once the kernel's INIT exchange is over: INIT resets the readahead.

    A stat of the mount point waits for INIT (the kernel holds requests until then) and is
    answered by this same loop, hence the worker thread.
    """
    import trio

    from . import kernel

    try:
        await trio.to_thread.run_sync(os.stat, mountpoint)
        await trio.to_thread.run_sync(kernel.tune, mountpoint)
    except Exception:
        log.warning("kernel tuning failed; the mount works with the defaults", exc_info=True)


async def _watch_signals(scope: object) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """`ebsfuse unmount`: detach the mount; the daemon sees it and exits."""
    path = os.path.realpath(mountpoint)  # mountinfo holds the resolved path
    if not os.path.ismount(path):
        raise UsageError(f"{mountpoint} is not mounted")
    if not _is_ebsfuse_mount(path):
        raise UsageError(f"{mountpoint} is not an ebsfuse mount")
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        done = subprocess.run(
            ["umount", *(["-l"] if lazy else []), path], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit status {done.returncode}"
        if "busy" in reason.lower():
            reason += " (a loop device or a process still uses it; try --lazy)"
        raise EbsfuseError(f"cannot unmount {mountpoint}: {reason}")


def _is_ebsfuse_mount(path: str) -> bool:
    entry = mountinfo.topmost(path)
    return entry is not None and entry.fstype in ("fuse.ebsfuse", "fuse")


def wait_unmounted(path: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while os.path.ismount(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
