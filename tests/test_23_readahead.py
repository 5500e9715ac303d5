"""The prefetcher: window growth and collapse, no amplification on random reads, budgets.

The window logic is tested alone; its effect is proven with the emulator's request counts
through SnapshotImage (no FUSE): never a timing.
"""

from __future__ import annotations

import os
import random

import trio

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.image import SnapshotImage
from ebsfuse.core.pipeline import describe_snapshot
from ebsfuse.core.readahead import MAX_WINDOW_BLOCKS, MIN_WINDOW_BLOCKS, ReadaheadWindow
from ebsfuse.core.reader import FetchContext
from ebsfuse.ebs.client import ClientSettings, EbsClient, RetryPolicy
from ebsfuse.emulator import Emulator

KERNEL_READ = 128 * 1024


def test_window_opens_on_the_second_sequential_read_and_doubles() -> None:
    w = ReadaheadWindow(num_blocks=1000)
    assert list(w.observe(0, KERNEL_READ)) == []  # one read proves nothing
    first = w.observe(KERNEL_READ, KERNEL_READ)
    assert w.window == MIN_WINDOW_BLOCKS
    assert list(first) == [1, 2]
    sizes = []
    for k in range(2, 4 * 40):
        w.observe(k * KERNEL_READ, KERNEL_READ)
        sizes.append(w.window)
    assert sizes == sorted(sizes)  # only grows while the reader keeps going
    assert max(sizes) == MAX_WINDOW_BLOCKS


def test_prefetch_never_repeats_a_block_and_stays_inside_the_volume() -> None:
    w = ReadaheadWindow(num_blocks=50)
    issued: list[int] = []
    for k in range(50 * 4):
        issued += list(w.observe(k * KERNEL_READ, KERNEL_READ))
    assert issued == sorted(set(issued))
    assert max(issued) == 49


def test_reordered_kernel_reads_still_count_as_sequential() -> None:
    w = ReadaheadWindow(num_blocks=1000)
    order = [0, 1, 3, 2, 5, 4, 7, 6, 8, 10, 9, 11]
    for k in order:
        w.observe(k * KERNEL_READ, KERNEL_READ)
    assert w.window >= MIN_WINDOW_BLOCKS and w.collapses == 0


def test_a_jump_collapses_the_window() -> None:
    w = ReadaheadWindow(num_blocks=10_000)
    for k in range(40):
        w.observe(k * KERNEL_READ, KERNEL_READ)
    assert w.window > MIN_WINDOW_BLOCKS
    assert list(w.observe(5000 * BLOCK_SIZE, 4096)) == []
    assert w.window == 0 and w.collapses == 1


def test_random_reads_never_prefetch() -> None:
    w = ReadaheadWindow(num_blocks=100_000)
    rng = random.Random(7)
    for _ in range(500):
        assert list(w.observe(rng.randrange(100_000) * BLOCK_SIZE, 4096)) == []


def test_window_respects_its_cap() -> None:
    w = ReadaheadWindow(num_blocks=10_000, max_blocks=3)
    for k in range(400):
        w.observe(k * KERNEL_READ, KERNEL_READ)
        assert w.window <= 3


# -- through the image, against the emulator -----------------------------------------------


def open_image(emu: Emulator, sid: str, cache_bytes: int) -> SnapshotImage:
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    policy = RetryPolicy(base_delay_s=0.01)
    info = describe_snapshot(client, sid, policy)
    ctx = FetchContext(client, cache_bytes=cache_bytes, max_concurrency=16, policy=policy)
    return SnapshotImage(info, ctx)


def gets(emu: Emulator) -> int:
    return emu.counters()["requests"].get("GetSnapshotBlock", 0)


def sequential_read(image: SnapshotImage, nbytes: int) -> bytes:
    window = image.new_window()
    out = bytearray()

    async def main() -> None:
        async with image.reader.ctx.running():
            for offset in range(0, nbytes, KERNEL_READ):
                out.extend(await image.read(offset, KERNEL_READ, window))

    trio.run(main)
    return bytes(out)


def test_sequential_read_prefetches_each_block_once(emu: Emulator, env: dict[str, str]) -> None:
    data = os.urandom(48 * BLOCK_SIZE)
    sid = emu.create_snapshot(data, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=64 * 2**20)
    assert sequential_read(image, len(data)) == data
    stats = image.reader.stats
    assert gets(emu) == 48  # each written block once; holes prefetched past the data are free
    assert stats.prefetched >= 40
    assert stats.prefetch_wasted == 0


