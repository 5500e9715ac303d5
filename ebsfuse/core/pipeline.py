"""The one block pipeline: how every command gets a snapshot's verified blocks.

    describe(ctx, id) ─► open_snapshot(ctx, info) ─► SnapshotReader.read_block(index)
                                                 └─► ordered_blocks(reader, wanted, window)
    open_changes(ctx, first, second) ─► BlockMap[ChangedBlock].listed()

The mount reads blocks at random through `SnapshotReader.read_block` (single flight, readahead);
`download` and `hash` consume `ordered_blocks`, the listed blocks in ascending order fetched a
window ahead (in worker threads that fetch block after block, `SnapshotReader.fetch_blocking`,
unless a lineage tier must be asked on trio); `diff` and `download --base` walk the changed
blocks of a pair. Under all of them each rule has one home:

- tokens: `BlockMap` (lazy listing by range, refresh before expiry) and
  `SnapshotReader.relist` (one re-list on a refused token);
- the retry loop and the budget: `ebs.retry.Attempts`, driven on trio by
  `FetchContext.with_retries` and blocking by `call_with_retries`, each attempt given what is
  left (`reader.attempt_by`); the shared request rate: `ebs.ratelimit`, inside the transport;
- length, SHA-256 and the audit line: `EbsClient.get_block`; listings checked whole: `ebs.pages`;
- counters: the reader's `ReadStats`.

The commands that block (the CLI's tools) enter it through `run_interruptibly`: Ctrl-C and
SIGTERM cancel the work, the tool's cleanup runs, and the caller gets KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import signal
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from .. import BLOCK_SIZE, GIB
from ..ebs.client import BlockPage, ChangedBlock, EbsClient, validate_snapshot_id
from ..ebs.errors import EbsError, UsageError
from ..ebs.pages import MAX_VOLUME_GIB
from ..ebs.retry import RetryPolicy
from .blockmap import DEFAULT_MAX_TOKENS, BlockMap
from .diskcache import DiskCache
from .lineage import Lineage
from .reader import FetchContext, Fetched, PageLister, SnapshotReader
from .stats import ReadStats

T = TypeVar("T")

# The describe call needs only VolumeSize and BlockSize; 100 is the smallest page botocore
# accepts, so opening a snapshot costs one small request however large the volume.
DESCRIBE_PAGE = 100
# Block indexes of the largest EBS volume (64 TiB).
MAX_VOLUME_BLOCKS = MAX_VOLUME_GIB * GIB // BLOCK_SIZE
# The largest page the list calls give: a walk's first call (see `describe`).
WALK_PAGE = 10000
# A tool's memory cache: the stream hands each block to its consumer once and no step reads a
# block twice, so one block (the cache cannot be empty) keeps the peak memory at the requests
# in flight.
TOOL_CACHE_BYTES = BLOCK_SIZE


@dataclass(frozen=True)
class SnapshotInfo:
    """What the first page of a listing says of a snapshot: its size, and that it is readable."""

    snapshot_id: str
    volume_size_gib: int
    block_size: int
    first_page: BlockPage[str]

    @property
    def size_bytes(self) -> int:
        return self.volume_size_gib * GIB

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.size_bytes / self.block_size)


async def describe(
    ctx: FetchContext, snapshot_id: str, *, max_results: int = DESCRIBE_PAGE
) -> SnapshotInfo:
    """One ListSnapshotBlocks call: the volume's size, and proof the snapshot is readable.

    The page is checked like every other (`pages.block_page`): a VolumeSize outside the EBS
    range or a block size other than 512 KiB refuses the snapshot with one line. A tool that
    walks the whole listing asks for a full `WALK_PAGE`: the block map keeps it, so the walk
    starts where it ends instead of listing the start again.
    """
    validate_snapshot_id(snapshot_id)
    request = functools.partial(ctx.client.list_blocks, snapshot_id, max_results=max_results)
    deadline = trio.current_time() + ctx.policy.budget_s
    page = await ctx.with_retries(request, ReadStats(), deadline)
    return SnapshotInfo(snapshot_id, page.volume_size_gib, page.block_size, page)


def describe_snapshot(client: EbsClient, snapshot_id: str, policy: RetryPolicy) -> SnapshotInfo:
    """`describe` for a caller outside trio (the mount, before it starts serving)."""
    ctx = FetchContext(client, cache_bytes=BLOCK_SIZE, max_concurrency=1, policy=policy)
    return trio.run(describe, ctx, snapshot_id)


def open_snapshot(
    ctx: FetchContext, info: SnapshotInfo, *, max_tokens: int | None = None
) -> SnapshotReader:
    """A reader of `info`'s snapshot whose block map starts with what `describe` listed."""
    stats = ReadStats()
    request = functools.partial(
        ctx.client.list_blocks, info.snapshot_id, volume_size_gib=info.volume_size_gib
    )
    blockmap: BlockMap[str] = BlockMap(
        info.snapshot_id,
        info.num_blocks,
        PageLister(ctx, stats, request),
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
    )
    blockmap.seed(info.first_page)
    return SnapshotReader(info.snapshot_id, blockmap, ctx, stats)


