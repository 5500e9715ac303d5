"""`ebsfuse changes A B`: the files that differ between two snapshots' filesystems.

1. ListChangedBlocks says which 512 KiB blocks differ between A and B (`ChangedBlocks`, one bit
   a block). Snapshots of different lineages get UNRELATED_SNAPSHOTS: then there is no block
   evidence, and every file present in both is read and compared (said in the result).
2. One private mount daemon serves both snapshots, so B's blocks that did not change are lent
   by A's cache (the lineage tier) rather than fetched twice. Each filesystem is mounted
   read-only through its own read-only loop device (chain.py, `Chain.mount_companion`).
3. treediff.py walks both trees at once: metadata from both, and for each file present in
   both, its content judged by extents (ext2/3/4 and XFS: only the ranges that lie in changed
   blocks, or moved, are read) or by reading both in full (other filesystems, `--deep`).

So the requests are the two trees' metadata (B's unchanged metadata lent by A) and the changed
blocks of the files, which is the point: the naive way restores both snapshots whole.

Everything is torn down on success, failure and Ctrl-C alike; nothing in the chain can write.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import BLOCK_SIZE, GIB
from ..core.partitions import HEAD_BYTES, scan_partition_table
from ..core.pipeline import describe, open_changes, run_interruptibly, tool_context
from ..core.reader import FetchContext
from ..core.stats import ReadStats
from ..ebs.client import EbsClient, RetryPolicy, validate_snapshot_id
from ..ebs.errors import EbsError, EbsfuseError, UsageError
from ..fuse.mount import MountOptions
from .chain import Chain, Selected, runtime_dir
from .restore import inside, resolve_in_root
from .treediff import Change, ChangedBlocks, Evidence, Side, TreeComparer

log = logging.getLogger(__name__)

# Filesystems whose FIEMAP gives byte offsets on the device they were mounted from. btrfs gives
# addresses in its own logical space (its chunk tree maps them), so it is compared by reading.
EXTENT_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs"})


class ChangesInterrupted(EbsfuseError):
    """Ctrl-C or SIGTERM during `changes`: everything was cleaned up."""


@dataclass
class ChangesResult:
    first_snapshot_id: str
    second_snapshot_id: str
    partition: int = 0
    fstype: str = ""
    path: str = "/"
    method: str = "extents"  # "extents", "read" (no extent map, or --deep), "unrelated", "same"
    added: int = 0
    deleted: int = 0
    modified: int = 0
    metadata: int = 0
    renamed: int = 0
    entries: int = 0  # entries walked (in either tree)
    changed_blocks: int = 0  # in the whole volume, as ListChangedBlocks said
    changed_blocks_in_filesystem: int = 0
    files_by_extents: int = 0
    files_read: int = 0
    bytes_compared: int = 0  # file bytes read to compare (both trees)
    blocks_fetched: int = 0  # GetSnapshotBlock, both snapshots
    blocks_lent: int = 0  # B's blocks served from A's cache (or the disk tier) instead
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def total(self) -> int:
        return self.added + self.deleted + self.modified + self.metadata + self.renamed


@dataclass
class ChangesJob:
    first: str
    second: str
    partition: int | None = None
    path: str = "/"
    deep: bool = False
    on_change: Callable[[Change], None] = lambda change: None
    on_entry: Callable[[int], None] = lambda walked: None  # progress: entries walked so far
    on_total: Callable[[int], None] = lambda total: None  # progress: entries expected


def changes(
    client: EbsClient, job: ChangesJob, mount_options: MountOptions, policy: RetryPolicy
) -> ChangesResult:
    """Compare the two snapshots' filesystems, handing each change to `job.on_change`."""
    started = time.monotonic()
    validate_snapshot_id(job.first)
    validate_snapshot_id(job.second)
    result = ChangesResult(job.first, job.second, path=inside(job.path))
    ctx = tool_context(client, 1, policy)
    if job.first == job.second:
        run_interruptibly(describe, ctx, job.first)  # an unknown id is still refused
        result.method = "same"
        result.notes.append("the same snapshot twice: nothing changed")
        return result
    changed = run_interruptibly(_changed_blocks, ctx, job.first, job.second)
    if changed is None:
        result.method = "unrelated"
        result.notes.append(
            "the snapshots are of different lineages (ListChangedBlocks: UNRELATED_SNAPSHOTS): "
            "compared by metadata and by reading every file present in both"
        )
    else:
        result.changed_blocks = changed.count
    _compare_through_chain(job, mount_options, changed, result)
    result.seconds = time.monotonic() - started
    return result


