"""Emulator as a process: the command line, signals, and --data-dir surviving `kill -9`."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import emulator_fixtures as fx
from tests.conftest import wait_for
from tests.emulator_fixtures import (
    BLOCK,
    ROOT,
    EmulatorProcess,
    content,
    list_all,
    make_client,
    put,
    raw,
    read,
)

tmp_dir, processes = fx.tmp_dir, fx.processes  # fixtures


def test_stdout_is_exactly_the_endpoint_line(processes: list[EmulatorProcess]) -> None:
    proc = EmulatorProcess("--synthetic", "size=2,pattern=first:3,seed=1")
    processes.append(proc)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proc.endpoint)
    ebs = make_client(proc.endpoint)
    sid = re.search(r"synthetic snapshot (snap-[0-9a-f]+)", _wait_log(proc, "synthetic"))
    assert sid is not None
    assert sorted(list_all(ebs, sid.group(1))) == [0, 1, 2]
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(10) == 0
    assert proc.proc.stdout is not None
    assert proc.proc.stdout.read() == ""  # nothing after the endpoint line


def _wait_log(proc: EmulatorProcess, needle: str) -> str:
    for _ in range(100):
        text = proc.stderr()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not logged: {proc.stderr()!r}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_stop_cleanly(processes: list[EmulatorProcess], sig: int) -> None:
    proc = EmulatorProcess("--log-level", "WARNING")
    processes.append(proc)
    assert raw(proc.endpoint, "GET", "/_emulator/counters", auth=False).status == 200
    assert proc.kill(sig) == 0
    assert "Traceback" not in proc.stderr()


@pytest.mark.parametrize(
    "args",
    [
        ["--fail-rate", "1.5"],
        ["--port", "http"],
        ["--latency-ms", "-3"],
        ["--synthetic", "size=0"],
        ["--token-ttl", "0"],
        ["--log-level", "LOUD"],
        ["--no-such-flag"],
        ["--host", "256.1.1.1", "--port", "0"],
        ["--daily-chain", "vol-0a"],
        ["--catalogue", "many"],
    ],
)
def test_bad_arguments(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ebsfuse.emulator", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_cli_module_api() -> None:
    import argparse

    from ebsfuse.emulator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--empty-pages", "--synthetic", "size=1"])
    assert args.port == 0 and args.empty_pages and args.synthetic == ["size=1"]
    assert args.throttle_rps == 1000 and args.token_ttl == 7 * 86400
    assert args.page_token_ttl == 3600 and args.host == "127.0.0.1"


def test_faults_from_command_line(processes: list[EmulatorProcess]) -> None:
    proc = EmulatorProcess("--empty-pages", "--token-ttl", "5", "--throttle-rps", "7")
    processes.append(proc)
    faults = raw(proc.endpoint, "GET", "/_emulator/faults", auth=False).json()
    assert faults["empty_pages"] is True
    assert faults["token_ttl"] == 5 and faults["throttle_rps"] == 7
    body = json.dumps({"fail_rate": 1.0}).encode()
    assert raw(proc.endpoint, "POST", "/_emulator/faults", body=body, auth=False).status == 200
    resp = raw(proc.endpoint, "POST", "/snapshots", body=b'{"VolumeSize": 1}')
    assert resp.status == 500
    counters = raw(proc.endpoint, "GET", "/_emulator/counters", auth=False).json()
    assert counters["errors_injected"]["InternalServerException"] == 1


def test_a_volumes_history_and_a_large_account_from_the_command_line(
    processes: list[EmulatorProcess],
) -> None:
    import boto3

    proc = EmulatorProcess("--daily-chain", "vol-0123456789abcdef0:4", "--catalogue", "1200:3")
    processes.append(proc)
    ec2 = boto3.client(
        "ec2",
        endpoint_url=proc.endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )

    def snapshots(volume: str) -> list[dict]:
        pages = ec2.get_paginator("describe_snapshots").paginate(
            Filters=[{"Name": "volume-id", "Values": [volume]}]
        )
        return [s for page in pages for s in page["Snapshots"]]

    days = sorted(s["StartTime"] for s in snapshots("vol-0123456789abcdef0"))
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(days)] == [86400.0] * 3
    assert [len(snapshots(f"vol-{n:017x}")) for n in (1, 2, 3)] == [400, 400, 400]


def test_gates_and_completion_delay_from_outside_the_process(
    processes: list[EmulatorProcess],
) -> None:
    """The controls a test of a separate emulator process needs: --complete-after, and gates
    over HTTP."""
    proc = EmulatorProcess("--complete-after", "300")
    processes.append(proc)
    faults = raw(proc.endpoint, "GET", "/_emulator/faults", auth=False).json()
    assert faults["complete_after_s"] == 300
    sid = raw(
        proc.endpoint, "POST", "/_emulator/synthetic", body=b'{"spec": "size=1"}', auth=False
    ).json()["SnapshotId"]
    body = json.dumps({"snapshot_id": sid, "block_index": 3}).encode()
    closed = raw(proc.endpoint, "POST", "/_emulator/gates", body=body, auth=False).json()
    assert closed == {"gates": [{"snapshot_id": sid, "block_index": 3, "arrived": 0}]}
    ebs = make_client(proc.endpoint)
    token = ebs.list_snapshot_blocks(SnapshotId=sid, StartingBlockIndex=3, MaxResults=100)[
        "Blocks"
    ][0]["BlockToken"]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read(ebs, sid, 3, token)))
    reader.start()

    def held() -> bool:
        gates = raw(proc.endpoint, "GET", "/_emulator/gates", auth=False).json()["gates"]
        return gates[0]["arrived"] == 1

    wait_for(held, what="the request to reach the gate")
    assert got == []  # held
    body = json.dumps({"release": True}).encode()
    assert raw(proc.endpoint, "POST", "/_emulator/gates", body=body, auth=False).json() == {
        "gates": []
    }
    reader.join(30)
    assert len(got) == 1 and len(got[0]) == BLOCK


def test_data_dir_survives_kill_9(processes: list[EmulatorProcess], tmp_dir: Path) -> None:
    data = tmp_dir / "data"
    proc = EmulatorProcess("--data-dir", str(data))
    processes.append(proc)
    ebs = make_client(proc.endpoint)
    blocks = {0: content(1), 7: content(2), 2047: os.urandom(524288)}
    parent = ebs.start_snapshot(VolumeSize=1, Description="kept", Tags=[{"Key": "a", "Value": "b"}])
    parent_id = parent["SnapshotId"]
    for index, block in blocks.items():
        put(ebs, parent_id, index, block)
    ebs.complete_snapshot(SnapshotId=parent_id, ChangedBlocksCount=len(blocks))
    child_id = ebs.start_snapshot(VolumeSize=2, ParentSnapshotId=parent_id)["SnapshotId"]
    put(ebs, child_id, 7, content(3))
    ebs.complete_snapshot(SnapshotId=child_id, ChangedBlocksCount=1)
    pending_id = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    put(ebs, pending_id, 1, content(4))
    synthetic = raw(
        proc.endpoint, "POST", "/_emulator/synthetic", body=b'{"spec": "size=4,pattern=first:9"}'
    ).json()["SnapshotId"]
    old_token = list_all(ebs, parent_id)[7]
    assert proc.kill(signal.SIGKILL) == -signal.SIGKILL

    again = EmulatorProcess("--data-dir", str(data))
    processes.append(again)
    ebs = make_client(again.endpoint)
    tokens = list_all(ebs, parent_id)
    assert sorted(tokens) == sorted(blocks)
    for index, block in blocks.items():
        assert read(ebs, parent_id, index, tokens[index]) == block
    assert read(ebs, parent_id, 7, old_token) == content(2)  # the token key persisted too
    tokens = list_all(ebs, child_id)
    assert sorted(tokens) == [0, 7, 2047]
    assert read(ebs, child_id, 7, tokens[7]) == content(3)
    assert read(ebs, child_id, 2047, tokens[2047]) == blocks[2047]
    assert ebs.list_snapshot_blocks(SnapshotId=child_id)["VolumeSize"] == 2
    assert sorted(list_all(ebs, synthetic)) == list(range(9))
    # A pending snapshot is not kept across a restart (documented).
    with pytest.raises(ebs.exceptions.ResourceNotFoundException):
        ebs.complete_snapshot(SnapshotId=pending_id, ChangedBlocksCount=1)
    # Only complete files are in the data directory: no temporary leftovers of finished writes.
    assert not [p for p in data.rglob(".*.tmp")]