async def open_changes(
    ctx: FetchContext, first: str, second: str, stats: ReadStats
) -> tuple[BlockMap[ChangedBlock], int]:
    """The blocks that differ between two snapshots (ListChangedBlocks), learned by range, and
    the second snapshot's VolumeSize in GiB, from the first page (kept by the map).

    Indexes may run past the second volume (a block only a larger first snapshot has), so the
    map spans the largest EBS volume; its last page proves the rest unchanged.
    """
    request = functools.partial(ctx.client.list_changed_blocks, second, first)
    first_page = await PageLister(ctx, stats, request)(None, None)
    gib = first_page.volume_size_gib
    checked = functools.partial(request, volume_size_gib=gib)
    changes: BlockMap[ChangedBlock] = BlockMap(
        f"{first}..{second}", MAX_VOLUME_BLOCKS, PageLister(ctx, stats, checked)
    )
    changes.seed(first_page)
    return changes, gib


async def listed_blocks(
    reader: SnapshotReader, start: int = 0
) -> AsyncGenerator[tuple[int, bool], None]:
    """Every written block of the reader's snapshot from `start`, each to be fetched."""
    async for index, _ in reader.blockmap.listed(start):
        yield index, True


# Where a block goes as soon as it arrives, out of order, when its consumer does not need
# it in order (download writes each at its offset): (index, verified bytes or None).
Sink = Callable[[int, bytes | None], None]


