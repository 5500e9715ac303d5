"""Shared fixtures: an emulator per test, AWS settings pointing at it, images, real mounts.

Test files are numbered by layer (s3ql's habit), so a reader sees at a glance which mount:
  10 emulator conformance (HTTP through boto3)    20 block map, reader, image without FUSE
  40 real FUSE mounts and loop devices            41 command-line errors and life cycle

Everything that mounts or attaches is torn down in `finally` blocks, and a session-wide
guard sweeps anything left under this run's temporary directories, so one failing test never
leaves a stale mount that breaks the next.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from ebsfuse import BLOCK_SIZE
from ebsfuse.ebs.fastget import FastBlockGetter
from ebsfuse.ebs.settings import ClientSettings
from ebsfuse.emulator import Emulator
from tests.worker_loop import LeanGetter, LoopGetter

RUN_ROOT = Path(tempfile.mkdtemp(prefix="ebsfuse-tests-"))
DEADLINE_S = 30.0


def fuse_available() -> bool:
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError:
        return False
    return shutil.which("fusermount3") is not None


needs_fuse = pytest.mark.skipif(
    not fuse_available(), reason="/dev/fuse or fusermount3 is not available on this machine"
)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mount need root")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir=RUN_ROOT))
    try:
        yield path
    finally:
        sweep(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = Emulator(port=0)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


def aws_env(endpoint: str | None) -> dict[str, str]:
    """Environment for a subprocess: dummy credentials, no host configuration, the endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="AKIAEBSFUSETEST",
        AWS_SECRET_ACCESS_KEY="test-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
    )
    if endpoint:
        # The emulator answers EC2 DescribeSnapshots on the same port.
        env["AWS_ENDPOINT_URL_EBS"] = env["AWS_ENDPOINT_URL_EC2"] = endpoint
    return env


@pytest.fixture
def env(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """AWS settings for the emulator, in this process and for subprocesses."""
    environment = aws_env(emu.endpoint)
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    for key, value in environment.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return environment


@pytest.fixture
def ebs(emu: Emulator, env: dict[str, str]) -> Any:
    return boto3.client("ebs", endpoint_url=emu.endpoint, region_name="us-east-1")


# -- images -------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 4 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
    return digest.hexdigest()


def sample_tree(root: Path) -> dict[str, bytes]:
    """A few files of known content: text, a binary spanning blocks, a nested one, an empty one."""
    files = {
        "hello.txt": b"hello from an EBS snapshot\n",
        "docs/readme.md": b"# restored\n" * 100,
        "data/random.bin": os.urandom(3 * BLOCK_SIZE + 12345),
        "data/nested/deep/file.txt": b"deep\n",
        "empty": b"",
    }
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


def make_ext4_image(workdir: Path, size_mib: int = 32) -> tuple[Path, dict[str, bytes]]:
    """An ext4 filesystem image built from a directory with `mkfs.ext4 -d`, and its files."""
    source = workdir / "source-tree"
    source.mkdir()
    files = sample_tree(source)
    image = workdir / "disk.img"
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-d",
            str(source),
            "-L",
            "ebsfuse-test",
            str(image),
            f"{size_mib}M",
        ],
        check=True,
    )
    return image, files