def test_prefetch_stays_within_a_small_cache_budget(emu: Emulator, env: dict[str, str]) -> None:
    data = os.urandom(40 * BLOCK_SIZE)
    sid = emu.create_snapshot(data, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=8 * BLOCK_SIZE)
    window = image.new_window()
    assert window.max_blocks == 2  # a quarter of the 8-block cache
    assert sequential_read(image, len(data)) == data
    assert image.reader.ctx.cache.current_bytes <= 8 * BLOCK_SIZE
    assert image.reader.stats.prefetch_wasted == 0


def test_random_small_reads_cost_one_request_each(emu: Emulator, env: dict[str, str]) -> None:
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(0, 2048, 3)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=256 * 2**20)
    rng = random.Random(11)
    targets = rng.sample(sorted(blocks), 60)
    window = image.new_window()
    before = gets(emu)

    async def main() -> None:
        async with image.reader.ctx.running():
            for index in targets:
                offset = index * BLOCK_SIZE + rng.randrange(BLOCK_SIZE - 4096)
                got = await image.read(offset, 4096, window)
                within = offset - index * BLOCK_SIZE
                assert got == blocks[index][within : within + 4096]

    trio.run(main)
    assert gets(emu) - before == len(targets)
    assert image.reader.stats.prefetched == 0


def test_two_readers_each_get_their_own_window(emu: Emulator, env: dict[str, str]) -> None:
    data = os.urandom(64 * BLOCK_SIZE)
    sid = emu.create_snapshot(data, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=128 * 2**20)
    first, second = image.new_window(), image.new_window()

    async def main() -> None:
        async with image.reader.ctx.running():
            for k in range(8 * 4):
                a = await image.read(k * KERNEL_READ, KERNEL_READ, first)
                b = await image.read(32 * BLOCK_SIZE + k * KERNEL_READ, KERNEL_READ, second)
                assert a == data[k * KERNEL_READ : (k + 1) * KERNEL_READ]
                start = 32 * BLOCK_SIZE + k * KERNEL_READ
                assert b == data[start : start + KERNEL_READ]

    trio.run(main)
    # Interleaved, the two streams would look random to one shared window: each kept its own.
    assert first.collapses == 0 and second.collapses == 0
    assert first.window > MIN_WINDOW_BLOCKS and second.window > MIN_WINDOW_BLOCKS
    assert gets(emu) <= 64


def test_a_second_pass_from_the_start_prefetches_again() -> None:
    w = ReadaheadWindow(num_blocks=1000)
    for k in range(400):
        w.observe(k * KERNEL_READ, KERNEL_READ)
    w.observe(0, KERNEL_READ)  # back to the start: collapse
    assert list(w.observe(KERNEL_READ, KERNEL_READ)) == [1, 2]
    grown = [len(w.observe(k * KERNEL_READ, KERNEL_READ)) for k in range(2, 40)]
    assert sum(grown) > 10 and w.window > MIN_WINDOW_BLOCKS


def test_a_failing_prefetch_never_ends_the_context(emu: Emulator, env: dict[str, str]) -> None:
    data = os.urandom(16 * BLOCK_SIZE)
    sid = emu.create_snapshot(data, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=64 * 2**20)
    real_get = image.reader.ctx.client.get_block
    broken = {3}
    failed: list[int] = []

    def get_block(snapshot_id: str, index: int, token: str, **kwargs: float | None) -> bytes:
        if index in broken:
            failed.append(index)
            raise OSError(28, "No space left on device")  # e.g. the audit log's disk is full
        return real_get(snapshot_id, index, token, **kwargs)

    image.reader.ctx.client.get_block = get_block  # type: ignore[method-assign]
    window = image.new_window()

    async def main() -> None:
        async with image.reader.ctx.running():
            for offset in range(0, 3 * BLOCK_SIZE, KERNEL_READ):  # prefetches block 3
                await image.read(offset, KERNEL_READ, window)
            key = (sid, 3)
            while not failed or key in image.reader.ctx.inflight:  # the prefetch ran, and ended
                await trio.sleep(0.01)
            assert failed == [3]  # it failed, once, and the context lives on
            broken.clear()
            assert (
                await image.read(3 * BLOCK_SIZE, 10) == data[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + 10]
            )

    trio.run(main)
