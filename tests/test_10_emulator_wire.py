"""Emulator conformance, wire level: authentication, error format, framing, control plane."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError

from ebsfuse.emulator import Emulator
from tests import emulator_fixtures as fx
from tests.emulator_fixtures import BLOCK, checksum, content, error_of, list_all, raw, read

emulator, client = fx.emulator, fx.client  # fixtures


def test_reason_and_message_reach_boto3(emulator: Emulator, client: Any) -> None:
    with pytest.raises(ClientError) as exc:
        client.list_snapshot_blocks(SnapshotId="snap-0123456789abcdef0")
    resp = exc.value.response
    assert resp["Error"]["Code"] == "ResourceNotFoundException"
    assert "snap-0123456789abcdef0" in resp["Error"]["Message"]
    # botocore parses the modeled error shape into the top level of the response.
    assert resp["Reason"] == "SNAPSHOT_NOT_FOUND"
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert isinstance(exc.value, client.exceptions.ResourceNotFoundException)


@pytest.mark.parametrize("authorization", [None, "", "Basic eDp4", "AWS4-HMAC-SHA1 x"])
def test_unsigned_requests_are_denied(emulator: Emulator, authorization: str | None) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = raw(emulator.endpoint, "GET", f"/snapshots/{sid}/blocks", headers=headers, auth=False)
    assert resp.status == 403
    assert resp.error_type == "AccessDeniedException"
    assert resp.json()["Reason"] == "UNAUTHORIZED_ACCOUNT"
    assert resp.json()["message"]


def test_error_wire_format(emulator: Emulator) -> None:
    resp = raw(emulator.endpoint, "GET", "/snapshots/snap-00000000000000001/blocks")
    assert resp.status == 404
    assert resp.error_type == "ResourceNotFoundException"
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json() == {
        "message": "The snapshot 'snap-00000000000000001' does not exist.",
        "Reason": "SNAPSHOT_NOT_FOUND",
    }
    assert resp.headers["x-amzn-RequestId"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/nothing"), ("DELETE", "/snapshots"), ("GET", "/snapshots")],
)
def test_unknown_paths_are_json_404(emulator: Emulator, method: str, path: str) -> None:
    resp = raw(emulator.endpoint, method, path)
    assert resp.status == 404
    assert resp.error_type == "UnknownOperationException"
    assert "message" in resp.json()


BAD_IDS = ["snap-XYZ", "vol-0123456789abcdef0", "snap-", "snap-" + "a" * 60, "snap-0123%20"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_snapshot_ids(emulator: Emulator, bad: str) -> None:
    good = emulator.create_snapshot(blocks={0: content(1)})
    token = "AAAA"
    requests = [
        ("GET", f"/snapshots/{bad}/blocks", None),
        ("GET", f"/snapshots/{bad}/blocks/0?blockToken={token}", None),
        ("PUT", f"/snapshots/{bad}/blocks/0", content(2)),
        ("POST", f"/snapshots/completion/{bad}", None),
        ("GET", f"/snapshots/{bad}/changedblocks", None),
        ("GET", f"/snapshots/{good}/changedblocks?firstSnapshotId={bad}", None),
    ]
    for method, path, body in requests:
        headers = {"x-amz-ChangedBlocksCount": "0"} if "completion" in path else {}
        resp = raw(emulator.endpoint, method, path, body=body, headers=headers)
        assert resp.status == 400, (method, path, resp.body)
        assert resp.error_type == "ValidationException"
        assert resp.json()["Reason"] == "INVALID_SNAPSHOT_ID"


def test_malformed_start_snapshot_bodies(emulator: Emulator) -> None:
    for body in [b"{", b"[]", b"\xff\xfe", b'{"VolumeSize": "8"}', b'{"VolumeSize": true}']:
        resp = raw(emulator.endpoint, "POST", "/snapshots", body=body)
        assert resp.status == 400, body
        assert resp.error_type == "ValidationException"
    resp = raw(emulator.endpoint, "POST", "/snapshots", body=b"{}")
    assert resp.status == 400
    assert resp.json()["Reason"] == "INVALID_VOLUME_SIZE"
    for size in (0, -1, 65537):
        resp = raw(
            emulator.endpoint, "POST", "/snapshots", body=json.dumps({"VolumeSize": size}).encode()
        )
        assert resp.json()["Reason"] == "INVALID_VOLUME_SIZE"


@pytest.mark.parametrize(
    "query",
    [
        "maxResults=99",
        "maxResults=10001",
        "maxResults=abc",
        "maxResults=",
        "maxResults=-100",
        "startingBlockIndex=-1",
        "startingBlockIndex=x",
        "startingBlockIndex=1e3",
    ],
)
def test_bad_list_parameters(emulator: Emulator, query: str) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    for path in (f"/snapshots/{sid}/blocks?{query}", f"/snapshots/{sid}/changedblocks?{query}"):
        resp = raw(emulator.endpoint, "GET", path)
        assert resp.status == 400, path
        assert resp.json()["Reason"] == "INVALID_PARAMETER_VALUE"


@pytest.mark.parametrize("index", ["x", "-1", "2048", "1.5", "99999999999999999999999"])
def test_bad_block_index(emulator: Emulator, index: str) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)}, volume_size_gib=1)
    resp = raw(emulator.endpoint, "GET", f"/snapshots/{sid}/blocks/{index}?blockToken=AAAA")
    assert resp.status == 400
    assert resp.json()["Reason"] == "INVALID_BLOCK"


def test_garbage_never_gives_500(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    pending = emulator.create_snapshot(status="pending")
    cases = [
        ("GET", f"/snapshots/{sid}/blocks/0"),
        ("GET", f"/snapshots/{sid}/blocks/0?blockToken="),
        ("GET", f"/snapshots/{sid}/blocks/0?blockToken=%FF%FE"),
        ("GET", f"/snapshots/{sid}/blocks/0?blockToken=" + "A" * 400),
        ("GET", f"/snapshots/{sid}/blocks?pageToken=!!!"),
        ("GET", f"/snapshots/{sid}/blocks?pageToken=" + "QUFB" * 12),
        ("PUT", f"/snapshots/{pending}/blocks/0"),
        ("POST", f"/snapshots/completion/{pending}"),
        ("POST", "/snapshots/completion/" + pending + "?x=%zz"),
        ("GET", "/snapshots/%00/blocks"),
    ]
    for method, path in cases:
        resp = raw(emulator.endpoint, method, path)
        assert 400 <= resp.status < 500, (method, path, resp.status)
        assert resp.error_type
    assert "InternalServerException" not in emulator.counters()["errors"]


def address(endpoint: str) -> tuple[str, int]:
    host, port = urlsplit(endpoint).netloc.split(":")
    return host, int(port)


def test_keep_alive_and_content_length(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1), 3: content(2)})
    conn = socket.create_connection(address(emulator.endpoint))
    try:
        f = conn.makefile("rb")
        tokens = {}
        for _ in range(3):  # three requests on one connection
            conn.sendall(
                f"GET /snapshots/{sid}/blocks HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: AWS4-HMAC-SHA256 x\r\n\r\n".encode()
            )
            status, headers = _read_head(f)
            assert status == 200
            body = f.read(int(headers["content-length"]))
            tokens = {b["BlockIndex"]: b["BlockToken"] for b in json.loads(body)["Blocks"]}
        from urllib.parse import quote

        conn.sendall(
            f"GET /snapshots/{sid}/blocks/3?blockToken={quote(tokens[3], safe='')} HTTP/1.1\r\n"
            "Host: x\r\nAuthorization: AWS4-HMAC-SHA256 x\r\n\r\n".encode()
        )
        status, headers = _read_head(f)
        assert status == 200
        assert int(headers["content-length"]) == BLOCK
        assert f.read(BLOCK) == content(2)
    finally:
        conn.close()


def _read_head(f: Any) -> tuple[int, dict[str, str]]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def test_expect_100_continue_on_put(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(status="pending")
    data = content(9)
    conn = socket.create_connection(address(emulator.endpoint))
    try:
        f = conn.makefile("rb")
        conn.sendall(
            (
                f"PUT /snapshots/{sid}/blocks/4 HTTP/1.1\r\nHost: x\r\n"
                "Authorization: AWS4-HMAC-SHA256 x\r\nExpect: 100-continue\r\n"
                f"Content-Length: {BLOCK}\r\nx-amz-Data-Length: {BLOCK}\r\n"
                f"x-amz-Checksum: {checksum(data)}\r\nx-amz-Checksum-Algorithm: SHA256\r\n\r\n"
            ).encode()
        )
        status, _ = _read_head(f)
        assert status == 100
        conn.sendall(data)
        status, headers = _read_head(f)
        assert status == 201
        assert headers["x-amz-checksum"] == checksum(data)
        f.read(int(headers["content-length"]))
    finally:
        conn.close()


def test_chunked_put_body(emulator: Emulator) -> None:
    sid = emulator.create_snapshot(status="pending")
    data = content(5)
    half = BLOCK // 2
    body = (
        b"".join(
            [f"{half:x}\r\n".encode(), data[:half], b"\r\n", f"{half:x}\r\n".encode(), data[half:]]
        )
        + b"\r\n0\r\n\r\n"
    )
    resp = raw(
        emulator.endpoint,
        "PUT",
        f"/snapshots/{sid}/blocks/1",
        body=body,
        headers={
            "Transfer-Encoding": "chunked",
            "x-amz-Data-Length": str(BLOCK),
            "x-amz-Checksum": checksum(data),
            "x-amz-Checksum-Algorithm": "SHA256",
        },
    )
    assert resp.status == 201, resp.body


def test_timestamps_parse_as_datetimes(emulator: Emulator, client: Any) -> None:
    started = client.start_snapshot(VolumeSize=1)
    assert started["StartTime"].year >= 2024
    sid = emulator.create_snapshot(blocks={0: content(1)})
    page = client.list_snapshot_blocks(SnapshotId=sid)
    lifetime = page["ExpiryTime"] - started["StartTime"]
    assert 6.9 * 86400 < lifetime.total_seconds() < 7.1 * 86400


def test_control_plane_needs_no_authorization(emulator: Emulator, client: Any) -> None:
    sid = emulator.create_snapshot(blocks={0: content(1)})
    read(client, sid, 0, list_all(client, sid)[0])
    counters = raw(emulator.endpoint, "GET", "/_emulator/counters", auth=False).json()
    assert counters["requests"] == {"ListSnapshotBlocks": 1, "GetSnapshotBlock": 1}
    assert counters["bytes_served"] == BLOCK
    resp = raw(
        emulator.endpoint,
        "POST",
        "/_emulator/faults",
        body=json.dumps({"latency_ms": 1, "empty_pages": True}).encode(),
        auth=False,
    )
    assert resp.status == 200
    assert emulator.faults.latency_ms == 1
    assert emulator.faults.empty_pages is True
    assert raw(emulator.endpoint, "GET", "/_emulator/faults", auth=False).json()["latency_ms"] == 1
    assert raw(emulator.endpoint, "POST", "/_emulator/reset", auth=False).status == 200
    assert emulator.counters()["requests"] == {}
    for bad in [{"fail_rate": 2}, {"nonsense": 1}, {"empty_pages": "yes"}, {"token_ttl": 0}]:
        resp = raw(emulator.endpoint, "POST", "/_emulator/faults", body=json.dumps(bad).encode())
        assert resp.status == 400, bad
    assert raw(emulator.endpoint, "POST", "/_emulator/faults", body=b"[").status == 400
    assert raw(emulator.endpoint, "GET", "/_emulator/nothing").status == 404


def test_control_plane_clock_and_synthetic(emulator: Emulator, client: Any) -> None:
    spec = b'{"spec": "size=1,pattern=first:3"}'
    resp = raw(emulator.endpoint, "POST", "/_emulator/synthetic", body=spec)
    sid = resp.json()["SnapshotId"]
    assert sorted(list_all(client, sid)) == [0, 1, 2]
    before = emulator.clock.now()
    resp = raw(emulator.endpoint, "POST", "/_emulator/clock", body=b'{"advance": 100}')
    assert resp.json()["now"] >= before + 100
    bad = raw(emulator.endpoint, "POST", "/_emulator/synthetic", body=b'{"spec": "size=0"}')
    assert bad.status == 400


def test_error_code_status_table(emulator: Emulator, client: Any) -> None:
    # ConflictException 409 and ValidationException 400 as boto3 reports them.
    client.start_snapshot(VolumeSize=1, ClientToken="t1")
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=2, ClientToken="t1")
    assert error_of(exc) == ("ConflictException", None, 409)
    with pytest.raises(ClientError) as exc:
        client.start_snapshot(VolumeSize=70000)
    assert error_of(exc) == ("ValidationException", "INVALID_VOLUME_SIZE", 400)


def test_stop_closes_connections_and_threads() -> None:
    emu = Emulator(port=0).start()
    endpoint = emu.endpoint
    try:
        ebs = fx.make_client(endpoint)
        sid = emu.create_snapshot(blocks={0: content(1)})
        list_all(ebs, sid)  # leaves a keep-alive connection open
        assert any(t.name.startswith("ebs-emulator-conn") for t in threading.enumerate())
    finally:
        emu.stop()
        emu.stop()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith("ebs-emulator")]
    host, port = urlsplit(endpoint).netloc.split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_head_request_has_no_body(emulator: Emulator) -> None:
    conn = http.client.HTTPConnection(urlsplit(emulator.endpoint).netloc, timeout=5)
    try:
        conn.request("HEAD", "/snapshots")
        resp = conn.getresponse()
        assert resp.status == 404 and resp.read() == b""
        conn.request("GET", "/_emulator/counters")  # the connection is still in step
        assert conn.getresponse().status == 200
    finally:
        conn.close()
