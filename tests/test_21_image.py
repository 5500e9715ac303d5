"""SnapshotImage and the reader over HTTP to the emulator, without FUSE.

Byte-exactness, holes without requests, single flight, the cache's byte budget, token
refusal and refresh, and the retry budget: each proven with the emulator's request counters.
"""

from __future__ import annotations

import os
import time

import pytest
import trio
import trio.testing

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.core import blockmap as blockmap_module
from ebsfuse.core.image import SnapshotImage
from ebsfuse.core.pipeline import describe_snapshot
from ebsfuse.core.reader import FetchContext
from ebsfuse.ebs.client import ClientSettings, EbsClient, RetryPolicy
from ebsfuse.ebs.errors import EbsError
from ebsfuse.emulator import Emulator

FAST = RetryPolicy(attempts=4, throttle_attempts=6, base_delay_s=0.01, max_delay_s=0.05)


def open_image(
    emu, snapshot_id: str, *, cache_bytes: int = 64 * BLOCK_SIZE, policy: RetryPolicy = FAST
) -> SnapshotImage:
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    info = describe_snapshot(client, snapshot_id, policy)
    ctx = FetchContext(client, cache_bytes=cache_bytes, max_concurrency=8, policy=policy)
    return SnapshotImage(info, ctx)


def gets(emu: Emulator) -> int:
    return emu.counters()["requests"].get("GetSnapshotBlock", 0)


def lists(emu: Emulator) -> int:
    return emu.counters()["requests"].get("ListSnapshotBlocks", 0)


@pytest.fixture
def blocks() -> dict[int, bytes]:
    return {i: os.urandom(BLOCK_SIZE) for i in (0, 1, 2, 7, 2047)}


def expected(blocks: dict[int, bytes], offset: int, size: int, volume: int = GIB) -> bytes:
    out = bytearray()
    end = min(offset + size, volume)
    pos = offset
    while pos < end:
        index, within = divmod(pos, BLOCK_SIZE)
        take = min(BLOCK_SIZE - within, end - pos)
        out += blocks.get(index, bytes(BLOCK_SIZE))[within : within + take]
        pos += take
    return bytes(out)


def test_reads_are_byte_exact_across_blocks_holes_and_eof(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes]
) -> None:
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid)
    cases = [
        (0, 100),
        (BLOCK_SIZE - 10, 20),  # across a block boundary
        (BLOCK_SIZE * 2 - 5, BLOCK_SIZE * 3),  # written, hole, hole, ...
        (BLOCK_SIZE * 6 + 17, BLOCK_SIZE + 100),  # hole into a written block
        (GIB - 300, 1000),  # clamped at EOF
        (GIB, 10),  # at EOF: nothing
        (GIB + 5, 10),  # past EOF: nothing
    ]

    async def main() -> None:
        for offset, size in cases:
            assert await image.read(offset, size) == expected(blocks, offset, size), (offset, size)

    trio.run(main)


def test_holes_cost_no_request(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes]
) -> None:
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid)
    before = gets(emu)

    async def main() -> None:
        for index in (3, 4, 100, 1000, 2046):
            assert await image.read(index * BLOCK_SIZE, BLOCK_SIZE) == bytes(BLOCK_SIZE)

    trio.run(main)
    assert gets(emu) == before
    # The describe call's first page covered the whole (sparse) volume: no more listings.
    assert lists(emu) == 1


def test_concurrent_reads_of_one_block_share_one_request(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes]
) -> None:
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid)
    gate = emu.gate(sid, 7)  # the leader's request is held until every reader is waiting
    results: list[bytes] = []

    async def read_one() -> None:
        results.append(await image.read(7 * BLOCK_SIZE + 4096, 4096))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(read_one)
            while not gate.arrived:  # the request is at the service...
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()  # ...and all 20 readers wait on it
            gate.release()

    trio.run(main)
    assert gate.arrived == 1
    assert gets(emu) == 1
    assert results == [blocks[7][4096:8192]] * 20
    assert image.reader.stats.shared_flights == 19