class _Slot:
    """One block of the stream: filled by its fetch task, handed out in index order."""

    __slots__ = ("data", "done", "error", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.data: bytes | None = None
        self.error: Exception | None = None
        self.done = trio.Event()


class OrderedBlocks:
    """The consumer's side of `ordered_blocks`: `async for index, data in blocks`."""

    def __init__(self, receive: trio.MemoryReceiveChannel[_Slot]) -> None:
        self._receive = receive

    def __aiter__(self) -> OrderedBlocks:
        return self

    async def __anext__(self) -> tuple[int, bytes | None]:
        try:
            slot = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error.fresh() if isinstance(slot.error, EbsError) else slot.error
        return slot.index, slot.data


@contextlib.asynccontextmanager
async def ordered_blocks(
    reader: SnapshotReader,
    wanted: AsyncGenerator[tuple[int, bool], None],
    window: int,
    sink: Sink | None = None,
) -> AsyncIterator[OrderedBlocks]:
    """`wanted` (index, fetch?) pairs, ascending, as (index, verified bytes or None), in order.

    Blocks marked for fetching are fetched at most `window` ahead of the consumer, by worker
    threads block after block (`_BulkStream`), or, where a lineage tier must be asked on trio,
    through `reader.read_block`, the mount's own path (`_Stream`); both keep the same token,
    retry and verification rules. The others come back as None at once. Without a `sink` the
    bytes travel with the order, so memory holds at most `window + 2` blocks; with one, each
    block is handed to `sink` the moment it arrives (in the worker thread that fetched it; a
    hole, or a block from another tier, on the trio thread), and the order carries only its
    index, so memory holds only the requests in flight. A sink must therefore be thread-safe.
    The first failure, of a listing, a block or the sink, is raised to the consumer at its
    place in the order. Leaving the context cancels whatever is still being fetched.
    """
    send, receive = trio.open_memory_channel[_Slot](max(1, window))
    async with trio.open_nursery() as nursery:
        # Without a lineage tier (which borrows on trio) the fetches run in threads of their
        # own, block after block; with it, each block takes the mount's path.
        stream: _Stream | _BulkStream
        if reader.ctx.lineage is None:
            stream = _BulkStream(reader, sink, nursery)
        else:
            stream = _Stream(reader, sink, nursery)
        nursery.start_soon(stream.produce, wanted, send)
        try:
            yield OrderedBlocks(receive)
        finally:
            nursery.cancel_scope.cancel()
            stream.close()
    reader.ctx.on_fetched = None


class _Stream:
    """The producing side: a slot per wanted block, a fetch task per block to fetch.

    With a sink, a block fetched from the service is handed to it in the worker thread that
    fetched it (`FetchContext.on_fetched`: no hand-off, the bytes written before the thread
    lets go of them); a block from another tier, or a hole, on the trio thread.
    """

    def __init__(self, reader: SnapshotReader, sink: Sink | None, nursery: trio.Nursery) -> None:
        self._reader = reader
        self._sink = sink
        self._nursery = nursery
        self._lock = threading.Lock()
        self._sunk: dict[int, Exception | None] = {}  # index -> the sink's failure, if any
        if sink is not None:
            reader.ctx.on_fetched = self._fetched

    def _fetched(self, snapshot_id: str, index: int, data: bytes) -> None:
        """In a worker thread: the sink for a block just fetched, its outcome kept for `_fill`."""
        if snapshot_id != self._reader.snapshot_id or self._sink is None:
            return
        failure: Exception | None = None
        try:
            self._sink(index, data)
        except Exception as error:  # a write that failed: raised in order, by _fill
            failure = error
        with self._lock:
            self._sunk[index] = failure

    async def produce(
        self, wanted: AsyncGenerator[tuple[int, bool], None], send: trio.MemorySendChannel[_Slot]
    ) -> None:
        await _produce(wanted, send, self._start)

    async def _start(self, slot: _Slot, fetch: bool) -> None:
        if fetch:
            self._nursery.start_soon(self._fill, slot)
        else:
            _deliver(slot, None, self._sink)
            slot.done.set()

    async def _fill(self, slot: _Slot) -> None:
        try:
            data = await self._reader.read_block(slot.index)
        except EbsError as error:
            slot.error = error.fresh()
            return
        else:
            with self._lock:
                sunk, failure = slot.index in self._sunk, self._sunk.pop(slot.index, None)
            if failure is not None:
                slot.error = failure
            elif not sunk:
                if isinstance(data, memoryview):  # a fetch worker's (the daemon's); tools get bytes
                    data = bytes(data)
                _deliver(slot, data, self._sink)
        finally:
            slot.done.set()

    def close(self) -> None:
        """Nothing to stop: the fetch tasks end with the nursery."""


async def _produce(
    wanted: AsyncGenerator[tuple[int, bool], None],
    send: trio.MemorySendChannel[_Slot],
    start: Callable[[_Slot, bool], Awaitable[None]],
) -> None:
    """A slot per wanted block, in order, each `start`ed (fetched, or filled at once); a
    failed listing becomes a slot holding its error, raised to the consumer in its place."""
    async with send, contextlib.aclosing(wanted):
        try:
            async for index, fetch in wanted:
                slot = _Slot(index)
                await start(slot, fetch)
                await send.send(slot)
        except EbsError as error:
            slot = _Slot(-1)
            slot.error = error.fresh()
            slot.done.set()
            await send.send(slot)


def _deliver(slot: _Slot, data: bytes | None, sink: Sink | None) -> None:
    """Hand `data` to the slot, or to the sink (a write that fails is raised in order)."""
    try:
        if sink is None:
            slot.data = data
        else:
            sink(slot.index, data)
    except Exception as error:
        slot.error = error


class _BulkStream:
    """The producing side of a tool's stream: worker threads that fetch block after block.

    A tool reads each block once, in order, with no other reader to share a flight with, so
    the mount's per-block machinery (a task, a single-flight entry, a cache entry and a hop to
    a worker thread for each block) is pure cost; measured, it kept the trio thread busy for a
    download's whole run. Here the trio thread only walks the block map and hands (block,
    token) jobs to `ctx.max_concurrency` threads; each fetches with
    `SnapshotReader.fetch_blocking` (the same retry loop, budget, verification and disk tier),
    hands the bytes to the sink where there is one, and reports back with one callback. The
    one re-list of a refused token happens here, on trio, where the block map lives.
    """

    def __init__(self, reader: SnapshotReader, sink: Sink | None, nursery: trio.Nursery) -> None:
        self._reader = reader
        self._sink = sink
        self._nursery = nursery
        self._trio = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[tuple[_Slot, str, bool] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"fetch-{n}", daemon=True)
            for n in range(reader.ctx.max_concurrency)
        ]
        for thread in self._threads:
            thread.start()

    async def produce(
        self, wanted: AsyncGenerator[tuple[int, bool], None], send: trio.MemorySendChannel[_Slot]
    ) -> None:
        await _produce(wanted, send, self._start)

    async def _start(self, slot: _Slot, fetch: bool) -> None:
        token = await self._reader.blockmap.lookup(slot.index) if fetch else None
        if token is None:
            _deliver(slot, None, self._sink)
            slot.done.set()
        else:
            self._jobs.put((slot, token, False))

    def close(self) -> None:
        """Stop the threads: each ends after its request (whose deadline bounds it)."""
        self._stop.set()
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None and not self._stop.is_set():
            slot, token, relisted = job
            outcome = self._reader.fetch_blocking(slot.index, token, self._stop)
            sink_error: Exception | None = None
            if outcome.data is not None and self._sink is not None:
                try:
                    self._sink(slot.index, outcome.data)
                except Exception as error:  # raised in order, on the trio thread
                    sink_error = error
                outcome.data = None  # written: not held while the report waits its turn
            try:
                self._trio.run_sync_soon(self._done, slot, token, relisted, outcome, sink_error)
            except trio.RunFinishedError:
                return

    def _done(
        self,
        slot: _Slot,
        token: str,
        relisted: bool,
        outcome: Fetched,
        sink_error: Exception | None,
    ) -> None:
        """On the trio thread: count the outcome and fill the slot (or re-list once)."""
        self._reader.count(outcome)
        error = outcome.error
        if error is not None and error.token_refused and not relisted and not self._stop.is_set():
            self._nursery.start_soon(self._relist, slot, token)
            return
        if error is not None:
            slot.error = error
        elif sink_error is not None:
            slot.error = sink_error
        elif self._sink is None:
            slot.data = outcome.data
        slot.done.set()

    async def _relist(self, slot: _Slot, token: str) -> None:
        try:
            fresh = await self._reader.relist(slot.index, token)
        except EbsError as error:
            slot.error = error.fresh()
            slot.done.set()
            return
        if fresh is None:
            _deliver(slot, None, self._sink)
            slot.done.set()
        else:
            self._jobs.put((slot, fresh, True))


