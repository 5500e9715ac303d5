"""A second, independent implementation of the API: moto's server, block size set to 512 KiB.

moto 5.x is not faithful (no pagination, no expiry, string block indexes, BlockSize 512), so
passing here shows the client relies only on the documented API, not on this project's
emulator. The only change to moto is its block size, which it hard-codes to 512.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from .conftest import (
    MountedSnapshots,
    aws_env,
    needs_fuse,
    needs_root,
    run_ebsfuse,
    wait_for,
)

pytest.importorskip("moto.server")

MOTO_WITH_EBS_BLOCK_SIZE = """
import sys
import time
import moto.ebs.models as models
original = models.EBSSnapshot.__init__
def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.block_size = 524288
models.EBSSnapshot.__init__ = init
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def moto_endpoint():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO_WITH_EBS_BLOCK_SIZE, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def accepting() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(accepting, what="moto's server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@needs_fuse
@needs_root
def test_mount_reads_a_snapshot_served_by_moto(moto_endpoint: str, workdir: Path) -> None:
    env = aws_env(moto_endpoint)
    env["AWS_ENDPOINT_URL_EC2"] = moto_endpoint  # moto also answers DescribeSnapshots
    raw = bytearray(os.urandom(6 * 524288))
    raw[2 * 524288 : 3 * 524288] = bytes(524288)  # a hole the uploader skips
    source = workdir / "src.img"
    source.write_bytes(bytes(raw))
    done = run_ebsfuse("upload", str(source), env=env)
    assert done.returncode == 0, done.stderr
    sid = done.stdout.strip()
    time.sleep(2)  # so the snapshot's StartTime and the mount time are told apart below
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        with open(mount.image(), "rb") as f:
            assert f.read(len(raw)) == bytes(raw)
            assert f.read(524288) == bytes(524288)
        # mtime is the snapshot's StartTime from EC2, not the mount time.
        ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
        started = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["StartTime"]
        assert abs(os.stat(mount.image()).st_mtime - started.timestamp()) < 1, mount.log()
        assert "Traceback" not in mount.log()