def test_cache_stays_within_its_byte_budget_and_hits_avoid_requests(
    emu: Emulator, env: dict[str, str]
) -> None:
    data = {i: os.urandom(BLOCK_SIZE) for i in range(10)}
    sid = emu.create_snapshot(blocks=data, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=3 * BLOCK_SIZE)
    ctx = image.reader.ctx

    async def main() -> None:
        for index in range(10):
            assert await image.read(index * BLOCK_SIZE, BLOCK_SIZE) == data[index]
            assert ctx.cache.current_bytes <= 3 * BLOCK_SIZE
        before = gets(emu)
        assert await image.read(9 * BLOCK_SIZE, 10) == data[9][:10]  # still cached
        assert gets(emu) == before
        assert await image.read(0, 10) == data[0][:10]  # evicted long ago
        assert gets(emu) == before + 1

    trio.run(main)
    assert image.reader.stats.cache_hits >= 1


def test_expired_token_is_refused_then_relisted_once(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make the map keep tokens past their expiry, so the service's refusal path is taken.
    monkeypatch.setattr(blockmap_module, "REFRESH_FRACTION", 1000.0)
    emu.set_faults(token_ttl=60)
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid)

    async def main() -> None:
        emu.advance_clock(61)  # the service's clock: the listed tokens are now expired
        assert await image.read(2 * BLOCK_SIZE, 64) == blocks[2][:64]

    trio.run(main)
    assert image.reader.stats.token_refusals == 1
    assert lists(emu) == 2
    assert emu.counters()["errors"].get("ValidationException", 0) == 1


def test_tokens_are_refreshed_before_they_expire(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes]
) -> None:
    emu.set_faults(token_ttl=100)
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid, cache_bytes=BLOCK_SIZE)
    # Time passes on two clocks moved together, with no sleeping: the service's (token expiry)
    # and the block map's (when to refresh), which reads the wall clock off the service's.
    monotonic = [time.monotonic()]
    image.blockmap._clock = lambda: monotonic[0]
    image.blockmap._wall_clock = emu.clock.now

    async def main() -> None:
        for index in (0, 1, 2, 7, 2047, 0):
            emu.advance_clock(45)
            monotonic[0] += 45
            assert await image.read(index * BLOCK_SIZE, 8) == blocks[index][:8]

    trio.run(main)
    # Over 270 s with a 100 s lifetime the map re-listed ahead of expiry, never hitting a refusal.
    assert lists(emu) >= 3
    assert image.reader.stats.token_refusals == 0
    assert image.blockmap.refreshes >= 2


def test_persistent_failure_gives_an_error_within_the_retry_budget(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ebsfuse.core.reader.FAILED_HOLD_S", 0.3)
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid)
    emu.set_faults(fail_rate=1.0)
    before = gets(emu)

    async def main() -> None:
        with pytest.raises(EbsError) as caught:
            await image.read(BLOCK_SIZE, 10)
        assert caught.value.code == "InternalServerException"
        assert caught.value.snapshot_id == sid and caught.value.block_index == 1

    trio.run(main)
    assert gets(emu) - before == FAST.attempts
    emu.set_faults(fail_rate=0.0)
    # Asked again at once, the block fails from memory, without a request; after the hold
    # it is fetched afresh.
    with pytest.raises(EbsError):
        trio.run(lambda: image.read(BLOCK_SIZE, 10))
    assert gets(emu) - before == FAST.attempts
    time.sleep(0.4)
    assert trio.run(lambda: image.read(BLOCK_SIZE, 10)) == blocks[1][:10]


def test_faults_never_produce_a_wrong_byte(emu: Emulator, env: dict[str, str]) -> None:
    data = {i: os.urandom(BLOCK_SIZE) for i in range(40)}
    sid = emu.create_snapshot(blocks=data, volume_size_gib=1)
    image = open_image(
        emu, sid, policy=RetryPolicy(attempts=8, throttle_attempts=20, base_delay_s=0.02)
    )
    emu.set_faults(fail_rate=0.1, truncate_rate=0.05, throttle_rps=50)

    async def main() -> None:
        got = await image.read(0, 40 * BLOCK_SIZE)
        assert got == b"".join(data[i] for i in range(40))

    trio.run(main)
    stats = image.reader.stats
    assert sum(stats.retries.values()) > 0  # the faults were really met


