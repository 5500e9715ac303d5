"""The shared rate limiter (`ebsfuse.ebs.ratelimit`): unit arithmetic on a fake clock, then 32
threads of one process against an emulator that throttles: the rate falls to what the service
allows, the throttling answers stop piling up, and the rate grows back when the limit lifts."""

from __future__ import annotations

import contextlib
import functools
import threading
import time

import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.ebs.client import ClientSettings, EbsClient, RetryPolicy, call_with_retries
from ebsfuse.ebs.errors import EbsError
from ebsfuse.ebs.ratelimit import BETA, COOLDOWN_S, CUBIC_C, RateLimiter
from ebsfuse.emulator import Emulator


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(max_rps: float | None = None) -> tuple[RateLimiter, FakeTime]:
    t = FakeTime()
    return RateLimiter(max_rps, clock=t.clock, sleep=t.sleep), t


def test_no_limit_until_throttled_and_a_cap_paces_requests() -> None:
    free, t = limiter()
    for _ in range(1000):
        assert free.acquire(t.now + 1)
    assert free.rps is None and t.now == 1000.0 and free.waited_s == 0
    capped, t = limiter(max_rps=5)
    start = t.now
    for _ in range(11):
        assert capped.acquire(t.now + 10)
    assert t.now - start == pytest.approx(2.0)  # 1 token at hand, then 10 at 5 per second


def test_a_throttle_cuts_once_per_congestion_event_then_the_rate_grows_back() -> None:
    rl, t = limiter()
    for _ in range(100):  # 100 requests over one second, unlimited
        rl.acquire(t.now + 1)
        t.now += 0.01
    for _ in range(64):  # the 64 in flight all come back throttled
        rl.throttled()
    assert (rl.throttles, rl.cuts) == (64, 1)
    assert rl.rps == pytest.approx(100 * BETA, rel=0.05)
    k = (100 * (1 - BETA) / CUBIC_C) ** (1 / 3)
    t.now += k
    assert rl.rps == pytest.approx(100, rel=0.05)  # back where it was cut, after K seconds
    t.now += COOLDOWN_S
    rl.throttled()  # a new event: cut from the rate now
    assert rl.cuts == 2 and rl.rps is not None and rl.rps < 100
    t.now += 60
    assert rl.rps is None  # probed far past the old rate with no throttle: limit lifted


def test_a_turn_past_the_deadline_is_refused_without_a_token() -> None:
    rl, t = limiter(max_rps=1)
    assert rl.acquire(t.now + 5)  # the token at hand
    assert not rl.acquire(t.now + 0.5)  # the next turn is 1 s away
    assert rl.acquire(t.now + 5) and t.now == pytest.approx(1001.0)


def fetch_for(client: EbsClient, sid: str, tokens: dict[int, str], seconds: float) -> None:
    """32 threads fetching blocks with the client's retries until `seconds` have passed."""
    stop = time.monotonic() + seconds
    policy = RetryPolicy(attempts=3, throttle_attempts=50, base_delay_s=0.05, max_delay_s=0.5)

    def work(seed: int) -> None:
        index = seed
        while time.monotonic() < stop:
            index = (index + 7) % len(tokens)
            with contextlib.suppress(EbsError):  # out of throttle attempts: the next block
                call_with_retries(
                    functools.partial(client.get_block, sid, index, tokens[index]), policy
                )

    threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_thirty_two_threads_share_one_rate_that_follows_the_service(
    emu: Emulator, env: dict[str, str]
) -> None:
    sid = emu.create_snapshot(blocks={i: bytes([i]) * BLOCK_SIZE for i in range(16)})
    client = EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    try:
        tokens = dict(client.list_blocks(sid).blocks)
        emu.set_faults(throttle_rps=40)  # the service's quota for this snapshot
        fetch_for(client, sid, tokens, 3.0)  # learning
        learned = client.rate_limiter.rps
        assert learned is not None and client.rate_limiter.cuts >= 1
        emu.reset_counters()
        fetch_for(client, sid, tokens, 3.0)  # settled: most requests get through
        counters = emu.counters()
        sent = counters["requests"]["GetSnapshotBlock"]
        refused = counters["errors_injected"]["RequestThrottledException"]
        assert refused < 0.4 * sent, (sent, refused, client.rate_limiter.snapshot())
        # The quota lifts (nothing is in flight between phases): no further cut, and the rate
        # only grows, along its cubic curve.
        emu.set_faults(throttle_rps=0)
        cuts, before = client.rate_limiter.cuts, client.rate_limiter.rps
        fetch_for(client, sid, tokens, 3.0)
        after = client.rate_limiter.rps
        assert client.rate_limiter.cuts == cuts
        assert before is not None and (after is None or after > before), (before, after)
    finally:
        client.close()
