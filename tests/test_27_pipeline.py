"""The one block pipeline's rules, tested once at the pipeline, over HTTP to the emulator.

Every command reads through `core.pipeline`: the mount by `SnapshotReader.read_block`, the
tools by `ordered_blocks` and the block map's `listed` walk. What is shown here therefore holds
for `download`, `hash`, `diff` and `info` alike: blocks in order and verified, holes without a
request, a bounded window, tokens refreshed before they expire and re-listed once when
refused, no page token held across a stall, the first failure raised at its place in the
order, and 64 readers starting at once against a throttling service without a request storm.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import AsyncGenerator, Callable

import pytest
import trio

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.blockmap import BlockMap
from ebsfuse.core.pipeline import (
    PageLister,
    SnapshotInfo,
    describe,
    listed_blocks,
    open_changes,
    open_snapshot,
    ordered_blocks,
    tool_context,
)
from ebsfuse.core.reader import FetchContext, SnapshotReader
from ebsfuse.core.stats import ReadStats
from ebsfuse.ebs.client import BlockPage, ClientSettings, EbsClient, RetryPolicy
from ebsfuse.ebs.errors import EbsError
from ebsfuse.emulator import Emulator

FAST = RetryPolicy(attempts=4, throttle_attempts=6, base_delay_s=0.01, max_delay_s=0.05)


def new_client(emu: Emulator, cls: type[EbsClient] = EbsClient) -> EbsClient:
    return cls(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))


def requests(emu: Emulator, name: str) -> int:
    return int(emu.counters()["requests"].get(name, 0))


async def collect(
    reader: SnapshotReader, wanted: AsyncGenerator[tuple[int, bool], None], window: int = 8
) -> list[tuple[int, bytes | None]]:
    async with ordered_blocks(reader, wanted, window) as blocks:
        return [item async for item in blocks]


def test_the_stream_gives_every_written_block_in_order_verified_and_holes_cost_nothing(
    emu: Emulator, env: dict[str, str]
) -> None:
    written = {i: os.urandom(BLOCK_SIZE) for i in (0, 1, 5, 700, 2047)}
    sid = emu.create_snapshot(blocks=written, volume_size_gib=1)
    client = new_client(emu)
    ctx = tool_context(client, 4, FAST)

    async def main() -> list[tuple[int, bytes | None]]:
        reader = open_snapshot(ctx, await describe(ctx, sid))
        return await collect(reader, listed_blocks(reader))

    try:
        got = trio.run(main)
    finally:
        client.close()
    assert [i for i, _ in got] == sorted(written)
    for index, data in got:
        assert data is not None
        assert hashlib.sha256(data).digest() == hashlib.sha256(written[index]).digest()
    assert requests(emu, "GetSnapshotBlock") == len(written)  # no request for the 2043 holes


def test_the_window_bounds_the_blocks_fetched_ahead_of_a_slow_consumer(
    emu: Emulator, env: dict[str, str]
) -> None:
    sid = emu.create_synthetic("size=1,pattern=every:4,seed=2")  # 512 blocks written
    client = new_client(emu)
    ctx = tool_context(client, 4, FAST)
    window = 6

    async def main() -> int:
        reader = open_snapshot(ctx, await describe(ctx, sid))
        async with ordered_blocks(reader, listed_blocks(reader), window) as blocks:
            await blocks.__anext__()
            # However long the consumer dawdles, the producer stops at the window: the one
            # consumed, `window` in the channel, one waiting to be put there, one being sent.
            await trio.sleep(1.0)
            return requests(emu, "GetSnapshotBlock")

    try:
        sent = trio.run(main)
    finally:
        client.close()
    assert window <= sent <= 1 + window + 2, sent


def test_tokens_are_relisted_before_they_expire_during_a_walk(
    emu: Emulator, env: dict[str, str]
) -> None:
    sid = emu.create_synthetic("size=1,pattern=every:3,seed=5")  # 683 blocks, one page
    client = new_client(emu)
    ctx = tool_context(client, 2, FAST)
    now = [0.0]

    async def main() -> list[int]:
        info = await describe(ctx, sid)
        # The pipeline's own reader, with the block map's monotonic clock in the test's hand.
        stats = ReadStats()
        request = _list_request(ctx, info)
        blockmap: BlockMap[str] = BlockMap(
            sid, info.num_blocks, PageLister(ctx, stats, request), clock=lambda: now[0]
        )
        reader = SnapshotReader(sid, blockmap, ctx, stats)
        seen = []
        async with ordered_blocks(reader, listed_blocks(reader), 2) as blocks:
            async for index, data in blocks:
                assert data is not None
                seen.append(index)
                if len(seen) == 100:
                    now[0] += 0.9 * 7 * 86400  # 90% of the tokens' 7 days: refresh first
        return seen

    try:
        lists_before = requests(emu, "ListSnapshotBlocks")
        seen = trio.run(main)
    finally:
        client.close()
    assert seen == list(range(0, 2048, 3))
    assert requests(emu, "ListSnapshotBlocks") - lists_before >= 2  # the walk and the refresh
    assert emu.counters()["errors"].get("ValidationException", 0) == 0  # no token refused


def _list_request(ctx: FetchContext, info: SnapshotInfo) -> Callable[..., BlockPage[str]]:
    return functools.partial(
        ctx.client.list_blocks, info.snapshot_id, volume_size_gib=info.volume_size_gib
    )


def test_a_refused_token_is_relisted_once_per_range_and_no_page_token_outlives_a_stall(
    emu: Emulator, env: dict[str, str]
) -> None:
    sid = emu.create_synthetic("size=16,pattern=every:2,seed=3")  # 16384 blocks: 2 pages
    emu.set_faults(empty_pages=True)  # NextTokens to follow between the pages
    client = new_client(emu)
    ctx = tool_context(client, 8, FAST)

    async def main() -> tuple[int, int]:
        reader = open_snapshot(ctx, await describe(ctx, sid))
        count = fetched = 0
        async for index, _ in reader.blockmap.listed():
            count += 1
            if count == 5000:
                # Eight days pass mid-walk: every token and page token in hand has expired.
                emu.advance_clock(8 * 86400)
            if count % 1000 == 0:
                assert await reader.read_block(index) is not None
                fetched += 1
        return count, fetched

    try:
        count, fetched = trio.run(main)
    finally:
        client.close()
    assert (count, fetched) == (16384, 16)
    errors = emu.counters()["errors"]
    # The blocks after the jump were refused once (a token of the old range) and re-listed;
    # the walk itself never sent a stale NextToken: it lists each range from an index.
    assert 1 <= errors.get("ValidationException", 0) <= 2, errors


def test_the_first_failure_is_raised_at_its_place_in_the_order(
    emu: Emulator, env: dict[str, str]
) -> None:
    written = {i: os.urandom(BLOCK_SIZE) for i in range(12)}
    sid = emu.create_snapshot(blocks=written, volume_size_gib=1)

    class BadBlockSeven(EbsClient):
        """Block 7 always fails its checksum, as a corrupting proxy would make it."""

        def get_block(
            self, snapshot_id: str, index: int, token: str, *, timeout: float | None = None
        ) -> bytes:
            data = super().get_block(snapshot_id, index, token, timeout=timeout)
            if index == 7:
                raise EbsError(
                    "SHA-256 mismatch",
                    snapshot_id=snapshot_id,
                    block_index=index,
                    code="ChecksumMismatch",
                    retryable=True,
                )
            return data

    client = new_client(emu, BadBlockSeven)
    ctx = tool_context(client, 4, FAST)
    got: list[int] = []

    async def main() -> None:
        reader = open_snapshot(ctx, await describe(ctx, sid))
        async with ordered_blocks(reader, listed_blocks(reader), 8) as blocks:
            async for index, data in blocks:
                assert data == written[index]
                got.append(index)

    try:
        with pytest.raises(EbsError) as caught:
            trio.run(main)
    finally:
        client.close()
    assert got == list(range(7))  # every block before it, in order, and none after
    assert caught.value.block_index == 7 and caught.value.code == "ChecksumMismatch"
    assert caught.value.attempts == FAST.attempts  # retried by the policy, then given up


def test_changed_blocks_walk_lists_both_tokens(emu: Emulator, env: dict[str, str]) -> None:
    same = os.urandom(BLOCK_SIZE)
    parent = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE), 2: same, 3: same})
    child = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE), 5: same}, parent=parent)
    client = new_client(emu)
    ctx = tool_context(client, 2, FAST)

    async def main() -> list[tuple[int, bool, bool]]:
        changes, gib = await open_changes(ctx, parent, child, ReadStats())
        assert gib == 1
        return [
            (i, c.first_token is not None, c.second_token is not None)
            async for i, c in changes.listed()
        ]

    try:
        walked = trio.run(main)
    finally:
        client.close()
    # The child inherits blocks 2 and 3 unchanged; block 0 is rewritten, 5 is new.
    assert walked == [(0, True, True), (5, False, True)]


def test_sixty_four_readers_starting_at_once_do_not_storm_a_throttling_service(
    emu: Emulator, env: dict[str, str]
) -> None:
    blocks = 128
    sid = emu.create_snapshot(blocks={i: bytes([i]) * BLOCK_SIZE for i in range(blocks)})
    client = new_client(emu)
    policy = RetryPolicy(throttle_attempts=30, base_delay_s=0.05, max_delay_s=1.0, budget_s=60)
    ctx = FetchContext(client, cache_bytes=blocks * BLOCK_SIZE, max_concurrency=64, policy=policy)
    emu.set_faults(throttle_rps=50)

    async def main() -> int:
        reader = open_snapshot(ctx, await describe(ctx, sid))
        done = 0

        async def read_many(first: int) -> None:
            nonlocal done
            for index in range(first, blocks, 64):
                assert await reader.read_block(index) == bytes([index]) * BLOCK_SIZE
                done += 1

        async with trio.open_nursery() as nursery:
            for first in range(64):
                nursery.start_soon(read_many, first)
        return done

    try:
        done = trio.run(main)
    finally:
        client.close()
    counters = emu.counters()
    sent = counters["requests"]["GetSnapshotBlock"]
    refused = counters["errors_injected"].get("RequestThrottledException", 0)
    assert done == blocks
    # Each refusal cuts the shared rate once per congestion event, so after the first wave
    # the 64 readers queue behind one pace instead of each retrying on its own schedule
    # (which costs several refusals per block: coldsnap's issue #451).
    assert sent == blocks + refused
    assert refused < blocks, (sent, refused, client.rate_limiter.snapshot())
    assert client.rate_limiter.cuts >= 1