def test_unknown_snapshot_fails_at_once(emu: Emulator, env: dict[str, str]) -> None:
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    with pytest.raises(EbsError) as caught:
        describe_snapshot(client, "snap-0123456789abcdef0", FAST)
    assert caught.value.code == "ResourceNotFoundException"
    assert caught.value.reason == "SNAPSHOT_NOT_FOUND"
    assert lists(emu) == 1  # not retried


def test_a_cancelled_leader_never_hands_cancelled_to_its_waiters(
    emu: Emulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reader A reads blocks 1-2: block 1 is denied while block 2 sits in retry backoff, so the
    # failure cancels A's fetch of block 2. Reader B, waiting on that same flight, must get
    # the block, not A's Cancelled (which would escape the FUSE handler and end the mount).
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(4)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    image = open_image(emu, sid, policy=RetryPolicy(base_delay_s=0.5, max_delay_s=0.5))
    client = image.reader.ctx.client
    real_get = client.get_block
    failed_once: set[int] = set()

    def get_block(snapshot_id: str, index: int, token: str, **kwargs: float | None) -> bytes:
        if index == 1:
            time.sleep(0.05)
            raise EbsError("denied", code="AccessDeniedException")
        if index == 2 and index not in failed_once:
            failed_once.add(index)
            raise EbsError("blip", code="InternalServerException", retryable=True)
        return real_get(snapshot_id, index, token, **kwargs)

    monkeypatch.setattr(client, "get_block", get_block)
    monkeypatch.setattr("random.uniform", lambda a, b: b)  # deterministic backoff
    outcomes: dict[str, object] = {}

    async def reader_a() -> None:
        with pytest.raises(EbsError):
            await image.read(BLOCK_SIZE, 2 * BLOCK_SIZE)
        outcomes["a"] = "failed"

    async def reader_b() -> None:
        await trio.sleep(0.02)
        outcomes["b"] = await image.read(2 * BLOCK_SIZE, 4096)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader_a)
            nursery.start_soon(reader_b)

    trio.run(main)
    assert outcomes == {"a": "failed", "b": blocks[2][:4096]}
    assert image.reader.ctx.inflight == {}


def test_a_request_queued_past_its_budget_is_not_sent(
    emu: Emulator, env: dict[str, str], blocks: dict[int, bytes]
) -> None:
    """The budget is worked out when a worker takes the request: one that waited for its slot
    until too little was left fails without a request, and a prefetch that never got a slot
    is neither logged as a failure nor remembered against the block."""
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    policy = RetryPolicy(attempts=1, throttle_attempts=1, budget_s=1.5, attempts_per_budget=1)
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    info = describe_snapshot(client, sid, policy)
    ctx = FetchContext(client, cache_bytes=64 * BLOCK_SIZE, max_concurrency=1, policy=policy)
    image = SnapshotImage(info, ctx)
    emu.set_faults(latency_ms=1300)  # the one slot is busy for most of the budget

    async def main() -> None:
        async with ctx.running():
            first = trio.Event()

            async def slow_reader() -> None:
                first.set()
                assert await image.read(0, 10) == blocks[0][:10]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                await first.wait()
                await trio.sleep(0.05)  # block 0's request holds the slot
                image.reader.prefetch(7)  # queued behind it: starved, never sent
                with pytest.raises(EbsError) as caught:
                    await image.read(BLOCK_SIZE, 10)  # block 1, queued too
            assert caught.value.code == "ReadTimeout" and caught.value.attempts == 0
            assert (sid, 7) not in ctx.failed  # the starved prefetch taught nothing
            assert (sid, 1) in ctx.failed  # the reader's own failure is held

    before = gets(emu)
    trio.run(main)
    assert gets(emu) - before == 1  # only block 0 was ever requested
