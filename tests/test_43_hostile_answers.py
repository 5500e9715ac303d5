"""Real mounts and tools against hostile answers: never a wrong byte, never past the bound.

For every fault the emulator can inject (cut, empty, foreign and malformed listing pages, a
VolumeSize that changes; trickling, stalled, oversized and corrupt block bodies; bare 429s):
- once (`max_faults=1`): the reader gets the right bytes;
- always: the reader gets EIO within the mount's `--block-timeout`, never zeros for a written
  block; asked again at once, it fails at once without a request; the daemon lives and serves
  other blocks; the log has one line for the failed block and no traceback.
`hash` and `download` give the right result or exit non-zero with one line, never a wrong
digest or image; a VolumeSize beyond 64 TiB refuses the mount with one line.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.emulator import Emulator

from .conftest import (
    MountedSnapshots,
    daemon_pids,
    mounts_under,
    needs_fuse,
    run_ebsfuse,
    wait_for,
)

# The mount's describe call lists blocks 0..99 (one page of 100, with a NextToken), so block
# LISTED_LATER needs a listing of its own after mounting, and SEEDED does not.
SEEDED = 5
LISTED_LATER = 105
WRITTEN = 110
# A short bound keeps the "always" cases quick; the bound itself is what is tested.
BOUND_S = 4.0
# Each test's own timeout (pytest-timeout): the bound, with slack for the mount's start, FUSE
# round trips and a loaded machine. The property is "EIO in bounded time, never a hang", which
# a test that hangs past this fails; no test measures a latency.
TEST_TIMEOUT_S = 60.0
pytestmark = [needs_fuse, pytest.mark.timeout(TEST_TIMEOUT_S)]

LISTING_FAULTS: dict[str, dict[str, Any]] = {
    "cut": {"list_fault": "cut", "list_fault_rate": 1.0},
    "empty": {"list_fault": "empty", "list_fault_rate": 1.0},
    "html": {"list_fault": "html", "list_fault_rate": 1.0},
    "malformed": {"list_fault": "malformed", "list_fault_rate": 1.0},
    "bare-429": {"bare_429_rate": 1.0},
}
BLOCK_FAULTS: dict[str, dict[str, Any]] = {
    "trickle": {"body_fault": "trickle", "body_fault_rate": 1.0},
    "stall": {"body_fault": "stall", "body_fault_rate": 1.0},
    "oversize": {"body_fault": "oversize", "body_fault_rate": 1.0},
    "corrupt": {"corrupt_rate": 1.0},
    "bare-429": {"bare_429_rate": 1.0},
}
# The code each "always" fault leaves in its one log line.
EXPECTED_CODE = {
    "cut": "ResponseStreamingError",
    "empty": "MalformedListing",
    "html": "MalformedListing",
    "malformed": "MalformedListing",
    "bare-429": "429",
    "trickle": "ReadTimeoutError",
    "stall": "ReadTimeoutError",
    "oversize": "OversizedBody",
    "corrupt": "ChecksumMismatch",
}


@pytest.fixture
def blocks() -> dict[int, bytes]:
    return {i: os.urandom(BLOCK_SIZE) for i in range(WRITTEN)}


@pytest.fixture
def sid(emu: Emulator, blocks: dict[int, bytes]) -> str:
    return emu.create_snapshot(blocks=blocks, volume_size_gib=1)


@pytest.fixture
def mount(
    emu: Emulator, env: dict[str, str], workdir: Path, sid: str
) -> Iterator[MountedSnapshots]:
    with MountedSnapshots(
        workdir / "mnt", [sid], env, "--block-timeout", str(BOUND_S), "--cache-size", "8M"
    ) as mounted:
        yield mounted


def read_block(mount: MountedSnapshots, index: int, size: int = BLOCK_SIZE) -> bytes:
    """One read of block `index`, with the kernel's readahead off: no other block is asked for
    in the background, so what the service sees is this read alone."""
    fd = os.open(mount.image(), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, index * BLOCK_SIZE)
    finally:
        os.close(fd)


def error_lines(mount: MountedSnapshots) -> list[str]:
    return [line for line in mount.log().splitlines() if " ERROR " in line]


def assert_fails_within_the_bound(mount: MountedSnapshots, snapshot_id: str, index: int) -> None:
    # "Within the bound" is the test timeout's to enforce (TEST_TIMEOUT_S), not a clock's.
    with pytest.raises(OSError) as caught:
        read_block(mount, index, 4096)
    assert caught.value.errno == errno.EIO
    # Asked again at once (the kernel re-issues a failed read), the block fails at once from
    # what the daemon remembers: no new budget, no request for it, no second error line.
    with pytest.raises(OSError) as again:
        read_block(mount, index, 4096)
    assert again.value.errno == errno.EIO
    assert f"{snapshot_id}: block {index}: " in failed_moments_ago(mount)
    assert daemon_pids(mount.mountpoint), "the daemon died"


def reads_again(mount: MountedSnapshots, index: int, expected: bytes) -> None:
    """Once the faults stop, the daemon serves the block right. Not always at the first try: a
    storm of throttling answers leaves the shared request rate low for a few seconds, and a
    read refused a turn within the short bound fails (it never returns wrong bytes)."""
    got: list[bytes] = []

    def attempt() -> bool:
        try:
            got.append(read_block(mount, index))
        except OSError as error:
            assert error.errno == errno.EIO
            return False
        return True

    wait_for(attempt, timeout=60, what=f"block {index} to read again")
    assert got[-1] == expected


def failed_moments_ago(mount: MountedSnapshots) -> str:
    return "\n".join(line for line in mount.log().splitlines() if "(failed moments ago)" in line)


def assert_one_line_for_the_failed_block(
    mount: MountedSnapshots, snapshot_id: str, index: int, code: str
) -> None:
    """Two failed reads of one block, one log line: snapshot, block, code and attempts.

    The mount's readahead may have tried the next blocks too; each of those has its own one
    line, and no block has two.
    """
    lines = error_lines(mount)
    mine = [line for line in lines if f"{snapshot_id}: block {index}: " in line]
    assert len(mine) == 1, lines
    assert f"{snapshot_id}: block {index}: {code}" in mine[0], mine[0]
    assert re.search(r"after \d+ attempts", mine[0]), mine[0]
    named = [m.group(1) for m in (re.search(r": block (\d+): ", line) for line in lines) if m]
    assert len(named) == len(lines) == len(set(named)), lines
    assert "Traceback" not in mount.log()


@pytest.mark.parametrize("fault", sorted(LISTING_FAULTS))
def test_a_listing_fault_once_still_reads_the_right_bytes(
    emu: Emulator, mount: MountedSnapshots, blocks: dict[int, bytes], fault: str
) -> None:
    emu.set_faults(**LISTING_FAULTS[fault], max_faults=1)
    assert read_block(mount, LISTED_LATER) == blocks[LISTED_LATER]
    injected = emu.counters()["errors_injected"]
    assert sum(v for k, v in injected.items() if k.startswith("list-") or k == "bare429") == 1
    assert error_lines(mount) == [] and "Traceback" not in mount.log()


@pytest.mark.parametrize("fault", sorted(LISTING_FAULTS))
def test_a_listing_fault_always_gives_eio_never_zeros(
    emu: Emulator, mount: MountedSnapshots, sid: str, blocks: dict[int, bytes], fault: str
) -> None:
    emu.set_faults(**LISTING_FAULTS[fault])
    assert_fails_within_the_bound(mount, sid, LISTED_LATER)
    assert_one_line_for_the_failed_block(mount, sid, LISTED_LATER, EXPECTED_CODE[fault])
    # Nothing was learned from the broken pages: once the service answers properly, a block
    # of that range reads right (it would read as zeros had a page made it a hole).
    emu.set_faults(list_fault_rate=0.0, bare_429_rate=0.0)
    reads_again(mount, LISTED_LATER + 2, blocks[LISTED_LATER + 2])


def test_a_listing_for_another_volume_size_is_refused(
    emu: Emulator, mount: MountedSnapshots, sid: str, blocks: dict[int, bytes]
) -> None:
    emu.set_faults(report_volume_size=2)  # the mount knows 1 GiB
    assert_fails_within_the_bound(mount, sid, LISTED_LATER)
    assert_one_line_for_the_failed_block(mount, sid, LISTED_LATER, "MalformedListing")
    emu.set_faults(report_volume_size=0)
    reads_again(mount, LISTED_LATER + 1, blocks[LISTED_LATER + 1])


@pytest.mark.parametrize("fault", sorted(BLOCK_FAULTS))
def test_a_block_fault_once_still_reads_the_right_bytes(
    emu: Emulator, mount: MountedSnapshots, blocks: dict[int, bytes], fault: str
) -> None:
    emu.set_faults(**BLOCK_FAULTS[fault], max_faults=1)
    assert read_block(mount, SEEDED) == blocks[SEEDED]
    assert sum(emu.counters()["errors_injected"].values()) == 1
    assert error_lines(mount) == [] and "Traceback" not in mount.log()


@pytest.mark.parametrize("fault", sorted(BLOCK_FAULTS))
def test_a_block_fault_always_gives_eio_within_the_bound(
    emu: Emulator, mount: MountedSnapshots, sid: str, blocks: dict[int, bytes], fault: str
) -> None:
    emu.set_faults(**BLOCK_FAULTS[fault])
    assert_fails_within_the_bound(mount, sid, SEEDED)
    assert_one_line_for_the_failed_block(mount, sid, SEEDED, EXPECTED_CODE[fault])
    emu.set_faults(body_fault_rate=0.0, corrupt_rate=0.0, bare_429_rate=0.0)
    reads_again(mount, SEEDED + 20, blocks[SEEDED + 20])


@pytest.mark.parametrize("gib", [70000, 2**40])
def test_an_absurd_volume_size_refuses_the_mount_with_one_line(
    emu: Emulator, env: dict[str, str], workdir: Path, sid: str, gib: int
) -> None:
    emu.set_faults(report_volume_size=gib)
    mnt = workdir / "mnt"
    mnt.mkdir()
    done = run_ebsfuse("mount", sid, str(mnt), env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "VolumeSize" in lines[0] and sid in lines[0], done.stderr
    assert mounts_under(workdir) == [] and not daemon_pids(mnt)


def expected_image_sha256(blocks: dict[int, bytes]) -> str:
    digest = hashlib.sha256()
    for index in range(WRITTEN):
        digest.update(blocks[index])
    zeros = bytes(16 * BLOCK_SIZE)
    for _ in range((GIB - WRITTEN * BLOCK_SIZE) // len(zeros)):
        digest.update(zeros)
    digest.update(bytes((GIB - WRITTEN * BLOCK_SIZE) % len(zeros)))
    return digest.hexdigest()


@pytest.mark.parametrize("fault", ["cut", "empty", "html", "malformed"])
def test_hash_and_download_are_right_or_fail_never_wrong(
    emu: Emulator,
    env: dict[str, str],
    workdir: Path,
    sid: str,
    blocks: dict[int, bytes],
    fault: str,
) -> None:
    emu.set_faults(**LISTING_FAULTS[fault], max_faults=1)
    done = run_ebsfuse("hash", sid, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert f'"sha256": "{expected_image_sha256(blocks)}"' in done.stdout
    emu.set_faults(max_faults=1)
    image = workdir / "image"
    done = run_ebsfuse("download", sid, str(image), "-q", env=env)
    assert done.returncode == 0, done.stderr
    with open(image, "rb") as f:
        for index in range(WRITTEN):
            assert f.read(BLOCK_SIZE) == blocks[index], index
    image.unlink()
    # Always broken: a non-zero exit with one line, never a digest or a finished image.
    emu.set_faults(max_faults=0)
    for args in (["hash", sid], ["download", sid, str(image), "-q"]):
        done = run_ebsfuse(*args, "--block-timeout", str(BOUND_S), env=env)
        assert done.returncode != 0, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and sid in lines[0], done.stderr
        assert EXPECTED_CODE[fault] in lines[0]
        assert done.stdout.strip() == ""


@pytest.mark.parametrize("fault", ["empty", "html", "malformed"])
def test_diff_and_info_are_right_or_fail_never_wrong(
    emu: Emulator, env: dict[str, str], sid: str, fault: str
) -> None:
    """An empty ListChangedBlocks page would read as "nothing changed": refused instead."""
    child = emu.create_snapshot(blocks={3: os.urandom(BLOCK_SIZE)}, parent=sid)
    emu.set_faults(**LISTING_FAULTS[fault], max_faults=1)
    done = run_ebsfuse("diff", sid, child, "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert '"changed_blocks": 1' in done.stdout
    emu.set_faults(max_faults=0)
    for args in (["diff", sid, child], ["info", sid]):
        done = run_ebsfuse(*args, "--block-timeout", str(BOUND_S), env=env)
        assert done.returncode != 0, args
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "MalformedListing" in lines[0], done.stderr
        assert done.stdout.strip() == ""