def tool_context(
    client: EbsClient,
    workers: int,
    policy: RetryPolicy,
    *,
    cache_dir: str | None = None,
    cache_dir_size: int | None = None,
) -> FetchContext:
    """The pipeline's shared state for one tool run: `workers` requests in flight, and the
    disk tier when `cache_dir` is given (refused in one line if it cannot be used)."""
    ctx = FetchContext(
        client,
        cache_bytes=TOOL_CACHE_BYTES,
        max_concurrency=workers,
        policy=policy,
        log_failures=False,
    )
    if cache_dir:
        ctx.disk = DiskCache(cache_dir, cache_dir_size)
    return ctx


async def borrow_from_bases(ctx: FetchContext, info: SnapshotInfo, base_ids: list[str]) -> None:
    """Let `info`'s snapshot take unchanged blocks from its bases' entries in the disk tier."""
    if not base_ids:
        return
    if ctx.disk is None:
        raise UsageError("--base needs --cache-dir: the base's blocks are read from there")
    lineage = Lineage(ctx)
    lineage.add(info.snapshot_id, info.num_blocks)
    for base in base_ids:
        lineage.add(base, (await describe(ctx, base)).num_blocks)
    ctx.lineage = lineage


def run_interruptibly(fn: Callable[..., Awaitable[T]], *args: object) -> T:
    """`trio.run(fn, *args)`; Ctrl-C or SIGTERM cancels `fn` and raises KeyboardInterrupt
    once its cleanup (finally blocks, which may not await) has run."""
    return trio.run(_Interruptible(fn, args).run)


class _Interruptible(Generic[T]):
    def __init__(self, fn: Callable[..., Awaitable[T]], args: tuple[object, ...]) -> None:
        self._fn = fn
        self._args = args

    async def run(self) -> T:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                try:
                    return await self._fn(*self._args)
                finally:
                    nursery.cancel_scope.cancel()
        # Only a signal cancels the scope before `fn` returns.
        raise KeyboardInterrupt()


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return
