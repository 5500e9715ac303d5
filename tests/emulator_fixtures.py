"""Fixtures and helpers for the emulator conformance tests (tests/test_10_emulator_*.py).

A test module binds the fixtures it uses as module attributes (`emulator = fx.emulator`),
which pytest collects and which shadow no import. Every fixture tears down in `finally`:
emulators stopped, subprocesses killed, temporary directories removed.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError

from ebsfuse.emulator import Emulator

BLOCK = 524288
ROOT = Path(__file__).resolve().parent.parent
# The emulator checks only the scheme of the Authorization header, never the signature.
AUTH = "AWS4-HMAC-SHA256 Credential=x/20240101/us-east-1/ebs/aws4_request, Signature=00"


def make_client(endpoint: str, **config: Any) -> Any:
    """An unmodified boto3 `ebs` client; no retries, so each call is one request."""
    settings: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    settings.update(config)
    return boto3.client(
        "ebs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=botocore.config.Config(**settings),
    )


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A started in-process emulator with default settings."""
    emu = Emulator(port=0)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def client(emulator: Emulator) -> Any:
    """boto3's ebs client pointed at `emulator`."""
    return make_client(emulator.endpoint)


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A temporary directory removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ebsfuse-emu-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Block contents -------------------------------------------------------------------------------


def content(tag: int) -> bytes:
    """A distinct, cheap 512 KiB block for `tag`."""
    return tag.to_bytes(8, "big") * (BLOCK // 8)


def checksum(data: bytes) -> str:
    """Base64 SHA-256, as the API sends it."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def linear(blocks: dict[int, bytes]) -> str:
    """LINEAR aggregated checksum of blocks written to one snapshot."""
    h = hashlib.sha256()
    for index in sorted(blocks):
        h.update(hashlib.sha256(blocks[index]).digest())
    return base64.b64encode(h.digest()).decode()


def put(ebs: Any, snapshot_id: str, index: int, data: bytes) -> dict[str, Any]:
    """PutSnapshotBlock with a correct checksum."""
    return ebs.put_snapshot_block(
        SnapshotId=snapshot_id,
        BlockIndex=index,
        BlockData=data,
        DataLength=len(data),
        Checksum=checksum(data),
        ChecksumAlgorithm="SHA256",
    )


def upload(
    ebs: Any, blocks: dict[int, bytes], volume_size: int = 1, parent: str | None = None
) -> str:
    """Start, put every block, complete; returns the snapshot id."""
    kwargs: dict[str, Any] = {"VolumeSize": volume_size}
    if parent:
        kwargs["ParentSnapshotId"] = parent
    sid = ebs.start_snapshot(**kwargs)["SnapshotId"]
    for index, data in blocks.items():
        put(ebs, sid, index, data)
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=len(blocks))
    return sid


def list_all(ebs: Any, snapshot_id: str, **kwargs: Any) -> dict[int, str]:
    """Every block index -> token of a snapshot, following NextToken."""
    out: dict[int, str] = {}
    args: dict[str, Any] = {"SnapshotId": snapshot_id, **kwargs}
    while True:
        page = ebs.list_snapshot_blocks(**args)
        for b in page["Blocks"]:
            assert b["BlockIndex"] not in out
            out[b["BlockIndex"]] = b["BlockToken"]
        if "NextToken" not in page:
            return out
        args["NextToken"] = page["NextToken"]


def changed_all(ebs: Any, second: str, first: str | None = None, **kwargs: Any) -> list[Any]:
    """Every ChangedBlocks entry between two snapshots, following NextToken."""
    out: list[Any] = []
    args: dict[str, Any] = {"SecondSnapshotId": second, **kwargs}
    if first:
        args["FirstSnapshotId"] = first
    while True:
        page = ebs.list_changed_blocks(**args)
        out += page["ChangedBlocks"]
        if "NextToken" not in page:
            return out
        args["NextToken"] = page["NextToken"]


def read(ebs: Any, snapshot_id: str, index: int, token: str) -> bytes:
    """GetSnapshotBlock's body, checked against the checksum header."""
    resp = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockToken=token)
    data = resp["BlockData"].read()
    assert resp["DataLength"] == len(data) == BLOCK
    assert resp["ChecksumAlgorithm"] == "SHA256"
    assert resp["Checksum"] == checksum(data)
    return data


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, str | None, int]:
    """(code, Reason, HTTP status) of a ClientError raised by boto3."""
    resp = exc.value.response
    return resp["Error"]["Code"], resp.get("Reason"), resp["ResponseMetadata"]["HTTPStatusCode"]


# Raw HTTP -------------------------------------------------------------------------------------


@dataclass
class Raw:
    """A raw HTTP response."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    @property
    def error_type(self) -> str | None:
        return self.headers.get("x-amzn-ErrorType")


def raw(
    endpoint: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> Raw:
    """One request outside boto3 (for what boto3 cannot express)."""
    conn = http.client.HTTPConnection(urlsplit(endpoint).netloc, timeout=10)
    try:
        all_headers = {"Authorization": AUTH} if auth else {}
        all_headers.update(headers or {})
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        assert int(resp.headers["Content-Length"]) == len(data)
        return Raw(resp.status, resp.headers, data)
    finally:
        conn.close()


# Subprocess emulator --------------------------------------------------------------------------


class EmulatorProcess:
    """`python -m ebsfuse.emulator` in a subprocess; `endpoint` is read from its stdout."""

    def __init__(self, *args: str) -> None:
        # stderr goes to a file: a pipe nobody reads could fill up and stall the server.
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in kill())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebsfuse.emulator", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("endpoint "):
            self.kill()
            raise AssertionError(f"emulator did not start: {line!r} {self.stderr()}")
        self.endpoint = line.split()[1]

    def stderr(self) -> str:
        """Everything logged so far."""
        self._log.seek(0)
        return self._log.read()

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def close(self) -> None:
        """Kill the process if it still runs and drop its log."""
        self.kill()
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[EmulatorProcess]]:
    """Emulator subprocesses started by a test, all killed afterwards."""
    started: list[EmulatorProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.close()
