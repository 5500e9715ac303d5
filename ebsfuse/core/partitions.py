"""Partition tables: MBR (primary and logical) and GPT (512- and 4096-byte sectors), parsed purely.

`scan_partition_table(head, disk_size)` looks at the first bytes of a disk and says what table
it holds, which partitions it lists and, when it lists none, why (no table, a filesystem written
straight onto the disk, a damaged GPT...). `parse_partition_table` returns just the list. No I/O
happens here: the caller reads the head (the first 512 KiB EBS block holds every GPT and MBR of
practical interest) and, for logical partitions, hands in a `read(offset, size)` callback, sync
(`scan_partition_table`) or async (`detect_partitions`) alike, so the FUSE side reads inside
trio and tests read from bytes.

Numbering follows Linux: MBR primary slots are 1-4 whatever is empty, logical partitions 5 on in
chain order; GPT entry k is partition k+1.

Validation is strict where a wrong answer would expose the wrong bytes: a GPT header must carry
its signature, a matching CRC32, `MyLBA` 1, sane entry geometry, and its entry array must match
its CRC32. A damaged primary GPT is reported, not guessed around: the backup header at the end
of the disk is not consulted (it would cost a second, far-away read for a disk that is broken
anyway).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field

# Both sector sizes GPT disks are made with; EBS volumes present 512-byte sectors, but an image
# written from a 4Kn disk carries its table at 4096.
SECTOR_SIZES = (512, 4096)
MBR_SIGNATURE_OFFSET = 510
MBR_TABLE_OFFSET = 446
MBR_ENTRY_SIZE = 16
GPT_SIGNATURE = b"EFI PART"
# The UEFI header is 92 bytes; a larger header_size is allowed up to one sector.
GPT_MIN_HEADER_SIZE = 92
GPT_MIN_ENTRY_SIZE = 128
# No real GPT has more than a few hundred entries (128 is standard); a larger count in a damaged
# header would make us allocate or CRC megabytes of garbage.
GPT_MAX_ENTRIES = 4096
# Logical partitions form a linked list on disk; a loop or a runaway chain stops here.
MAX_LOGICAL_PARTITIONS = 128
# MBR partition types of extended partitions (DOS, Windows LBA, Linux).
EXTENDED_TYPES = {0x05, 0x0F, 0x85}
GPT_PROTECTIVE_TYPE = 0xEE
# What `detect_partitions` reads first: one EBS block (a single GetSnapshotBlock, cached for the
# reads that follow), far more than any table needs (a 4Kn GPT's 128 entries end at 24 KiB).
HEAD_BYTES = 512 * 1024

GPT_TYPE_NAMES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "b921b045-1df0-41c3-af44-4c6f280d3fae": "Linux root (ARM64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}
MBR_TYPE_NAMES = {
    0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x07: "NTFS/exFAT", 0x0B: "FAT32",
    0x0C: "FAT32 (LBA)", 0x0E: "FAT16 (LBA)", 0x82: "Linux swap", 0x83: "Linux",
    0x8E: "Linux LVM", 0xEF: "EFI System", 0xFD: "Linux RAID",
}  # fmt: skip


@dataclass(frozen=True)
class Partition:
    """One partition: its number as Linux names it and its exact byte range on the disk."""

    number: int
    start: int  # bytes from the start of the disk
    size: int  # bytes
    scheme: str  # "gpt" or "mbr"
    type_id: str  # GPT type GUID, or the MBR type byte as "0x83"
    name: str = ""  # GPT partition name (empty for MBR)
    logical: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def type_name(self) -> str:
        if self.scheme == "gpt":
            return GPT_TYPE_NAMES.get(self.type_id, self.type_id)
        return MBR_TYPE_NAMES.get(int(self.type_id, 16), f"type {self.type_id}")


@dataclass
class PartitionTable:
    """What a disk's head says: the scheme, the partitions, and why there are none if so."""

    scheme: str | None  # "gpt", "mbr" or None
    partitions: list[Partition] = field(default_factory=list)
    reason: str = ""  # why no partitions are listed (empty when some are)
    sector_size: int = 512
    warnings: list[str] = field(default_factory=list)  # partitions left out, and why

    def describe(self) -> str:
        if not self.partitions:
            return self.reason
        parts = ", ".join(f"{p.number} ({p.type_name})" for p in self.partitions)
        text = f"{self.scheme.upper() if self.scheme else '?'} partitions {parts}"
        return text + "".join(f"; {w}" for w in self.warnings)


