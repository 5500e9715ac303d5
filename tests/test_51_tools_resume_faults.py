"""Snapshot tools under stress: kill and resume, Ctrl-C, injected faults, token expiry, terminals.

Kills and signals go to real `ebsfuse download` processes; the resume sidecar written before
the kill says which blocks were done, and the emulator's counters prove that exactly the
others are fetched afterwards. Token expiry is driven through the emulator's clock in-process
(the walk's refresh before expiry and its page tokens are the pipeline's, in test_27).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.ebs.client import ClientSettings, EbsClient, RetryPolicy
from ebsfuse.ebs.errors import EbsError
from ebsfuse.emulator import Emulator
from ebsfuse.tools.download import CHECKPOINT_INTERVAL_S, DownloadOptions, download_snapshot
from ebsfuse.tools.upload import UploadOptions, upload_image

from .conftest import ebsfuse_cmd, wait_for
from .conftest import run_ebsfuse as run_subprocess
from .test_50_tools import (
    assert_one_line_failure,
    assert_volume_holds,
    download,
    gets,
    puts,
    rand,
    run_ebsfuse,
    upload,
    write_image,
)

FAST = RetryPolicy(attempts=4, throttle_attempts=4, base_delay_s=0.01, max_delay_s=0.05)


def client_for(emu: Emulator) -> EbsClient:
    return EbsClient(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], **kw: object) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(ebsfuse_cmd(*args), env=env, text=True, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def done_count(state_path: Path, indexes: set[int]) -> int:
    """Blocks the resume sidecar vouches for."""
    state = json.loads(state_path.read_text())
    below = sum(1 for i in indexes if i < state["done_below"])
    return below + len(set(state["done_extra"]) - set(range(state["done_below"])))


@pytest.fixture
def slow_snapshot(emu: Emulator, workdir: Path) -> tuple[str, Path, set[int]]:
    """40 data blocks with holes between, served slowly enough to interrupt half way."""
    indexes = {i * 3 for i in range(40)}
    blocks = {i: rand() for i in indexes}
    image = write_image(workdir / "src.img", blocks, 120)
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    return sid, image, indexes


def test_resume_after_sigkill_fetches_only_what_is_missing(
    emu: Emulator, env: dict[str, str], workdir: Path, slow_snapshot: tuple[str, Path, set[int]]
) -> None:
    sid, image, indexes = slow_snapshot
    out = workdir / "out.img"
    state = workdir / "out.img.partial.state"
    # Two held blocks: the 21st until a checkpoint is due, the 31st so the download cannot
    # finish. A checkpoint is written as blocks arrive once CHECKPOINT_INTERVAL_S has passed.
    first, last = emu.gate(sid, 60), emu.gate(sid, 90)
    args = ["download", sid, str(out), "--workers", "2", "-q"]
    with started(args, env) as proc:
        wait_for(lambda: first.arrived, what="the first held block's request")
        time.sleep(CHECKPOINT_INTERVAL_S)  # time passing, not a guess: a checkpoint is due
        first.release()
        wait_for(
            lambda: state.exists() and json.loads(state.read_text())["done_below"] > 0,
            what="a checkpoint",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    last.release()
    assert not out.exists()  # nothing named DEST until the download is complete
    done = done_count(state, indexes)
    assert 0 < done < len(indexes)

    emu.reset_counters()
    refused = run_ebsfuse("download", sid, str(out), env=env)
    assert_one_line_failure(refused, "--resume")
    result = download(env, sid, out, "--resume")
    assert result["resumed"] is True
    assert gets(emu) == len(indexes) - done == result["blocks_fetched"]
    # Blocks below the low-water mark are not even listed again; those above it are skipped.
    assert result["blocks_listed"] == len(indexes) - (done - result["blocks_already_done"])
    assert_volume_holds(out, image)
    assert not state.exists() and not (workdir / "out.img.partial").exists()


def test_ctrl_c_exits_130_and_leaves_a_resumable_download(
    emu: Emulator, env: dict[str, str], workdir: Path, slow_snapshot: tuple[str, Path, set[int]]
) -> None:
    sid, image, indexes = slow_snapshot
    out = workdir / "out.img"
    state = workdir / "out.img.partial.state"
    gate = emu.gate(sid, 90)  # held: the download is under way when Ctrl-C comes
    args = ["download", sid, str(out), "--workers", "2"]
    with started(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_for(lambda: gate.arrived, what="the held block's request")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    gate.release()
    assert proc.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0], stderr
    assert not out.exists()
    done = done_count(state, indexes)
    assert done >= 1  # the final checkpoint records what finished before the interrupt

    emu.reset_counters()
    result = download(env, sid, out, "--resume")
    assert gets(emu) == len(indexes) - done == result["blocks_fetched"]
    assert_volume_holds(out, image)


@pytest.mark.parametrize("command", ["download", "hash"])
def test_sigterm_ends_a_tool_like_ctrl_c(
    emu: Emulator,
    env: dict[str, str],
    workdir: Path,
    slow_snapshot: tuple[str, Path, set[int]],
    command: str,
) -> None:
    """SIGTERM cancels the pipeline's work: exit 130, one line, and a download stays resumable."""
    sid, _, indexes = slow_snapshot
    out = workdir / "out.img"
    gate = emu.gate(sid, 0)  # held: the job is under way when SIGTERM comes, and stalled
    args = [sid, str(out)] if command == "download" else [sid]
    with started(
        [command, *args, "--workers", "2"], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        wait_for(lambda: gate.arrived, what="the held block's request")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    gate.release()
    assert proc.returncode == 130, stderr
    assert stdout == ""  # no digest, no report: the job did not finish
    assert gets(emu) < len(indexes)  # it stopped fetching
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], stderr
    if command == "download":
        assert "--resume" in lines[0] and (workdir / "out.img.partial.state").exists()


