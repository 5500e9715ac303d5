"""Catalogue mounts: a volume's snapshots (or any DescribeSnapshots query) as a directory.

The catalogue's rules are tested without FUSE (names, order, the TTL, the AWS CLI's filter
syntax, paging through the emulator's EC2 with boto3); the rest with real mounts against the
emulator: a 30-day chain of a real ext4 filesystem read through `by-volume/`, with the audit
log proving only changed blocks were fetched; snapshots appearing and disappearing after the
TTL; and every bad input or EC2 failure as one line with nothing left mounted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.catalog import Catalog, CatalogView
from ebsfuse.core.imageset import ImageSet
from ebsfuse.core.lineage import Lineage
from ebsfuse.core.pipeline import tool_context
from ebsfuse.ebs.client import ClientSettings, EbsClient, RetryPolicy
from ebsfuse.ebs.ec2 import (
    SnapshotQuery,
    SnapshotRecord,
    ec2_client,
    list_snapshots,
    parse_filter,
)
from ebsfuse.ebs.errors import EbsError, EbsfuseError, UsageError
from ebsfuse.emulator import Emulator

from .conftest import (
    MountedSnapshots,
    allocated_blocks,
    daemon_pids,
    loop_device,
    mounted_filesystem,
    needs_fuse,
    run_ebsfuse,
    wait_for,
)

GIB = 1024**3
VOLUME = "vol-0123456789abcdef0"
DAY0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)


def record(sid: str, volume: str, day: int, second: int = 0) -> SnapshotRecord:
    start = DAY0 + timedelta(days=day, seconds=second)
    return SnapshotRecord(sid, volume, start.timestamp(), GIB)


# -- the catalogue's rules, without FUSE ---------------------------------------------------


def test_a_volumes_snapshots_are_named_by_start_time_oldest_first() -> None:
    view = CatalogView(
        [
            record("snap-03", VOLUME, 2),
            record("snap-01", VOLUME, 0),
            record("snap-02", VOLUME, 1),
            record("snap-09", "vol-0000000000000000a", 0),
        ]
    )
    volume = view.volumes[VOLUME]
    assert volume.names == [
        "2026-11-01T03:00:00Z.img",
        "2026-11-02T03:00:00Z.img",
        "2026-11-03T03:00:00Z.img",
    ]
    assert volume.snapshot_ids == ["snap-01", "snap-02", "snap-03"]
    assert volume.latest == "snap-03"
    assert list(view.records) == ["snap-01", "snap-02", "snap-03", "snap-09"]
    assert list(view.volumes) == ["vol-0000000000000000a", VOLUME]
    assert view.total_bytes == 4 * GIB


def test_two_snapshots_started_in_one_second_keep_apart_by_id() -> None:
    view = CatalogView([record("snap-0b", VOLUME, 0), record("snap-0a", VOLUME, 0)])
    assert view.volumes[VOLUME].names == [
        "2026-11-01T03:00:00Z.img",
        "2026-11-01T03:00:00Z-snap-0b.img",
    ]
    assert view.volumes[VOLUME].by_name["2026-11-01T03:00:00Z.img"] == "snap-0a"


def test_the_catalogue_asks_again_only_after_its_ttl_and_keeps_its_view_on_failure() -> None:
    answers: list[list[SnapshotRecord] | Exception] = [
        [record("snap-01", VOLUME, 0), record("snap-02", VOLUME, 1)],
        EbsfuseError("EC2 DescribeSnapshots failed: RequestLimitExceeded: slow down"),
        [record("snap-02", VOLUME, 1)],
    ]
    calls = []

    def fetch() -> list[SnapshotRecord]:
        calls.append(time.monotonic())
        answer = answers[len(calls) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    catalog = Catalog(CatalogView([record("snap-01", VOLUME, 0)]), fetch, ttl_s=0.2)

    async def scenario() -> list[object]:
        seen: list[object] = [await catalog.refresh_if_stale()]  # fresh: no call
        await trio.sleep(0.25)
        seen.append(await catalog.refresh_if_stale())  # snap-02 appears
        seen.append(await catalog.refresh_if_stale())  # fresh again: no call
        await trio.sleep(0.25)
        seen.append(await catalog.refresh_if_stale())  # fails: the view stays
        seen.append(list(catalog.view.records))
        await trio.sleep(0.25)
        seen.append(await catalog.refresh_if_stale())  # snap-01 is gone
        return seen

    assert trio.run(scenario) == [False, True, False, False, ["snap-01", "snap-02"], True]
    assert list(catalog.view.records) == ["snap-02"]
    assert len(calls) == 3 and (catalog.refreshes, catalog.failed_refreshes) == (2, 1)


def test_filters_are_read_as_the_aws_cli_writes_them() -> None:
    assert parse_filter("Name=tag:Backup,Values=daily,weekly") == [
        ("tag:Backup", ["daily", "weekly"])
    ]
    assert parse_filter('[{"Name": "description", "Values": ["db *"]}]') == [
        ("description", ["db *"])
    ]
    for bad in ("tag:Backup=daily", "Name=tag:Backup,Values=", "[{"):
        with pytest.raises(UsageError, match="--filters"):
            parse_filter(bad)


def test_a_query_asks_for_completed_snapshots_and_by_filters_only_ones_own() -> None:
    by_volume = SnapshotQuery(volume_ids=[VOLUME]).request()
    assert by_volume == {
        "Filters": [
            {"Name": "volume-id", "Values": [VOLUME]},
            {"Name": "status", "Values": ["completed"]},
        ]
    }
    by_tag = SnapshotQuery(filters=[("tag:Backup", ["daily"])]).request()
    assert by_tag["OwnerIds"] == ["self"]
    shared = SnapshotQuery(filters=[("status", ["*"])], owner_ids=["123456789012"]).request()
    assert shared == {
        "Filters": [{"Name": "status", "Values": ["*"]}],
        "OwnerIds": ["123456789012"],
    }


def test_listing_pages_through_ec2_and_skips_snapshots_not_completed(
    emu: Emulator, env: dict[str, str]
) -> None:
    made = {
        emu.create_snapshot(blocks={}, volume_size_gib=1, volume_id=VOLUME) for _ in range(1003)
    }
    emu.create_snapshot(blocks={}, volume_size_gib=1, volume_id=VOLUME, status="pending")
    emu.create_snapshot(blocks={}, volume_size_gib=1, volume_id="vol-0000000000000000a")
    emu.reset_counters()
    records = list(list_snapshots(ec2_client(None, None), SnapshotQuery(volume_ids=[VOLUME])))
    assert {r.snapshot_id for r in records} == made
    assert all(r.volume_id == VOLUME and r.size_bytes == GIB for r in records)
    assert emu.counters()["requests"]["DescribeSnapshots"] == 2  # 1000 a page


def test_images_open_once_however_many_readers_and_idle_ones_are_bounded(
    emu: Emulator, env: dict[str, str]
) -> None:
    chain = emu.create_daily_chain(VOLUME, 5, written_blocks=4, changed_per_day=1)
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    ctx = tool_context(client, 4, RetryPolicy(attempts=2, base_delay_s=0.01))
    lineage = Lineage(ctx)
    images = ImageSet(ctx, lineage, max_idle=2)
    sids = [sid for sid, _ in chain]
    emu.reset_counters()

    async def scenario() -> list[str]:
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # three readers of one snapshot at once: one describe
                nursery.start_soon(images.open, sids[0], None)
        images.pin(sids[0])
        for sid in sids[1:]:
            await images.open(sid, None)
        with pytest.raises(EbsError):
            await images.open("snap-00000000000000000", None)
        return [image.snapshot_id for image in images.live()]

    try:
        live = trio.run(scenario)
    finally:
        client.close()
    # The pinned one stays; of the four idle ones, the two most recently opened.
    assert live == [sids[0], sids[3], sids[4]]
    assert lineage.members == live
    assert (images.opened, images.closed) == (5, 2)
    assert emu.counters()["requests"]["ListSnapshotBlocks"] == 6  # 5 images, 1 unknown id


# -- a real filesystem over 30 days ---------------------------------------------------------


def day_text(day: int) -> bytes:
    return f"day {day}: the web server's configuration as it was\n".encode() * 3000


def ext4_chain(emu: Emulator, workdir: Path, days: int) -> list[tuple[str, set[int]]]:
    """Daily snapshots of a volume holding ext4 whose notes.txt changes every day.

    Each day rewrites notes.txt with debugfs (no mount), and the snapshot holds the blocks that
    differ from the day before, as a child of it. Returns (snapshot id, changed blocks) a day.
    """
    image = workdir / "volume.img"
    with open(image, "wb") as f:
        f.truncate(GIB)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=0", str(image)],
        check=True,
        capture_output=True,
    )
    source = workdir / "notes.txt"
    chain: list[tuple[str, set[int]]] = []
    before: dict[int, bytes] = {}
    parent = None
    for day in range(days):
        source.write_bytes(day_text(day))
        commands = (
            f"rm notes.txt\nwrite {source} notes.txt\n" if day else f"write {source} notes.txt\n"
        )
        subprocess.run(
            ["debugfs", "-w", "-f", "-", str(image)],
            input=commands.encode(),
            check=True,
            capture_output=True,
        )
        now = allocated_blocks(image)
        changed = {i: data for i, data in now.items() if before.get(i) != data}
        changed |= {i: bytes(BLOCK_SIZE) for i in before if i not in now}
        parent = emu.create_snapshot(
            blocks=changed,
            volume_size_gib=1,
            parent=parent,
            start_time=DAY0 + timedelta(days=day),
            volume_id=VOLUME,
        )
        chain.append((parent, set(changed)))
        before = now
    image.unlink()
    return chain


@needs_fuse
def test_a_file_on_every_day_of_a_month_fetches_only_what_changed(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    chain = ext4_chain(emu, workdir, 30)
    audit = workdir / "audit.jsonl"
    emu.reset_counters()
    with MountedSnapshots(
        workdir / "mnt", [], env, "--volume", VOLUME, "--audit-log", str(audit)
    ) as mount:
        days = mount.mountpoint / "by-volume" / VOLUME
        names = sorted(os.listdir(days))
        assert names[-1] == "latest" and len(names) == 31
        for day, (name, (sid, _)) in enumerate(zip(names[:-1], chain, strict=True)):
            assert name == (DAY0 + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%SZ.img")
            assert os.readlink(days / name) == f"../../{sid}.img"
            assert os.stat(days / name).st_size == GIB
            assert os.stat(days / name).st_mtime == (DAY0 + timedelta(days=day)).timestamp()
        assert os.readlink(days / "latest") == f"../../{chain[-1][0]}.img"
        assert emu.counters()["requests"].get("GetSnapshotBlock", 0) == 0  # listing is free
        for day, name in enumerate(names[:-1]):
            with (
                loop_device(days / name) as device,
                mounted_filesystem(device, workdir / "fs") as fs,
            ):
                assert (fs / "notes.txt").read_bytes() == day_text(day), name
        stats = run_ebsfuse("stats", str(mount.mountpoint), env=env).stdout
        assert "catalogue 30 snapshots of 1 volumes; 30 images open" in stats, stats
        assert re.search(r"lineage 30 snapshots: [1-9][0-9]* blocks lent", stats), stats
        log = mount.log()
    fetched: dict[str, set[int]] = {}
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        fetched.setdefault(entry["snapshot"], set()).add(entry["block"])
    # Day 0 is read cold; every later day fetches blocks that changed that day, nothing else.
    for sid, changed in chain[1:]:
        assert fetched.get(sid, set()) <= changed, (sid, fetched.get(sid), changed)
    later = sum(len(fetched.get(sid, ())) for sid, _ in chain[1:])
    assert later <= sum(len(changed) for _, changed in chain[1:])
    print(f"\nday 0 fetched {len(fetched[chain[0][0]])} blocks; days 1-29 {later} in all")
    assert "Traceback" not in log


# -- the catalogue follows the service -------------------------------------------------------


@needs_fuse
def test_new_snapshots_appear_after_the_ttl_and_deleted_ones_go(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    chain = emu.create_daily_chain(VOLUME, 3, written_blocks=8, changed_per_day=2)
    (first, first_content), _, (third, _) = chain
    with MountedSnapshots(
        workdir / "mnt", [], env, "--volume", VOLUME, "--catalog-ttl", "1"
    ) as mount:
        root = mount.mountpoint
        assert sorted(os.listdir(root)) == sorted(["by-volume", *(f"{s}.img" for s, _ in chain)])
        with open(root / f"{first}.img", "rb") as image:
            assert image.read(BLOCK_SIZE) == first_content[0]
            new = emu.create_snapshot(
                blocks={0: b"n" * BLOCK_SIZE},
                volume_size_gib=1,
                parent=third,
                start_time=DAY0 + timedelta(days=3),
                volume_id=VOLUME,
            )
            emu.delete_snapshot(first)
            wait_for(lambda: f"{new}.img" in os.listdir(root), what="the new snapshot")
            assert f"{first}.img" not in os.listdir(root)
            volume = root / "by-volume" / VOLUME
            assert os.readlink(volume / "latest") == f"../../{new}.img"
            assert len(os.listdir(volume)) == 4  # days 1, 2, 3 and latest
            with open(root / f"{new}.img", "rb") as added:
                assert added.read(BLOCK_SIZE) == b"n" * BLOCK_SIZE
            # The open image of the deleted snapshot: what is cached reads, the rest is EIO.
            image.seek(0)
            assert image.read(BLOCK_SIZE) == first_content[0]
            with pytest.raises(OSError) as caught:
                os.pread(image.fileno(), BLOCK_SIZE, 5 * BLOCK_SIZE)
            assert caught.value.errno == errno.EIO
        # Closed, it goes: the kernel forgets the name within the TTL.
        wait_for(lambda: not (root / f"{first}.img").exists(), what="the deleted image to go")
        log = mount.log()
    # One line says the snapshot is gone, however many of its blocks failed.
    gone = [line for line in log.splitlines() if first in line and " ERROR " in line]
    assert len(gone) == 1 and "SNAPSHOT_NOT_FOUND" in gone[0], log


def mbr_block(start_sector: int, sectors: int) -> bytes:
    """A first block holding an MBR with one Linux partition."""
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start_sector, sectors)
    sector = bytes(446) + entry + bytes(48) + b"\x55\xaa"
    return sector + bytes(BLOCK_SIZE - len(sector))


@needs_fuse
def test_partition_files_of_a_catalogue_appear_when_an_image_is_first_used(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(
        blocks={0: mbr_block(2048, 204800), 2: b"p" * BLOCK_SIZE},
        volume_size_gib=1,
        volume_id=VOLUME,
    )
    emu.reset_counters()
    with MountedSnapshots(workdir / "mnt", [], env, "--volume", VOLUME) as mount:
        root = mount.mountpoint
        assert sorted(os.listdir(root)) == ["by-volume", f"{sid}.img"]  # nothing read yet
        assert emu.counters()["requests"].get("GetSnapshotBlock", 0) == 0
        part = root / f"{sid}-part1.img"  # looked up by name: that image's table is read
        assert os.stat(part).st_size == 204800 * 512
        with open(part, "rb") as f:
            assert f.read(BLOCK_SIZE) == b"p" * BLOCK_SIZE  # sector 2048: block 2
        assert sorted(os.listdir(root)) == ["by-volume", f"{sid}-part1.img", f"{sid}.img"]
        assert not (root / f"{sid}-part2.img").exists()


# -- bad input and EC2's failures ------------------------------------------------------------


def refused(env: dict[str, str], workdir: Path, *args: str) -> str:
    """Run a mount that must fail: its one stderr line; nothing may be left mounted."""
    mountpoint = workdir / "mnt"
    mountpoint.mkdir(exist_ok=True)
    done = run_ebsfuse("mount", *args, str(mountpoint), env=env)  # a hang: the test's timeout
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not os.path.ismount(mountpoint) and not daemon_pids(mountpoint)
    return lines[0]


@needs_fuse
def test_bad_queries_and_ec2_failures_are_one_line_and_nothing_mounted(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    emu.create_daily_chain(VOLUME, 2, written_blocks=4, changed_per_day=1)
    assert "not a volume id" in refused(env, workdir, "--volume", "vol-xyz")
    assert "not both" in refused(env, workdir, "--volume", VOLUME, "snap-0123456789abcdef0")
    assert "--filters" in refused(env, workdir, "--filters", "tag:Backup=daily")
    missing = refused(env, workdir, "--volume", "vol-00000000000000000")
    assert "no completed snapshot matches volume vol-00000000000000000" in missing
    rejected = refused(env, workdir, "--filters", "Name=colour,Values=blue")
    assert "InvalidParameterValue" in rejected
    emu.set_faults(denied_access_keys=env["AWS_ACCESS_KEY_ID"])
    assert "ec2:DescribeSnapshots" in refused(env, workdir, "--volume", VOLUME)
    emu.set_faults(denied_access_keys="", ec2_throttle_rate=1.0)
    assert "RequestLimitExceeded" in refused(env, workdir, "--volume", VOLUME)
    emu.set_faults(ec2_throttle_rate=0.0)
    unreachable = dict(env, AWS_ENDPOINT_URL_EC2="http://127.0.0.1:9")
    assert "EC2 DescribeSnapshots failed" in refused(unreachable, workdir, "--volume", VOLUME)