async def _changed_blocks(ctx: FetchContext, first: str, second: str) -> ChangedBlocks | None:
    """The pair's changed blocks; None when the service says they are unrelated."""
    try:
        listing, gib = await open_changes(ctx, first, second, ReadStats())
    except EbsError as error:
        if error.reason == "UNRELATED_SNAPSHOTS":
            return None
        raise
    changed = ChangedBlocks(gib * GIB // BLOCK_SIZE)  # the second's volume: grows if need be
    async for index, _ in listing.listed():
        changed.add(index)
    return changed


def _compare_through_chain(
    job: ChangesJob, opts: MountOptions, changed: ChangedBlocks | None, result: ChangesResult
) -> None:
    private = os.path.join(runtime_dir(), f"changes-{os.getpid()}-{secrets.token_hex(4)}")
    os.makedirs(private, mode=0o700)
    target_a, target_b = os.path.join(private, "a"), os.path.join(private, "b")
    chain = Chain(
        job.first, private, target_a, owns_target=True, companions=[job.second], direct_io=True
    )
    try:
        chain.start_daemon(opts)
        selected_a, selected_b = _select_both(chain, job)
        evidence = _evidence(chain, selected_a, selected_b, changed, job.deep, result)
        chain.attach(selected_a)
        chain.mount_filesystem()
        chain.mount_companion(job.second, selected_b, target_b)
        _walk(job, Side(target_a), Side(target_b), evidence, result)
        _count_fetches(chain, result)
    except KeyboardInterrupt:
        raise ChangesInterrupted("interrupted; nothing is left mounted") from None
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else ""
        for target, sid in ((target_a, job.first), (target_b, job.second)):
            if where.startswith(target):
                where = f"{where[len(target) :] or '/'} in {sid}"
        raise EbsfuseError(f"changes failed: {where}: {exc.strerror or exc}") from None
    finally:
        chain.teardown()


def _select_both(chain: Chain, job: ChangesJob) -> tuple[Selected, Selected]:
    """The same partition of both snapshots, holding the same kind of filesystem."""
    selected_a = chain.select(job.partition)
    selected_b = chain.select(selected_a.partition, job.second)
    if selected_a.fstype != selected_b.fstype:
        where = "the disk" if selected_a.partition == 0 else f"partition {selected_a.partition}"
        raise UsageError(
            f"{where} holds {selected_a.fstype} in {job.first} but {selected_b.fstype} in "
            f"{job.second}: there are no files to compare one by one"
        )
    return selected_a, selected_b


def _evidence(
    chain: Chain,
    selected_a: Selected,
    selected_b: Selected,
    changed: ChangedBlocks | None,
    deep: bool,
    result: ChangesResult,
) -> Evidence:
    """What may be relied on, and the notes saying what could not be."""
    result.partition, result.fstype = selected_a.partition, selected_a.fstype
    offset_a = _partition_start(chain, chain.snapshot_id, selected_a)
    offset_b = _partition_start(chain, chain.companions[0], selected_b)
    sizes = [
        os.path.getsize(os.path.join(chain.image_dir, f"{sid}.img"))
        for sid in (chain.snapshot_id, chain.companions[0])
    ]
    if sizes[0] != sizes[1]:
        result.notes.append(
            f"the volume was resized: {sizes[0] // GIB} GiB in {chain.snapshot_id}, "
            f"{sizes[1] // GIB} GiB in {chain.companions[0]}"
        )
    evidence = Evidence(changed, offset_a, selected_a.fstype in EXTENT_FILESYSTEMS, deep)
    if changed is not None:
        end = offset_a + max(selected_a.size, selected_b.size)
        result.changed_blocks_in_filesystem = changed.count_in(offset_a, end)
        if offset_a != offset_b:
            evidence.changed = None
            result.method = "read"
            result.notes.append(
                f"partition {selected_a.partition} starts at {offset_a} in {chain.snapshot_id} "
                f"but at {offset_b} in {chain.companions[0]}: changed blocks cannot be matched "
                "to files, so every file present in both was read and compared"
            )
        elif not result.changed_blocks_in_filesystem:
            evidence.unchanged = True
            result.notes.append("no block of the filesystem changed: its files are the same")
    if deep:
        result.method = "read"
        result.notes.append("--deep: every file present in both was read and compared")
    elif changed is not None and offset_a == offset_b and not evidence.extents:
        result.method = "read"
        if result.changed_blocks_in_filesystem:
            result.notes.append(
                f"{selected_a.fstype} gives no extent map here: files present in both were read "
                "and compared, since the filesystem has changed blocks"
            )
    return evidence


def _partition_start(chain: Chain, snapshot_id: str, selected: Selected) -> int:
    """Where the selected filesystem starts in the volume (0 for the whole disk)."""
    if selected.partition == 0:
        return 0
    whole = os.path.join(chain.image_dir, f"{snapshot_id}.img")
    with open(whole, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        table = scan_partition_table(
            f.read(HEAD_BYTES), size, lambda offset, length: os.pread(f.fileno(), length, offset)
        )
    for partition in table.partitions:
        if partition.number == selected.partition:
            return partition.start
    raise EbsfuseError(f"{snapshot_id}: partition {selected.partition} vanished from its table")


def _walk(job: ChangesJob, a: Side, b: Side, evidence: Evidence, result: ChangesResult) -> None:
    start = result.path = _start_path(a, b, job)
    job.on_total(_inodes_in_use(a.root) + _inodes_in_use(b.root))
    comparer = TreeComparer(a, b, evidence, job.on_change, job.on_entry)
    comparer.run(start)
    for kind, count in comparer.counts.items():
        setattr(result, kind, count)
    result.entries = comparer.entries
    result.files_by_extents = comparer.judge.files_by_extents
    result.files_read = comparer.judge.files_read
    result.bytes_compared = comparer.judge.bytes_read
    if comparer.moved_with_parent:
        result.notes.append(
            f"{comparer.moved_with_parent} entries moved with a renamed directory and are "
            "otherwise unchanged (not listed)"
        )


def _start_path(a: Side, b: Side, job: ChangesJob) -> str:
    """`--path` inside both trees (symbolic links on the way kept inside each)."""
    prefix = inside(job.path)
    if prefix == "/":
        return prefix
    found = []
    for side in (a, b):
        try:
            found.append(os.path.relpath(resolve_in_root(side.root, prefix), side.root))
        except UsageError:
            continue
    if not found:
        raise UsageError(f"{prefix}: no such file or directory in either snapshot")
    if len(set(found)) > 1:
        raise UsageError(f"{prefix} leads to different places in the two snapshots")
    return "/" if found[0] == "." else "/" + found[0]


def _inodes_in_use(root: str) -> int:
    try:
        st = os.statvfs(root)
    except OSError:
        return 0
    return max(0, st.f_files - st.f_ffree)


def _count_fetches(chain: Chain, result: ChangesResult) -> None:
    for sid in (chain.snapshot_id, *chain.companions):
        counters = chain.stats(sid)
        result.blocks_fetched += int(counters.get("bytes_fetched", 0)) // BLOCK_SIZE
        result.blocks_lent += int(counters.get("saved", {}).get("requests", 0))
