"""`ebsfuse changes`: file-level changes between two snapshots, through real mounts.

Each filesystem (ext4, XFS, NTFS) is made with its own mkfs, filled through a read-write loop
mount, snapshotted into the emulator, changed (add, delete, append, overwrite in place,
chmod/chown, touch, rename, a symlink retargeted, and a file rewritten with its size and times
put back), and snapshotted again as a child holding only the blocks that differ. The command
then runs as users run it, against the emulator over HTTP, and its JSON lines are checked
entry by entry, with the emulator's counters showing which blocks were fetched.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.emulator import Emulator

from .conftest import (
    allocated_blocks,
    assert_one_line_failure,
    ebsfuse_cmd,
    loops_backed_by,
    mounts_under,
    needs_fuse,
    needs_root,
    run_ebsfuse,
    wait_for,
)

MIB = 1024 * 1024
VOLUME_MIB = 400  # mkfs.xfs wants 300 MB at least
# Where the overwritten-in-place region of big.bin lies: inside its second MiB.
OVERWRITE_AT = MIB + 8192


@dataclass
class Pair:
    first: str
    second: str
    fstype: str
    changed_blocks: set[int]
    second_alone: str  # day two again, as a snapshot of no lineage


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Volume:
    """A volume image with a filesystem, mounted read-write to change it, then snapshotted."""

    def __init__(
        self, emu: Emulator, workdir: Path, fstype: str, *, start_sector: int | None = None
    ) -> None:
        self.emu, self.fstype = emu, fstype
        self.image = workdir / f"{fstype}.img"
        self.mnt = workdir / f"{fstype}-rw"
        self.mnt.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(VOLUME_MIB * MIB)
        self.window = ""  # mount(8)'s offset and sizelimit options for a partition
        target = str(self.image)
        if start_sector is not None:
            # One MBR partition; an odd start, so no block boundary of the volume is one of
            # the filesystem's.
            subprocess.run(
                ["sfdisk", "-q", str(self.image)],
                input=f"start={start_sector}, type=83\n",
                text=True,
                check=True,
                capture_output=True,
            )
            offset, size = start_sector * 512, VOLUME_MIB * MIB - start_sector * 512
            self.window = f",offset={offset},sizelimit={size}"
            target = _attach(self.image, offset, size)
        self.format(fstype, target)
        if start_sector is not None:
            _run("losetup", "-d", target)
        self.before: dict[int, bytes] = {}
        self.snapshots: list[str] = []

    def format(self, fstype: str, target: str | None = None) -> None:
        mkfs = {
            "ext4": ["mkfs.ext4", "-q", "-F", "-I", "256", "-E", "lazy_itable_init=0"],
            "xfs": ["mkfs.xfs", "-q", "-f"],
            "ntfs": ["mkntfs", "-q", "-F", "-Q"],
        }[fstype]
        self.fstype = fstype
        _run(*mkfs, target or str(self.image))

    def __enter__(self) -> Path:
        if self.fstype == "ntfs":
            _run("ntfs-3g", str(self.image), str(self.mnt))
        else:
            _run("mount", "-o", "loop" + self.window, str(self.image), str(self.mnt))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", str(self.mnt)], capture_output=True)
        for device in _loops_of(self.image):
            subprocess.run(["losetup", "-d", device], capture_output=True)

    def snapshot(self, *, volume_size_gib: int = 1) -> tuple[str, set[int]]:
        """A snapshot of the image as it is now: a child of the last, with what differs."""
        now = allocated_blocks(self.image)
        changed = {i: data for i, data in now.items() if self.before.get(i) != data}
        changed |= {i: bytes(BLOCK_SIZE) for i in self.before if i not in now}
        parent = self.snapshots[-1] if self.snapshots else None
        sid = self.emu.create_snapshot(
            blocks=changed, volume_size_gib=volume_size_gib, parent=parent
        )
        self.snapshots.append(sid)
        self.before = now
        return sid, set(changed)


def _attach(image: Path, offset: int, size: int) -> str:
    done = subprocess.run(
        ["losetup", "-f", "--show", "-o", str(offset), "--sizelimit", str(size), str(image)],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def _loops_of(image: Path) -> list[str]:
    done = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
    return [line.split(":")[0] for line in done.stdout.splitlines() if line]


def fill(root: Path, fstype: str) -> dict[str, Any]:
    """The first day's files; returns what the second day must restore (stomp.bin's times)."""
    rng = random.Random(7)
    (root / "keep.txt").write_bytes(b"never touched\n" * 100)
    (root / "big.bin").write_bytes(rng.randbytes(3 * MIB))
    (root / "append.log").write_bytes(b"line\n" * 1000)
    (root / "delete.me").write_bytes(b"soon gone\n")
    (root / "chmod.sh").write_bytes(b"#!/bin/sh\n")
    (root / "chown.dat").write_bytes(b"owned\n")
    (root / "touch.txt").write_bytes(b"touched\n")
    (root / "rename-old.txt").write_bytes(b"moving\n")
    (root / "target1").write_bytes(b"one\n")
    (root / "target2").write_bytes(b"two\n")
    (root / "stomp.bin").write_bytes(rng.randbytes(MIB))
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n")
    (root / "olddir").mkdir()
    (root / "olddir" / "child.txt").write_bytes(b"moves along\n")
    os.symlink("target1", root / "link")
    os.chmod(root / "chmod.sh", 0o644)
    os.sync()
    return {"stomp": os.stat(root / "stomp.bin")}


def change(root: Path, fstype: str, kept: dict[str, Any]) -> None:
    """The second day: one change of each kind."""
    rng = random.Random(8)
    (root / "new.txt").write_bytes(b"added\n")
    (root / "delete.me").unlink()
    with open(root / "append.log", "ab") as f:
        f.write(b"appended\n")
    with open(root / "big.bin", "r+b") as f:
        f.seek(OVERWRITE_AT)
        f.write(rng.randbytes(100))
    if fstype != "ntfs":  # ntfs-3g without a user mapping shows 0777, root: nothing to see
        os.chmod(root / "chmod.sh", 0o700)
        os.chown(root / "chown.dat", 1000, 1000)
    os.utime(root / "touch.txt", (1_700_000_000, 1_700_000_000))
    os.rename(root / "rename-old.txt", root / "rename-new.txt")
    os.rename(root / "olddir", root / "newdir")
    os.unlink(root / "link")
    os.symlink("target2", root / "link")
    stomp = kept["stomp"]
    with open(root / "stomp.bin", "r+b") as f:  # the same size, other bytes, times put back
        f.write(rng.randbytes(MIB))
    os.utime(root / "stomp.bin", ns=(stomp.st_atime_ns, stomp.st_mtime_ns))
    os.sync()


def restore_ctime(image: Path, fstype: str, path: str, ctime_ns: int) -> None:
    """Put a file's ctime back, as a timestomping tool with raw disk access would."""
    if fstype == "ext4":
        seconds, nanoseconds = divmod(ctime_ns, 1_000_000_000)
        _run("debugfs", "-w", "-R", f"sif {path} ctime @{seconds}", str(image))
        _run("debugfs", "-w", "-R", f"sif {path} ctime_extra {nanoseconds << 2}", str(image))


