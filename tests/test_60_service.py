"""The service and the wrappers: systemd units verified, the unit's command run as systemd would.

`systemd-analyze verify` needs no running systemd (it loads the units offline), so it runs in a
container whose PID 1 is not systemd. Running the unit for real would need systemd as PID 1;
instead the test runs the unit's own ExecStart line with a `$NOTIFY_SOCKET` of its own and
checks what systemd relies on: READY=1 only once the mount is live, SIGTERM a clean stop (exit
0, unmounted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.emulator import Emulator

from .conftest import needs_fuse, needs_root

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
SERVICE = UNITS / "ebsfuse@.service"
EXEC_PATH = "/usr/local/bin/ebsfuse"  # where the unit expects the command (scripts/setup)


def unit_value(text: str, key: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"{key}=")]
    return line.split("=", 1)[1]


@pytest.fixture
def command_installed() -> Iterator[None]:
    """The unit's ExecStart path exists (verify checks it): scripts/setup's link, or one now."""
    link = Path(EXEC_PATH)
    if os.access(link, os.X_OK):
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(f"{EXEC_PATH} is missing and only root may create it")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path(sys.executable).parent / "ebsfuse")
    try:
        yield
    finally:
        link.unlink()


def test_units_pass_systemd_analyze_verify(tmp_path: Path, command_installed: None) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (Debian package: systemd)")
    # A template is verified as an instance: a link named like one.
    instance = tmp_path / "ebsfuse@snap-0123456789abcdef0.service"
    shutil.copy(SERVICE, tmp_path / SERVICE.name)
    instance.symlink_to(SERVICE.name)
    shutil.copy(UNITS / "mnt-snapshot.mount", tmp_path)
    for unit in (instance, tmp_path / "mnt-snapshot.mount"):
        done = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        # Unknown keys and bad values are warnings with exit status 0: demand silence.
        assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_unit_contents() -> None:
    text = SERVICE.read_text()
    assert unit_value(text, "Type") == "notify"
    assert unit_value(text, "Restart") == "on-failure"
    assert "--foreground" in unit_value(text, "ExecStart")
    assert "DeviceAllow=/dev/fuse rw" in text
    # A private mount namespace would hide the mount from the host.
    for hiding in ("ProtectSystem=", "PrivateTmp=", "ProtectHome=", "PrivateDevices="):
        assert not any(line.startswith(hiding) for line in text.splitlines()), hiding


@needs_fuse
@needs_root
def test_exec_start_signals_ready_and_stops_cleanly(
    emu: Emulator, env: dict[str, str], tmp_path: Path
) -> None:
    """The unit's ExecStart, expanded as systemd would, under a NOTIFY_SOCKET of ours."""
    block = os.urandom(BLOCK_SIZE)
    sid = emu.create_snapshot(blocks={0: block}, volume_size_gib=1)
    mountpoint = tmp_path / "run-ebsfuse" / sid  # stands in for /run/ebsfuse/%i
    mountpoint.mkdir(parents=True)
    command = unit_value(SERVICE.read_text(), "ExecStart")
    command = command.replace("/run/ebsfuse/%i", str(mountpoint)).replace("%i", sid)
    argv = shlex.split(command.replace("$EBSFUSE_OPTS", "--cache-size 64M"))
    argv[0] = str(Path(sys.executable).parent / "ebsfuse")
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    proc = subprocess.Popen(
        argv, env={**env, "NOTIFY_SOCKET": str(notify)}, stderr=subprocess.PIPE, text=True
    )
    try:
        message = sock.recv(4096).decode()
        assert "READY=1" in message
        assert os.path.ismount(mountpoint)  # ready means the image can be read
        with open(mountpoint / f"{sid}.img", "rb") as f:
            assert f.read(BLOCK_SIZE) == block
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        assert proc.wait(30) == 0
        assert not os.path.ismount(mountpoint)
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


# -- scripts/ -----------------------------------------------------------------------------------


@needs_fuse
@needs_root
def test_restore_cron_wrapper(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    from .conftest import make_ext4_image

    image, files = make_ext4_image(workdir)
    sid = emu.create_snapshot(image.read_bytes(), volume_size_gib=1)
    dest_root = workdir / "restores"
    wrapper_env = {
        **env,
        "EBSFUSE": str(Path(sys.executable).parent / "ebsfuse"),
        "EBSFUSE_RUNTIME_DIR": str(workdir / "run"),
    }
    done = subprocess.run(
        [installed("ebsfuse-restore-cron"), sid, "/docs", str(dest_root)],
        env=wrapper_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (run_dir,) = [p for p in dest_root.iterdir() if not p.name.startswith(".")]
    assert (run_dir / "docs" / "readme.md").read_bytes() == files["docs/readme.md"]
    # A failing restore: its one line logged, its status returned, no empty dated directory.
    done = subprocess.run(
        [installed("ebsfuse-restore-cron"), sid, "/nope", str(dest_root)],
        env=wrapper_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert [p.name for p in dest_root.iterdir() if not p.name.startswith(".")] == [run_dir.name]


def installed(command: str) -> str:
    """The wrapper as users run it: installed on the PATH with the package (setup.cfg)."""
    path = shutil.which(command)
    assert path is not None, f"{command} is not installed with the package"
    return path


def test_evidence_wrapper(emu: Emulator, env: dict[str, str], tmp_path: Path) -> None:
    blocks = {0: os.urandom(BLOCK_SIZE), 7: os.urandom(BLOCK_SIZE)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    evidence = tmp_path / "case-42"
    before = datetime.now(UTC).replace(microsecond=0)
    done = subprocess.run(
        [installed("ebsfuse-evidence"), sid, str(evidence)],
        env={**env, "EBSFUSE": str(Path(sys.executable).parent / "ebsfuse")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The digests worked out here, from the blocks given to the emulator and zeros to 1 GiB
    # (as sha256sum of the image file would), not taken from `ebsfuse hash`.
    sha, md5 = hashlib.sha256(), hashlib.md5()
    zeros = bytes(BLOCK_SIZE)
    for index in range(GIB // BLOCK_SIZE):
        sha.update(blocks.get(index, zeros))
        md5.update(blocks.get(index, zeros))
    expected = f"SHA256 ({sid}.img) = {sha.hexdigest()}\nMD5 ({sid}.img) = {md5.hexdigest()}\n"
    assert done.stdout == expected
    assert (evidence / f"{sid}.sha256-md5").read_text() == expected
    audit = [
        json.loads(line) for line in (evidence / f"{sid}.audit.jsonl").read_text().splitlines()
    ]
    assert sorted(entry["block"] for entry in audit) == [0, 7]
    # The record says who acquired it, where and when.
    record = json.loads((evidence / f"{sid}.json").read_text())
    assert record["sha256"] == sha.hexdigest() and record["md5"] == md5.hexdigest()
    assert record["host"] == socket.getfqdn()
    assert record["user"] == os.environ.get("USER", str(os.getuid()))
    started = datetime.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before <= started <= datetime.now(UTC)  # when: during this run
