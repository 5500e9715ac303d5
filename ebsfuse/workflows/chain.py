"""The chain behind `browse` and `restore`: private FUSE mount -> read-only loop -> filesystem.

    <runtime>/<kind>-<id>/image/          ebsfuse mount daemon (a child, its own session)
        <snapshot-id>[-partN].img         the partition file (fs.py's view of the byte range)
    /dev/loopN                            losetup -r on that file (read-only block device)
    TARGET                                mount -o <never-write options> /dev/loopN TARGET

Every step is undone by `Chain.teardown`, which trusts the kernel's state rather than its own
memory (what is mounted at TARGET, which loop devices are backed by files under the FUSE mount,
whether the daemon still runs), so it also cleans up a half-built chain after Ctrl-C in the
middle of a step, or a chain whose builder was killed (`Chain.from_state`).

Nothing in the chain can write to the snapshot: the EBS direct APIs are read through
GetSnapshotBlock only, the FUSE mount is read-only, the loop device is read-only (`-r`), and the
filesystem is mounted with the options that keep its driver from writing even to replay a
journal (`MOUNT_OPTIONS`: ext4 `noload`, XFS `norecovery`, btrfs `nologreplay`).

The runtime directory is `$EBSFUSE_RUNTIME_DIR`, else `/run/ebsfuse` for root, else
`$XDG_RUNTIME_DIR/ebsfuse` or `/tmp/ebsfuse-<uid>`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.procs import pid_alive as pid_alive
from ..ebs.errors import EbsfuseError, UsageError
from ..fuse import mountinfo
from ..fuse.mount import MountOptions, spawn_daemon

log = logging.getLogger(__name__)

# A filesystem may be briefly busy right after the copy (the kernel releasing the last
# references); after this long `umount` is retried lazily so teardown always finishes.
UMOUNT_BUSY_RETRY_S = 5.0
# A daemon asked to stop unmounts at once; one that has not exited after this is killed.
DAEMON_STOP_TIMEOUT_S = 15.0
# How long the private mount point may stay busy after its daemon is gone (its kernel mount
# going away): a FUSE unmount completes in milliseconds.
MOUNTPOINT_BUSY_S = 2.0
# Bytes read from the start of a partition to recognise its filesystem: btrfs keeps its magic
# at 64 KiB + 64, the farthest of those looked for. One or two EBS blocks at most.
PROBE_BYTES = 0x10040 + 8

# mount(8) type and the options that never write, by detected filesystem.
MOUNT_OPTIONS: dict[str, tuple[str, str]] = {
    # The ext4 driver mounts ext2 and ext3 too; `noload` skips the journal (no replay), which a
    # dirty journal otherwise demands even on `ro`, and a read-only device then refuses.
    "ext2": ("ext4", "ro,noload"),
    "ext3": ("ext4", "ro,noload"),
    "ext4": ("ext4", "ro,noload"),
    # `norecovery` skips log replay; `nouuid` lets a clone of a mounted XFS (the host's own
    # root, snapshotted) mount beside it.
    "xfs": ("xfs", "ro,norecovery,nouuid"),
    # No log-tree replay (`rescue=nologreplay` since Linux 5.9; `nologreplay` before).
    "btrfs": ("btrfs", "ro,rescue=nologreplay"),
    "vfat": ("vfat", "ro"),
    "exfat": ("exfat", "ro"),
    "ntfs": ("ntfs3", "ro"),  # ntfs-3g is tried when the kernel has no ntfs3
    "iso9660": ("iso9660", "ro"),
    "squashfs": ("squashfs", "ro"),
}


def runtime_dir() -> str:
    configured = os.environ.get("EBSFUSE_RUNTIME_DIR")
    if configured:
        return os.path.abspath(configured)
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/ebsfuse"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "ebsfuse")
    return f"/tmp/ebsfuse-{os.getuid()}"


def human(n: int) -> str:
    from ..tools.progress import human_bytes

    return human_bytes(n)


# -- filesystem detection ---------------------------------------------------------------------


def detect_filesystem(head: bytes) -> str | None:
    """The filesystem (or volume type) whose signature starts `head`, by magic bytes."""

    def at(offset: int, magic: bytes) -> bool:
        return head[offset : offset + len(magic)] == magic

    if at(0x438, b"\x53\xef"):
        compat, incompat = (int.from_bytes(head[o : o + 4], "little") for o in (0x45C, 0x460))
        if incompat & ~0x1E:  # extents, 64bit, flex_bg...: features ext3 never had
            return "ext4"
        return "ext3" if compat & 0x4 else "ext2"  # has_journal
    if at(0, b"XFSB"):
        return "xfs"
    if at(0x10040, b"_BHRfS_M"):
        return "btrfs"
    if at(3, b"NTFS    "):
        return "ntfs"
    if at(3, b"EXFAT   "):
        return "exfat"
    if at(0x1FE, b"\x55\xaa") and (at(0x36, b"FAT") or at(0x52, b"FAT32")):
        return "vfat"
    if at(0x8001, b"CD001"):
        return "iso9660"
    if at(0, b"hsqs"):
        return "squashfs"
    if at(4086, b"SWAPSPACE2") or at(4086, b"SWAP-SPACE"):
        return "swap"
    if at(512, b"LABELONE") and at(536, b"LVM2 001"):
        return "LVM2 physical volume"
    if at(0, b"LUKS\xba\xbe"):
        return "LUKS encrypted volume"
    return None


def probe_file(path: str) -> str | None:
    with open(path, "rb") as f:
        return detect_filesystem(f.read(PROBE_BYTES))


# -- small helpers over the kernel's state ------------------------------------------------------


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise EbsfuseError(f"{cmd[0]} is not installed (util-linux provides it)") from None


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def _mount_reason(done: subprocess.CompletedProcess[str], target: str) -> str:
    """mount(8)'s first line without its `mount: TARGET:` prefix (the rest is a dmesg hint)."""
    lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
    if not lines:
        return f"exit status {done.returncode}"
    reason = lines[0].removeprefix("mount: ").removeprefix(f"{target}: ").rstrip(".")
    return reason + " (see dmesg)" if "dmesg" in " ".join(lines[1:]) else reason