ReadFn = Callable[[int, int], bytes]
AsyncReadFn = Callable[[int, int], Awaitable[bytes]]
# A generator that yields (offset, size) it needs to read, is sent the bytes, returns a table.
_Scanner = Generator[tuple[int, int], bytes, PartitionTable]
# The extended boot record walk: the same reads, giving the logical partitions it found.
_LogicalScanner = Generator[tuple[int, int], bytes, list[Partition]]


def parse_partition_table(
    head: bytes, disk_size: int, read: ReadFn | None = None
) -> list[Partition]:
    """The partitions of a disk whose first bytes are `head` ([] when none can be trusted)."""
    return scan_partition_table(head, disk_size, read).partitions


def scan_partition_table(head: bytes, disk_size: int, read: ReadFn | None = None) -> PartitionTable:
    """Parse the table in `head`; `read` (optional) reaches extended-partition boot records.

    Without `read`, logical partitions are left out with a warning saying so.
    """
    scanner = _scan(head, disk_size, follow_logical=read is not None)
    try:
        request = next(scanner)
        while True:
            assert read is not None
            request = scanner.send(read(*request))
    except StopIteration as done:
        return done.value


async def detect_partitions(read: AsyncReadFn, disk_size: int) -> PartitionTable:
    """Read the head through `read` (async), then parse it, following logical partitions."""
    head = await read(0, min(HEAD_BYTES, disk_size))
    scanner = _scan(head, disk_size, follow_logical=True)
    try:
        request = next(scanner)
        while True:
            request = scanner.send(await read(*request))
    except StopIteration as done:
        return done.value


# -- the scan -----------------------------------------------------------------------------


def _scan(head: bytes, disk_size: int, *, follow_logical: bool) -> _Scanner:
    if len(head) < 512:
        return PartitionTable(None, reason="the disk is smaller than one sector")
    mbr_signed = head[MBR_SIGNATURE_OFFSET : MBR_SIGNATURE_OFFSET + 2] == b"\x55\xaa"
    entries = _mbr_entries(head) if mbr_signed else []
    protective = any(e[1] == GPT_PROTECTIVE_TYPE for e in entries)
    gpt_at = [s for s in SECTOR_SIZES if head[s : s + 8] == GPT_SIGNATURE]
    if protective or (gpt_at and not _looks_like_mbr(entries)):
        if not gpt_at:
            return PartitionTable(
                "gpt", reason="protective MBR, but no GPT header at sector 1 (512 or 4096 bytes)"
            )
        problems = []
        for sector in gpt_at:
            table = _parse_gpt(head, disk_size, sector)
            if table.partitions or not table.reason.startswith("damaged"):
                return table
            problems.append(table.reason)
        return PartitionTable("gpt", reason="; ".join(problems))
    if not mbr_signed:
        return PartitionTable(None, reason="no partition table (no MBR signature, no GPT header)")
    fs = _filesystem_boot_sector(head)
    if fs:
        return PartitionTable(None, reason=f"no partition table: the disk starts with a {fs}")
    if not _looks_like_mbr(entries):
        return PartitionTable(None, reason="no partition table (the MBR lists no partition)")
    return (yield from _parse_mbr(entries, disk_size, follow_logical=follow_logical))


def _looks_like_mbr(entries: list[tuple[int, int, int, int, int]]) -> bool:
    """Status bytes valid and at least one used slot: not a boot sector of something else."""
    return bool(entries) and all(status in (0x00, 0x80) for status, *_ in entries)


def _mbr_entries(head: bytes) -> list[tuple[int, int, int, int, int]]:
    """(status, type, first LBA, sector count, slot) of the used primary slots."""
    out = []
    for slot in range(4):
        offset = MBR_TABLE_OFFSET + slot * MBR_ENTRY_SIZE
        status, ptype, first, count = struct.unpack_from("<B3xB3xII", head, offset)
        if ptype == 0 and first == 0 and count == 0:
            continue
        out.append((status, ptype, first, count, slot + 1))
    return out


def _filesystem_boot_sector(head: bytes) -> str:
    """FAT, NTFS and exFAT boot sectors also end in 55 AA: recognise them as filesystems."""
    if head[3:11] == b"NTFS    ":
        return "NTFS filesystem"
    if head[3:11] == b"EXFAT   ":
        return "exFAT filesystem"
    if head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16", b"FAT  "):
        return "FAT filesystem"
    return ""


