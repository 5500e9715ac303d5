"""Emulator conformance: the answers of broken networks, proxies and overloaded services.

Each fault is seen through unmodified boto3 (what a peer client gets) or a raw socket (what
boto3 hides), from its flag and from the control endpoint: cut, empty, foreign (HTML) and
malformed listing pages; trickling, stalled, oversized and corrupted block bodies; bare 429s;
an absurd VolumeSize; and `max_faults`, which makes "fail once" exact.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from botocore.exceptions import BotoCoreError, ClientError
from urllib3.exceptions import ProtocolError

from ebsfuse.emulator import Emulator
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import (
    AUTH,
    BLOCK,
    EmulatorProcess,
    checksum,
    content,
    list_all,
    raw,
    read,
)

emulator, client, processes = fx.emulator, fx.client, fx.processes  # fixtures


def request(path: str) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nConnection: close\r\n"
    return (head + "\r\n").encode()


def raw_exchange(endpoint: str, path: str, *, max_bytes: int = 1 << 20) -> tuple[bytes, bytes]:
    """GET `path` on a fresh connection; (head, the body bytes that arrived up to EOF)."""
    host, port = urlsplit(endpoint).netloc.split(":")
    data = b""
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request(path))
        while len(data) < max_bytes and (chunk := conn.recv(1 << 20)):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_listing_faults_are_200_answers_botocore_reads_as_no_blocks(
    emulator: Emulator, client: Any
) -> None:
    """Why ebsfuse checks every page: botocore turns these into 'no blocks, no more'."""
    sid = emulator.create_snapshot(blocks={0: content(1), 5: content(2)})
    for kind in ("empty", "html"):
        emulator.set_faults(list_fault=kind, list_fault_rate=1.0)
        page = client.list_snapshot_blocks(SnapshotId=sid)
        assert page["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert page.get("Blocks", []) == [] and "NextToken" not in page, kind
    # A cut page: urllib3 2 checks Content-Length, so boto3 raises here (urllib3 1.x did not).
    emulator.set_faults(list_fault="cut")
    with pytest.raises((BotoCoreError, ProtocolError)):
        client.list_snapshot_blocks(SnapshotId=sid)
    emulator.set_faults(list_fault="malformed")
    page = client.list_snapshot_blocks(SnapshotId=sid)
    first = page["Blocks"][0]
    assert "BlockToken" not in first and first["BlockIndex"] >= page["VolumeSize"] * 2048
    assert [b["BlockIndex"] for b in page["Blocks"][1:]] == [0, 5]
    emulator.set_faults(list_fault_rate=0.0)
    assert [b["BlockIndex"] for b in client.list_snapshot_blocks(SnapshotId=sid)["Blocks"]] == [
        0,
        5,
    ]
    injected = emulator.counters()["errors_injected"]
    assert [injected[f"list-{k}"] for k in ("empty", "html", "cut", "malformed")] == [1, 1, 1, 1]


def test_listing_faults_on_the_wire(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(blocks={i: content(i) for i in range(3)})
    emulator.set_faults(list_fault="cut", list_fault_rate=1.0)
    head, body = raw_exchange(emulator.endpoint, f"/snapshots/{sid}/blocks")
    announced = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert 0 < len(body) < announced  # the connection ends halfway through the page
    emulator.set_faults(list_fault="html")
    head, body = raw_exchange(emulator.endpoint, f"/snapshots/{sid}/changedblocks")
    assert head.startswith(b"HTTP/1.1 200") and b"text/html" in head and b"<html>" in body
    assert b"x-amzn-ErrorType" not in head


def test_changed_blocks_pages_get_the_same_faults(emulator: Emulator, client: Any) -> None:
    parent = emulator.create_snapshot(blocks={0: content(1)})
    child = emulator.create_snapshot(blocks={3: content(2)}, parent=parent)
    emulator.set_faults(list_fault="malformed", list_fault_rate=1.0)
    page = client.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child)
    assert [b["BlockIndex"] for b in page["ChangedBlocks"]][1:] == [3]
    assert "SecondBlockToken" not in page["ChangedBlocks"][0]


def test_max_faults_makes_fail_once_exact(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    emulator.set_faults(list_fault="empty", list_fault_rate=1.0, max_faults=1)
    assert client.list_snapshot_blocks(SnapshotId=sid).get("Blocks", []) == []
    for _ in range(3):
        assert len(client.list_snapshot_blocks(SnapshotId=sid)["Blocks"]) == 1
    emulator.set_faults(max_faults=1)  # setting it again allows one more
    assert client.list_snapshot_blocks(SnapshotId=sid).get("Blocks", []) == []
    assert len(client.list_snapshot_blocks(SnapshotId=sid)["Blocks"]) == 1


def test_bare_429_has_no_aws_error_type(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    emulator.set_faults(bare_429_rate=1.0)
    resp = raw(emulator.endpoint, "GET", f"/snapshots/{sid}/blocks")
    assert resp.status == 429 and resp.error_type is None
    assert resp.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ClientError) as exc:
        client.list_snapshot_blocks(SnapshotId=sid)
    assert exc.value.response["Error"]["Code"] == "429"
    assert emulator.counters()["errors_injected"]["bare429"] == 2


def test_corrupt_bodies_fail_their_checksum(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    token = list_all(client, sid)[0]
    emulator.set_faults(corrupt_rate=1.0)
    answer = client.get_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockToken=token)
    data = answer["BlockData"].read()
    assert len(data) == BLOCK and data != content(1)
    assert answer["Checksum"] == checksum(content(1)) != checksum(data)
    emulator.set_faults(corrupt_rate=0.0)
    assert read(client, sid, 0, token) == content(1)


def test_oversized_body_announces_64_mib(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    token = list_all(client, sid)[0]
    emulator.set_faults(body_fault="oversize", body_fault_rate=1.0)
    path = f"/snapshots/{sid}/blocks/0?blockToken={quote(token, safe='')}"
    head, body = raw_exchange(emulator.endpoint, path, max_bytes=2 * BLOCK)
    assert b"Content-Length: 67108864" in head
    assert body[:BLOCK] == content(1)  # the block, then filler as long as anyone reads


def test_trickling_and_stalled_bodies(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    token = list_all(client, sid)[0]
    path = f"/snapshots/{sid}/blocks/0?blockToken={quote(token, safe='')}"
    host, port = urlsplit(emulator.endpoint).netloc.split(":")
    for kind, at_least, at_most in (("trickle", 1, 5), ("stall", BLOCK // 2, BLOCK // 2)):
        emulator.set_faults(body_fault=kind, body_fault_rate=1.0)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request(path))
            conn.settimeout(0.5)
            data = b""
            watched_until = time.monotonic() + 3  # a trickle sends a byte a second
            while time.monotonic() < watched_until:
                try:
                    chunk = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                assert chunk, f"{kind}: the server hung up"
                data += chunk
        body = data.partition(b"\r\n\r\n")[2]
        assert at_least <= len(body) <= at_most, kind
        assert body == content(1)[: len(body)]
    # The server side of a stall ends when the client hangs up: the emulator still answers.
    emulator.set_faults(body_fault_rate=0.0)
    assert read(client, sid, 0, token) == content(1)


def test_report_volume_size(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    emulator.set_faults(report_volume_size=2**40)
    assert client.list_snapshot_blocks(SnapshotId=sid)["VolumeSize"] == 2**40
    emulator.set_faults(report_volume_size=0)
    assert client.list_snapshot_blocks(SnapshotId=sid)["VolumeSize"] == 1


def test_new_fault_settings_are_validated(emulator: Emulator) -> None:
    settings: list[dict[str, Any]] = [
        {"list_fault": "garbled"},
        {"body_fault": 3},
        {"list_fault_rate": 2},
        {"corrupt_rate": -1},
        {"bare_429_rate": "often"},
        {"max_faults": -1},
    ]
    for bad in settings:
        with pytest.raises(ValueError):
            emulator.set_faults(**bad)
    assert emulator.faults.list_fault == "cut" and emulator.faults.list_fault_rate == 0


def test_hostile_faults_from_the_command_line_and_control_endpoint(
    processes: list[EmulatorProcess],
) -> None:
    proc = EmulatorProcess(
        "--list-fault", "html:0.5", "--body-fault", "trickle", "--bare-429-rate", "0.1",
        "--corrupt-rate", "0.2", "--report-volume-size", "70000", "--max-faults", "3",
    )  # fmt: skip
    processes.append(proc)
    faults = raw(proc.endpoint, "GET", "/_emulator/faults", auth=False).json()
    assert (faults["list_fault"], faults["list_fault_rate"]) == ("html", 0.5)
    assert (faults["body_fault"], faults["body_fault_rate"]) == ("trickle", 1.0)
    assert faults["bare_429_rate"] == 0.1 and faults["corrupt_rate"] == 0.2
    assert faults["report_volume_size"] == 70000 and faults["max_faults"] == 3
    body = json.dumps({"list_fault": "empty", "list_fault_rate": 1.0, "max_faults": 0}).encode()
    assert raw(proc.endpoint, "POST", "/_emulator/faults", body=body, auth=False).status == 200
    sid = raw(
        proc.endpoint, "POST", "/_emulator/synthetic", body=b'{"spec": "size=1"}', auth=False
    ).json()["SnapshotId"]
    started = time.monotonic()
    while time.monotonic() - started < 5:
        resp = raw(proc.endpoint, "GET", f"/snapshots/{sid}/blocks")
        if resp.status == 200:  # past the sometimes-429
            assert resp.json() == {}
            break
    else:
        raise AssertionError("no listing answer got past the bare 429s")
    bad = raw(proc.endpoint, "POST", "/_emulator/faults", body=b'{"list_fault": "x"}', auth=False)
    assert bad.status == 400