def mount_source(path: str) -> str | None:
    """The source of the topmost mount at `path` (e.g. /dev/loop3)."""
    entry = mountinfo.topmost(path)
    return entry.source if entry else None


def loop_backing_file(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def loops_under(directory: str) -> list[str]:
    """Loop devices whose backing file lies under `directory`."""
    devices = []
    for entry in os.listdir("/sys/block"):
        if entry.startswith("loop"):
            backing = loop_backing_file(entry)
            if backing and backing.startswith(directory.rstrip("/") + "/"):
                devices.append(f"/dev/{entry}")
    return devices


def umount(path: str, *, lazy_after: float | None = UMOUNT_BUSY_RETRY_S) -> None:
    """Unmount `path`, retrying while busy, then lazily (if `lazy_after` is not None)."""
    deadline = time.monotonic() + (lazy_after or 0)
    while os.path.ismount(path):
        done = _run(["umount", path])
        if done.returncode == 0:
            return
        if "busy" not in _last_line(done).lower():
            if not os.path.ismount(path):
                return
            raise EbsfuseError(f"cannot unmount {path}: {_last_line(done)}")
        if time.monotonic() >= deadline:
            if lazy_after is None:
                raise EbsfuseError(
                    f"cannot unmount {path}: target is busy (a process uses it; try --lazy)"
                )
            log.warning("%s is busy: detaching it lazily", path)
            _run(["umount", "-l", path])
            return
        time.sleep(0.2)


# -- the chain -------------------------------------------------------------------------------


@dataclass
class Selected:
    """The file the loop device will read, and what it holds."""

    path: str
    partition: int  # 0 for the whole disk
    fstype: str
    size: int

    def label(self) -> str:
        where = "the whole disk" if self.partition == 0 else f"partition {self.partition}"
        return f"{where} ({self.fstype}, {human(self.size)})"


@dataclass
class Chain:
    snapshot_id: str
    base: str  # private directory holding the FUSE mount point (and browse's state file)
    target: str  # where the filesystem is mounted
    daemon_pid: int | None = None
    device: str | None = None
    selected: Selected | None = None
    owns_target: bool = False  # target was created by us (restore): removed on teardown
    # Further snapshots the same daemon serves, each with its own loop device and filesystem
    # mounted at its own target (`changes` reads two; one daemon lets them share blocks).
    companions: list[str] = field(default_factory=list)
    companion_targets: list[str] = field(default_factory=list)
    # Loop devices with direct I/O: several reads of the image in flight at once, where the
    # buffered loop device reads one at a time. Right for scattered reads (`changes`: 4.4 s
    # against 7.8-9.6 s on bench-changes' 4 GiB run), wrong for streaming ones (its restores:
    # 34-36 s against 13-15 s, without the image's page cache and readahead).
    direct_io: bool = False
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def image_dir(self) -> str:
        return os.path.join(self.base, "image")

    # -- building ----------------------------------------------------------------------------

    def start_daemon(
        self, opts: MountOptions, interrupted: Callable[[], bool] = lambda: False
    ) -> None:
        """`ebsfuse mount --foreground` on the private dir; returns once the mount is live."""
        os.makedirs(self.image_dir, exist_ok=True)
        opts.snapshot_ids = [self.snapshot_id, *self.companions]
        opts.mountpoint = self.image_dir
        self._proc, message = spawn_daemon(opts, interrupted)
        self.daemon_pid = self._proc.pid
        if message == "ok":
            return
        if message.startswith("error "):
            raise EbsfuseError(message[len("error ") :])
        raise EbsfuseError("the mount daemon exited before the snapshot was mounted")

    def partitions(self, snapshot_id: str | None = None) -> dict[int, str]:
        """Partition number -> file in the FUSE mount (listing it triggers detection)."""
        prefix = f"{snapshot_id or self.snapshot_id}-part"
        found = {}
        for name in os.listdir(self.image_dir):
            if name.startswith(prefix) and name.endswith(".img"):
                number = name[len(prefix) : -len(".img")]
                if number.isdigit():
                    found[int(number)] = os.path.join(self.image_dir, name)
        return dict(sorted(found.items()))

    def select(self, partition: int | None, snapshot_id: str | None = None) -> Selected:
        """The partition asked for, or the only mountable filesystem; one clear line otherwise."""
        sid = snapshot_id or self.snapshot_id
        parts = self.partitions(sid)
        whole = os.path.join(self.image_dir, f"{sid}.img")
        if partition == 0 or (partition is None and not parts):
            return self._probe(sid, 0, whole, required=True)
        if partition is not None:
            if partition not in parts:
                have = (
                    f"its partitions are {', '.join(map(str, parts))}"
                    if parts
                    else "it has no partition table (use --partition 0 or leave it out)"
                )
                raise UsageError(f"{sid} has no partition {partition}: {have}")
            return self._probe(sid, partition, parts[partition], required=True)
        candidates, others = [], []
        for number, path in parts.items():
            found = self._probe(sid, number, path, required=False)
            if found.fstype in MOUNT_OPTIONS:
                candidates.append(found)
            else:
                others.append(f"{number}: {found.fstype}")
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise EbsfuseError(
                f"{sid} holds no filesystem ebsfuse can mount (partitions {'; '.join(others)})"
            )
        listed = ", ".join(c.label() for c in candidates)
        raise UsageError(f"{sid} has several filesystems: {listed}; choose one with --partition N")

    def _probe(self, sid: str, number: int, path: str, *, required: bool) -> Selected:
        fstype = probe_file(path) or "nothing recognisable"
        selected = Selected(path, number, fstype, os.path.getsize(path))
        if required and fstype not in MOUNT_OPTIONS:
            where = "the disk" if number == 0 else f"partition {number}"
            raise EbsfuseError(
                f"{sid}: {where} holds no filesystem ebsfuse can mount (found: {fstype})"
            )
        return selected

    def attach(self, selected: Selected) -> str:
        self.selected = selected
        self.device = _attach_loop(selected.path, self.direct_io)
        return self.device

    def mount_filesystem(self) -> None:
        assert self.selected is not None and self.device is not None
        _mount_read_only(self.selected, self.device, self.target)

    def mount_companion(self, snapshot_id: str, selected: Selected, target: str) -> None:
        """A companion's `selected` filesystem at `target`, by its own read-only loop device."""
        assert snapshot_id in self.companions
        device = _attach_loop(selected.path, self.direct_io)
        self.companion_targets.append(target)
        _mount_read_only(selected, device, target)

    def stats(self, snapshot_id: str | None = None) -> dict[str, Any]:
        """The daemon's counters for a snapshot it serves ({} if they cannot be read)."""
        from ..core.stats import STATS_NAME

        try:
            with open(os.path.join(self.image_dir, STATS_NAME.decode()), "rb") as f:
                return json.loads(f.read())["snapshots"][snapshot_id or self.snapshot_id]
        except (OSError, ValueError, KeyError):
            return {}

    # -- browse's state file ---------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.base, "state.json")

    def save_state(self, keeper_pid: int) -> None:
        state = {
            "snapshot_id": self.snapshot_id,
            "target": self.target,
            "daemon_pid": self.daemon_pid,
            "keeper_pid": keeper_pid,
            "device": self.device,
            "partition": self.selected.partition if self.selected else None,
            "fstype": self.selected.fstype if self.selected else None,
        }
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.state_path)

    @classmethod
    def from_state(cls, base: str) -> tuple[Chain, dict[str, Any]] | None:
        try:
            with open(os.path.join(base, "state.json")) as f:
                state = json.load(f)
        except (OSError, ValueError):
            return None
        chain = cls(state["snapshot_id"], base, state["target"], state.get("daemon_pid"))
        chain.device = state.get("device")
        return chain, state

    # -- undoing ---------------------------------------------------------------------------

    def teardown(self, *, lazy: bool = False) -> None:
        """Undo whatever part of the chain exists, innermost first; never raises."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C waits
        try:
            self._teardown(lazy)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _teardown(self, lazy: bool) -> None:
        targets = [*reversed(self.companion_targets), self.target]
        for target in targets:
            if os.path.ismount(target) and self._target_is_ours(target):
                try:
                    if lazy:
                        _run(["umount", "-l", target])
                    else:
                        umount(target)
                except EbsfuseError as error:
                    log.warning("%s", error)
        if os.path.isdir(self.image_dir):
            for device in loops_under(self.image_dir):
                # On a device still held (a lazy unmount), this sets autoclear instead.
                _run(["losetup", "-d", device])
        self._stop_daemon()
        if os.path.ismount(self.image_dir):
            _run(["fusermount3", "-u", "-z", self.image_dir])
        if self.owns_target:
            for target in targets:
                with contextlib.suppress(OSError):
                    os.rmdir(target)
        with contextlib.suppress(OSError):
            os.unlink(self.state_path)
        _remove_mountpoint(self.image_dir)
        with contextlib.suppress(OSError):
            os.rmdir(self.base)

    def _target_is_ours(self, target: str) -> bool:
        """The target's mount is a loop device over our image dir (not some unrelated mount)."""
        source = mount_source(target) or ""
        backing = loop_backing_file(source) if source.startswith("/dev/loop") else None
        if backing is None:
            # Detached loop (autoclear) or never ours: only if it is the device we attached.
            return source != "" and source == self.device
        return backing.startswith(self.image_dir + "/")

    def _stop_daemon(self) -> None:
        pid = self.daemon_pid
        if pid is None or not pid_alive(pid) or not _is_our_daemon(pid, self.image_dir):
            if self._proc is not None:
                with contextlib.suppress(Exception):
                    self._proc.wait(0)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the daemon unmounts and exits 0
        deadline = time.monotonic() + DAEMON_STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.05)
        log.warning("the mount daemon %d did not stop: killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()


def _remove_mountpoint(path: str) -> None:
    """Remove the private mount point, waiting a moment while it is still busy: a daemon
    stopped as it came up (Ctrl-C during its start) may still be taking its mount down. Once
    in a full test run the directory outlived the mount by an instant and was left behind."""
    deadline = time.monotonic() + MOUNTPOINT_BUSY_S
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() >= deadline:
                return
        time.sleep(0.05)


def _attach_loop(path: str, direct_io: bool) -> str:
    extra = ["--direct-io=on"] if direct_io else []
    done = _run(["losetup", "-r", *extra, "-f", "--show", path])
    if done.returncode != 0:
        raise EbsfuseError(f"cannot attach a loop device: {_last_line(done)}")
    return done.stdout.strip()


def _mount_read_only(selected: Selected, device: str, target: str) -> None:
    fstype = selected.fstype
    kind, options = MOUNT_OPTIONS[fstype]
    attempts = [(kind, options)]
    if fstype == "btrfs":
        attempts.append(("btrfs", "ro,nologreplay"))  # kernels before 5.9
    if fstype == "ntfs":
        attempts.append(("ntfs-3g", "ro"))
    os.makedirs(target, exist_ok=True)
    reason = ""
    for kind, options in attempts:
        done = _run(["mount", "-t", kind, "-o", options, device, target])
        if done.returncode == 0:
            return
        reason = _mount_reason(done, target)
    raise EbsfuseError(f"cannot mount {selected.label()} read-only ({options}): {reason}")


def _is_our_daemon(pid: int, image_dir: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return image_dir.encode() in args
