"""Snapshot tools: regressions found in review, each a way to end with wrong or lost data."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.emulator import Emulator

from .conftest import needs_root, run_ebsfuse


@pytest.fixture
def writable_loop(workdir: Path) -> Iterator[str]:
    """A 3 GiB read-write loop device holding 0xFF in block 2053, removed afterwards."""
    backing = workdir / "device.img"
    with open(backing, "wb") as f:
        f.truncate(3 * GIB)
        f.seek(2053 * BLOCK_SIZE)
        f.write(b"\xff" * BLOCK_SIZE)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@needs_root
def test_incremental_download_to_a_device_zeroes_past_the_old_volume(
    emu: Emulator, env: dict[str, str], workdir: Path, writable_loop: str
) -> None:
    # OLD is 1 GiB; NEW (its child) is 2 GiB and wrote only block 2100. The device's garbage
    # at block 2053, past OLD's volume, must read as zeros afterwards, as NEW's image does.
    old = emu.create_snapshot(blocks={0: b"A" * BLOCK_SIZE}, volume_size_gib=1)
    new = emu.create_snapshot(blocks={2100: b"B" * BLOCK_SIZE}, volume_size_gib=2, parent=old)
    device_env = dict(env, XDG_STATE_HOME=str(workdir / "state"))
    for args in (("download", old, writable_loop, "--force", "-q"),
                 ("download", new, writable_loop, "--base", old, "--force", "-q")):  # fmt: skip
        done = run_ebsfuse(*args, env=device_env)
        assert done.returncode == 0, done.stderr
    with open(writable_loop, "rb") as device:
        device.seek(2053 * BLOCK_SIZE)
        assert device.read(BLOCK_SIZE) == bytes(BLOCK_SIZE)
        device.seek(2100 * BLOCK_SIZE)
        assert device.read(BLOCK_SIZE) == b"B" * BLOCK_SIZE
        device.seek(0)
        assert device.read(BLOCK_SIZE) == b"A" * BLOCK_SIZE


def test_download_never_replaces_a_fifo_or_character_device(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    done = run_ebsfuse("download", sid, str(fifo), "--force", env=env)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "neither a regular file nor a block device" in done.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_backwards_incremental_download_cuts_the_file_to_the_smaller_volume(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    small = emu.create_snapshot(blocks={0: b"A" * BLOCK_SIZE}, volume_size_gib=1)
    big = emu.create_snapshot(blocks={2100: b"B" * BLOCK_SIZE}, volume_size_gib=2, parent=small)
    dest = workdir / "image"
    assert run_ebsfuse("download", big, str(dest), "-q", env=env).returncode == 0
    done = run_ebsfuse("download", small, str(dest), "--base", big, "--force", "-q", env=env)
    assert done.returncode == 0, done.stderr
    assert dest.stat().st_size == GIB
    with open(dest, "rb") as f:
        assert f.read(BLOCK_SIZE) == b"A" * BLOCK_SIZE


def test_upload_refuses_an_unwritable_manifest_before_starting_a_snapshot(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    image = workdir / "disk.img"
    image.write_bytes(os.urandom(BLOCK_SIZE))
    manifest = workdir / "no-such-dir" / "manifest"
    done = run_ebsfuse("upload", str(image), "--manifest", str(manifest), env=env)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "manifest" in done.stderr
    assert emu.counters()["requests"].get("StartSnapshot", 0) == 0  # nothing left pending
