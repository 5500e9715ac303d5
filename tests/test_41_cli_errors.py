"""Bad input to `ebsfuse mount`: one clear line on stderr, non-zero exit, nothing mounted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.cli.commands import translate_mount_helper_argv
from ebsfuse.emulator import Emulator

from .conftest import (
    MountedSnapshots,
    assert_one_line_failure,
    aws_env,
    daemon_pids,
    ebsfuse_cmd,
    mounts_under,
    needs_fuse,
    needs_root,
    run_ebsfuse,
    sweep,
)


@pytest.fixture
def mnt(workdir: Path) -> Path:
    path = workdir / "mnt"
    path.mkdir()
    return path


def mount_fails(env: dict[str, str], mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_ebsfuse("mount", *args, env=env, timeout=120)
    assert not mounts_under(mnt.parent), "a failed mount left something mounted"
    assert not daemon_pids(mnt), "a failed mount left a daemon running"
    return done


@pytest.fixture
def sid(emu: Emulator) -> str:
    return emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)


def test_malformed_snapshot_id(env: dict[str, str], mnt: Path) -> None:
    assert_one_line_failure(mount_fails(env, mnt, "snap-XYZ", str(mnt)), "snap-XYZ", "snapshot id")


@needs_fuse
def test_snapshot_that_does_not_exist(env: dict[str, str], mnt: Path) -> None:
    done = mount_fails(env, mnt, "snap-0123456789abcdef0", str(mnt))
    assert_one_line_failure(done, "snap-0123456789abcdef0", "SNAPSHOT_NOT_FOUND")


@needs_fuse
@pytest.mark.parametrize("status", ["pending", "error"])
def test_snapshot_not_completed(emu: Emulator, env: dict[str, str], mnt: Path, status: str) -> None:
    sid = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1, status=status)
    assert_one_line_failure(mount_fails(env, mnt, sid, str(mnt)), sid)


@needs_fuse
def test_no_credentials(emu: Emulator, mnt: Path, sid: str) -> None:
    env = aws_env(emu.endpoint)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    assert_one_line_failure(mount_fails(env, mnt, sid, str(mnt)), "credentials")


def test_mountpoint_missing(env: dict[str, str], workdir: Path, sid: str) -> None:
    missing = workdir / "nope"
    assert_one_line_failure(mount_fails(env, missing, sid, str(missing)), "does not exist")


def test_mountpoint_not_a_directory(env: dict[str, str], workdir: Path, sid: str) -> None:
    target = workdir / "file"
    target.write_text("x")
    assert_one_line_failure(mount_fails(env, target, sid, str(target)), "not a directory")


@needs_fuse
@needs_root
def test_mountpoint_already_mounted(env: dict[str, str], workdir: Path, sid: str) -> None:
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        done = run_ebsfuse("mount", sid, str(mount.mountpoint), env=env)
        assert_one_line_failure(done, "already")
        assert len(daemon_pids(mount.mountpoint)) == 1


@needs_root
def test_dev_fuse_unavailable(env: dict[str, str], mnt: Path, sid: str) -> None:
    if not shutil.which("unshare"):
        pytest.skip("unshare is not installed")
    # Whether this machine lets us make the namespace is asked on its own, first: a skip must
    # never hide a failure of the command under test.
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    # A private mount namespace with an empty /dev: the container-without-fuse case.
    cmd = " ".join(ebsfuse_cmd("mount", sid, str(mnt)))
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs none /dev && exec {cmd}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_failure(done, "/dev/fuse")
    assert not mounts_under(mnt)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--no-such-option"], "unrecognized arguments"),
        (["--cache-size", "lots"], "cannot parse size"),
        (["--cache-size", "100K"], "smaller than one 512 KiB block"),
        (["--max-concurrency", "0"], "at least 1"),
    ],
)
def test_bad_options(
    env: dict[str, str], mnt: Path, sid: str, args: list[str], needle: str
) -> None:
    assert_one_line_failure(mount_fails(env, mnt, *args, sid, str(mnt)), needle)


def test_same_snapshot_twice(env: dict[str, str], mnt: Path, sid: str) -> None:
    assert_one_line_failure(mount_fails(env, mnt, sid, sid, str(mnt)), "twice")


def test_unknown_mount_helper_option(env: dict[str, str], mnt: Path, sid: str) -> None:
    done = run_ebsfuse(sid, str(mnt), "-o", "flavour=vanilla", env=env)
    assert_one_line_failure(done, "unknown mount option")


def test_unmount_of_something_not_mounted(env: dict[str, str], mnt: Path) -> None:
    assert_one_line_failure(run_ebsfuse("unmount", str(mnt), env=env), "not mounted")


@needs_fuse
def test_access_denied(emu: Emulator, env: dict[str, str], mnt: Path, sid: str) -> None:
    emu.set_faults(denied_access_keys=env["AWS_ACCESS_KEY_ID"])
    done = mount_fails(env, mnt, sid, str(mnt))
    assert_one_line_failure(done, sid, "AccessDeniedException", "UNAUTHORIZED_ACCOUNT")
    # Refused at once: a permission problem is not retried.
    assert emu.counters()["requests"]["ListSnapshotBlocks"] == 1


@needs_fuse
def test_unknown_profile(env: dict[str, str], mnt: Path, sid: str) -> None:
    done = mount_fails(env, mnt, "--profile", "no-such-profile", sid, str(mnt))
    assert_one_line_failure(done, "no-such-profile")


def test_log_file_that_cannot_be_written(env: dict[str, str], mnt: Path, sid: str) -> None:
    done = mount_fails(env, mnt, "--log-file", "/nonexistent/dir/log", sid, str(mnt))
    assert_one_line_failure(done, "/nonexistent/dir/log")


@needs_fuse
@needs_root
def test_mount_and_unmount_through_a_symlinked_mountpoint(
    env: dict[str, str], workdir: Path, sid: str
) -> None:
    real = workdir / "real"
    real.mkdir()
    link = workdir / "link"
    link.symlink_to(real)
    try:
        done = run_ebsfuse("mount", sid, str(link), env=env)
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(real)
        assert run_ebsfuse("unmount", str(link), env=env).returncode == 0
        assert not os.path.ismount(real)
    finally:
        sweep(workdir)


def test_mount_helper_arguments_translate_to_the_mount_command() -> None:
    argv = translate_mount_helper_argv(
        ["snap-0a:snap-0b", "/mnt/x", "-o", "rw,nodev,region=eu-west-1,cache_size=1G,"
         "allow_other,auto_unmount,x-systemd.automount,no_kernel_tuning", "-t", "fuse.ebsfuse",
         "-n"]
    )  # fmt: skip
    assert argv == [
        "mount", "--region", "eu-west-1", "--cache-size", "1G", "--allow-other",
        "--no-kernel-tuning", "--", "snap-0a", "snap-0b", "/mnt/x",
    ]  # fmt: skip


def test_stats_and_help_load_no_fuse_trio_or_boto3(tmp_path: Path) -> None:
    """`ebsfuse stats` reads a JSON file: it must start light, whatever the mount loads."""
    doc = {"cache": {"bytes": 0, "limit": 1}, "requests_in_flight": 0, "max_concurrency": 64}
    (tmp_path / ".ebsfuse-stats").write_text(json.dumps({**doc, "snapshots": {}}))
    probe = (
        "import sys\nfrom ebsfuse.cli import main\n"
        f"main(['stats', {str(tmp_path)!r}])\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'pyfuse3', 'trio', 'boto3', 'botocore', 'cachetools', 'urllib3'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert "cache 0 of 0 MiB" in done.stdout


def test_points_in_time_read_as_restore_at_takes_them() -> None:
    from datetime import UTC, datetime, timedelta

    from ebsfuse.cli.options import point_in_time

    assert point_in_time("2026-11-02T12:00:00Z") == datetime(2026, 11, 2, 12, tzinfo=UTC)
    assert point_in_time("2026-11-02 12:00") == datetime(2026, 11, 2, 12, tzinfo=UTC)
    assert point_in_time("2026-11-02T13:00:00+01:00") == datetime(2026, 11, 2, 12, tzinfo=UTC)
    for text, ago in (
        ("yesterday", timedelta(days=1)),
        ("3 days ago", timedelta(days=3)),
        ("90 minutes ago", timedelta(minutes=90)),
        ("1 week ago", timedelta(7)),
    ):
        assert abs(datetime.now(UTC) - ago - point_in_time(text)) < timedelta(seconds=5), text


def test_output_cut_short_by_its_reader_ends_quietly(emu: Emulator, env: dict[str, str]) -> None:
    """`ebsfuse diff ... | head`: the reader goes away; no traceback, the status SIGPIPE gives."""
    a, b = b"a" * BLOCK_SIZE, b"b" * BLOCK_SIZE  # one object each: the emulator keeps refs
    first = emu.create_snapshot(blocks=dict.fromkeys(range(0, 2000, 2), a))
    # 500 changed ranges: 25 KB of output, past any buffer, so writing it meets the closed pipe
    second = emu.create_snapshot(blocks=dict.fromkeys(range(0, 2000, 4), b), parent=first)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        done = subprocess.run(
            ebsfuse_cmd("diff", first, second), env=env, stdout=write_end, stderr=subprocess.PIPE
        )
    finally:
        os.close(write_end)
    assert b"Traceback" not in done.stderr
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
