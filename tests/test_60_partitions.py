"""Partition tables and filesystem signatures: the parser on real tools' output, then the mount.

The parser is pure, so most tests build a table with sgdisk/sfdisk in a sparse file and parse
its head directly; the last tests mount for real and check the `<snapshot-id>-partN.img` files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.core.partitions import (
    HEAD_BYTES,
    detect_partitions,
    parse_partition_table,
    scan_partition_table,
)
from ebsfuse.emulator import Emulator
from ebsfuse.workflows.chain import detect_filesystem

from .conftest import MountedSnapshots, needs_fuse, needs_root

MIB = 1024 * 1024
LINUX_FS = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install gdisk fdisk dosfstools ...)")
    return path


def sparse_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def head_of(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def reader_of(path: Path) -> Callable[[int, int], bytes]:
    def read(offset: int, size: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    return read


def sgdisk_gpt(path: Path) -> None:
    subprocess.run(
        [tool("sgdisk"), "-n", "1:2048:+10M", "-t", "1:8300", "-c", "1:root",
         "-n", "2:0:+20M", "-t", "2:8200", "-n", "4:0:+1M", "-t", "4:8300", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip


# -- GPT --------------------------------------------------------------------------------------


def test_gpt_512_from_sgdisk(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    table = scan_partition_table(head_of(disk), 64 * MIB)
    assert table.scheme == "gpt" and table.sector_size == 512 and not table.warnings
    got = [(p.number, p.start, p.size, p.type_id, p.name) for p in table.partitions]
    assert got == [
        (1, 2048 * 512, 10 * MIB, LINUX_FS, "root"),
        (2, 2048 * 512 + 10 * MIB, 20 * MIB, SWAP, ""),
        (4, 2048 * 512 + 30 * MIB, 1 * MIB, LINUX_FS, ""),  # numbers follow entry slots
    ]
    assert table.partitions[1].type_name == "Linux swap"


@needs_root
def test_gpt_4096_byte_sectors(tmp_path: Path) -> None:
    """A 4Kn disk: header at 4096, LBAs in 4 KiB units (made on a 4096-byte-sector loop)."""
    sgdisk = tool("sgdisk")
    disk = sparse_disk(tmp_path / "4kn.img", 64 * MIB)
    device = subprocess.run(
        ["losetup", "-b", "4096", "-f", "--show", str(disk)],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(
            [sgdisk, "-n", "1:256:+8M", "-t", "1:8300", "-n", "2:0:+4M", device],
            check=True, capture_output=True,
        )  # fmt: skip
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)
    table = scan_partition_table(head_of(disk), 64 * MIB)
    assert table.scheme == "gpt" and table.sector_size == 4096
    got = [(p.number, p.start, p.size) for p in table.partitions]
    assert got == [(1, 256 * 4096, 8 * MIB), (2, 256 * 4096 + 8 * MIB, 4 * MIB)]


def _corrupt(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_gpt_header_crc_mismatch_shows_nothing_and_says_why(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    _corrupt(disk, 512 + 40)  # FirstUsableLBA, covered by the header CRC
    table = scan_partition_table(head_of(disk), 64 * MIB)
    assert table.partitions == []
    assert "header CRC32 mismatch" in table.reason


def test_gpt_entries_crc_mismatch_shows_nothing_and_says_why(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    _corrupt(disk, 1024 + 32)  # first entry's FirstLBA, covered by the entries CRC
    assert parse_partition_table(head_of(disk), 64 * MIB) == []
    assert "entries CRC32 mismatch" in scan_partition_table(head_of(disk), 64 * MIB).reason


def test_gpt_partition_past_the_end_of_the_disk_is_left_out(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    table = scan_partition_table(head_of(disk), 20 * MIB)  # the table says 64 MiB
    assert [p.number for p in table.partitions] == [1]
    assert any("past the" in w for w in table.warnings)


def test_protective_mbr_without_gpt_header(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    with open(disk, "r+b") as f:
        f.seek(512)
        f.write(bytes(512))  # wipe the primary header
    table = scan_partition_table(head_of(disk), 64 * MIB)
    assert table.partitions == [] and "protective MBR" in table.reason


# -- MBR --------------------------------------------------------------------------------------


def sfdisk(path: Path, script: str) -> None:
    subprocess.run([tool("sfdisk"), "-q", str(path)], input=script, text=True, check=True)


def test_mbr_primary_and_logical_partitions(tmp_path: Path) -> None:
    disk = sparse_disk(tmp_path / "mbr.img", 64 * MIB)
    sfdisk(
        disk,
        "label: dos\n"
        "start=2048, size=20480, type=83\n"
        "start=22528, size=40960, type=5\n"
        "start=24576, size=8192, type=82\n"
        "start=34816, size=8192, type=83\n",
    )
    head = head_of(disk)
    # Without a way to read the extended boot records: primaries only, and a warning.
    table = scan_partition_table(head, 64 * MIB)
    assert [(p.number, p.start, p.size) for p in table.partitions] == [(1, MIB, 10 * MIB)]
    assert any("logical partitions" in w for w in table.warnings)
    # With one: the logical ones, numbered from 5 as Linux does.
    table = scan_partition_table(head, 64 * MIB, reader_of(disk))
    got = [(p.number, p.start, p.size, p.type_id, p.logical) for p in table.partitions]
    assert got == [
        (1, MIB, 10 * MIB, "0x83", False),
        (5, 24576 * 512, 4 * MIB, "0x82", True),
        (6, 34816 * 512, 4 * MIB, "0x83", True),
    ]
    # The async driver (what the mount uses) gives the same.
    read = reader_of(disk)

    async def aread(offset: int, size: int) -> bytes:
        return read(offset, size)

    assert trio.run(detect_partitions, aread, 64 * MIB).partitions == table.partitions


def test_no_table_and_filesystems_written_on_the_whole_disk(tmp_path: Path) -> None:
    assert "no partition table" in scan_partition_table(bytes(HEAD_BYTES), GIB).reason
    ext4 = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(ext4), "8M"], check=True)
    assert parse_partition_table(head_of(ext4), 8 * MIB) == []
    fat = sparse_disk(tmp_path / "fat.img", 64 * MIB)
    subprocess.run([tool("mkfs.vfat"), str(fat)], check=True, capture_output=True)
    table = scan_partition_table(head_of(fat), 64 * MIB)
    assert table.partitions == [] and "FAT filesystem" in table.reason


def test_mbr_with_an_entry_outside_the_disk(tmp_path: Path) -> None:
    head = bytearray(512)
    struct.pack_into("<B3xB3xII", head, 446, 0x80, 0x83, 2048, 2048)
    struct.pack_into("<B3xB3xII", head, 462, 0x00, 0x83, 10_000_000, 2048)
    head[510:512] = b"\x55\xaa"
    table = scan_partition_table(bytes(head), 64 * MIB)
    assert [p.number for p in table.partitions] == [1]
    assert any("outside" in w for w in table.warnings)


def test_a_crafted_gpt_with_crcs_computed_here(tmp_path: Path) -> None:
    """An independent encoder: our own header and entries, CRCs computed with zlib."""
    entries = bytearray(128 * 128)
    type_le = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # Linux filesystem, mixed-endian
    entries[0:16] = type_le
    entries[16:32] = os.urandom(16)
    struct.pack_into("<QQQ", entries, 32, 40, 40 + 2047, 0)
    entries[56 : 56 + 8] = "data".encode("utf-16-le")
    header = bytearray(92)
    struct.pack_into(
        "<8sIIII QQQQ 16s QIII", header, 0, b"EFI PART", 0x10000, 92, 0, 0,
        1, 131071, 34, 131038, os.urandom(16), 2, 128, 128, zlib.crc32(entries),
    )  # fmt: skip
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    disk = bytearray(64 * 1024)
    struct.pack_into("<B3xB3xII", disk, 446, 0, 0xEE, 1, 131071)
    disk[510:512] = b"\x55\xaa"
    disk[512 : 512 + 92] = header
    disk[1024 : 1024 + len(entries)] = entries
    (part,) = parse_partition_table(bytes(disk), 64 * MIB)
    assert (part.number, part.start, part.size, part.type_id, part.name) == (
        1, 40 * 512, 2048 * 512, LINUX_FS, "data",
    )  # fmt: skip


# -- filesystem signatures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fstype", "make"),
    [
        ("ext4", ["mkfs.ext4", "-q", "-F"]),
        ("ext2", ["mkfs.ext2", "-q", "-F"]),
        ("xfs", ["mkfs.xfs", "-q", "-f"]),
        ("btrfs", ["mkfs.btrfs", "-q", "-f"]),
        ("vfat", ["mkfs.vfat"]),
        ("ntfs", ["mkntfs", "-q", "-F", "-f"]),
        ("swap", ["mkswap"]),
    ],
)
def test_filesystem_signatures(tmp_path: Path, fstype: str, make: list[str]) -> None:
    tool(make[0])
    image = sparse_disk(tmp_path / "fs.img", 320 * MIB)
    subprocess.run([*make, str(image)], check=True, capture_output=True)
    with open(image, "rb") as f:
        assert detect_filesystem(f.read(0x10048)) == fstype
    assert detect_filesystem(bytes(0x10048)) is None


# -- through the mount --------------------------------------------------------------------------


def blocks_of(path: Path, size: int) -> dict[int, bytes]:
    """The non-zero 512 KiB blocks of a (sparse) file, as the emulator takes them."""
    blocks = {}
    with open(path, "rb") as f:
        for index in range(size // BLOCK_SIZE):
            data = f.read(BLOCK_SIZE)
            if data.strip(b"\0"):
                blocks[index] = data
    return blocks


def gets(emu: Emulator) -> int:
    return emu.counters()["requests"].get("GetSnapshotBlock", 0)


@pytest.fixture
def mbr_disk(tmp_path: Path) -> Iterator[Path]:
    disk = sparse_disk(tmp_path / "disk.img", 64 * MIB)
    sfdisk(disk, "label: dos\nstart=2048, size=20480, type=83\nstart=22528, size=2048, type=83\n")
    with open(disk, "r+b") as f:
        f.seek(MIB)
        f.write(os.urandom(10 * MIB))  # partition 1's content
        f.seek(22528 * 512)
        f.write(os.urandom(MIB))  # partition 2's
    yield disk


@needs_fuse
@needs_root
def test_partition_files_in_the_mount(
    emu: Emulator, env: dict[str, str], workdir: Path, mbr_disk: Path
) -> None:
    sid = emu.create_snapshot(blocks=blocks_of(mbr_disk, 64 * MIB), volume_size_gib=1)
    other = emu.create_snapshot(blocks={1: os.urandom(BLOCK_SIZE)}, volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid, other], env) as mount:
        before = gets(emu)
        os.stat(mount.image(sid))  # a known name: no detection, no request
        assert gets(emu) == before
        names = os.listdir(mount.mountpoint)
        assert sorted(names) == sorted(
            [f"{sid}.img", f"{sid}-part1.img", f"{sid}-part2.img", f"{other}.img"]
        )
        assert gets(emu) == before + 1  # block 0 of the disk; the other's is a hole
        part1 = mount.mountpoint / f"{sid}-part1.img"
        part2 = mount.mountpoint / f"{sid}-part2.img"
        assert os.path.getsize(part1) == 10 * MIB and os.path.getsize(part2) == MIB
        source = mbr_disk.read_bytes()
        assert part1.read_bytes() == source[MIB : 11 * MIB]
        with open(part2, "rb") as f:
            f.seek(MIB - 100)
            assert f.read(4096) == source[22528 * 512 + MIB - 100 : 22528 * 512 + MIB]
            assert f.read(10) == b""  # clamped at the partition's end
        inodes = {name: os.stat(mount.mountpoint / name).st_ino for name in names}
        assert len(set(inodes.values())) == len(names)
        assert {n: os.stat(mount.mountpoint / n).st_ino for n in names} == inodes
        assert os.stat(part1).st_mode & 0o777 == 0o444
        with pytest.raises(OSError):
            os.open(part1, os.O_RDWR)
        assert "partitions 1" in mount.log()
        assert "no partition files" in mount.log()  # the other snapshot, and why


@needs_fuse
@needs_root
def test_damaged_table_shows_the_whole_image_and_logs_why(
    emu: Emulator, env: dict[str, str], workdir: Path, tmp_path: Path
) -> None:
    disk = sparse_disk(tmp_path / "gpt.img", 64 * MIB)
    sgdisk_gpt(disk)
    _corrupt(disk, 512 + 40)
    sid = emu.create_snapshot(blocks=blocks_of(disk, 64 * MIB), volume_size_gib=1)
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        assert os.listdir(mount.mountpoint) == [f"{sid}.img"]
        with contextlib.suppress(FileNotFoundError):
            os.stat(mount.mountpoint / f"{sid}-part1.img")
            raise AssertionError("a partition of a damaged table was shown")
    assert "header CRC32 mismatch" in mount.log()
