"""Emulator conformance: StartSnapshot, PutSnapshotBlock and CompleteSnapshot through boto3."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from botocore.exceptions import ClientError

from ebsfuse.emulator import Emulator
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import (
    BLOCK,
    checksum,
    content,
    error_of,
    linear,
    list_all,
    put,
    raw,
    read,
    upload,
)

emulator, client = fx.emulator, fx.client  # fixtures


def test_start_snapshot_response(client: Any) -> None:
    resp = client.start_snapshot(VolumeSize=8, Description="d", Tags=[{"Key": "k", "Value": "v"}])
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert re.fullmatch(r"snap-[0-9a-f]{17}", resp["SnapshotId"])
    assert re.fullmatch(r"[0-9]{12}", resp["OwnerId"])
    assert resp["Status"] == "pending"
    assert resp["BlockSize"] == BLOCK
    assert resp["VolumeSize"] == 8
    assert resp["Description"] == "d"
    assert resp["Tags"] == [{"Key": "k", "Value": "v"}]
    assert resp["SseType"] == "sse-ebs"
    assert "KmsKeyArn" not in resp and "ParentSnapshotId" not in resp
    assert resp["StartTime"].year >= 2024


@pytest.mark.parametrize("size", [65537, 10**9])
def test_volume_size_limit(client: Any, size: int) -> None:
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=size)
    assert error_of(exc) == ("ValidationException", "INVALID_VOLUME_SIZE", 400)
    assert client.start_snapshot(VolumeSize=65536)["VolumeSize"] == 65536


def test_encryption_and_kms(client: Any) -> None:
    arn = "arn:aws:kms:us-east-1:123456789012:key/abcd"
    resp = client.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn=arn)
    assert resp["SseType"] == "sse-kms"
    assert resp["KmsKeyArn"] == arn
    default = client.start_snapshot(VolumeSize=1, Encrypted=True)
    assert default["SseType"] == "sse-kms"
    assert default["KmsKeyArn"].startswith("arn:aws:kms:")
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, KmsKeyArn=arn)  # a key without Encrypted
    assert error_of(exc)[0] == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, Encrypted=True, KmsKeyArn="not-an-arn")
    assert error_of(exc)[0] == "ValidationException"
    # A child inherits its parent's encryption; Encrypted may not be given with a parent.
    parent = resp["SnapshotId"]
    client.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=0)
    child = client.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)
    assert child["SseType"] == "sse-kms" and child["KmsKeyArn"] == arn
    assert child["ParentSnapshotId"] == parent
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, ParentSnapshotId=parent, Encrypted=True)
    assert error_of(exc)[0] == "ValidationException"


def test_tags_and_description_limits(client: Any) -> None:
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, Tags=[{"Key": "k" * 128, "Value": "v"}])
    assert error_of(exc) == ("ValidationException", "INVALID_TAG", 400)
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, Tags=[{"Key": f"k{i}", "Value": ""} for i in range(51)])
    assert error_of(exc) == ("ValidationException", "INVALID_TAG", 400)
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, Description="x" * 256)
    assert error_of(exc)[0] == "ValidationException"


def test_client_token_idempotency(client: Any) -> None:
    first = client.start_snapshot(VolumeSize=2, ClientToken="tok-1", Description="a")
    again = client.start_snapshot(VolumeSize=2, ClientToken="tok-1", Description="a")
    assert again["SnapshotId"] == first["SnapshotId"]
    assert again["StartTime"] == first["StartTime"]
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=2, ClientToken="tok-1", Description="b")
    assert error_of(exc) == ("ConflictException", None, 409)
    other = client.start_snapshot(VolumeSize=2, ClientToken="tok-2", Description="a")
    assert other["SnapshotId"] != first["SnapshotId"]
    # Without a ClientToken boto3 generates a fresh one per call: distinct snapshots.
    assert client.start_snapshot(VolumeSize=2)["SnapshotId"] != first["SnapshotId"]


def test_parent_must_exist_and_be_completed(emulator: Emulator, client: Any) -> None:
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-0123456789abcdef0")
    assert error_of(exc) == ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", 404)
    pending = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, ParentSnapshotId=pending)
    assert error_of(exc)[0] == "ValidationException"
    assert "pending" in exc.value.response["Error"]["Message"]
    failed = emulator.create_snapshot(status="error")
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, ParentSnapshotId=failed)
    assert error_of(exc)[0] == "ValidationException"
    big = emulator.create_snapshot(blocks={0: content(1)}, volume_size_gib=4)
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=2, ParentSnapshotId=big)
    assert error_of(exc) == ("ValidationException", "INVALID_VOLUME_SIZE", 400)


def test_lineage_child_overrides_parent(client: Any) -> None:
    parent = upload(client, {0: content(1), 1: content(2), 5: content(3)}, volume_size=1)
    child = upload(client, {1: content(20), 2000: content(21)}, volume_size=2, parent=parent)
    grandchild = upload(client, {0: content(30), 3000: content(31)}, volume_size=2, parent=child)
    tokens = list_all(client, child)
    assert sorted(tokens) == [0, 1, 5, 2000]
    assert read(client, child, 0, tokens[0]) == content(1)  # inherited
    assert read(client, child, 1, tokens[1]) == content(20)  # overridden
    assert read(client, child, 2000, tokens[2000]) == content(21)
    tokens = list_all(client, grandchild)
    assert sorted(tokens) == [0, 1, 5, 2000, 3000]
    expected = {0: 30, 1: 20, 5: 3, 2000: 21, 3000: 31}
    for index, tag in expected.items():
        assert read(client, grandchild, index, tokens[index]) == content(tag)
    # The parent is untouched by its children.
    tokens = list_all(client, parent)
    assert sorted(tokens) == [0, 1, 5]
    assert read(client, parent, 1, tokens[1]) == content(2)
    assert client.list_snapshot_blocks(SnapshotId=child)["VolumeSize"] == 2


def test_put_response_and_rewrite(client: Any) -> None:
    sid = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    resp = put(client, sid, 7, content(1))
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert resp["Checksum"] == checksum(content(1))
    assert resp["ChecksumAlgorithm"] == "SHA256"
    put(client, sid, 7, content(2))  # a rewrite while pending replaces the block
    client.put_snapshot_block(
        SnapshotId=sid,
        BlockIndex=8,
        BlockData=content(3),
        DataLength=BLOCK,
        Checksum=checksum(content(3)),
        ChecksumAlgorithm="SHA256",
        Progress=50,
    )
    client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)
    tokens = list_all(client, sid)
    assert read(client, sid, 7, tokens[7]) == content(2)
    assert read(client, sid, 8, tokens[8]) == content(3)


def test_put_validation(emulator: Emulator, client: Any) -> None:
    sid = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        put(client, sid, 2048, content(1))  # 1 GiB holds indexes 0..2047
    assert error_of(exc) == ("ValidationException", "INVALID_BLOCK", 400)
    with pytest.raises(ClientError) as exc:
        put(client, sid, 0, b"x" * 1000)  # DataLength 1000: only 524288 is allowed
    assert error_of(exc)[0] == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.put_snapshot_block(
            SnapshotId=sid,
            BlockIndex=0,
            BlockData=content(1)[:-1],
            DataLength=BLOCK,
            Checksum=checksum(content(1)[:-1]),
            ChecksumAlgorithm="SHA256",
        )
    assert error_of(exc)[0] == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.put_snapshot_block(
            SnapshotId=sid,
            BlockIndex=0,
            BlockData=content(1),
            DataLength=BLOCK,
            Checksum=checksum(content(2)),
            ChecksumAlgorithm="SHA256",
        )
    code, reason, status = error_of(exc)
    assert (code, reason, status) == ("ValidationException", "INVALID_PARAMETER_VALUE", 400)
    assert "checksum" in exc.value.response["Error"]["Message"].lower()
    # Nothing was stored by the refused writes.
    client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
    assert list_all(client, sid) == {}
    assert emulator.counters()["bytes_received"] == 0


def test_put_headers_checked_raw(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(status="pending")
    good = {
        "x-amz-Data-Length": str(BLOCK),
        "x-amz-Checksum": checksum(content(1)),
        "x-amz-Checksum-Algorithm": "SHA256",
    }
    for drop in good:
        headers = {k: v for k, v in good.items() if k != drop}
        resp = raw(emulator.endpoint, "PUT", f"/snapshots/{sid}/blocks/0", body=content(1),
                   headers=headers)  # fmt: skip
        assert resp.status == 400 and resp.error_type == "ValidationException", drop
    for name, value in [("x-amz-Checksum-Algorithm", "MD5"), ("x-amz-Progress", "101")]:
        resp = raw(emulator.endpoint, "PUT", f"/snapshots/{sid}/blocks/0", body=content(1),
                   headers={**good, name: value})  # fmt: skip
        assert resp.status == 400, name
    resp = raw(emulator.endpoint, "PUT", f"/snapshots/{sid}/blocks/0", body=content(1),
               headers=good)  # fmt: skip
    assert resp.status == 201


def test_complete_checks_changed_blocks_count(client: Any) -> None:
    parent = upload(client, {0: content(1), 1: content(2)})
    sid = client.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)["SnapshotId"]
    put(client, sid, 3, content(3))
    put(client, sid, 3, content(4))  # the same block twice counts once
    put(client, sid, 4, content(5))
    for wrong in (0, 1, 3, 4):  # 4 would count the parent's blocks too
        with pytest.raises(ClientError) as exc:
            client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=wrong)
        assert error_of(exc)[0] == "ValidationException"
    resp = client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)
    assert resp["Status"] == "completed"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 202


def test_complete_linear_checksum(client: Any) -> None:
    blocks = {9: content(9), 2: content(2), 5: content(5)}
    sid = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index, data in blocks.items():
        put(client, sid, index, data)
    wrong = linear({9: content(9), 2: content(2), 5: content(6)})
    with pytest.raises(ClientError) as exc:
        client.complete_snapshot(
            SnapshotId=sid,
            ChangedBlocksCount=3,
            Checksum=wrong,
            ChecksumAlgorithm="SHA256",
            ChecksumAggregationMethod="LINEAR",
        )
    assert error_of(exc)[0] == "ValidationException"
    resp = client.complete_snapshot(
        SnapshotId=sid,
        ChangedBlocksCount=3,
        Checksum=linear(blocks),
        ChecksumAlgorithm="SHA256",
        ChecksumAggregationMethod="LINEAR",
    )
    assert resp["Status"] == "completed"


def test_completed_snapshot_refuses_writes(client: Any) -> None:
    sid = upload(client, {0: content(1)})
    with pytest.raises(ClientError) as exc:
        put(client, sid, 1, content(2))
    assert error_of(exc)[0] == "ValidationException"
    assert "completed" in exc.value.response["Error"]["Message"]
    # Completing again (a retried request) is harmless and changes nothing.
    assert client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)["Status"] == "completed"
    assert sorted(list_all(client, sid)) == [0]


def test_unknown_snapshot_everywhere(client: Any) -> None:
    missing = "snap-0123456789abcdef0"
    calls = [
        lambda: client.list_snapshot_blocks(SnapshotId=missing),
        lambda: client.list_changed_blocks(SecondSnapshotId=missing),
        lambda: client.get_snapshot_block(SnapshotId=missing, BlockIndex=0, BlockToken="AAAA"),
        lambda: put(client, missing, 0, content(1)),
        lambda: client.complete_snapshot(SnapshotId=missing, ChangedBlocksCount=0),
    ]
    for call in calls:
        with pytest.raises(ClientError) as exc:
            call()
        assert error_of(exc) == ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", 404)


def test_timeout_turns_pending_into_error(emulator: Emulator, client: Any) -> None:
    sid = client.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"]
    put(client, sid, 0, content(1))
    emulator.advance_clock(9 * 60)
    put(client, sid, 1, content(2))  # activity restarts the countdown
    emulator.advance_clock(9 * 60)
    put(client, sid, 2, content(3))
    emulator.advance_clock(10 * 60 + 1)
    with pytest.raises(ClientError) as exc:
        put(client, sid, 3, content(4))
    assert "error" in exc.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as exc:
        client.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3)
    assert error_of(exc)[0] == "ValidationException"
    with pytest.raises(ClientError) as exc:
        client.list_snapshot_blocks(SnapshotId=sid)
    assert "error" in exc.value.response["Error"]["Message"]
    # The default timeout is 60 minutes.
    other = client.start_snapshot(VolumeSize=1)["SnapshotId"]
    emulator.advance_clock(59 * 60)
    assert put(client, other, 0, content(1))
    emulator.advance_clock(61 * 60)
    with pytest.raises(ClientError):
        put(client, other, 1, content(1))


def test_timeout_parameter_range(emulator: Emulator, client: Any) -> None:
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1, Timeout=4321)
    assert error_of(exc)[0] == "ValidationException"
    body = json.dumps({"VolumeSize": 1, "Timeout": 9}).encode()
    assert raw(emulator.endpoint, "POST", "/snapshots", body=body).status == 400
    assert client.start_snapshot(VolumeSize=1, Timeout=4320)["Status"] == "pending"


def test_pending_snapshot_quota(emulator: Emulator, client: Any) -> None:
    started = [client.start_snapshot(VolumeSize=1, Timeout=10)["SnapshotId"] for _ in range(100)]
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=1)
    assert error_of(exc) == ("ConcurrentLimitExceededException", None, 400)
    client.complete_snapshot(SnapshotId=started[0], ChangedBlocksCount=0)
    client.start_snapshot(VolumeSize=1)  # completing one frees a slot
    emulator.advance_clock(11 * 60)  # and timed-out ones free theirs
    for _ in range(5):
        client.start_snapshot(VolumeSize=1)