def _parse_mbr(
    entries: list[tuple[int, int, int, int, int]], disk_size: int, *, follow_logical: bool
) -> _Scanner:
    sector = 512
    table = PartitionTable("mbr", sector_size=sector)
    for _status, ptype, first, count, slot in entries:
        if count == 0 or ptype == 0:
            continue
        start, size = first * sector, count * sector
        if first == 0 or start + size > disk_size:
            table.warnings.append(
                f"partition {slot} ({start}+{size} bytes) lies outside the {disk_size}-byte disk"
            )
            continue
        if ptype in EXTENDED_TYPES:
            if follow_logical:
                logical = yield from _logical_partitions(first, count, disk_size, table)
                table.partitions.extend(logical)
            else:
                table.warnings.append(
                    f"logical partitions in extended partition {slot} are not shown"
                )
            continue
        table.partitions.append(Partition(slot, start, size, "mbr", f"0x{ptype:02x}"))
    table.partitions.sort(key=lambda p: p.number)
    if not table.partitions:
        table.reason = "the MBR lists no usable partition" + "".join(
            f"; {w}" for w in table.warnings
        )
    return table


def _logical_partitions(
    ext_first: int, ext_count: int, disk_size: int, table: PartitionTable
) -> _LogicalScanner:
    """Walk the chain of extended boot records; each holds one logical partition and a link."""
    sector = 512
    out: list[Partition] = []
    ebr = ext_first
    seen: set[int] = set()
    while len(out) < MAX_LOGICAL_PARTITIONS:
        if ebr in seen or not ext_first <= ebr < ext_first + ext_count:
            table.warnings.append(f"the logical partition chain is broken at sector {ebr}")
            break
        seen.add(ebr)
        record = yield (ebr * sector, sector)
        if len(record) < sector or record[510:512] != b"\x55\xaa":
            table.warnings.append(f"no extended boot record at sector {ebr}")
            break
        _, ptype, rel, count = struct.unpack_from("<B3xB3xII", record, MBR_TABLE_OFFSET)
        _, next_type, next_rel, _ = struct.unpack_from(
            "<B3xB3xII", record, MBR_TABLE_OFFSET + MBR_ENTRY_SIZE
        )
        if ptype and count:
            start, size = (ebr + rel) * sector, count * sector
            if start + size <= disk_size:
                out.append(Partition(5 + len(out), start, size, "mbr", f"0x{ptype:02x}", "", True))
            else:
                table.warnings.append(f"logical partition at sector {ebr + rel} exceeds the disk")
        if next_type not in EXTENDED_TYPES or next_rel == 0:
            break
        ebr = ext_first + next_rel  # links are relative to the extended partition's start
    return out


def _parse_gpt(head: bytes, disk_size: int, sector: int) -> PartitionTable:
    table = PartitionTable("gpt", sector_size=sector)
    header = head[sector : sector + sector]
    (
        _sig, _rev, header_size, header_crc, _res, my_lba, _alt_lba, first_usable, last_usable,
        _disk_guid, entries_lba, num_entries, entry_size, entries_crc,
    ) = struct.unpack_from("<8sIIII QQQQ 16s QIII", header)  # fmt: skip
    if not GPT_MIN_HEADER_SIZE <= header_size <= sector:
        table.reason = f"damaged GPT: header size {header_size}"
        return table
    raw = bytearray(header[:header_size])
    raw[16:20] = b"\0\0\0\0"
    if zlib.crc32(raw) != header_crc:
        table.reason = f"damaged GPT: header CRC32 mismatch ({sector}-byte sectors)"
        return table
    if my_lba != 1:
        table.reason = f"damaged GPT: the header at sector 1 says it is at sector {my_lba}"
        return table
    if entry_size < GPT_MIN_ENTRY_SIZE or entry_size % 8 or not 0 < num_entries <= GPT_MAX_ENTRIES:
        table.reason = f"damaged GPT: {num_entries} entries of {entry_size} bytes"
        return table
    start = entries_lba * sector
    length = num_entries * entry_size
    if entries_lba < 2 or start + length > len(head):
        table.reason = (
            f"GPT entries at sector {entries_lba} lie beyond the first {len(head)} bytes read"
        )
        return table
    array = head[start : start + length]
    if zlib.crc32(array) != entries_crc:
        table.reason = "damaged GPT: partition entries CRC32 mismatch"
        return table
    for k in range(num_entries):
        entry = array[k * entry_size : (k + 1) * entry_size]
        type_guid = entry[:16]
        if type_guid == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        number = k + 1
        if last < first or first < first_usable or last > last_usable:
            table.warnings.append(f"partition {number} has an impossible range {first}-{last}")
            continue
        begin, size = first * sector, (last - first + 1) * sector
        if begin + size > disk_size:
            table.warnings.append(
                f"partition {number} ends at byte {begin + size}, past the {disk_size}-byte disk"
            )
            continue
        type_id = str(uuid.UUID(bytes_le=bytes(type_guid)))
        table.partitions.append(Partition(number, begin, size, "gpt", type_id, name))
    if not table.partitions:
        table.reason = "the GPT lists no partition" + "".join(f"; {w}" for w in table.warnings)
    return table
