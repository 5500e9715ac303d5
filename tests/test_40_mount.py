"""Real mounts: the daemon in the background, the kernel's FUSE, loop devices, ext4.

Every test here mounts for real and reads through the kernel; the emulator's counters show
what went over the wire.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.emulator import Emulator
from ebsfuse.fuse import kernel

from .conftest import (
    MountedSnapshots,
    daemon_pids,
    ebsfuse_cmd,
    loop_device,
    make_ext4_image,
    mounted_filesystem,
    needs_fuse,
    needs_root,
    run_ebsfuse,
    sha256_file,
    wait_for,
)

pytestmark = [needs_fuse, needs_root]

# The PATH mount(8) gives its helpers, whatever the caller's PATH.
MOUNT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def gets(emu: Emulator) -> int:
    return emu.counters()["requests"].get("GetSnapshotBlock", 0)


def test_upload_mount_loop_mount_and_read_files(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    image, files = make_ext4_image(workdir)
    done = run_ebsfuse("upload", str(image), "--description", "e2e", env=env, check=True)
    sid = done.stdout.strip()
    assert sid.startswith("snap-") and len(sid) == 22
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        img = mount.image()
        listing = os.listdir(mount.mountpoint)
        assert listing == [f"{sid}.img"]
        st_img = os.stat(img)
        assert st_img.st_size == GIB
        assert oct(st_img.st_mode & 0o777) == "0o444"
        assert st_img.st_uid == os.getuid()
        # The image holds the uploaded bytes, then zeros to the end of the 1 GiB volume.
        with open(img, "rb") as f:
            assert f.read(image.stat().st_size) == image.read_bytes()
        with loop_device(img) as device, mounted_filesystem(device, workdir / "fs") as fs:
            for name, data in files.items():
                assert (fs / name).read_bytes() == data, name
        with pytest.raises(OSError) as caught:
            os.open(img, os.O_RDWR)
        assert caught.value.errno == errno.EROFS  # as the README says, for root and others
        with pytest.raises(FileNotFoundError):
            os.stat(mount.mountpoint / "snap-0000000000000000f.img")
        vfs = os.statvfs(mount.mountpoint)
        assert vfs.f_flag & os.ST_RDONLY
        assert vfs.f_blocks * vfs.f_frsize == GIB
        done = run_ebsfuse("unmount", str(mount.mountpoint), env=env)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: not daemon_pids(mount.mountpoint), what="the daemon to exit")
        assert not os.path.ismount(mount.mountpoint)


def test_whole_image_sha256_matches_the_source(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    raw = bytearray(os.urandom(8 * BLOCK_SIZE))
    raw[3 * BLOCK_SIZE : 5 * BLOCK_SIZE] = bytes(2 * BLOCK_SIZE)  # two holes in the middle
    source = hashlib.sha256(raw)
    for _ in range((GIB - len(raw)) // BLOCK_SIZE):
        source.update(bytes(BLOCK_SIZE))
    written = {i: bytes(raw[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]) for i in (0, 1, 2, 5, 6, 7)}
    sid = emu.create_snapshot(blocks=written, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        assert sha256_file(mount.image()) == source.hexdigest()
        assert gets(emu) == 6  # the six written blocks, once each; holes cost nothing
        # st_blocks reflects allocation once the listing showed it.
        assert os.stat(mount.image()).st_blocks * 512 == 6 * BLOCK_SIZE
        done = run_ebsfuse("stats", "--json", str(mount.mountpoint), env=env, check=True)
        stats = json.loads(done.stdout)["snapshots"][sid]
        assert stats["requests"]["GetSnapshotBlock"] == 6
        assert stats["prefetch"]["blocks"] > 0  # the sequential read was prefetched
        assert stats["prefetch"]["wasted"] == 0
        assert stats["latency_ms"]["p50"] is not None
        human = run_ebsfuse("stats", str(mount.mountpoint), env=env, check=True).stdout
        assert sid in human and "GetSnapshotBlock 6" in human


def read_as_nobody(path: Path, size: int) -> subprocess.CompletedProcess[bytes]:
    """`size` bytes of `path` read by another user (nobody), as a process of theirs would."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "dd", f"if={path}", f"bs={size}", "count=1", "status=none"],
        capture_output=True,
        timeout=60,
    )  # fmt: skip


