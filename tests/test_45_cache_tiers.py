"""Cache tiers with real mounts: the disk tier (`--cache-dir`) and lineage between snapshots.

Every claim is shown with the emulator's own request counters and independent digests of the
bytes: a remount reads everything again without a GetSnapshotBlock, a killed daemon's cache
stays correct, damaged entries are dropped and refetched, processes share one bounded directory,
and a child snapshot costs its changed blocks when its parent's blocks are cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.core.diskcache import ENTRY_SIZE, MAGIC, DiskCache
from ebsfuse.emulator import Emulator

from .conftest import (
    MountedSnapshots,
    daemon_pids,
    ebsfuse_cmd,
    make_ext4_image,
    mounts_under,
    run_ebsfuse,
    sha256_file,
    wait_for,
)

SID = "snap-0123456789abcdef0"


def gets(emu: Emulator) -> int:
    return int(emu.counters()["requests"].get("GetSnapshotBlock", 0))


def image_digest(blocks: dict[int, bytes], volume: int = GIB) -> str:
    digest = hashlib.sha256()
    zeros = bytes(BLOCK_SIZE)
    for index in range(volume // BLOCK_SIZE):
        digest.update(blocks.get(index, zeros))
    return digest.hexdigest()


def random_blocks(indexes: range | list[int]) -> dict[int, bytes]:
    return {i: os.urandom(BLOCK_SIZE) for i in indexes}


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "blocks").glob("*/*"))


def mount_stats(mounted: MountedSnapshots, env: dict[str, str]) -> dict[str, object]:
    done = run_ebsfuse("stats", str(mounted.mountpoint), "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_one_line(done: subprocess.CompletedProcess[str], needle: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr


# -- the disk tier ------------------------------------------------------------------------------


def test_a_remount_reads_everything_from_the_disk_tier(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks([0, 1, 2, 100, 101, 2047])
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    cache = workdir / "cache"
    expected = image_digest(blocks)
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-dir", str(cache)) as mounted:
        assert sha256_file(mounted.image()) == expected
    assert gets(emu) == len(blocks)
    assert len(entries(cache)) == len(blocks)
    # Private: the directory and every entry are the user's alone.
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in entries(cache))

    emu.reset_counters()
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-dir", str(cache)) as mounted:
        assert sha256_file(mounted.image()) == expected
        stats = mount_stats(mounted, env)
    assert gets(emu) == 0  # every written block from disk, every hole from the listing
    snapshot = stats["snapshots"][sid]  # type: ignore[index]
    assert snapshot["cache"]["disk_hits"] == len(blocks)
    assert snapshot["saved"] == {"requests": len(blocks), "bytes": len(blocks) * BLOCK_SIZE}
    assert stats["disk_cache"]["hits"] == len(blocks)  # type: ignore[index]


def test_fstab_options_give_the_disk_tier(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks([3])
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    cache, mnt = workdir / "cache", workdir / "mnt"
    mnt.mkdir()
    options = f"ro,cache_dir={cache},cache_dir_size=64M,_netdev"
    done = run_ebsfuse(sid, str(mnt), "-o", options, env=env)  # as mount(8) calls it
    try:
        assert done.returncode == 0, done.stderr
        assert sha256_file(mnt / f"{sid}.img") == image_digest(blocks)
        stats = json.loads(run_ebsfuse("stats", str(mnt), "--json", env=env).stdout)
        assert stats["disk_cache"]["directory"] == str(cache)
        assert stats["disk_cache"]["limit"] == 64 * 2**20
        assert len(entries(cache)) == 1
    finally:
        run_ebsfuse("unmount", str(mnt), env=env)
        wait_for(lambda: not daemon_pids(mnt), what="the daemon to exit")


def test_hash_and_download_share_the_mount_s_cache_directory(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks(range(0, 40, 3))
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    cache = str(workdir / "cache")
    first = run_ebsfuse("hash", sid, "--cache-dir", cache, "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["blocks_fetched"] == len(blocks)
    emu.reset_counters()
    again = run_ebsfuse("hash", sid, "--cache-dir", cache, "--json", env=env)
    doc = json.loads(again.stdout)
    assert doc["sha256"] == image_digest(blocks)
    assert (doc["blocks_fetched"], doc["blocks_cached"]) == (0, len(blocks))
    out = workdir / "out.img"
    done = run_ebsfuse("download", sid, str(out), "--cache-dir", cache, "-q", env=env)
    assert done.returncode == 0, done.stderr
    assert sha256_file(out) == image_digest(blocks)
    assert gets(emu) == 0


def test_restore_after_browse_of_the_same_snapshot_fetches_nothing_again(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    image, files = make_ext4_image(workdir)
    sid = emu.create_snapshot(image.read_bytes(), volume_size_gib=1)
    wenv = {**env, "EBSFUSE_RUNTIME_DIR": str(workdir / "run")}
    cache = str(workdir / "cache")
    target = workdir / "browse"
    target.mkdir()
    done = run_ebsfuse("browse", sid, str(target), "--cache-dir", cache, env=wenv)
    assert done.returncode == 0, done.stderr
    try:
        # What an incident responder does: walk the tree, read what is there.
        for name, data in files.items():
            assert (target / name).read_bytes() == data
        shutil.copytree(target / "data", workdir / "looked-at")
    finally:
        assert run_ebsfuse("unmount", str(target), env=wenv).returncode == 0
    browsed = {int(p.name, 16) for p in entries(Path(cache))}
    out = workdir / "restored"
    audit = workdir / "restore-audit.jsonl"
    done = run_ebsfuse(
        "restore", sid, "data", str(out), "--cache-dir", cache, "--json",
        "--audit-log", str(audit), env=wenv,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "random.bin").read_bytes() == files["data/random.bin"]
    assert (out / "nested" / "deep" / "file.txt").read_bytes() == files["data/nested/deep/file.txt"]
    result = json.loads(done.stdout)
    # The blocks browse read came from the disk; no block browse fetched was fetched again.
    # What restore may still fetch is readahead past what browse read, if browse's had not
    # landed: with this 32 MiB ext4, the journal's first block (block 32), within the window.
    fetched_again = {json.loads(line)["block"] for line in audit.read_text().splitlines()}
    assert fetched_again.isdisjoint(browsed), (fetched_again, browsed)
    # At least the superblock's block and random.bin's four came from the disk tier.
    assert {0, 4, 5, 6, 7} <= browsed and result["blocks_from_cache"] >= 5
    assert mounts_under(workdir) == []


def in_flight(mountpoint: str, env: dict[str, str]) -> int:
    done = run_ebsfuse("stats", mountpoint, "--json", env=env)
    return int(json.loads(done.stdout)["requests_in_flight"]) if done.returncode == 0 else -1


def test_a_daemon_killed_mid_read_leaves_a_cache_that_reads_right(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks(range(64))
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    cache = workdir / "cache"
    emu.set_faults(latency_ms=100)
    mnt = workdir / "mnt"
    with MountedSnapshots(mnt, [sid], env, "--cache-dir", str(cache), "--max-concurrency", "4"):
        reader = subprocess.Popen(
            ["dd", f"if={mnt / (sid + '.img')}", "of=/dev/null", "bs=1M", "count=32"],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: len(entries(cache)) >= 8, what="blocks stored")
            for pid in daemon_pids(mnt):
                os.kill(pid, signal.SIGKILL)
        finally:
            reader.wait(30)
    stored = len(entries(cache))
    assert 8 <= stored < len(blocks)

    emu.set_faults(latency_ms=0)
    emu.reset_counters()
    with MountedSnapshots(mnt, [sid], env, "--cache-dir", str(cache)) as mounted:
        assert sha256_file(mounted.image()) == image_digest(blocks)
    # Every block stored whole before the kill came from disk: only the rest were fetched.
    assert gets(emu) == len(blocks) - stored
    assert not list((cache / "tmp").iterdir())  # a write cut by the kill was cleared away


def test_a_flipped_byte_and_a_truncated_entry_are_dropped_and_fetched_again(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks(range(8))
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    cache = workdir / "cache"
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-dir", str(cache)) as mounted:
        sha256_file(mounted.image())
    flipped, truncated = entries(cache)[2], entries(cache)[5]
    with open(flipped, "r+b") as f:
        f.seek(len(MAGIC) + 32 + 1000)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    os.truncate(truncated, ENTRY_SIZE // 2)

    emu.reset_counters()
    with MountedSnapshots(workdir / "mnt", [sid], env, "--cache-dir", str(cache)) as mounted:
        assert sha256_file(mounted.image()) == image_digest(blocks)
        stats = mount_stats(mounted, env)
        log = mounted.log()
    assert gets(emu) == 2
    assert stats["disk_cache"]["corrupt_dropped"] == 2  # type: ignore[index]
    for path in (flipped, truncated):
        lines = [line for line in log.splitlines() if str(path) in line]
        assert len(lines) == 1 and "damaged" in lines[0], log
        # Fetched again and stored again, whole.
        assert path.stat().st_size == ENTRY_SIZE


def test_two_processes_fill_one_directory_within_its_size(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    first = random_blocks(range(48))
    second = random_blocks(range(48))
    a = emu.create_snapshot(blocks=first, volume_size_gib=1)
    b = emu.create_snapshot(blocks=second, volume_size_gib=1)
    cache = workdir / "cache"
    limit = 20 * ENTRY_SIZE
    args = ["--cache-dir", str(cache), "--cache-dir-size", str(limit), "--json", "--workers", "4"]
    emu.set_faults(latency_ms=20)  # long enough for the two to overlap
    procs = [
        subprocess.Popen(
            ebsfuse_cmd("hash", sid, *args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sid in (a, b)
    ]
    done = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], done
    outputs = [out for out, _ in done]
    assert json.loads(outputs[0])["sha256"] == image_digest(first)
    assert json.loads(outputs[1])["sha256"] == image_digest(second)
    held = entries(cache)
    assert 0 < len(held) * ENTRY_SIZE <= limit
    assert sum(p.stat().st_size for p in held) <= limit
    assert {p.parent.name for p in held} <= {a, b}
    assert int((cache / "usage").read_text()) == len(held) * ENTRY_SIZE


def test_cache_stats_drop_and_clear(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    a = emu.create_snapshot(blocks=random_blocks(range(3)), volume_size_gib=1)
    b = emu.create_snapshot(blocks=random_blocks(range(5)), volume_size_gib=1)
    cache = str(workdir / "cache")
    for sid in (a, b):
        assert run_ebsfuse("hash", sid, "--cache-dir", cache, env=env).returncode == 0
    doc = json.loads(run_ebsfuse("cache", "stats", "--cache-dir", cache, "--json", env=env).stdout)
    assert doc["entries"] == 8 and doc["bytes"] == 8 * ENTRY_SIZE
    assert {sid: s["blocks"] for sid, s in doc["snapshots"].items()} == {a: 3, b: 5}
    human = run_ebsfuse("cache", "stats", "--cache-dir", cache, env=env)
    assert human.returncode == 0 and "8 blocks" in human.stdout and a in human.stdout
    dropped = run_ebsfuse("cache", "drop", a, "--cache-dir", cache, "--json", env=env)
    assert json.loads(dropped.stdout)["dropped_blocks"] == 3
    doc = json.loads(run_ebsfuse("cache", "stats", "--cache-dir", cache, "--json", env=env).stdout)
    assert list(doc["snapshots"]) == [b]
    assert "dropped 5 blocks" in run_ebsfuse("cache", "clear", "--cache-dir", cache, env=env).stdout
    assert entries(Path(cache)) == []
    assert_one_line(run_ebsfuse("cache", "drop", "--cache-dir", cache, env=env), "SNAPSHOT_ID")
    missing = str(workdir / "nowhere")
    assert_one_line(run_ebsfuse("cache", "stats", "--cache-dir", missing, env=env), "not exist")


# -- bad input ----------------------------------------------------------------------------------


def test_unusable_cache_directories_are_refused_in_one_line(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks=random_blocks([0]), volume_size_gib=1)
    mnt = workdir / "mnt"
    mnt.mkdir()
    a_file = workdir / "a-file"
    a_file.write_text("not a directory")
    shared = workdir / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    foreign = workdir / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    stranger = workdir / "stranger"
    stranger.mkdir(mode=0o700)
    (stranger / "precious.txt").write_text("keep me")
    readonly = workdir / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], check=True)
    try:
        cases = [
            (a_file, "not a directory"),
            (shared, "writable by others"),
            (foreign, "another user"),
            (stranger, "not an ebsfuse cache"),
            (readonly / "cache", "Read-only file system"),
        ]
        for path, needle in cases:
            done = run_ebsfuse("mount", "--cache-dir", str(path), sid, str(mnt), env=env)
            assert_one_line(done, needle)
            assert not os.path.ismount(mnt)
            assert_one_line(run_ebsfuse("hash", sid, "--cache-dir", str(path), env=env), needle)
        assert (stranger / "precious.txt").read_text() == "keep me"
        done = run_ebsfuse("mount", "--cache-dir-size", "1G", sid, str(mnt), env=env)
        assert_one_line(done, "--cache-dir-size needs --cache-dir")
        done = run_ebsfuse("mount", "--base", sid, sid, str(mnt), env=env)
        assert_one_line(done, "also mounted")
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
    assert mounts_under(workdir) == []


def test_a_full_disk_stops_storing_never_reading_right(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = random_blocks(range(40))  # 20 MiB: more than the 6 MiB file system holds
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    small = workdir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        cache = small / "cache"
        args = ("--cache-dir", str(cache), "--cache-dir-size", "1G")
        with MountedSnapshots(workdir / "mnt", [sid], env, *args) as mounted:
            assert sha256_file(mounted.image()) == image_digest(blocks)
            stats = mount_stats(mounted, env)
            log = mounted.log()
        assert stats["disk_cache"]["storing"] is False  # type: ignore[index]
        warned = [line for line in log.splitlines() if "going on without storing" in line]
        assert len(warned) == 1, log
        assert 0 < len(entries(cache)) < len(blocks)
        assert not list((cache / "tmp").iterdir())  # no half-written entry left
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# -- the lineage tier ---------------------------------------------------------------------------


@pytest.fixture
def lineage(emu: Emulator) -> tuple[str, str, dict[int, bytes], dict[int, bytes], int]:
    """A parent of 200 written blocks and a child with 1% of its volume's blocks changed."""
    parent_blocks = random_blocks(range(200))
    parent = emu.create_snapshot(blocks=parent_blocks, volume_size_gib=1)
    changes = {5: os.urandom(BLOCK_SIZE), 77: os.urandom(BLOCK_SIZE), 300: os.urandom(BLOCK_SIZE)}
    changes[150] = parent_blocks[150]  # rewritten with the same bytes: not a change
    child = emu.create_snapshot(blocks=changes, parent=parent)
    child_blocks = {**parent_blocks, **changes}
    return parent, child, parent_blocks, child_blocks, 3


