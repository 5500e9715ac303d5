"""Snapshot tools against the emulator: upload, download, diff and info through the command line.

Round trips are byte-exact and sparse (allocated size from st_blocks), "only the changed
blocks" is proven with the emulator's request counters, and every bad input ends in one line
on stderr and a non-zero exit. Helpers here are shared with test_51_* (resume and faults).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.cli.commands import main as ebsfuse_main
from ebsfuse.emulator import Emulator

from .conftest import assert_one_line_failure, needs_root

MIB = 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------


def run_ebsfuse(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`ebsfuse ARGS` in this process (the `env` fixture already points AWS_* at the emulator):
    the same code path as the command, without paying a Python start-up per call. Tests that
    need a real process (signals, terminals) use conftest's `run_ebsfuse`."""
    assert all(os.environ.get(k) == v for k, v in env.items() if k.startswith("AWS_"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = ebsfuse_main(list(args))
        except SystemExit as exit_:  # argparse errors
            rc = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["ebsfuse", *args], rc, out.getvalue(), err.getvalue())


def write_image(path: Path, blocks: dict[int, bytes], nblocks: int) -> Path:
    """A sparse image of `nblocks` blocks holding `blocks` (index -> 512 KiB) and holes."""
    with open(path, "wb") as f:
        f.truncate(nblocks * BLOCK_SIZE)
        for index, data in blocks.items():
            assert len(data) == BLOCK_SIZE
            f.seek(index * BLOCK_SIZE)
            f.write(data)
    return path


def rand() -> bytes:
    return os.urandom(BLOCK_SIZE)


def gets(emu: Emulator) -> int:
    return emu.counters()["requests"].get("GetSnapshotBlock", 0)


def puts(emu: Emulator) -> int:
    return emu.counters()["requests"].get("PutSnapshotBlock", 0)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def assert_volume_holds(volume: Path, image: Path, volume_size: int = GIB) -> None:
    """`volume` is `image` followed by zeros up to `volume_size`, byte for byte."""
    with open(volume, "rb") as v, open(image, "rb") as i:
        assert v.seek(0, os.SEEK_END) == volume_size  # works for block devices too
        v.seek(0)
        while True:
            want = i.read(4 * MIB)
            if not want:
                break
            assert v.read(len(want)) == want
        # Past the image: nothing but zeros. Holes are skipped with SEEK_DATA / SEEK_HOLE and
        # only data segments are read (a block device has no holes: all of it is read).
        pos = v.tell()
        while pos < volume_size:
            try:
                data_at = os.lseek(v.fileno(), pos, os.SEEK_DATA)
                hole_at = os.lseek(v.fileno(), data_at, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return  # no data after `pos`
                data_at, hole_at = pos, volume_size
            v.seek(data_at)
            left = hole_at - data_at
            while left > 0:
                chunk = v.read(min(left, 4 * MIB))
                assert chunk and chunk.count(0) == len(chunk), f"data past the image at {v.tell()}"
                left -= len(chunk)
            pos = hole_at


def upload(env: dict[str, str], image: Path, *args: str) -> dict[str, object]:
    done = run_ebsfuse("upload", str(image), "--json", *args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def download(env: dict[str, str], sid: str, dest: Path, *args: str) -> dict[str, Any]:
    done = run_ebsfuse("download", sid, str(dest), "--json", *args, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def image_blocks() -> dict[int, bytes]:
    """Written data, a block of written zeros (index 3) and holes, over 24 blocks."""
    return {0: rand(), 1: rand(), 3: bytes(BLOCK_SIZE), 7: rand(), 8: rand(), 23: rand()}


# -- round trips --------------------------------------------------------------------------


def test_plain_round_trip_is_byte_identical_and_sparse(
    emu: Emulator, env: dict[str, str], workdir: Path, image_blocks: dict[int, bytes]
) -> None:
    image = write_image(workdir / "disk.img", image_blocks, 24)
    up = upload(env, image, "--description", "round trip", "--tag", "owner=tests")
    sid = str(up["snapshot_id"])
    assert up["blocks_written"] == 5 and up["blocks_zero_skipped"] == 19
    assert puts(emu) == 5
    snap = emu.store.get(sid)
    assert snap.description == "round trip"
    assert snap.tags == [{"Key": "owner", "Value": "tests"}]

    emu.reset_counters()
    out = workdir / "out.img"
    result = download(env, sid, out)
    assert result["blocks_fetched"] == 5 and result["zero_blocks"] == 0
    assert gets(emu) == 5
    assert_volume_holds(out, image)
    # Sparse: 5 written blocks allocated (plus file-system slack), not the 1 GiB volume.
    assert allocated(out) <= 5 * BLOCK_SIZE + MIB
    assert not (workdir / "out.img.partial").exists()
    assert not (workdir / "out.img.partial.state").exists()


def test_encrypted_round_trip_sends_zero_blocks_and_stays_sparse(
    emu: Emulator, env: dict[str, str], workdir: Path, image_blocks: dict[int, bytes]
) -> None:
    image = write_image(workdir / "disk.img", image_blocks, 24)
    up = upload(env, image, "--encrypted")
    sid = str(up["snapshot_id"])
    # An unwritten block of an encrypted snapshot restores as random data: nothing skipped.
    assert up["encrypted"] is True
    assert up["blocks_written"] == 24 and up["blocks_skipped"] == 0
    assert puts(emu) == 24
    assert emu.store.get(sid).encrypted

    out = workdir / "out.img"
    result = download(env, sid, out)
    assert result["blocks_fetched"] == 24 and result["zero_blocks"] == 19
    assert_volume_holds(out, image)
    assert allocated(out) <= 5 * BLOCK_SIZE + MIB  # zero blocks were fetched, not written


def test_kms_key_is_passed(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    image = write_image(workdir / "disk.img", {0: rand()}, 2)
    arn = "arn:aws:kms:us-east-1:123456789012:key/abcd-1234"
    sid = str(upload(env, image, "--encrypted", "--kms-key-arn", arn)["snapshot_id"])
    assert emu.store.get(sid).kms_key_arn == arn


def make_lineage(workdir: Path) -> tuple[Path, Path, set[int]]:
    """Parent and child images (16 blocks) and the indexes whose content differs."""
    same = rand()
    parent = {0: rand(), 1: same, 2: rand(), 5: rand(), 9: rand()}
    child = dict(parent)
    child[2] = rand()  # rewritten
    child[5] = bytes(BLOCK_SIZE)  # zeroed: must be sent, the parent's data is there
    child[11] = rand()  # new
    child[12] = bytes(BLOCK_SIZE)  # zeros over a hole: nothing to send
    del child[9]  # a hole where the parent had data: must become zeros
    changed = {2, 5, 9, 11}
    return (
        write_image(workdir / "p.img", parent, 16),
        write_image(workdir / "c.img", child, 16),
        changed,
    )


@pytest.mark.parametrize("source", ["image", "manifest"])
def test_incremental_upload_sends_only_changed_blocks(
    emu: Emulator, env: dict[str, str], workdir: Path, source: str
) -> None:
    p_img, c_img, changed = make_lineage(workdir)
    manifest = workdir / "p.manifest"
    parent = str(upload(env, p_img, "--manifest", str(manifest))["snapshot_id"])
    assert manifest.exists() and not Path(str(manifest) + ".tmp").exists()
    emu.reset_counters()
    flag = ["--parent-image", str(p_img)] if source == "image" else [
        "--parent-manifest", str(manifest)
    ]  # fmt: skip
    up = upload(env, c_img, "--parent", parent, *flag)
    child = str(up["snapshot_id"])
    assert puts(emu) == len(changed) == up["blocks_written"]
    assert up["parent_snapshot_id"] == parent
    assert emu.store.get(child).parent is emu.store.get(parent)

    out = workdir / "child.img"
    download(env, child, out)
    assert_volume_holds(out, c_img)


def test_child_of_child_from_manifests(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    """A manifest describes all the snapshot holds, inherited blocks included."""
    p_img, c_img, _ = make_lineage(workdir)
    m1, m2 = workdir / "1.manifest", workdir / "2.manifest"
    parent = str(upload(env, p_img, "--manifest", str(m1))["snapshot_id"])
    child = str(
        upload(env, c_img, "--parent", parent, "--parent-manifest", str(m1), "--manifest", str(m2))[
            "snapshot_id"
        ]
    )
    g_blocks = {0: rand()}  # only block 0 differs from the child
    g_img = workdir / "g.img"
    with open(c_img, "rb") as src, open(g_img, "wb") as dst:
        dst.write(src.read())
    with open(g_img, "r+b") as f:
        f.write(g_blocks[0])
    emu.reset_counters()
    grandchild = str(
        upload(env, g_img, "--parent", child, "--parent-manifest", str(m2))["snapshot_id"]
    )
    assert puts(emu) == 1
    out = workdir / "g.out"
    download(env, grandchild, out)
    assert_volume_holds(out, g_img)


def test_encrypted_child_sends_zero_blocks_but_not_unchanged_data(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    p_img, c_img, _ = make_lineage(workdir)
    parent = str(upload(env, p_img, "--encrypted")["snapshot_id"])
    emu.reset_counters()
    up = upload(env, c_img, "--parent", parent, "--parent-image", str(p_img))
    assert up["encrypted"] is True
    # Data blocks identical to the parent's (0, 1) are skipped; every zero block is sent,
    # since the parent image cannot say whether the parent wrote it.
    assert puts(emu) == 16 - 2 == up["blocks_written"]
    out = workdir / "child.img"
    download(env, str(up["snapshot_id"]), out)
    assert_volume_holds(out, c_img)


# -- incremental download -------------------------------------------------------------------


def test_incremental_download_fetches_only_changed_blocks(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    p_img, c_img, changed = make_lineage(workdir)
    parent = str(upload(env, p_img)["snapshot_id"])
    child = str(upload(env, c_img, "--parent", parent, "--parent-image", str(p_img))["snapshot_id"])
    out = workdir / "vol.img"
    download(env, parent, out)
    emu.reset_counters()
    result = download(env, child, out, "--base", parent)
    # Every changed block is fetched; 5 and 9 now hold zeros (the child wrote them).
    assert gets(emu) == len(changed) == result["blocks_fetched"]
    assert result["zero_blocks"] == 2 and result["blocks_zeroed"] == 0
    assert_volume_holds(out, c_img)
    assert allocated(out) <= 5 * BLOCK_SIZE + MIB  # zeroed blocks became holes again

    # And backwards: from the child's image to the parent's. Block 11 exists only in the
    # child (the first snapshot now): it becomes zeros without a request.
    emu.reset_counters()
    back = download(env, parent, out, "--base", child)
    assert back["blocks_zeroed"] == 1 and gets(emu) == 3 == back["blocks_fetched"]
    assert_volume_holds(out, p_img)
    assert not (workdir / "vol.img.partial").exists()


def test_incremental_download_needs_the_base_image(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    p_img, c_img, _ = make_lineage(workdir)
    parent = str(upload(env, p_img)["snapshot_id"])
    child = str(upload(env, c_img, "--parent", parent, "--parent-image", str(p_img))["snapshot_id"])
    missing = run_ebsfuse("download", child, str(workdir / "nope"), "--base", parent, env=env)
    assert_one_line_failure(missing, "does not exist", "--base")
    wrong = workdir / "wrong.img"
    wrong.write_bytes(b"x" * 1000)
    done = run_ebsfuse("download", child, str(wrong), "--base", parent, env=env)
    assert_one_line_failure(done, "does not hold")
    assert wrong.read_bytes() == b"x" * 1000
    other = str(upload(env, p_img)["snapshot_id"])
    unrelated = run_ebsfuse("download", child, str(wrong), "--base", other, env=env)
    assert_one_line_failure(unrelated, "UNRELATED_SNAPSHOTS")


# -- block devices ----------------------------------------------------------------------------


@needs_root
def test_download_to_a_block_device(
    emu: Emulator,
    env: dict[str, str],
    workdir: Path,
    image_blocks: dict[int, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = write_image(workdir / "disk.img", image_blocks, 24)
    sid = str(upload(env, image)["snapshot_id"])
    backing = workdir / "backing"
    with open(backing, "wb") as f:  # junk where the snapshot has holes and zeros
        f.truncate(GIB)
        for index in (2, 3, 4, 100):
            f.seek(index * BLOCK_SIZE)
            f.write(rand())
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        refused = run_ebsfuse("download", sid, device, env=env)
        assert_one_line_failure(refused, "block device", "--force")
        state_home = workdir / "state"
        monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
        download(env, sid, Path(device), "--force")
        with open(device, "rb") as dev:
            assert dev.seek(0, os.SEEK_END) == GIB
            dev.seek(0)
            # The image, then zeros where the junk was (holes and block 100 of the snapshot).
            assert dev.read(24 * BLOCK_SIZE) == image.read_bytes()
            assert dev.read(100 * BLOCK_SIZE).count(0) == 100 * BLOCK_SIZE
            dev.seek(GIB - 4 * MIB)
            assert dev.read().count(0) == 4 * MIB
        assert not list(state_home.glob("ebsfuse/*"))  # the sidecar is gone once complete
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


@needs_root
def test_block_device_too_small(
    emu: Emulator, env: dict[str, str], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(workdir))
    sid = emu.create_snapshot(blocks={0: rand()}, volume_size_gib=1)
    backing = workdir / "small"
    with open(backing, "wb") as f:
        f.truncate(8 * MIB)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        done = run_ebsfuse("download", sid, device, "--force", env=env)
        assert_one_line_failure(done, "too small")
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)


# -- diff and info ------------------------------------------------------------------------------


def test_diff_reports_known_changes(emu: Emulator, env: dict[str, str]) -> None:
    same = rand()
    parent = emu.create_snapshot(blocks={0: rand(), 1: rand(), 2: same, 5: rand()})
    child = emu.create_snapshot(
        blocks={1: rand(), 2: same, 7: rand(), 8: rand(), 9: rand()}, parent=parent
    )
    done = run_ebsfuse("diff", parent, child, "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    # Block 2 was rewritten with the same content: not a change. 7-9 only in the child.
    assert doc["changes"] == [
        {"offset": BLOCK_SIZE, "length": BLOCK_SIZE, "first_block": 1, "blocks": 1},
        {"offset": 7 * BLOCK_SIZE, "length": 3 * BLOCK_SIZE, "first_block": 7, "blocks": 3},
    ]
    assert doc["changed_blocks"] == 4 and doc["changed_bytes"] == 4 * BLOCK_SIZE
    assert doc["only_in_second"] == 3 and doc["only_in_first"] == 0 and doc["in_both"] == 1
    assert doc["share"] == pytest.approx(4 * BLOCK_SIZE / GIB)
    assert doc["first_snapshot_id"] == parent and doc["second_snapshot_id"] == child

    human = run_ebsfuse("diff", parent, child, env=env)
    assert human.returncode == 0 and human.stderr == ""
    lines = human.stdout.strip().splitlines()
    assert len(lines) == 3
    assert "blocks 7-9" in lines[1] and "4 blocks changed in 2 ranges" in lines[2]


def test_diff_of_identical_and_of_unrelated_snapshots(emu: Emulator, env: dict[str, str]) -> None:
    parent = emu.create_snapshot(blocks={0: rand()})
    child = emu.create_snapshot(blocks={}, parent=parent)
    done = run_ebsfuse("diff", parent, child, "--json", env=env)
    doc = json.loads(done.stdout)
    assert doc["changes"] == [] and doc["changed_blocks"] == 0
    other = emu.create_snapshot(blocks={0: rand()})
    assert_one_line_failure(run_ebsfuse("diff", parent, other, env=env), "UNRELATED_SNAPSHOTS")
    assert_one_line_failure(
        run_ebsfuse("diff", parent, "snap-0123456789abcdef0", env=env), "does not exist"
    )


def test_info(emu: Emulator, env: dict[str, str]) -> None:
    sid = emu.create_snapshot(blocks={3: rand(), 4: rand(), 100: rand()}, volume_size_gib=2)
    doc = json.loads(run_ebsfuse("info", sid, "--json", env=env).stdout)
    assert doc["volume_size"] == 2 * GIB and doc["volume_size_gib"] == 2
    assert doc["block_size"] == BLOCK_SIZE
    assert doc["written_blocks"] == 3 and doc["written_bytes"] == 3 * BLOCK_SIZE
    assert doc["first_written_offset"] == 3 * BLOCK_SIZE
    assert doc["last_written_offset"] == 100 * BLOCK_SIZE
    assert doc["written_end"] == 101 * BLOCK_SIZE
    assert doc["token_expiry"]
    human = run_ebsfuse("info", sid, env=env)
    assert "written blocks: 3" in human.stdout and human.stderr == ""

    empty = emu.create_snapshot(blocks={}, volume_size_gib=1)
    doc = json.loads(run_ebsfuse("info", empty, "--json", env=env).stdout)
    assert doc["written_blocks"] == 0 and doc["first_written_offset"] is None


def test_info_follows_pages_and_empty_pages(emu: Emulator, env: dict[str, str]) -> None:
    sid = emu.create_synthetic("size=16,pattern=every:2,seed=3")  # 16384 blocks: 2 pages
    emu.set_faults(empty_pages=True)
    doc = json.loads(run_ebsfuse("info", sid, "--json", env=env).stdout)
    assert doc["written_blocks"] == 16384
    assert doc["last_written_offset"] == (32768 - 2) * BLOCK_SIZE
    assert doc["pages"] >= 3  # data pages and the injected empty ones between them


# -- bad input ------------------------------------------------------------------------------


@needs_root  # a read-only tmpfs
def test_download_refuses_to_overwrite_and_reports_bad_destinations(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(blocks={0: rand()})
    existing = workdir / "exists.img"
    existing.write_bytes(b"keep me")
    assert_one_line_failure(run_ebsfuse("download", sid, str(existing), env=env), "--force")
    assert existing.read_bytes() == b"keep me"
    assert not (workdir / "exists.img.partial").exists()
    download(env, sid, existing, "--force")
    assert os.path.getsize(existing) == GIB

    assert_one_line_failure(
        run_ebsfuse("download", sid, str(workdir / "no" / "dir.img"), env=env), "does not exist"
    )
    assert_one_line_failure(run_ebsfuse("download", sid, str(workdir), env=env), "directory")
    unknown = run_ebsfuse("download", "snap-0123456789abcdef0", str(workdir / "u.img"), env=env)
    assert_one_line_failure(unknown, "snap-0123456789abcdef0", "does not exist")
    assert not (workdir / "u.img").exists() and not (workdir / "u.img.partial").exists()
    assert_one_line_failure(
        run_ebsfuse("download", "snap-XYZ", str(workdir / "x.img"), env=env), "snapshot id"
    )
    # A directory even root cannot write in: a read-only filesystem.
    readonly = workdir / "ro"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(readonly)], check=True)
    try:
        assert_one_line_failure(
            run_ebsfuse("download", sid, str(readonly / "x.img"), env=env), "not writable"
        )
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)


def test_upload_bad_input(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    odd = workdir / "odd.img"
    odd.write_bytes(os.urandom(1000))
    assert_one_line_failure(run_ebsfuse("upload", str(odd), env=env), "not a multiple", "--pad")
    assert not emu.store.ids()  # nothing was started

    padded = upload(env, odd, "--pad")
    assert padded["padded_bytes"] == BLOCK_SIZE - 1000
    out = workdir / "out.img"
    download(env, str(padded["snapshot_id"]), out)
    assert_volume_holds(out, odd)

    image = write_image(workdir / "disk.img", {0: rand()}, 2)
    cases = [
        (["--kms-key-arn", "arn:aws:kms:us-east-1:123456789012:key/x"], "--encrypted"),
        (["--parent", "snap-0123456789abcdef0"], "--parent-image"),
        (["--parent-image", str(image)], "--parent"),
        (["--parent", "snap-0123456789abcdef0", "--parent-image", str(image)], "does not exist"),
        (["--tag", "novalue"], "KEY=VALUE"),
        (["--timeout", "5"], "10 to 4320"),
        (["--description", "x" * 300], "255"),
    ]
    for args, needle in cases:
        assert_one_line_failure(run_ebsfuse("upload", str(image), *args, env=env), needle)
    assert_one_line_failure(run_ebsfuse("upload", str(workdir / "missing"), env=env), "cannot read")
    assert_one_line_failure(run_ebsfuse("upload", str(workdir), env=env), "directory")
    sid = str(upload(env, image, "--manifest", str(workdir / "m"))["snapshot_id"])
    other = str(upload(env, image)["snapshot_id"])
    wrong = run_ebsfuse(
        "upload", str(image), "--parent", other, "--parent-manifest", str(workdir / "m"), env=env
    )
    assert_one_line_failure(wrong, sid, "not " + other)


def test_upload_wait_and_timeout(emu: Emulator, env: dict[str, str], workdir: Path) -> None:
    image = write_image(workdir / "disk.img", {1: rand()}, 4)
    up = upload(env, image, "--wait", "--timeout", "30")
    assert up["status"] == "completed"
    assert emu.store.get(str(up["snapshot_id"])).timeout_minutes == 30
    plain = run_ebsfuse("upload", str(image), env=env)
    assert plain.returncode == 0 and plain.stdout.strip().startswith("snap-")
    assert plain.stderr == ""


def test_download_and_diff_honour_audit_log_and_max_rps(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    """The tools' client is built from every client option (it once dropped --audit-log)."""
    blocks = {0: rand(), 5: rand(), 9: rand()}
    sid = emu.create_snapshot(blocks=blocks, volume_size_gib=1)
    audit = workdir / "audit.jsonl"
    result = download(env, sid, workdir / "out.img", "--audit-log", str(audit), "--max-rps", "50")
    assert result["blocks_fetched"] == 3
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(line["block"] for line in lines) == [0, 5, 9]
    assert all(line["snapshot"] == sid and line["bytes"] == BLOCK_SIZE for line in lines)
    bad = run_ebsfuse("download", sid, str(workdir / "x.img"), "--max-rps", "0", env=env)
    assert bad.returncode == 2 and "--max-rps" in bad.stderr and len(bad.stderr.splitlines()) == 1
