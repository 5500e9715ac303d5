"""The file-by-file comparison of `ebsfuse changes`, without FUSE: two directories of this host.

Which blocks changed is given by hand (`ChangedBlocks`), so the rules are seen one by one: a
range the extents vouch for is not read, a range in a changed block is, a differing byte is
found to its page, a rename is matched by inode and birth time. Real snapshots are in test_61.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.workflows.treediff import (
    MAX_BLOCKS,
    MAX_RANGES,
    PAGE,
    Change,
    ChangedBlocks,
    ContentJudge,
    Evidence,
    Ranges,
    Side,
    TreeComparer,
    birth_ns,
    differing_pages,
    file_extents,
    walk_pair,
)


def test_changed_blocks_answer_for_byte_ranges() -> None:
    changed = ChangedBlocks(100)
    for index in (3, 4, 9, 99):
        changed.add(index)
    changed.add(4)
    assert changed.count == 4 and 4 in changed and 5 not in changed and 150 not in changed
    changed.add(150)  # past the volume the map was sized for (the other may be larger): grows
    assert 150 in changed and 149 not in changed and changed.num_blocks > 150
    assert changed.count_in(0, 200 * BLOCK_SIZE) == 5
    changed.add(-1)
    changed.add(MAX_BLOCKS)  # no volume has these: ignored
    assert changed.count == 5 and changed.num_blocks < 200
    assert changed.count_in(0, 3 * BLOCK_SIZE) == 0
    assert changed.count_in(3 * BLOCK_SIZE - 1, 3 * BLOCK_SIZE + 1) == 1
    assert changed.count_in(0, 100 * BLOCK_SIZE) == 4
    start, end = 3 * BLOCK_SIZE + 10, 9 * BLOCK_SIZE + 20
    assert list(changed.spans(start, end)) == [
        (start, 4 * BLOCK_SIZE),
        (4 * BLOCK_SIZE, 5 * BLOCK_SIZE),
        (9 * BLOCK_SIZE, end),
    ]
    assert list(changed.spans(5 * BLOCK_SIZE, 9 * BLOCK_SIZE)) == []


def test_ranges_merge_and_stay_bounded_without_losing_a_byte() -> None:
    ranges = Ranges()
    ranges.add(0, 4096)
    ranges.add(4096, 4096)
    ranges.add(10_000, 0)
    assert ranges.items == [(0, 8192)]
    for i in range(2, 2 * MAX_RANGES):
        ranges.add(i * 16384, 100)
    assert len(ranges.items) == MAX_RANGES
    last_offset, last_length = ranges.items[-1]
    assert last_offset + last_length == (2 * MAX_RANGES - 1) * 16384 + 100


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_differing_pages_find_a_byte_to_its_page(workdir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    other = bytearray(data)
    other[2 * 1024 * 1024 + 5] ^= 1
    a, b = write(workdir / "a", data), write(workdir / "b", bytes(other))
    ranges = Ranges()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        read = differing_pages(fa.fileno(), fb.fileno(), 100, len(data) - 100, ranges)
    assert ranges.items == [(2 * 1024 * 1024, PAGE)]
    assert read == 2 * len(data)  # widened to whole pages, cut at the end of the files


@pytest.fixture
def mapped_file(workdir: Path) -> Path:
    path = write(workdir / "tree" / "data.bin", os.urandom(3 * BLOCK_SIZE))
    os.sync()
    with open(path, "rb") as f:
        if not file_extents(f.fileno(), 0, 3 * BLOCK_SIZE):
            pytest.skip("this host's filesystem gives no extent map")
    return path


def test_extents_in_unchanged_blocks_are_not_read_and_changed_ones_are(mapped_file: Path) -> None:
    size = mapped_file.stat().st_size
    with open(mapped_file, "rb") as f:
        first = file_extents(f.fileno(), 0, size)
    assert first
    changed = ChangedBlocks((1 << 40) // BLOCK_SIZE)  # a terabyte: this host disk
    judge = ContentJudge(Evidence(changed, extents=True))
    verdict = judge.judge(str(mapped_file), str(mapped_file), size, size)
    assert verdict.ranges == [] and verdict.method == "extents" and judge.bytes_read == 0

    changed.add(first[0].physical // BLOCK_SIZE)  # the block holding the file's first byte
    verdict = judge.judge(str(mapped_file), str(mapped_file), size, size)
    assert verdict.ranges == [] and 0 < judge.bytes_read <= 2 * (BLOCK_SIZE + PAGE)

    # Without extents (another filesystem) or with --deep, the whole file is read.
    for evidence in (Evidence(changed), Evidence(changed, extents=True, deep=True)):
        whole = ContentJudge(evidence)
        assert whole.judge(str(mapped_file), str(mapped_file), size, size).method == "read"
        assert whole.bytes_read == 2 * size


def test_a_comparison_of_two_trees_finds_each_kind_of_change(workdir: Path) -> None:
    a, b = workdir / "a", workdir / "b"
    write(a / "same.txt", b"same\n")
    write(b / "same.txt", b"same\n")
    for side in (a, b):
        os.utime(side / "same.txt", ns=(0, 10**18))
    write(a / "sub" / "edited.txt", b"before\n")
    write(b / "sub" / "edited.txt", b"after!\n")
    os.utime(b / "sub" / "edited.txt", ns=(0, (a / "sub" / "edited.txt").stat().st_mtime_ns))
    write(a / "gone.txt", b"x")
    write(b / "onlyb" / "new.txt", b"y")
    write(a / "moved.txt", b"same inode\n")
    (b / "sub").mkdir(exist_ok=True)
    os.link(a / "moved.txt", b / "sub" / "moved-here.txt")  # one inode, two names: a rename
    os.symlink("one", a / "link")
    os.symlink("two", b / "link")

    found: list[Change] = []
    comparer = TreeComparer(Side(str(a)), Side(str(b)), Evidence(None), found.append)
    comparer.run()
    by_path = {c.path: c for c in found}
    edited = by_path["/sub/edited.txt"]
    assert edited.change == "modified" and edited.content is not None
    assert edited.content.ranges == [(0, 7)] and "mtime" not in edited.fields
    assert by_path["/link"].change == "metadata" and by_path["/link"].fields == ["target"]
    assert by_path["/gone.txt"].change == "deleted"
    assert by_path["/onlyb"].change == "added" and by_path["/onlyb/new.txt"].change == "added"
    assert "/same.txt" not in by_path
    if birth_ns(str(a / "moved.txt")) is not None:
        moved = by_path["/sub/moved-here.txt"]
        assert moved.change == "renamed" and moved.renamed_from == "/moved.txt"
    # Walk order first (modified and metadata), then renamed, deleted, added.
    kinds = [c.change for c in found if c.path != "/" and not c.path.startswith("/sub/moved")]
    assert kinds.index("deleted") > kinds.index("modified")
    assert comparer.counts["added"] == 2 and comparer.entries == len(list(walk_pair(
        Side(str(a)), Side(str(b))
    )))  # fmt: skip


def test_the_walk_is_depth_first_in_sorted_order_across_both_trees(workdir: Path) -> None:
    a, b = workdir / "a", workdir / "b"
    for path in ("x/1", "x/y/2", "z"):
        write(a / path, b"")
    for path in ("x/0", "w/3"):
        write(b / path, b"")
    order = [(path, st_a is not None, st_b is not None) for path, st_a, st_b in walk_pair(
        Side(str(a)), Side(str(b))
    )]  # fmt: skip
    assert order == [
        ("/", True, True),
        ("/w", False, True),
        ("/w/3", False, True),
        ("/x", True, True),
        ("/x/0", False, True),
        ("/x/1", True, False),
        ("/x/y", True, False),
        ("/x/y/2", True, False),
        ("/z", True, False),
    ]


def test_a_filesystem_the_service_vouches_for_is_not_read(workdir: Path) -> None:
    """When no block of the filesystem's range changed, its files are not read (NTFS would
    otherwise read them all); here two different files prove that nothing was looked at."""
    a, b = workdir / "a", workdir / "b"
    write(a / "f", b"one")
    write(b / "f", b"two")
    for side in (a, b):
        os.utime(side / "f", ns=(0, 10**18))
    evidence = Evidence(ChangedBlocks(8), unchanged=True)
    found: list[Change] = []
    comparer = TreeComparer(Side(str(a)), Side(str(b)), evidence, found.append)
    comparer.run("/f")
    assert found == [] and comparer.judge.bytes_read == 0
    evidence.deep = True  # --deep reads anyway
    comparer = TreeComparer(Side(str(a)), Side(str(b)), evidence, found.append)
    comparer.run("/f")
    assert [c.change for c in found] == ["modified"]
