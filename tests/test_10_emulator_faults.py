"""Emulator conformance: injected latency, throttling, failures, truncation, empty pages,
runtime changes to all of them, and the counters that report them."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError
from urllib3.exceptions import ProtocolError

from ebsfuse.emulator import Emulator
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import (
    AUTH,
    BLOCK,
    content,
    error_of,
    list_all,
    make_client,
    put,
    raw,
    read,
)

emulator, client = fx.emulator, fx.client  # fixtures


def test_latency_and_jitter(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    emulator.set_faults(latency_ms=150)
    client.list_snapshot_blocks(SnapshotId=sid)
    assert emulator.counters()["held_ms"] == 150  # the answer was held back, and only so long
    emulator.set_faults(latency_ms=0, jitter_ms=100)
    assert emulator.faults.delay(emulator.rng) <= 0.1
    emulator.set_faults(jitter_ms=0)
    assert emulator.faults.delay(emulator.rng) == 0


def test_throttle_per_snapshot(emulator: Emulator, client: Any) -> None:
    emulator.set_faults(throttle_rps=5)
    a = emulator.create_snapshot(blocks={0: content(1)})
    b = emulator.create_snapshot(blocks={0: content(2)})
    ta, tb = list_all(client, a)[0], list_all(client, b)[0]
    outcomes = []
    for _ in range(15):  # far more than 5 per second, back to back
        try:
            read(client, a, 0, ta)
            outcomes.append("ok")
        except ClientError as e:
            assert e.response["Error"]["Code"] == "RequestThrottledException"
            assert e.response["Reason"] == "RESOURCE_LEVEL_THROTTLE"
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400
            outcomes.append("throttled")
    assert outcomes[:5] == ["ok"] * 5  # the burst equals the rate
    assert "throttled" in outcomes
    assert read(client, b, 0, tb) == content(2)  # another snapshot has its own bucket
    counters = emulator.counters()
    assert counters["errors_injected"]["RequestThrottledException"] == outcomes.count("throttled")
    assert counters["errors"]["RequestThrottledException"] == outcomes.count("throttled")
    # Listings are not throttled by the block quota.
    for _ in range(10):
        client.list_snapshot_blocks(SnapshotId=a)


def test_throttle_applies_to_put_and_can_be_disabled(emulator: Emulator, client: Any) -> None:
    emulator.set_faults(throttle_rps=2)
    sid = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        for i in range(10):
            put(client, sid, i, content(i))
    assert error_of(exc) == ("RequestThrottledException", "RESOURCE_LEVEL_THROTTLE", 400)
    emulator.set_faults(throttle_rps=0)  # 0 = unlimited
    for i in range(20):
        put(client, sid, i, content(i))


def test_boto3_retries_throttling(emulator: Emulator) -> None:
    emulator.set_faults(throttle_rps=20)
    sid = emulator.create_snapshot(blocks={0: content(1)})
    retrying = make_client(emulator.endpoint, retries={"max_attempts": 10, "mode": "standard"})
    token = list_all(retrying, sid)[0]
    for _ in range(40):
        assert read(retrying, sid, 0, token) == content(1)
    assert emulator.counters()["errors_injected"]["RequestThrottledException"] > 0


def test_fail_rate(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    emulator.set_faults(fail_rate=1.0)
    for call in (
        lambda: client.list_snapshot_blocks(SnapshotId=sid),
        lambda: client.start_snapshot(VolumeSize=1),
    ):
        with pytest.raises(ClientError) as exc:
            call()
        assert error_of(exc) == ("InternalServerException", None, 500)
    assert raw(emulator.endpoint, "GET", "/_emulator/counters", auth=False).status == 200
    emulator.set_faults(fail_rate=0.5)
    emulator.seed_faults(1)
    failures = 0
    for _ in range(100):
        try:
            client.list_snapshot_blocks(SnapshotId=sid)
        except ClientError as e:
            assert e.response["Error"]["Code"] == "InternalServerException"
            failures += 1
    assert 25 < failures < 75
    counters = emulator.counters()
    assert counters["errors_injected"]["InternalServerException"] == failures + 2
    assert counters["errors"]["InternalServerException"] == failures + 2
    assert counters["requests"]["ListSnapshotBlocks"] == 101


def test_truncated_bodies(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    token = list_all(client, sid)[0]
    emulator.set_faults(truncate_rate=1.0)
    # Raw: the full Content-Length is announced, about half the body follows, then EOF.
    host, port = urlsplit(emulator.endpoint).netloc.split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            f"GET /snapshots/{sid}/blocks/0?blockToken={quote(token, safe='')} HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: {AUTH}\r\n\r\n".encode()
        )
        data = b""
        while chunk := conn.recv(1 << 20):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert f"Content-Length: {BLOCK}".encode() in head
    assert 0 < len(body) < BLOCK
    assert body == content(1)[: len(body)]
    # boto3: reading the body fails; the caller sees a short read, never wrong data.
    with pytest.raises((ResponseStreamingError, ProtocolError)):
        client.get_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockToken=token)[
            "BlockData"
        ].read()
    assert emulator.counters()["errors_injected"]["truncated"] == 2
    emulator.set_faults(truncate_rate=0.0)
    assert read(client, sid, 0, token) == content(1)


def test_empty_pages(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_synthetic("size=1,pattern=every:4")  # 512 blocks
    emulator.set_faults(empty_pages=True)
    sizes = []
    args: dict[str, Any] = {"SnapshotId": sid, "MaxResults": 200}
    indexes: list[int] = []
    while True:
        page = client.list_snapshot_blocks(**args)
        sizes.append(len(page["Blocks"]))
        indexes += [b["BlockIndex"] for b in page["Blocks"]]
        if "NextToken" not in page:
            break
        args["NextToken"] = page["NextToken"]
    assert sizes == [0, 200, 0, 200, 0, 112]
    assert indexes == list(range(0, 2048, 4))
    changed = []
    args = {"SecondSnapshotId": sid, "MaxResults": 300}
    while True:
        page = client.list_changed_blocks(**args)
        changed.append(len(page["ChangedBlocks"]))
        if "NextToken" not in page:
            break
        args["NextToken"] = page["NextToken"]
    assert changed == [0, 300, 0, 212]
    emulator.set_faults(empty_pages=False)
    assert len(client.list_snapshot_blocks(SnapshotId=sid)["Blocks"]) == 512


def test_set_faults_validation(emulator: Emulator) -> None:
    settings: list[dict[str, Any]] = [
        {"fail_rate": 1.5},
        {"truncate_rate": -0.1},
        {"latency_ms": -1},
        {"token_ttl": 0.5},
        {"empty_pages": 1},
        {"throttle_rps": "fast"},
        {"no_such_knob": 1},
    ]
    for bad in settings:
        with pytest.raises(ValueError):
            emulator.set_faults(**bad)
    assert emulator.faults.fail_rate == 0.0
    with pytest.raises(ValueError):
        Emulator(fail_rate=2.0)


def test_counters_shape_and_reset(emulator: Emulator, client: Any) -> None:
    sid = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    put(client, sid, 0, content(1))
    put(client, sid, 1, content(2))
    client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)
    tokens = list_all(client, sid)
    read(client, sid, 0, tokens[0])
    with pytest.raises(ClientError):
        client.list_snapshot_blocks(SnapshotId="snap-00000000000000000")
    assert emulator.counters() == {
        "requests": {
            "StartSnapshot": 1,
            "PutSnapshotBlock": 2,
            "CompleteSnapshot": 1,
            "ListSnapshotBlocks": 2,
            "GetSnapshotBlock": 1,
        },
        "errors_injected": {
            "InternalServerException": 0,
            "RequestThrottledException": 0,
            "truncated": 0,
        },
        "errors": {"ResourceNotFoundException": 1},
        "bytes_served": BLOCK,
        "bytes_received": 2 * BLOCK,
        "held_ms": 0,
    }
    emulator.reset_counters()
    assert emulator.counters()["requests"] == {}
    assert emulator.counters()["bytes_served"] == 0


def test_faults_from_constructor() -> None:
    with Emulator(fail_rate=1.0, latency_ms=5, empty_pages=True, token_ttl=10) as emu:
        assert emu.faults.as_dict()["token_ttl"] == 10
        with pytest.raises(ClientError) as exc:
            make_client(emu.endpoint).start_snapshot(VolumeSize=1)
        assert error_of(exc)[0] == "InternalServerException"