def test_interrupted_incremental_download_resumes(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    parent_blocks = {i: rand() for i in range(0, 60, 2)}
    parent = emu.create_snapshot(blocks=parent_blocks, volume_size_gib=1)
    changed = {i: rand() for i in range(1, 60, 2)}
    child = emu.create_snapshot(blocks=changed, parent=parent)
    out = workdir / "vol.img"
    download(env, parent, out)
    expected = write_image(workdir / "expected.img", {**parent_blocks, **changed}, 60)
    emu.reset_counters()
    gate = emu.gate(child, 41)  # a changed block past the middle, held
    args = ["download", child, str(out), "--base", parent, "--workers", "2"]
    with started(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_for(lambda: gate.arrived, what="the held block's request")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    gate.release()
    assert proc.returncode == 130
    # While being changed, the image is not at DEST: it passes for neither snapshot.
    assert not out.exists() and (workdir / "vol.img.partial").exists()
    emu.reset_counters()
    result = download(env, child, out, "--base", parent, "--resume")
    assert result["blocks_fetched"] < len(changed) and gets(emu) == result["blocks_fetched"]
    assert_volume_holds(out, expected)


def test_upload_wait_ends_when_the_service_completes_the_snapshot_and_can_time_out(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    image = write_image(workdir / "disk.img", {1: rand()}, 4)
    emu.set_faults(complete_after_s=600)  # pending for 10 minutes of the emulator's clock
    gave_up = run_ebsfuse("upload", str(image), "--wait", "--wait-timeout", "1", env=env)
    assert_one_line_failure(gave_up, "still pending after 1 s")
    emu.reset_counters()
    args = ["upload", str(image), "--wait", "--json"]
    with started(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        # It polls the pending snapshot (ListSnapshotBlocks refused: pending)...
        wait_for(
            lambda: emu.counters()["errors"].get("ValidationException", 0) >= 2,
            what="two polls of the pending snapshot",
        )
        assert proc.poll() is None  # ...and waits; it cannot finish before the service does
        emu.advance_clock(601)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["status"] == "completed"
    assert emu.store.get(str(result["snapshot_id"])).status(emu.clock.now()) == "completed"


def test_resume_state_must_match(
    emu: Emulator, env: dict[str, str], workdir: Path, slow_snapshot: tuple[str, Path, set[int]]
) -> None:
    sid, _, _ = slow_snapshot
    other = emu.create_snapshot(blocks={0: rand()})
    out = workdir / "out.img"
    gate = emu.gate(sid, 90)  # held: the download cannot finish before the interrupt
    args = ["download", sid, str(out), "--workers", "1"]
    with started(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_for(lambda: (workdir / "out.img.partial.state").exists(), what="the sidecar")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    gate.release()
    mismatch = run_ebsfuse("download", other, str(out), "--resume", env=env)
    assert_one_line_failure(mismatch, sid, "not this one")
    # --force starts over.
    download(env, other, out, "--force")
    assert not (workdir / "out.img.partial").exists()


# -- faults ---------------------------------------------------------------------------------


def test_every_command_survives_5xx_throttling_and_cut_bodies(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = {i: rand() for i in (0, 1, 2, 3, 5, 8, 13, 21)}
    image = write_image(workdir / "disk.img", blocks, 24)
    emu.seed_faults(7)
    emu.set_faults(fail_rate=0.2, truncate_rate=0.3, throttle_rps=40)
    up = upload(env, image, "--manifest", str(workdir / "m"))
    sid = str(up["snapshot_id"])
    out = workdir / "out.img"
    download(env, sid, out)
    assert_volume_holds(out, image)
    child_image = write_image(workdir / "child.img", {**blocks, 4: rand(), 5: rand()}, 24)
    child = str(
        upload(env, child_image, "--parent", sid, "--parent-manifest", str(workdir / "m"))[
            "snapshot_id"
        ]
    )
    download(env, child, out, "--base", sid)
    assert_volume_holds(out, child_image)
    diff = json.loads(run_ebsfuse("diff", sid, child, "--json", env=env).stdout)
    assert diff["changed_blocks"] == 2
    info = json.loads(run_ebsfuse("info", child, "--json", env=env).stdout)
    assert info["written_blocks"] == 9
    injected = emu.counters()["errors_injected"]
    assert injected["InternalServerException"] > 0 and injected["truncated"] > 0


def test_throttling_past_the_retry_budget_fails_cleanly(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks={i: rand() for i in range(4)})
    emu.set_faults(throttle_rps=0.001)  # every block request is refused
    out = workdir / "out.img"
    policy = "3,3,0.01,0.02"
    done = run_subprocess("download", sid, str(out), "--retry-policy", policy, env=env, timeout=60)
    assert_one_line_failure(done, "RequestThrottledException")
    assert not out.exists()  # the partial file stays resumable, DEST is not faked
    image = write_image(workdir / "disk.img", {0: rand()}, 2)
    up = run_ebsfuse("upload", str(image), "--retry-policy", policy, env=env)
    assert_one_line_failure(up, "RequestThrottledException")


def test_token_refused_mid_download_is_relisted(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    blocks = {i: rand() for i in range(0, 40, 4)}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)

    class Aging(EbsClient):
        """Eight days pass between the listing and the first block: every token expired."""

        aged = False

        def get_block(
            self, snapshot_id: str, index: int, token: str, *, timeout: float | None = None
        ) -> bytes:
            if not Aging.aged:
                Aging.aged = True
                emu.advance_clock(8 * 86400)
            return super().get_block(snapshot_id, index, token, timeout=timeout)

    client = Aging(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    out = workdir / "out.img"
    result = download_snapshot(client, sid, str(out), DownloadOptions(workers=1, policy=FAST))
    assert result.blocks_fetched == len(blocks)
    assert emu.counters()["errors"].get("ValidationException", 0) >= 1  # refused tokens
    image = write_image(workdir / "expected.img", blocks, 40)
    assert_volume_holds(out, image)


# -- upload's idempotence and eventual consistency ----------------------------------------------


def test_retried_start_snapshot_makes_one_snapshot(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    class LostResponse(EbsClient):
        """The first StartSnapshot reaches the service but its answer is lost."""

        calls = 0

        def start_snapshot(self, **kwargs: object) -> dict[str, object]:
            LostResponse.calls += 1
            answer = super().start_snapshot(**kwargs)
            if LostResponse.calls == 1:
                raise EbsError("connection reset", code="ConnectionError", retryable=True)
            return answer

    image = write_image(workdir / "disk.img", {0: rand(), 2: rand()}, 4)
    client = LostResponse(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    result = upload_image(client, str(image), UploadOptions(policy=FAST, workers=2))
    assert LostResponse.calls == 2
    assert emu.store.ids() == [result.snapshot_id]
    assert result.status == "completed" and result.blocks_written == 2


def test_snapshot_not_found_right_after_start_is_retried(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    class NotYetVisible(EbsClient):
        """The new snapshot is invisible for its first 10 PutSnapshotBlock requests."""

        refusals = 0

        def put_block(self, snapshot_id: str, index: int, data: bytes, checksum: str) -> None:
            if NotYetVisible.refusals < 10:
                NotYetVisible.refusals += 1
                raise EbsError(
                    "The snapshot does not exist.",
                    code="ResourceNotFoundException",
                    snapshot_id=snapshot_id,
                    retryable=True,
                )
            super().put_block(snapshot_id, index, data, checksum)

    blocks = {0: rand(), 1: rand()}
    image = write_image(workdir / "disk.img", blocks, 2)
    client = NotYetVisible(ClientSettings(endpoint_url=emu.endpoint, region="us-east-1"))
    # 10 refusals are beyond the policy's 4 attempts: the grace period carries the upload.
    result = upload_image(client, str(image), UploadOptions(policy=FAST, workers=1))
    assert NotYetVisible.refusals == 10 and puts(emu) == 2
    out = workdir / "out.img"
    download(env, result.snapshot_id, out)
    assert_volume_holds(out, image)


# -- terminals, memory ----------------------------------------------------------------------------


def _run_on_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ebsfuse with stdout and stderr on a pseudo-terminal; (exit status, what it drew)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        ebsfuse_cmd(*args), env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave
    )
    os.close(slave)
    chunks = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break  # EIO: the child closed its side
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_only_on_a_terminal(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    sid = emu.create_snapshot(blocks={i: rand() for i in range(12)})
    emu.set_faults(latency_ms=60)
    rc, drawn = _run_on_pty(["download", sid, str(workdir / "a.img"), "--workers", "2"], env)
    assert rc == 0 and "ETA" in drawn and "\r" in drawn and "/s" in drawn
    rc, drawn = _run_on_pty(["download", sid, str(workdir / "b.img"), "--workers", "2", "-q"], env)
    assert rc == 0 and drawn == ""
    emu.set_faults(latency_ms=0)
    piped = run_subprocess("download", sid, str(workdir / "c.img"), env=env)
    assert piped.returncode == 0 and piped.stderr == "" and "\r" not in piped.stdout


RSS_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
sys.stderr.write(f"maxrss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
sys.exit(code)
"""


def test_memory_stays_flat_on_an_8_tib_volume(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    # 8 TiB = 16.8 million block indexes; 256 of them written, spread over the whole volume.
    # (Not 16 TiB: ext4 files stop 4 KiB short of that, and the download would say so.)
    sid = emu.create_synthetic("size=8192,pattern=every:65536,seed=9")
    out = workdir / "big.img"
    # Through a small launcher: a child spawned straight from pytest inherits pytest's own peak
    # RSS in ru_maxrss (Linux folds the spawning mm's high-water mark in at exec).
    proc = subprocess.Popen(
        [sys.executable, "-c", RSS_LAUNCHER, *ebsfuse_cmd("download", sid, str(out), "--json")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["blocks_fetched"] == 256
    assert os.path.getsize(out) == 8192 * GIB
    assert os.stat(out).st_blocks * 512 <= 256 * BLOCK_SIZE + 16 * 1024 * 1024
    # Peak RSS (KiB on Linux): interpreter, boto3 and 64 workers' buffers, nothing per block.
    maxrss_kib = int(stderr.decode().rsplit("maxrss_kib=", 1)[1])
    assert maxrss_kib < 250 * 1024, maxrss_kib
