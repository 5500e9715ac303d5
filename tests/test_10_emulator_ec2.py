"""The emulator's EC2 DescribeSnapshots through unmodified boto3 (`ec2` client, query protocol).

What a catalogue of a volume's snapshots needs: the snapshots the EBS side serves, their volume,
state, start time and size; filters by volume, status, owner, tag and description; SnapshotIds;
pagination; and EC2's own error codes.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import boto3
import botocore.exceptions
import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.emulator import Emulator

VOLUME = "vol-0123456789abcdef0"


def ec2_client(emu: Emulator) -> Any:
    return boto3.client("ec2", endpoint_url=emu.endpoint, region_name="us-east-1")


def describe_all(ec2: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return [
        snap
        for page in ec2.get_paginator("describe_snapshots").paginate(**kwargs)
        for snap in page["Snapshots"]
    ]


def test_a_volume_s_daily_snapshots_with_their_metadata(emu: Emulator, env: dict[str, str]) -> None:
    chain = emu.create_daily_chain(VOLUME, 5, written_blocks=10, changed_per_day=2)
    other = emu.create_snapshot(blocks={0: os.urandom(BLOCK_SIZE)}, tags={"team": "web"})
    pending = emu.create_snapshot(blocks={}, status="pending", volume_id=VOLUME)
    ec2 = ec2_client(emu)
    snaps = describe_all(ec2, Filters=[{"Name": "volume-id", "Values": [VOLUME]}])
    by_id = {s["SnapshotId"]: s for s in snaps}
    assert set(by_id) == {sid for sid, _ in chain} | {pending}
    first = by_id[chain[0][0]]
    assert first["VolumeId"] == VOLUME and first["State"] == "completed"
    assert first["Progress"] == "100%" and first["VolumeSize"] == 1
    assert first["StartTime"] == datetime(2026, 11, 1, 3, 0, tzinfo=UTC)
    assert by_id[chain[4][0]]["StartTime"] == datetime(2026, 11, 5, 3, 0, tzinfo=UTC)
    assert by_id[pending]["State"] == "pending"
    done = describe_all(
        ec2,
        Filters=[
            {"Name": "volume-id", "Values": [VOLUME]},
            {"Name": "status", "Values": ["completed"]},
        ],
    )
    assert {s["SnapshotId"] for s in done} == {sid for sid, _ in chain}
    # Snapshots made another way carry the placeholder volume, as on AWS.
    tagged = describe_all(ec2, Filters=[{"Name": "tag:team", "Values": ["w*"]}])
    assert [(s["SnapshotId"], s["VolumeId"]) for s in tagged] == [(other, "vol-ffffffff")]
    assert tagged[0]["Tags"] == [{"Key": "team", "Value": "web"}]
    assert describe_all(ec2, Filters=[{"Name": "tag-key", "Values": ["team"]}]) == tagged
    daily = describe_all(ec2, Filters=[{"Name": "description", "Values": ["daily ?"]}])
    assert len(daily) == 5
    mine = describe_all(ec2, OwnerIds=["self"])
    assert len(mine) == 7
    assert describe_all(ec2, OwnerIds=["999999999999"]) == []
    chosen = ec2.describe_snapshots(SnapshotIds=[chain[1][0], other])["Snapshots"]
    assert {s["SnapshotId"] for s in chosen} == {chain[1][0], other}


def test_pagination_visits_every_snapshot_once(emu: Emulator, env: dict[str, str]) -> None:
    ids = {emu.create_snapshot(blocks={}, volume_size_gib=1, volume_id=VOLUME) for _ in range(23)}
    ec2 = ec2_client(emu)
    pages = list(ec2.get_paginator("describe_snapshots").paginate(PaginationConfig={"PageSize": 5}))
    assert [len(p["Snapshots"]) for p in pages] == [5, 5, 5, 5, 3]
    seen = [s["SnapshotId"] for p in pages for s in p["Snapshots"]]
    assert sorted(seen) == sorted(ids)
    assert emu.counters()["requests"]["DescribeSnapshots"] == 5


def test_ec2_errors_come_with_ec2_codes(emu: Emulator, env: dict[str, str]) -> None:
    ec2 = ec2_client(emu)
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(SnapshotIds=["snap-0123456789abcdef0"]), "InvalidSnapshot.NotFound"),
        (dict(SnapshotIds=["snap-xyz"]), "InvalidSnapshotID.Malformed"),
        (dict(Filters=[{"Name": "colour", "Values": ["red"]}]), "InvalidParameterValue"),
        (dict(MaxResults=2), "InvalidParameterValue"),
        (
            dict(SnapshotIds=["snap-0123456789abcdef0"], MaxResults=5),
            "InvalidParameterCombination",
        ),
    ]
    for kwargs, code in cases:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            ec2.describe_snapshots(**kwargs)
        assert caught.value.response["Error"]["Code"] == code, kwargs
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # A filter value that is no volume id matches nothing, as on AWS.
    assert describe_all(ec2, Filters=[{"Name": "volume-id", "Values": ["nonsense"]}]) == []


def test_synthetic_snapshots_can_name_their_volume(emu: Emulator, env: dict[str, str]) -> None:
    sid = emu.create_synthetic(f"size=2,pattern=every:9,seed=4,volume={VOLUME}")
    ec2 = ec2_client(emu)
    (snap,) = describe_all(ec2, Filters=[{"Name": "volume-id", "Values": [VOLUME]}])
    assert snap["SnapshotId"] == sid and snap["VolumeSize"] == 2