def allocated_blocks(image: Path) -> dict[int, bytes]:
    """The image's 512 KiB blocks that hold data (SEEK_DATA), by index."""
    blocks: dict[int, bytes] = {}
    with open(image, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            for index in range(offset // BLOCK_SIZE, (hole - 1) // BLOCK_SIZE + 1):
                if index not in blocks:
                    blocks[index] = os.pread(fd, BLOCK_SIZE, index * BLOCK_SIZE)
            offset = max(hole, offset + 1)
    return blocks


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A non-zero exit with exactly one line on stderr, no traceback, naming each needle."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


# -- mounts -------------------------------------------------------------------------------


def ebsfuse_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebsfuse", *args]


def run_ebsfuse(
    *args: str, env: dict[str, str], timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ebsfuse_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout, check=check
    )


def wait_for(
    predicate: Callable[[], object], timeout: float = DEADLINE_S, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def daemon_pids(mountpoint: Path) -> list[int]:
    """ebsfuse daemons serving `mountpoint`, found through /proc (background mounts)."""
    pids = []
    target = str(mountpoint).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_ebsfuse = any(arg == b"ebsfuse" or arg.endswith(b"/ebsfuse") for arg in cmdline)
        if is_ebsfuse and target in cmdline:
            pids.append(int(entry))
    return pids


def mounts_under(path: Path) -> list[str]:
    found = []
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                found.append(target)
    return found


def loops_backed_by(path: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "-a", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    )
    devices = []
    for line in out.stdout.splitlines():
        name, _, backing = line.strip().partition(" ")
        if backing.strip().startswith(str(path)):
            devices.append(name)
    return devices


def sweep(path: Path) -> None:
    """Undo every mount, loop device and daemon under `path`, innermost first."""
    for target in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)
    for device in loops_backed_by(path):
        subprocess.run(["losetup", "-d", device], capture_output=True)
    for target in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True)
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            for pid in daemon_pids(Path(root) / d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class MountedSnapshots:
    """`ebsfuse mount` in the background (the way users run it), undone on exit."""

    def __init__(self, mountpoint: Path, snapshot_ids: list[str], env: dict[str, str], *extra: str):
        self.mountpoint = mountpoint
        self.snapshot_ids = snapshot_ids
        self.env = env
        self.extra = list(extra)
        self.log_file = mountpoint.parent / f"{mountpoint.name}.log"

    def image(self, snapshot_id: str | None = None) -> Path:
        return self.mountpoint / f"{snapshot_id or self.snapshot_ids[0]}.img"

    def __enter__(self) -> MountedSnapshots:
        self.mountpoint.mkdir(exist_ok=True)
        done = run_ebsfuse(
            "mount", *self.extra, "--log-file", str(self.log_file), "--log-level", "DEBUG",
            *self.snapshot_ids, str(self.mountpoint), env=self.env,
        )  # fmt: skip
        if done.returncode != 0 or not os.path.ismount(self.mountpoint):
            self.close()
            raise AssertionError(f"mount failed ({done.returncode}): {done.stderr}")
        return self

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def close(self) -> None:
        sweep(self.mountpoint)
        wait_for(lambda: not daemon_pids(self.mountpoint), what="the daemon to exit")

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def loop_device(image: Path, *, offset: int = 0, sizelimit: int = 0) -> Iterator[str]:
    cmd = ["losetup", "-r", "-f", "--show"]
    if offset:
        cmd += ["-o", str(offset)]
    if sizelimit:
        cmd += ["--sizelimit", str(sizelimit)]
    device = subprocess.run(
        [*cmd, str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def mounted_filesystem(device: str, target: Path, options: str = "ro,noload") -> Iterator[Path]:
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", options, device, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


@pytest.fixture(scope="session", autouse=True)
def _leave_nothing_behind() -> Iterator[None]:
    yield
    sweep(RUN_ROOT)
    leftovers = mounts_under(RUN_ROOT) + loops_backed_by(RUN_ROOT)
    shutil.rmtree(RUN_ROOT, ignore_errors=True)
    assert not leftovers, f"tests left these behind: {leftovers}"


# Layers whose tests mount for real (FUSE, loop devices, filesystems): marked `mount`, so that
# `-m "not mount"` runs the emulator, the read path and the tools alone, quickly.
MOUNT_LAYERS = ("test_4", "test_6")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(tuple(f"tests/{layer}" for layer in MOUNT_LAYERS)):
            item.add_marker(pytest.mark.mount)


@pytest.fixture(params=["threads", "worker loop"])
def lean(request: pytest.FixtureRequest) -> Iterator[Callable[..., LeanGetter]]:
    """Makes a lean-transport getter (`make(settings, credentials_provider=None)`): the
    blocking `FastBlockGetter` the threads use, or the fetch worker's event loop. Both must
    pass every test of the transport; each made is closed after the test."""
    made: list[LeanGetter] = []

    def make(settings: ClientSettings, credentials_provider: Any = None) -> LeanGetter:
        kind = FastBlockGetter if request.param == "threads" else LoopGetter
        made.append(kind(settings, credentials_provider))
        return made[-1]

    yield make
    for getter in made:
        getter.close()