@pytest.fixture
def build(emu: Emulator, workdir: Path) -> Iterator[Any]:
    volumes: list[Volume] = []

    def make(fstype: str, *, start_sector: int | None = None, grow_to_gib: int = 1) -> Pair:
        volume = Volume(emu, workdir, fstype, start_sector=start_sector)
        volumes.append(volume)
        with volume as root:
            kept = fill(root, fstype)
        first, _ = volume.snapshot()
        with volume as root:
            change(root, fstype, kept)
        restore_ctime(volume.image, fstype, "/stomp.bin", kept["stomp"].st_ctime_ns)
        second, changed = volume.snapshot(volume_size_gib=grow_to_gib)
        alone = emu.create_snapshot(blocks=allocated_blocks(volume.image), volume_size_gib=1)
        volume.image.unlink()
        return Pair(first, second, fstype, changed, alone)

    try:
        yield make
    finally:
        for volume in volumes:
            volume.__exit__()


Lines = dict[str, dict[str, Any]]


def run_changes(env: dict[str, str], *args: str) -> tuple[Lines, dict[str, Any]]:
    done = run_ebsfuse("changes", "--json", *args, env=env)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines.pop()["summary"]
    return {line["path"]: line for line in lines}, summary


def assert_day_two(found: dict[str, dict[str, Any]], fstype: str) -> None:
    assert found["/new.txt"]["change"] == "added"
    assert found["/delete.me"]["change"] == "deleted"
    appended = found["/append.log"]
    assert appended["change"] == "modified"
    assert appended["ranges"][-1] == [5000, len(b"appended\n")]
    big = found["/big.bin"]
    assert big["change"] == "modified"
    page = OVERWRITE_AT // 4096 * 4096
    assert big["ranges"] == [[page, 4096]], big
    assert found["/touch.txt"]["change"] == "metadata"
    assert "mtime" in found["/touch.txt"]["fields"]
    assert found["/link"]["change"] == "metadata"
    assert found["/link"]["after"]["target"] == "target2"
    stomp = found["/stomp.bin"]
    assert stomp["change"] == "modified", stomp
    assert stomp["content_changed"] and stomp["before"]["size"] == stomp["after"]["size"]
    assert stomp["before"]["mtime"] == stomp["after"]["mtime"]
    for untouched in ("/keep.txt", "/target1", "/target2", "/dir", "/dir/sub/deep.txt"):
        assert untouched not in found
    if fstype != "ntfs":  # through ntfs-3g every mode reads 0777 and every owner root
        assert found["/chmod.sh"]["change"] == "metadata"
        assert found["/chmod.sh"]["after"]["mode"] == "0700"
        assert found["/chmod.sh"]["fields"] == ["mode", "ctime"]
        assert found["/chown.dat"]["fields"] == ["uid", "gid", "ctime"]
    # Renames are matched by inode and birth time (statx; NTFS's creation time on ntfs-3g).
    renamed = found["/rename-new.txt"]
    assert renamed["change"] == "renamed" and renamed["from"] == "/rename-old.txt"
    assert "/rename-old.txt" not in found
    moved = found["/newdir"]
    assert moved["change"] == "renamed" and moved["from"] == "/olddir"
    # Its child moved with it and is otherwise the same: counted in a note, not listed.
    assert not {"/olddir/child.txt", "/newdir/child.txt"} & set(found)


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_every_kind_of_change_is_found_by_extents_reading_only_changed_blocks(
    build: Any, emu: Emulator, env: dict[str, str], fstype: str
) -> None:
    pair = build(fstype)
    before = emu.counters()["requests"].get("GetSnapshotBlock", 0)
    found, summary = run_changes(env, pair.first, pair.second)
    assert_day_two(found, fstype)
    assert summary["method"] == "extents" and summary["fstype"] == fstype
    assert summary["files_read"] == 0 and summary["files_by_extents"] > 0
    if fstype == "ext4":  # debugfs put stomp.bin's ctime back too: nothing but bytes differ
        assert found["/stomp.bin"]["times_kept"] and "fields" not in found["/stomp.bin"]
    # Only what the changed blocks could alter was read to compare, in both snapshots: at
    # most the changed blocks themselves (pages of the small files that share them too), far
    # less than big.bin and stomp.bin whole (4 MiB each side).
    read = summary["bytes_compared"]
    assert read <= 2 * summary["changed_blocks_in_filesystem"] * BLOCK_SIZE
    assert read < 2 * 4 * MIB
    fetched = emu.counters()["requests"].get("GetSnapshotBlock", 0) - before
    assert fetched == summary["blocks_fetched"]
    assert not mounts_under(Path("/run/ebsfuse"))


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_ntfs_has_no_extent_map_so_files_are_read_and_the_output_says_so(
    build: Any, env: dict[str, str]
) -> None:
    pair = build("ntfs")
    found, summary = run_changes(env, pair.first, pair.second)
    assert_day_two(found, "ntfs")
    assert summary["method"] == "read" and summary["files_by_extents"] == 0
    assert summary["files_read"] > 0
    assert any("no extent map" in note for note in summary["notes"]), summary["notes"]
    assert all(line.get("judged_by", "read") == "read" for line in found.values())


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_a_partition_at_an_odd_offset_deep_reading_and_a_grown_volume_agree(
    build: Any, env: dict[str, str]
) -> None:
    pair = build("ext4", start_sector=3001, grow_to_gib=2)
    found, summary = run_changes(env, pair.first, pair.second)
    assert summary["partition"] == 1 and summary["method"] == "extents"
    assert any("resized" in note for note in summary["notes"]), summary["notes"]
    assert_day_two(found, "ext4")
    deep, deep_summary = run_changes(env, "--deep", "--partition", "1", pair.first, pair.second)
    assert deep_summary["method"] == "read" and deep_summary["files_by_extents"] == 0
    assert deep_summary["bytes_compared"] > summary["bytes_compared"]
    # Reading everything finds exactly what the extents found, range for range.
    assert {p: line["change"] for p, line in deep.items()} == {
        p: line["change"] for p, line in found.items()
    }
    for path, line in found.items():
        assert deep[path].get("ranges") == line.get("ranges"), path


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_the_table_a_prefix_and_unrelated_snapshots(
    build: Any, emu: Emulator, env: dict[str, str]
) -> None:
    pair = build("ext4")
    done = run_ebsfuse("changes", pair.first, pair.second, env=env)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert any(
        r.split()[:3] == ["modified", "file", "/stomp.bin"] and "SIZE AND TIMES AS BEFORE" in r
        for r in rows
    ), rows
    assert any(r.split()[:3] == ["renamed", "file", "/rename-new.txt"] for r in rows), rows
    assert rows[-1].startswith("12 changes from") and "1 added, 1 deleted, 3 modified" in rows[-1]
    assert "5 metadata only, 2 renamed" in rows[-1]
    assert "note: 1 entries moved with a renamed directory" in done.stderr
    assert "\r" not in done.stderr  # no progress line when nobody watches

    under, summary = run_changes(env, "--path", "dir/sub/..", pair.first, pair.second)
    assert under == {} and summary["path"] == "/dir" and summary["entries"] == 3

    # The same day-two filesystem as a snapshot of no lineage: the service cannot say which
    # blocks differ, so every file in both is read; the answer is the same.
    alone, unrelated = run_changes(env, pair.first, pair.second_alone)
    assert unrelated["method"] == "unrelated" and unrelated["files_read"] > 0
    assert any("UNRELATED_SNAPSHOTS" in note for note in unrelated["notes"])
    assert_day_two(alone, "ext4")


