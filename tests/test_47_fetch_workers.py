"""Fetch worker processes (`--fetch-workers`): real mounts against the emulator.

A worker fetches and verifies; everything else stays the daemon's. So these check what the
split could break: the bytes and the audit log are the same through workers as through threads,
a worker killed in the middle of a read costs a retry and not the read (nor the daemon), the
workers end with the daemon however it ends, and 0 means threads. The hostile-service tests
(test_43) run through the default, which is workers wherever there are two cores or more.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.fetchpool import FetchPool
from ebsfuse.core.image import SnapshotImage
from ebsfuse.core.pipeline import describe_snapshot
from ebsfuse.core.reader import FetchContext
from ebsfuse.ebs.client import ClientSettings, EbsClient
from ebsfuse.ebs.errors import EbsError, NotSent
from ebsfuse.ebs.ratelimit import RateLimiter
from ebsfuse.ebs.retry import RetryPolicy
from ebsfuse.emulator import Emulator

from .conftest import MountedSnapshots, daemon_pids, needs_fuse, run_ebsfuse, wait_for


def workers_of(daemon: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == daemon and b"fetchworker" in argv:
            found.append(int(entry))
    return found


@pytest.fixture
def snapshot(emu: Emulator) -> tuple[str, dict[int, bytes]]:
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(0, 64, 2)}
    return emu.create_snapshot(blocks=blocks, volume_size_gib=1), blocks


@pytest.fixture
def tokens(env: dict[str, str], snapshot: tuple[str, dict[int, bytes]]) -> dict[int, str]:
    """The snapshot's block tokens, listed through the client, for the pool's own tests."""
    client = EbsClient(ClientSettings())
    try:
        return dict(client.list_blocks(snapshot[0]).blocks)
    finally:
        client.close()


@needs_fuse
@pytest.mark.timeout(120)
def test_workers_give_the_same_bytes_and_audit_lines_as_threads(
    env: dict[str, str], workdir: Path, snapshot: tuple[str, dict[int, bytes]]
) -> None:
    sid, blocks = snapshot
    digests = {}
    for workers in ("2", "0"):
        audit = workdir / f"audit-{workers}.jsonl"
        mnt = workdir / f"mnt-{workers}"
        extra = ("--fetch-workers", workers, "--audit-log", str(audit))
        with MountedSnapshots(mnt, [sid], env, *extra) as mount:
            daemon = daemon_pids(mnt)[0]
            assert len(workers_of(daemon)) == int(workers)
            with open(mount.image(), "rb") as f:
                digests[workers] = hashlib.sha256(f.read(64 * BLOCK_SIZE)).hexdigest()
            done = run_ebsfuse("stats", "--json", str(mnt), env=env, check=True)
            pool = json.loads(done.stdout).get("fetch_workers")
            if workers == "2":
                # Every block fetched is held in its home, by the cache; none needed a copy.
                assert pool is not None and pool["processes"] == 2
                assert pool["homes_held"] == len(blocks) and pool["blocks_copied"] == 0
                assert pool["requests_in_flight"] == 0 and pool["restarts"] == 0
                human = run_ebsfuse("stats", str(mnt), env=env, check=True).stdout
                assert f"{len(blocks)} of {pool['homes']} homes holding blocks" in human
            else:
                assert pool is None
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        assert sorted(line["block"] for line in lines) == sorted(blocks)
        for line in lines:
            expected = hashlib.sha256(blocks[line["block"]]).digest()
            assert line["sha256"] == base64.b64encode(expected).decode()
    expected_image = b"".join(blocks.get(i, bytes(BLOCK_SIZE)) for i in range(64))
    assert digests["2"] == digests["0"] == hashlib.sha256(expected_image).hexdigest()


@needs_fuse
@pytest.mark.timeout(120)
def test_a_worker_killed_during_a_read_costs_a_retry_not_the_read(
    emu: Emulator, env: dict[str, str], workdir: Path, snapshot: tuple[str, dict[int, bytes]]
) -> None:
    sid, blocks = snapshot
    with MountedSnapshots(workdir / "mnt", [sid], env, "--fetch-workers", "1") as mount:
        daemon = daemon_pids(mount.mountpoint)[0]
        (first,) = workers_of(daemon)
        gate = emu.gate(sid, 10)
        reader = subprocess.Popen(
            ["dd", f"if={mount.image()}", "bs=512K", "skip=10", "count=1", "status=none"],
            stdout=subprocess.PIPE,
        )
        try:
            wait_for(lambda: gate.arrived > 0, what="the worker's request to arrive")
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: workers_of(daemon) not in ([], [first]), what="a new worker")
        finally:
            gate.release()
        data, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0 and data == blocks[10]
        assert "fetch worker 0 ended" in mount.log()
        assert daemon_pids(mount.mountpoint) == [daemon]  # the daemon lives on
        successors = workers_of(daemon)
    # Unmounted: its worker ended with it.
    wait_for(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in successors),
        what="the worker to end with its daemon",
    )


@needs_fuse
@pytest.mark.timeout(120)
def test_workers_die_with_a_killed_daemon(
    env: dict[str, str], workdir: Path, snapshot: tuple[str, dict[int, bytes]]
) -> None:
    sid, _ = snapshot
    with MountedSnapshots(workdir / "mnt", [sid], env, "--fetch-workers", "2") as mount:
        daemon = daemon_pids(mount.mountpoint)[0]
        workers = workers_of(daemon)
        assert len(workers) == 2
        os.kill(daemon, signal.SIGKILL)
        wait_for(
            lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
            what="the workers to end with their daemon",
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [0, 1])
def test_a_slot_is_held_until_its_answer_and_a_request_that_waited_too_long_is_not_sent(
    emu: Emulator,
    env: dict[str, str],
    snapshot: tuple[str, dict[int, bytes]],
    tokens: dict[int, str],
    keep: int,
) -> None:
    """With every slot taken, a request cancelled while its worker still fetches (its budget
    spent, say) must not hand its slot on: the worker writes its block there when the answer
    comes. The next request waits for that answer; if its budget is spent by then, it is not
    sent at all, and the one after it gets its own block. With a home (`keep`) the abandoned
    request's block is written there, and the home too comes back with the answer."""
    sid, blocks = snapshot
    gate = emu.gate(sid, 2)

    async def abandon_when_held(first: trio.CancelScope) -> None:
        while gate.arrived == 0:
            await trio.sleep(0.02)
        first.cancel()

    async def release_later() -> None:
        await trio.sleep(1.0)
        gate.release()

    def short_budget(deadline: float) -> Callable[[], float]:
        def time_left() -> float:
            if deadline - time.monotonic() < 0.5:
                raise NotSent("the budget was spent waiting")
            return deadline - time.monotonic()

        return time_left

    async def scenario() -> bytes:
        pool = FetchPool(
            ClientSettings(), processes=1, slots=1, limiter=RateLimiter(None), keep=keep
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            with trio.CancelScope() as first:
                nursery.start_soon(abandon_when_held, first)
                await pool.get(sid, 2, tokens[2], time_left=lambda: 30.0)
            assert first.cancelled_caught
            nursery.start_soon(release_later)
            with pytest.raises(NotSent):
                await pool.get(sid, 6, tokens[6], short_budget(time.monotonic() + 0.8))
            data, _checksum, _seconds = await pool.get(sid, 4, tokens[4], lambda: 30.0)
            assert isinstance(data, memoryview) == bool(keep)  # in the home it was given back
            nursery.cancel_scope.cancel()
        return bytes(data)

    assert trio.run(scenario) == blocks[4]
    # Blocks 2 (abandoned, answered anyway) and 4; block 6 was never sent.
    assert emu.counters()["requests"]["GetSnapshotBlock"] == 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("end", ["continued", "killed"])
def test_requests_cancelled_before_their_worker_took_them_give_their_slots_back(
    emu: Emulator,
    env: dict[str, str],
    snapshot: tuple[str, dict[int, bytes]],
    tokens: dict[int, str],
    end: str,
) -> None:
    """A stopped worker takes no requests: once the socket's buffer is full (a few hundred
    requests) the daemon's sends wait. Cancelled then, a request that was sent keeps its slot
    until its answer; one that was not sent must give its slot back at once, since no answer
    will ever come for it. If the stopped worker is killed instead, every request fails as
    retryable, sent or not. Either way every slot comes back and the pool serves again."""
    sid, blocks = snapshot
    # More requests than the socket's buffer holds (about 200 of these), each with a slot:
    # the slots are sparse shared memory, only touched when a block arrives.
    slots = 512
    failures: list[EbsError] = []

    async def attempt(pool: FetchPool, index: int) -> None:
        try:
            await pool.get(sid, index, tokens[index], lambda: 30.0)
        except EbsError as error:  # the killed worker's requests; anything else fails the test
            failures.append(error)

    async def storm(pool: FetchPool, worker: int) -> None:
        with trio.move_on_after(2):
            async with trio.open_nursery() as nursery:
                for n in range(slots):
                    nursery.start_soon(attempt, pool, sorted(tokens)[n % len(tokens)])
                await trio.sleep(0.5)
                if end == "killed":
                    os.kill(worker, signal.SIGKILL)

    async def scenario() -> dict[int, bytes]:
        pool = FetchPool(
            ClientSettings(), processes=1, slots=slots, limiter=RateLimiter(None), keep=slots
        )
        got: dict[int, bytes] = {}

        async def fetch(index: int, token: str) -> None:
            got[index] = bytes((await pool.get(sid, index, token, lambda: 30.0))[0])

        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            (worker,) = workers_of(os.getpid())
            os.kill(worker, signal.SIGSTOP)
            try:
                await storm(pool, worker)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGCONT)
            # The requests sent are answered now; their slots come back with the answers.
            with trio.fail_after(45):
                # A leaked slot or home never comes back.
                while pool.stats()["requests_in_flight"] or pool.stats()["homes_held"]:
                    await trio.sleep(0.05)
            assert pool.stats()["restarts"] == (end == "killed")
            with trio.fail_after(30):
                async with trio.open_nursery() as again:
                    for index, token in tokens.items():
                        again.start_soon(fetch, index, token)
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(scenario) == blocks
    if end == "killed":
        assert failures and all(f.retryable and f.code == "WorkerLost" for f in failures)