def test_a_child_mounted_beside_its_parent_costs_its_changed_blocks(
    emu: Emulator,
    env: dict[str, str],
    workdir: Path,
    lineage: tuple[str, str, dict[int, bytes], dict[int, bytes], int],
) -> None:
    parent, child, parent_blocks, child_blocks, changed = lineage
    with MountedSnapshots(workdir / "mnt", [parent, child], env) as mounted:
        assert sha256_file(mounted.image(parent)) == image_digest(parent_blocks)
        assert gets(emu) == len(parent_blocks)
        emu.reset_counters()
        assert sha256_file(mounted.image(child)) == image_digest(child_blocks)
        stats = mount_stats(mounted, env)
    assert gets(emu) == changed  # 5, 77 and 300; the other 198 borrowed from the parent
    child_stats = stats["snapshots"][child]  # type: ignore[index]
    assert child_stats["cache"]["lineage_hits"] == len(child_blocks) - changed
    listed = stats["lineage"]["requests"]["ListChangedBlocks"]  # type: ignore[index]
    assert 1 <= listed <= 3


def test_a_child_read_in_order_keeps_borrowing_when_memory_is_tight(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    """The memory cache holds the parent and little more: each block the child borrows is
    cached under its own name too, so memory runs out as the child reads. What goes must be
    the parent's blocks the child has passed, not those it is about to borrow."""
    parent_blocks = random_blocks(range(400))
    parent = emu.create_snapshot(blocks=parent_blocks, volume_size_gib=1)
    changes = {i: os.urandom(BLOCK_SIZE) for i in (10, 200, 390)}
    child = emu.create_snapshot(blocks=changes, parent=parent)
    args = ("--cache-size", "240M")  # 480 blocks: the parent and a readahead window more
    with MountedSnapshots(workdir / "mnt", [parent, child], env, *args) as mounted:
        assert sha256_file(mounted.image(parent)) == image_digest(parent_blocks)
        emu.reset_counters()
        assert sha256_file(mounted.image(child)) == image_digest({**parent_blocks, **changes})
    assert gets(emu) == len(changes)


def test_base_in_the_disk_cache_serves_a_child_s_unchanged_blocks(
    emu: Emulator,
    env: dict[str, str],
    workdir: Path,
    lineage: tuple[str, str, dict[int, bytes], dict[int, bytes], int],
) -> None:
    parent, child, _, child_blocks, changed = lineage
    cache = str(workdir / "cache")
    assert run_ebsfuse("hash", parent, "--cache-dir", cache, env=env).returncode == 0
    emu.reset_counters()
    args = ("--cache-dir", cache, "--base", parent)
    with MountedSnapshots(workdir / "mnt", [child], env, *args) as mounted:
        assert sha256_file(mounted.image(child)) == image_digest(child_blocks)
    assert gets(emu) == changed
    # hash takes --base the same way.
    shutil.rmtree(Path(cache) / "blocks" / child)
    emu.reset_counters()
    done = run_ebsfuse("hash", child, "--cache-dir", cache, "--base", parent, "--json", env=env)
    assert json.loads(done.stdout)["sha256"] == image_digest(child_blocks)
    assert gets(emu) == changed


def test_unrelated_snapshots_in_one_mount_lend_nothing(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    shared = random_blocks(range(4))
    a = emu.create_snapshot(blocks=shared, volume_size_gib=1)
    b = emu.create_snapshot(blocks=shared, volume_size_gib=1)  # same bytes, no lineage
    with MountedSnapshots(workdir / "mnt", [a, b], env) as mounted:
        sha256_file(mounted.image(a))
        emu.reset_counters()
        assert sha256_file(mounted.image(b)) == image_digest(shared)
        log = mounted.log()
    assert gets(emu) == len(shared)  # nothing borrowed without the service's word
    assert emu.counters()["requests"].get("ListChangedBlocks", 0) == 1  # asked once
    assert "share no blocks" in log


# -- the directory alone ------------------------------------------------------------------------


def test_an_orphaned_write_is_removed_and_never_read(workdir: Path) -> None:
    cache = workdir / "cache"
    disk = DiskCache(str(cache), 4 * ENTRY_SIZE)
    data = os.urandom(BLOCK_SIZE)
    disk.put(SID, 7, data)
    disk.close()
    # A process killed mid-write (pid 2**22 + 1 is above pid_max's default: never alive).
    orphan = cache / "tmp" / f"{2**22 + 1}-abcdef"
    orphan.write_bytes(MAGIC + b"partial")
    disk = DiskCache(str(cache), 4 * ENTRY_SIZE)
    try:
        assert not orphan.exists()
        assert disk.get(SID, 7) == data
        assert disk.get(SID, 8) is None
    finally:
        disk.close()


def test_eviction_keeps_the_recently_used(workdir: Path) -> None:
    disk = DiskCache(str(workdir / "cache"), 4 * ENTRY_SIZE)
    try:
        blocks = {i: os.urandom(BLOCK_SIZE) for i in range(6)}
        for i in range(4):
            disk.put(SID, i, blocks[i])
            os.utime(disk._path(SID, i), ns=(i * 10**9, i * 10**9))  # a clear age order
        assert disk.get(SID, 0) == blocks[0]  # used again: now the newest
        disk.put(SID, 4, blocks[4])
        assert disk.get(SID, 0) == blocks[0]
        assert disk.get(SID, 1) is None  # the least recently used went first
        assert disk.summary()["bytes"] <= 4 * ENTRY_SIZE  # type: ignore[operator]
    finally:
        disk.close()