def one_file_on_a_partition(emu: Emulator, workdir: Path) -> tuple[Volume, str]:
    """An ext4 partition at 1 MiB holding a.txt, and its first snapshot."""
    volume = Volume(emu, workdir, "ext4", start_sector=2048)
    try:
        with volume as root:
            (root / "a.txt").write_bytes(b"a\n")
        first, _ = volume.snapshot()
    except BaseException:
        volume.__exit__()
        raise
    return volume, first


def nothing_left() -> None:
    runtime = Path("/run/ebsfuse")
    assert not mounts_under(runtime) and not loops_backed_by(runtime)
    assert not list(runtime.glob("changes-*"))


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_bad_input_is_one_line_and_leaves_nothing_mounted(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    volume, first = one_file_on_a_partition(emu, workdir)
    try:
        with volume as root:
            (root / "a.txt").write_bytes(b"b\n")
        second, _ = volume.snapshot()
        device = _attach(volume.image, 2048 * 512, (VOLUME_MIB - 1) * MIB)
        try:
            volume.format("xfs", device)  # day three: the partition reformatted
        finally:
            _run("losetup", "-d", device)
        reformatted, _ = volume.snapshot()
        with open(volume.image, "r+b") as f:
            f.write(bytes(512))  # day four: the partition table is gone
        no_table, _ = volume.snapshot()
    finally:
        volume.__exit__()

    same = run_ebsfuse("changes", first, first, env=env)
    assert same.returncode == 0 and same.stdout == f"{first} and itself: nothing changed\n"
    unknown = "snap-0123456789abcdef0"
    cases: list[tuple[list[str], list[str]]] = [
        ([first, no_table], [no_table, "has no partition 1", "no partition table"]),
        (["--partition", "2", first, no_table], [first, "has no partition 2", "partitions are 1"]),
        ([second, reformatted], ["ext4 in", "xfs in", reformatted]),
        ([first, unknown], [unknown]),
        ([unknown, unknown], [unknown]),
        ([first, "snap-XYZ"], ["snap-XYZ"]),
        (["--path", "/nowhere", first, second], ["/nowhere", "no such file"]),
    ]
    for args, needles in cases:
        assert_one_line_failure(run_ebsfuse("changes", *args, env=env), *needles)
        nothing_left()
    emu.set_faults(denied_access_keys=env["AWS_ACCESS_KEY_ID"])
    denied = run_ebsfuse("changes", first, no_table, env=env)
    assert_one_line_failure(denied, "AccessDeniedException")
    nothing_left()


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_a_progress_line_on_a_terminal_and_ctrl_c_leaves_nothing_mounted(
    build: Any, emu: Emulator, env: dict[str, str]
) -> None:
    pair = build("ext4")
    command = shlex.join(ebsfuse_cmd("changes", pair.first, pair.second))
    # script(1) gives the command a terminal for stdout and stderr, as a person has.
    shown = subprocess.run(
        ["script", "-qec", command, "/dev/null"], env=env, capture_output=True, timeout=120
    )
    assert shown.returncode == 0, shown.stdout
    assert b"comparing entries [" in shown.stdout and b"\r" in shown.stdout
    assert b"12 changes from" in shown.stdout

    # Interrupted while a changed block of the second snapshot is being read.
    gates = [emu.gate(pair.second, index) for index in sorted(pair.changed_blocks)]
    proc = subprocess.Popen(
        ebsfuse_cmd("changes", pair.first, pair.second),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(gate.arrived for gate in gates), what="a read of a changed block")
        proc.send_signal(signal.SIGINT)
    finally:
        for gate in gates:
            gate.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "ebsfuse: interrupted; nothing is left mounted"
    nothing_left()


@needs_fuse
@needs_root
@pytest.mark.timeout(240)
def test_blocks_changed_outside_the_partition_change_no_file(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    volume, first = one_file_on_a_partition(emu, workdir)
    try:
        with open(volume.image, "r+b") as f:
            f.seek(BLOCK_SIZE)  # between the partition table and the partition (at 1 MiB)
            f.write(b"a boot loader's stage 1.5")
        second, changed = volume.snapshot()
    finally:
        volume.__exit__()
    assert changed == {1}
    found, summary = run_changes(env, first, second)
    assert found == {} and summary["changed_blocks"] == 1
    assert summary["changed_blocks_in_filesystem"] == 0 and summary["bytes_compared"] == 0
    assert "no block of the filesystem changed: its files are the same" in summary["notes"]
