"""Emulator conformance at scale: synthetic snapshots up to 64 TiB, with flat memory."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest

from ebsfuse.emulator import Emulator
from ebsfuse.emulator.synthetic import SpecError, SyntheticLayer, parse_spec
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import BLOCK, make_client, read

emulator, client = fx.emulator, fx.client  # fixtures

NBLOCKS_64TIB = 65536 * 2048  # 134,217,728 blocks


def rss_bytes() -> int:
    """This process's resident set size now (not the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_64tib_fully_allocated_volume(emulator: Emulator, client: Any) -> None:
    before = rss_bytes()
    sid = emulator.create_synthetic("size=65536,pattern=all,seed=7")
    seen: set[bytes] = set()
    for start in (0, NBLOCKS_64TIB // 2, NBLOCKS_64TIB - 10000):
        page = client.list_snapshot_blocks(SnapshotId=sid, StartingBlockIndex=start)
        assert page["VolumeSize"] == 65536
        blocks = page["Blocks"]
        assert [b["BlockIndex"] for b in blocks] == list(range(start, start + 10000))
        if start + 10000 < NBLOCKS_64TIB:
            assert "NextToken" in page
        else:
            assert "NextToken" not in page  # the last page of the volume
        for b in blocks[::2500] + blocks[-1:]:
            data = read(client, sid, b["BlockIndex"], b["BlockToken"])
            seen.add(hashlib.sha256(data).digest())
    assert len(seen) == 15  # every block differs
    # Walk a long stretch in pages and read a block from each: memory must stay flat.
    args: dict[str, Any] = {"SnapshotId": sid, "StartingBlockIndex": NBLOCKS_64TIB // 3}
    for _ in range(30):
        page = client.list_snapshot_blocks(**args)
        last = page["Blocks"][-1]
        read(client, sid, last["BlockIndex"], last["BlockToken"])
        args = {"SnapshotId": sid, "NextToken": page["NextToken"]}
    grown = rss_bytes() - before
    assert grown < 100 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_synthetic_content_is_deterministic(emulator: Emulator, client: Any) -> None:
    a = emulator.create_synthetic("size=16,pattern=random:0.25,seed=3")
    assert emulator.create_synthetic("seed=3,pattern=random:0.25,size=16") == a  # same spec
    b = emulator.create_synthetic("size=16,pattern=random:0.25,seed=4")
    assert a != b
    pages = client.list_snapshot_blocks(SnapshotId=a)["Blocks"]
    layer = SyntheticLayer(parse_spec("size=16,pattern=random:0.25,seed=3"))
    assert [p["BlockIndex"] for p in pages] == layer.indexes_from(0, 10000)
    assert len(pages) == layer.count()  # about a quarter of 32768 blocks: one page
    assert 0.24 * 16 * 2048 < layer.count() < 0.26 * 16 * 2048
    # The bytes as the format is documented (synthetic.py), built here, not by the layer:
    # SHAKE-256 of the seed for all but the last 32 bytes, then magic, seed and index.
    for entry in (pages[0], pages[-1]):
        data = read(client, a, entry["BlockIndex"], entry["BlockToken"])
        stamp = struct.pack(">8sQQ8x", b"EBSFUSE\x00", 3, entry["BlockIndex"])
        prefix = hashlib.shake_256(b"ebsfuse-synthetic" + (3).to_bytes(8, "big"))
        assert data == prefix.digest(BLOCK - len(stamp)) + stamp


@pytest.mark.parametrize(
    ("spec", "count", "first"),
    [
        ("size=1", 2048, [0, 1, 2]),
        ("size=1,pattern=every:1000", 3, [0, 1000, 2000]),
        ("size=1,pattern=first:2", 2, [0, 1]),
        ("size=1,pattern=first:5000", 2048, [0, 1, 2]),
        ("size=1,pattern=random:0", 0, []),
        ("size=1,pattern=random:1", 2048, [0, 1, 2]),
        ("size=1,id=snap-0000000000000abcd", 2048, [0, 1, 2]),
    ],
)
def test_synthetic_patterns(emulator: Emulator, spec: str, count: int, first: list[int]) -> None:
    sid = emulator.create_synthetic(spec)
    layer = emulator.store.get(sid).layer
    assert layer.count() == count
    assert layer.indexes_from(0, 3) == first
    if "id=" in spec:
        assert sid == "snap-0000000000000abcd"


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "pattern=all",
        "size=0",
        "size=65537",
        "size=1,pattern=every:0",
        "size=1,pattern=random:2",
        "size=1,pattern=sometimes",
        "size=1,seed=-1",
        "size=1,colour=blue",
        "size=1,size=2",
        "size=1,id=vol-1",
        "size",
    ],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(spec)


def test_small_child_of_huge_parent(emulator: Emulator) -> None:
    base = emulator.create_synthetic("size=65536,pattern=every:1000")
    ebs = make_client(emulator.endpoint)
    child = emulator.create_snapshot(parent=base, blocks={5: b"\x01" * BLOCK})
    assert emulator.store.get(child).volume_size == 65536
    page = ebs.list_snapshot_blocks(SnapshotId=child, MaxResults=100)
    assert [b["BlockIndex"] for b in page["Blocks"][:3]] == [0, 5, 1000]
    changed = ebs.list_changed_blocks(FirstSnapshotId=base, SecondSnapshotId=child)
    assert [c["BlockIndex"] for c in changed["ChangedBlocks"]] == [5]
    assert "NextToken" not in changed