@pytest.mark.timeout(60)
def test_a_block_keeps_its_home_while_anything_holds_it(
    emu: Emulator,
    env: dict[str, str],
    snapshot: tuple[str, dict[int, bytes]],
    tokens: dict[int, str],
) -> None:
    """A block answered into a home is handed out as a view of it, with no copy; the home is
    not written again while the block, or any view of it, is held, even past the pool's end.
    With its one home held, the next block is copied out of its request slot; once the last
    view goes, the home takes blocks again."""
    sid, blocks = snapshot

    async def scenario() -> None:
        pool = FetchPool(ClientSettings(), processes=1, slots=1, limiter=RateLimiter(None), keep=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            first, _, _ = await pool.get(sid, 2, tokens[2], lambda: 30.0)
            assert isinstance(first, memoryview) and first.readonly and first == blocks[2]
            piece = first[1000:3000]  # a view of the view: holds the home as the block does
            del first
            second, _, _ = await pool.get(sid, 4, tokens[4], lambda: 30.0)
            assert isinstance(second, bytes) and second == blocks[4]
            assert piece == blocks[2][1000:3000]
            del piece
            third, _, _ = await pool.get(sid, 6, tokens[6], lambda: 30.0)
            assert isinstance(third, memoryview) and third == blocks[6]
            fourth, _, _ = await pool.get(sid, 8, tokens[8], lambda: 30.0)
            assert isinstance(fourth, bytes) and fourth == blocks[8]
            assert pool.stats()["blocks_copied"] == 2 and pool.stats()["homes_held"] == 1
            nursery.cancel_scope.cancel()
        assert third == blocks[6]  # the pool is closed; the block it left is still whole

    trio.run(scenario)


@pytest.mark.timeout(60)
def test_a_read_across_blocks_in_homes_side_by_side_is_a_view_of_them(
    emu: Emulator, env: dict[str, str]
) -> None:
    """A block's home is the one its index maps to, when free, so consecutive blocks lie side
    by side whatever order they were fetched in, and a read across them is one view of the
    shared memory, with no copy; anything else (a hole in the range, a block whose home was
    taken) is joined into bytes. Either way the bytes are exact."""
    keep = 20  # homes: the ring wraps every 20 blocks
    last = 2 * keep + 9  # the last block written: a hole follows it
    blocks = {i: os.urandom(BLOCK_SIZE) for i in range(last + 1)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    client = EbsClient(ClientSettings())
    policy = RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.05)
    ctx = FetchContext(client, cache_bytes=16 * BLOCK_SIZE, max_concurrency=4, policy=policy)
    pool = ctx.pool = FetchPool(client.settings, 1, 4, client.rate_limiter, keep=keep)
    image = SnapshotImage(describe_snapshot(client, sid, policy), ctx)
    # Where the snapshot's turn of the ring puts its first home: blocks base to base + 7 lie
    # side by side, with no wrap.
    base = next(i for i in range(keep) if pool.home_for(sid, i) == pool.slots)

    def expected(offset: int, size: int) -> bytes:
        volume = b"".join(blocks.get(i, bytes(BLOCK_SIZE)) for i in range(last + 3))
        return volume[offset : offset + size]

    async def read_in_order(*indexes: int) -> None:
        for index in indexes:  # one after another, in this order
            await image.reader.read_block(base + index)

    async def scenario() -> None:
        async with ctx.running():
            # Block base + 25 takes the home of base + 5 first; 6 is fetched before 5.
            await read_in_order(25, 3, 2, 1, 0, 6, 5)
            at = base * BLOCK_SIZE
            cases = {
                (at, 2 * BLOCK_SIZE): memoryview,  # two whole blocks
                (at + BLOCK_SIZE - 100, 2 * BLOCK_SIZE + 200): memoryview,  # parts of three
                (at + 3 * BLOCK_SIZE + 7, 100): memoryview,  # within one
                (last * BLOCK_SIZE + 5, 2 * BLOCK_SIZE): bytes,  # into the hole after it
                (at + 5 * BLOCK_SIZE, 2 * BLOCK_SIZE): bytes,  # 5's home was taken
            }
            for (offset, size), kind in cases.items():
                got = await image.read_buffer(offset, size)
                assert type(got) is kind and got == expected(offset, size), (offset, size)
                assert await image.read(offset, size) == expected(offset, size)
            assert type(await image.read(at, 2 * BLOCK_SIZE)) is bytes

    try:
        trio.run(scenario)
    finally:
        client.close()