@contextlib.contextmanager
def traversable(path: Path) -> Iterator[None]:
    """Let other users through `path` and its parents up to /tmp (test dirs are 0700)."""
    changed = []
    for directory in [path, *path.parents]:
        if directory == Path(tempfile.gettempdir()) or directory == Path("/"):
            break
        changed.append((directory, directory.stat().st_mode & 0o7777))
        directory.chmod(changed[-1][1] | 0o711)
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_other_users_read_only_with_allow_other(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = {0: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with traversable(workdir):
        with MountedSnapshots(workdir / "open", [sid], env, "--allow-other") as mount:
            done = read_as_nobody(mount.image(), 4096)
            assert done.returncode == 0, done.stderr
            assert done.stdout == blocks[0][:4096]
        with MountedSnapshots(workdir / "private", [sid], env) as mount:
            done = read_as_nobody(mount.image(), 4096)
            assert done.returncode != 0 and b"Permission denied" in done.stderr, done
            assert done.stdout == b""


def test_two_snapshots_in_one_mount(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    a = {0: os.urandom(BLOCK_SIZE)}
    b = {5: os.urandom(BLOCK_SIZE)}
    sid_a = emu.create_snapshot(blocks=a, volume_size_gib=1)
    sid_b = emu.create_snapshot(blocks=b, volume_size_gib=2)
    with MountedSnapshots(workdir / "mnt", [sid_a, sid_b], env, "--allow-other") as mount:
        assert sorted(os.listdir(mount.mountpoint)) == sorted([f"{sid_a}.img", f"{sid_b}.img"])
        options = next(
            line.split()[3]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == str(mount.mountpoint)
        )
        assert {"ro", "allow_other"} <= set(options.split(","))
        assert os.path.getsize(mount.image(sid_b)) == 2 * GIB
        with open(mount.image(sid_a), "rb") as f:
            assert f.read(BLOCK_SIZE) == a[0]
        with open(mount.image(sid_b), "rb") as f:
            f.seek(5 * BLOCK_SIZE)
            assert f.read(BLOCK_SIZE) == b[5]
            f.seek(0)
            assert f.read(BLOCK_SIZE) == bytes(BLOCK_SIZE)


def test_holes_of_a_large_sparse_volume_make_no_request(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    written = {0: os.urandom(BLOCK_SIZE), 123_456: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=written, volume_size_gib=16384)  # 16 TiB
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        before = gets(emu)
        fd = os.open(mount.image(), os.O_RDONLY)
        try:
            for index in (1, 2, 5000, 123_455, 123_457, 16384 * 2048 - 1):
                assert os.pread(fd, 4096, index * BLOCK_SIZE + 100) == bytes(4096), index
            assert gets(emu) == before
            assert os.pread(fd, 64, 123_456 * BLOCK_SIZE) == written[123_456][:64]
            assert gets(emu) == before + 1
        finally:
            os.close(fd)


@pytest.fixture
def random_image(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> Iterator[tuple[int, dict[int, bytes]]]:
    """A 1 GiB volume with 24 scattered blocks written, mounted once for many examples."""
    rng = random.Random(1234)
    indexes = sorted([*rng.sample(range(64), 20), 2047, 2046, 1000, 1001])
    blocks = {i: rng.randbytes(BLOCK_SIZE) for i in indexes}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-size", "4M") as mount:
        fd = os.open(mount.image(), os.O_RDONLY)
        try:
            yield fd, blocks
        finally:
            os.close(fd)


def _expected(blocks: dict[int, bytes], offset: int, size: int) -> bytes:
    end = min(offset + size, GIB)
    out = bytearray()
    for index in range(offset // BLOCK_SIZE, (max(end, offset + 1) - 1) // BLOCK_SIZE + 1):
        if index * BLOCK_SIZE >= end:
            break
        lo = max(offset, index * BLOCK_SIZE) - index * BLOCK_SIZE
        hi = min(end, (index + 1) * BLOCK_SIZE) - index * BLOCK_SIZE
        out += blocks.get(index, bytes(BLOCK_SIZE))[lo:hi]
    return bytes(out)


interesting_offsets = st.one_of(
    st.integers(0, 66 * BLOCK_SIZE),
    st.integers(999 * BLOCK_SIZE, 1002 * BLOCK_SIZE),
    st.integers(GIB - 2 * BLOCK_SIZE, GIB + 4096),
    st.sampled_from([BLOCK_SIZE * k + d for k in (1, 2, 1000, 2047) for d in (-1, 0, 1)]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(offset=interesting_offsets, size=st.integers(0, 3 * BLOCK_SIZE))
def test_random_reads_match_the_source(
    random_image: tuple[int, dict[int, bytes]], offset: int, size: int
) -> None:
    fd, blocks = random_image
    assert os.pread(fd, size, offset) == _expected(blocks, offset, size)


def test_reads_spanning_several_token_lifetimes(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    emu.set_faults(token_ttl=2)
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(0, 48, 2)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-size", "1M") as mount:
        lists_before = emu.counters()["requests"]["ListSnapshotBlocks"]
        fd = os.open(mount.image(), os.O_RDONLY)
        try:
            # One read every 0.3 s, out of order (nothing to prefetch): 12 reads span ~3.6 s,
            # well past the tokens' 2 s lifetime.
            for index in sorted(blocks, key=lambda i: (i * 7) % 48)[:12]:
                assert os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE) == blocks[index]
                time.sleep(0.3)
        finally:
            os.close(fd)
        assert emu.counters()["requests"]["ListSnapshotBlocks"] > lists_before
        assert "token refused" not in mount.log()


def test_faults_still_give_a_byte_identical_image(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    raw = os.urandom(40 * BLOCK_SIZE)
    source = workdir / "src.img"
    source.write_bytes(raw)
    sid = emu.create_snapshot(raw, volume_size_gib=1)
    emu.set_faults(fail_rate=0.1, throttle_rps=50, truncate_rate=0.05)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        with open(mount.image(), "rb") as f:
            assert f.read(len(raw)) == raw
        counters = emu.counters()
        assert sum(counters["errors_injected"].values()) > 0


def test_every_request_failing_gives_eio_then_recovers(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = {1: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        emu.set_faults(fail_rate=1.0)
        fd = os.open(mount.image(), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as caught:
                os.pread(fd, 4096, BLOCK_SIZE)
            assert caught.value.errno == errno.EIO
            # The read gave up because the retries ran out (the policy's 6 attempts), not
            # because of anything slower; that it ends at all is the test timeout's to say.
            assert emu.counters()["errors_injected"]["InternalServerException"] >= 6
            assert "(after 6 attempts)" in mount.log(), mount.log()
            assert daemon_pids(mount.mountpoint), "the daemon died"
            emu.set_faults(fail_rate=0.0)
            # Asked again at once (as the kernel re-issues a failed read), the block fails at
            # once, without a request: no second budget. A moment later it is fetched afresh.
            requests = emu.counters()["requests"].get("GetSnapshotBlock", 0)
            with pytest.raises(OSError) as again:
                os.pread(fd, 4096, BLOCK_SIZE)
            assert again.value.errno == errno.EIO
            assert emu.counters()["requests"].get("GetSnapshotBlock", 0) == requests
            recovered: list[bytes] = []

            def read_again() -> bool:
                try:
                    recovered.append(os.pread(fd, 4096, BLOCK_SIZE))
                except OSError:
                    return False
                return True

            wait_for(read_again, what="the block to be read again after the failure hold")
            assert recovered == [blocks[1][:4096]]
        finally:
            os.close(fd)
        assert "InternalServerException" in mount.log()


def test_sigterm_unmounts_cleanly(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    sid = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    mnt = workdir / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        ebsfuse_cmd("mount", "--foreground", sid, str(mnt)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: os.path.ismount(mnt), what="the mount")
        with open(mnt / f"{sid}.img", "rb") as f:
            assert len(f.read(100)) == 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.ismount(mnt)
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_killed_daemon_leaves_no_hung_mount(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        (pid,) = daemon_pids(mount.mountpoint)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.ismount(mount.mountpoint), what="auto_unmount")


@pytest.fixture
def mount_helper() -> Iterator[None]:
    """mount(8) runs mount.fuse3 with a fixed PATH; make `ebsfuse` findable there.

    scripts/setup installs this link for good; a test run without it adds it for the test only.
    """
    if shutil.which("ebsfuse", path=MOUNT_PATH):
        yield
        return
    link = Path("/usr/local/bin/ebsfuse")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(sys.executable).parent / "ebsfuse")
    try:
        yield
    finally:
        link.unlink()


def test_mount_t_fuse_ebsfuse_and_fstab_convention(
    emu: Emulator, env: dict[str, str], workdir: Path, mount_helper: None
) -> None:
    blocks = {0: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    other_block = os.urandom(BLOCK_SIZE)
    other = emu.create_snapshot(blocks={3: other_block}, volume_size_gib=2)
    mnt = workdir / "mnt"
    mnt.mkdir()
    options = f"endpoint_url={env['AWS_ENDPOINT_URL_EBS']},region=us-east-1,cache_size=64M,_netdev"
    try:
        # Several snapshots in fstab's one SOURCE field, joined with ':' as the README says.
        done = subprocess.run(
            ["mount", "-t", "fuse.ebsfuse", f"{sid}:{other}", str(mnt), "-o", options],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mnt)
        assert sorted(os.listdir(mnt)) == sorted([f"{sid}.img", f"{other}.img"])
        with open(mnt / f"{sid}.img", "rb") as f:
            assert f.read(BLOCK_SIZE) == blocks[0]
        with open(mnt / f"{other}.img", "rb") as f:
            f.seek(3 * BLOCK_SIZE)
            assert f.read(BLOCK_SIZE) == other_block
        assert run_ebsfuse("unmount", str(mnt), env=env).returncode == 0
        wait_for(lambda: not daemon_pids(mnt), what="the daemon to exit")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.parametrize("by_option", [False, True], ids=["source", "volume-option"])
def test_fstab_mounts_a_volumes_history(
    emu: Emulator, env: dict[str, str], workdir: Path, mount_helper: None, by_option: bool
) -> None:
    volume = "vol-0123456789abcdef0"
    chain = emu.create_daily_chain(volume, 2, written_blocks=2, changed_per_day=1)
    mnt = workdir / "mnt"
    mnt.mkdir()
    options = f"endpoint_url={env['AWS_ENDPOINT_URL_EBS']},catalog_ttl=300,_netdev"
    source = volume
    if by_option:
        source, options = "ebsfuse", f"{options},volume={volume}"
    try:
        done = subprocess.run(
            ["mount", "-t", "fuse.ebsfuse", source, str(mnt), "-o", options],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        latest = mnt / "by-volume" / volume / "latest"
        assert os.readlink(latest) == f"../../{chain[-1][0]}.img"
        with open(latest, "rb") as f:
            assert f.read(BLOCK_SIZE) == chain[-1][1][0]
        assert run_ebsfuse("unmount", str(mnt), env=env).returncode == 0
        wait_for(lambda: not daemon_pids(mnt), what="the daemon to exit")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_audit_log_lists_exactly_the_blocks_fetched(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = {i: os.urandom(BLOCK_SIZE) for i in (0, 3, 9)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    audit = workdir / "audit.jsonl"
    with MountedSnapshots(workdir / "mnt", [sid], env, "--audit-log", str(audit)) as mount:
        fd = os.open(mount.image(), os.O_RDONLY)
        try:
            os.pread(fd, 4096, 3 * BLOCK_SIZE)
            os.pread(fd, 4096, 9 * BLOCK_SIZE + 8192)
            os.pread(fd, 4096, 5 * BLOCK_SIZE)  # a hole: nothing fetched, nothing logged
        finally:
            os.close(fd)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(entry["block"] for entry in lines) == [3, 9]
    for entry in lines:
        assert entry["snapshot"] == sid and entry["bytes"] == BLOCK_SIZE
        digest = hashlib.sha256(blocks[entry["block"]]).digest()
        assert entry["sha256"] == base64.b64encode(digest).decode()


def test_kernel_readahead_is_raised_unless_asked_not_to(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    for tuned in (True, False):
        extra = () if tuned else ("--no-kernel-tuning",)
        with MountedSnapshots(workdir / f"mnt-{tuned}", [sid], env, *extra) as mount:
            device = kernel.mount_device(str(mount.mountpoint))
            assert device is not None
            bdi = Path(f"/sys/class/bdi/{device[0]}:{device[1]}/read_ahead_kb")
            # The FUSE connection's background requests, the README's other tuning claim.
            connection = Path(kernel.FUSECTL) / str(device[1]) / "max_background"

            def settings(bdi: Path = bdi, connection: Path = connection) -> tuple[int, int | None]:
                background = int(connection.read_text()) if connection.exists() else None
                return int(bdi.read_text()), background

            if tuned:  # applied just after the mount goes live, by the daemon
                wait_for(lambda: settings()[0] == kernel.READ_AHEAD_KB, what="read_ahead_kb")
                if connection.exists():
                    wait_for(lambda: settings()[1] == kernel.MAX_BACKGROUND, what="max_background")
                assert "kernel settings for" in mount.log()
            else:
                read_ahead, background = settings()
                assert read_ahead != kernel.READ_AHEAD_KB  # the kernel's own defaults
                assert background != kernel.MAX_BACKGROUND
                assert "kernel settings for" not in mount.log()


def test_stats_show_the_shared_request_rate(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    """Throttling answers teach the mount's one rate limiter, and `ebsfuse stats` shows it."""
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(48)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env, "--max-rps", "200") as mount:
        emu.set_faults(throttle_rps=15)
        with open(mount.image(), "rb") as f:
            for index in range(48):
                assert f.read(BLOCK_SIZE) == blocks[index], index
        done = run_ebsfuse("stats", "--json", str(mount.mountpoint), env=env, check=True)
        rate = json.loads(done.stdout)["rate"]
        assert rate["max_rps"] == 200 and rate["throttles"] > 0 and rate["rate_cuts"] > 0
        assert rate["rps"] is not None and rate["rps"] <= 200
        human = run_ebsfuse("stats", str(mount.mountpoint), env=env, check=True).stdout
        assert "requests/s, at most 200" in human and "throttling answers" in human


def test_stats_count_what_happened_under_faults(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    """The counters `ebsfuse stats` promises, each against what the emulator saw."""
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(8)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:

        def stats() -> dict[str, Any]:
            done = run_ebsfuse("stats", "--json", str(mount.mountpoint), env=env)
            assert done.returncode == 0, done.stderr
            return dict(json.loads(done.stdout))

        emu.set_faults(fail_rate=1.0, max_faults=2)  # two InternalServerException, then fine
        with open(mount.image(), "rb") as f:
            assert f.read(4 * BLOCK_SIZE) == b"".join(blocks[i] for i in range(4))
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(0)
            assert f.read(4096) == blocks[0][:4096]  # from the daemon's cache this time
            wait_for(lambda: stats()["requests_in_flight"] == 0, what="readahead to settle")
            during = stats()["snapshots"][sid]
        after = stats()["snapshots"][sid]
    served = emu.counters()["requests"]
    assert during["readahead_windows"] and not after["readahead_windows"]  # per open file
    assert after["retries"] == {"InternalServerException": 2}
    assert after["requests"]["GetSnapshotBlock"] == served["GetSnapshotBlock"]
    assert after["requests"]["ListSnapshotBlocks"] == served["ListSnapshotBlocks"]
    assert after["cache"]["hits"] >= 1
    assert after["cache"]["misses"] == served["GetSnapshotBlock"] - 2  # blocks, not attempts
    assert after["prefetch"]["blocks"] >= 1
    assert after["token_ranges"] >= 1 and after["tokens_held"] == len(blocks)
    assert after["bytes_fetched"] == after["cache"]["misses"] * BLOCK_SIZE


def test_unmount_lazy_detaches_while_a_loop_device_still_reads_the_image(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    """The README's `unmount --lazy`: a loop device on the image keeps the mount busy; --lazy
    detaches it from the tree, the loop device reads on, and the daemon ends with it."""
    blocks = {0: os.urandom(BLOCK_SIZE), 9: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        with loop_device(mount.image()) as device:
            busy = run_ebsfuse("unmount", str(mount.mountpoint), env=env)
            assert busy.returncode != 0 and "--lazy" in busy.stderr, busy.stderr
            assert os.path.ismount(mount.mountpoint)
            assert run_ebsfuse("unmount", "--lazy", str(mount.mountpoint), env=env).returncode == 0
            assert not os.path.ismount(mount.mountpoint)
            with open(device, "rb") as f:  # still served, through the detached mount
                f.seek(9 * BLOCK_SIZE)
                assert f.read(BLOCK_SIZE) == blocks[9]
            assert daemon_pids(mount.mountpoint)
        wait_for(lambda: not daemon_pids(mount.mountpoint), what="the daemon to end")
