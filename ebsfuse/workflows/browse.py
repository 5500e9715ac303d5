"""`ebsfuse browse`: a snapshot's files, read-only, at a directory, until `ebsfuse unmount DIR`.

`ebsfuse browse SNAPSHOT_ID DIR` checks its input, then starts a keeper process (its own
session, so it outlives the command) and waits on a pipe for one line, `ok ...` or `error
REASON`, as `ebsfuse mount` does with its daemon. The keeper builds the chain of chain.py:
the private FUSE mount in `<runtime>/browse-<hash of DIR>/image`, a read-only loop device on
the chosen partition file, the filesystem at DIR with never-write options; it records the chain
in `state.json` beside the FUSE mount point and then waits.

The chain comes down, innermost first, when:
- the keeper gets SIGTERM, SIGINT or SIGHUP (so `kill KEEPER` or a service manager undoes all);
- `ebsfuse unmount DIR` runs: it unmounts DIR itself (so "busy" is reported and changes
  nothing, as umount would), then asks the keeper to finish; if the keeper is gone (kill -9),
  it tears the rest down itself from `state.json`;
- DIR is unmounted by anyone else (`umount DIR`): the keeper notices and removes the rest;
- the FUSE daemon dies: the keeper detaches DIR lazily and removes the rest.

`ebsfuse unmount DIR` finds the chain from DIR's hash in the runtime directory, or, when the
environment differs (another `EBSFUSE_RUNTIME_DIR`), from the kernel: DIR's mount source is a
loop device whose backing file lies in the chain's private directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import time
from types import FrameType

from ..ebs.client import validate_snapshot_id
from ..ebs.errors import EbsfuseError, UsageError
from ..fuse.mount import MountOptions, check_fuse_device, setup_daemon_logging, wait_ready
from .chain import Chain, loop_backing_file, mount_source, pid_alive, runtime_dir
from .chain import umount as umount_path

log = logging.getLogger(__name__)

# How often the keeper looks at DIR and the daemon between signals: a quarter second is quick
# enough for a user who just ran `umount DIR` and costs nothing.
WATCH_INTERVAL_S = 0.25
# How long `ebsfuse unmount` and an interrupted `browse` wait for the keeper's teardown: it
# unmounts, detaches and stops a daemon, each normally well under a second.
KEEPER_STOP_TIMEOUT_S = 60.0


class BrowseInterrupted(EbsfuseError):
    """Ctrl-C or SIGTERM while `browse` was setting up: the keeper undid everything."""


def chain_base(target: str) -> str:
    digest = hashlib.sha256(os.path.abspath(target).encode()).hexdigest()[:16]
    return os.path.join(runtime_dir(), f"browse-{digest}")


def find_chain(target: str) -> tuple[Chain, dict[str, object]] | None:
    """The browse chain mounted at `target`, if there is one."""
    target = os.path.abspath(target)
    bases = [chain_base(target)]
    source = mount_source(target) or ""
    if source.startswith("/dev/loop"):
        backing = loop_backing_file(source)
        if backing:
            bases.append(os.path.dirname(os.path.dirname(backing)))
    for base in bases:
        found = Chain.from_state(base)
        if found is not None and found[0].target == target:
            return found
    return None


def _keeper_alive(state: dict[str, object]) -> int | None:
    pid = state.get("keeper_pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return None
    return pid if b"browse" in args else None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- the command -----------------------------------------------------------------------------


def start_browse(snapshot_id: str, target: str, keeper_argv: list[str]) -> str:
    """Check, start the keeper, return its one-line success message (or raise its reason).

    `keeper_argv` is `ebsfuse browse` with its options, without the positional arguments.
    """
    validate_snapshot_id(snapshot_id)
    target = os.path.abspath(target)
    if not os.path.isdir(target):
        what = "does not exist" if not os.path.lexists(target) else "is not a directory"
        raise UsageError(f"{target} {what}")
    if os.path.ismount(target):
        raise UsageError(f"{target} is already a mount point (unmount it first)")
    check_fuse_device()
    base = chain_base(target)
    stale = Chain.from_state(base)
    if stale is not None:
        if _keeper_alive(stale[1]):
            raise UsageError(f"{target} is already being browsed (ebsfuse unmount {target})")
        stale[0].teardown()
    os.makedirs(base, mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe()
    try:
        keeper = subprocess.Popen(
            [*keeper_argv, "--keeper-fd", str(write_fd), "--", snapshot_id, target],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        message = wait_ready(read_fd)
    except (KeyboardInterrupt, EbsfuseError) as error:
        keeper.terminate()  # the keeper tears down whatever it built
        try:
            keeper.wait(KEEPER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()
        Chain(snapshot_id, base, target).teardown()  # anything a killed keeper left
        if isinstance(error, KeyboardInterrupt):
            raise BrowseInterrupted(f"interrupted; nothing is mounted at {target}") from None
        raise
    finally:
        os.close(read_fd)
    if message.startswith("ok"):
        return message[3:]
    with contextlib.suppress(subprocess.TimeoutExpired):
        keeper.wait(KEEPER_STOP_TIMEOUT_S)
    Chain(snapshot_id, base, target).teardown()  # anything a crashed keeper left
    if message.startswith("error "):
        raise EbsfuseError(message[len("error ") :])
    raise EbsfuseError("the browse process exited before the snapshot was mounted")


def run_keeper(
    snapshot_id: str, target: str, partition: int | None, opts: MountOptions, ready_fd: int
) -> int:
    """The keeper: build the chain, report, wait for a reason to stop, tear down. Exit status."""
    target = os.path.abspath(target)
    opts.ready_fd = ready_fd  # logging: to --log-file, else syslog, as a background daemon
    setup_daemon_logging(opts)
    opts.ready_fd = None
    os.set_inheritable(ready_fd, False)
    stop: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    chain = Chain(snapshot_id, chain_base(target), target)

    def report(line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, (line + "\n").encode())

    def check_stop() -> None:
        if stop:
            raise EbsfuseError("interrupted")

    try:
        chain.start_daemon(opts, interrupted=lambda: bool(stop))
        check_stop()
        selected = chain.select(partition)
        check_stop()
        chain.attach(selected)
        check_stop()
        chain.mount_filesystem()
        chain.save_state(os.getpid())
        check_stop()
    except (EbsfuseError, KeyboardInterrupt) as error:
        log.error("%s", error)
        chain.teardown()
        report(
            f"error {error}" if not isinstance(error, KeyboardInterrupt) else "error interrupted"
        )
        return 1
    except BaseException:
        log.exception("browse failed")
        chain.teardown()
        report("error internal error (see the log)")
        raise
    log.info("%s: %s mounted read-only at %s", snapshot_id, selected.label(), target)
    report(f"ok {target}: {snapshot_id} {selected.label()}, read-only")
    with contextlib.suppress(OSError):
        os.close(ready_fd)
    while not stop:
        time.sleep(WATCH_INTERVAL_S)
        if not os.path.ismount(target):
            log.info("%s was unmounted: removing the rest of the chain", target)
            break
        if chain.daemon_pid is None or not pid_alive(chain.daemon_pid):
            log.error("the mount daemon exited: detaching %s", target)
            chain.teardown(lazy=True)
            return 1
    if stop:
        log.info("%s received: unmounting %s", signal.Signals(stop[0]).name, target)
    chain.teardown()
    return 0


def unmount_browse(target: str, *, lazy: bool = False) -> bool:
    """`ebsfuse unmount DIR` for a browse chain: undo all of it. False if DIR is not one."""
    target = os.path.abspath(target)
    found = find_chain(target)
    if found is None:
        return False
    chain, state = found
    if os.path.ismount(target):
        if lazy:
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        else:
            umount_path(target, lazy_after=None)  # busy: one line, and the chain stays intact
    keeper = _keeper_alive(state)
    if keeper is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(keeper, signal.SIGTERM)
        if not _wait_gone(keeper, KEEPER_STOP_TIMEOUT_S):
            raise EbsfuseError(f"the browse process {keeper} did not stop")
    chain.teardown(lazy=lazy)  # whatever a killed keeper left behind
    return True
