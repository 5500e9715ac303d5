"""The workflows for real: browse, restore and hash against the emulator, through the kernel.

One GPT disk is built per module (ext4 with `mkfs.ext4 -d`, XFS filled through a loop mount,
and a partition holding no filesystem) and seeded into each test's emulator. Every test checks
that nothing is left behind: no mount, no loop device, no ebsfuse process, no runtime files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ebsfuse import BLOCK_SIZE, GIB
from ebsfuse.emulator import Emulator

from .conftest import (
    RUN_ROOT,
    MountedSnapshots,
    ebsfuse_cmd,
    loop_device,
    loops_backed_by,
    mounted_filesystem,
    mounts_under,
    needs_fuse,
    needs_root,
    run_ebsfuse,
    sample_tree,
    sweep,
    wait_for,
)

pytestmark = [needs_fuse, needs_root]

MIB = 1024 * 1024
SECTOR = 512
# Partition layout (sectors): 1 = ext4 64 MiB, 2 = xfs 320 MiB (mkfs.xfs's minimum is 300 MB),
# 3 = 8 MiB holding no filesystem.
EXT4_START, EXT4_SIZE = 2048 * SECTOR, 64 * MIB
XFS_START, XFS_SIZE = EXT4_START + EXT4_SIZE, 320 * MIB
RAW_START, RAW_SIZE = XFS_START + XFS_SIZE, 8 * MIB
WRITES = ("PutSnapshotBlock", "StartSnapshot", "CompleteSnapshot")
# A fixed, recognisable time for every file of the source tree, to the nanosecond.
MTIME_NS = 1_600_000_000_123_456_789
# The file capability ping and many daemons ship with, as setcap writes it.
CAPABILITY = "cap_net_raw=ep"


def need(*tools: str) -> None:
    for name in tools:
        if shutil.which(name) is None:
            pytest.skip(f"{name} is not installed (CI installs it; see .ci/run)")


def source_tree(root: Path) -> dict[str, bytes]:
    """sample_tree plus what restore must keep: owners, modes, links, a sparse file."""
    files = sample_tree(root)
    (root / "data" / "owned.txt").write_bytes(b"owned by someone else\n")
    os.chown(root / "data" / "owned.txt", 1234, 5678)
    os.chmod(root / "data" / "owned.txt", 0o640)
    os.link(root / "data" / "owned.txt", root / "data" / "hardlink")
    (root / "data" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chown(root / "data" / "tool", 0, 5678)
    os.chmod(root / "data" / "tool", 0o2750)
    os.symlink("../hello.txt", root / "data" / "link")
    os.symlink("/etc/passwd", root / "data" / "absolute-link")
    os.symlink("/", root / "data" / "escape")  # restore must resolve it inside the snapshot
    with open(root / "data" / "sparse.bin", "wb") as f:
        f.seek(3 * MIB)
        f.write(b"after a hole")
    os.chmod(root / "docs", 0o750)
    # What a system restore must keep beyond cp's basics: a file capability, user and security
    # extended attributes, and a POSIX ACL (default ACL on a directory too).
    (root / "data" / "ping").write_bytes(b"\x7fELF pretend binary\n")
    os.chmod(root / "data" / "ping", 0o755)
    subprocess.run(["setcap", CAPABILITY, str(root / "data" / "ping")], check=True)
    os.setxattr(root / "data" / "owned.txt", "user.origin", b"incident 4711")
    os.setxattr(root / "hello.txt", "security.selinux", b"system_u:object_r:etc_t:s0\0")
    (root / "data" / "shared.txt").write_bytes(b"readable by one more user\n")
    subprocess.run(["setfacl", "-m", "u:1234:r", str(root / "data" / "shared.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "g:5678:rx", str(root / "docs")], check=True)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath) / name, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    files["data/owned.txt"] = b"owned by someone else\n"
    files["data/ping"] = b"\x7fELF pretend binary\n"
    files["data/shared.txt"] = b"readable by one more user\n"
    files["data/sparse.bin"] = bytes(3 * MIB) + b"after a hole"
    return files


@dataclass
class GptDisk:
    path: Path
    ext4: Path  # the partitions' images, for reference mounts and the Sleuth Kit
    xfs: Path
    files: dict[str, bytes]
    blocks: dict[int, bytes]  # the disk's non-zero 512 KiB blocks
    sha256: str
    md5: str


def _file_blocks(path: Path) -> dict[int, bytes]:
    blocks = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                offset = os.lseek(f.fileno(), offset, os.SEEK_DATA) // BLOCK_SIZE * BLOCK_SIZE
            except OSError:
                break
            f.seek(offset)
            data = f.read(BLOCK_SIZE)
            if data.strip(b"\0"):
                blocks[offset // BLOCK_SIZE] = data
            offset += BLOCK_SIZE
    return blocks


def _digests(blocks: dict[int, bytes], size: int) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    zeros = bytes(BLOCK_SIZE)
    for index in range(size // BLOCK_SIZE):
        data = blocks.get(index, zeros)
        sha.update(data)
        md5.update(data)
    return sha.hexdigest(), md5.hexdigest()


@pytest.fixture(scope="module")
def gpt_disk() -> Iterator[GptDisk]:
    need("sgdisk", "mkfs.xfs", "setcap", "setfacl")
    root = Path(tempfile.mkdtemp(dir=RUN_ROOT))
    try:
        tree = root / "tree"
        tree.mkdir()
        files = source_tree(tree)
        ext4 = root / "ext4.img"
        subprocess.run(
            # 256-byte inodes: room for nanosecond times and in-inode attributes.
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-I",
                "256",
                "-d",
                str(tree),
                "-L",
                "snap-root",
                str(ext4),
                "64M",
            ],
            check=True,
        )
        xfs = root / "xfs.img"
        with open(xfs, "wb") as f:
            f.truncate(XFS_SIZE)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-L", "snap-data", str(xfs)], check=True)
        device = subprocess.run(
            ["losetup", "-f", "--show", str(xfs)], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            with mounted_filesystem(device, root / "xfs-mnt", "rw") as mnt:
                subprocess.run(["cp", "-a", f"{tree}/.", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", device], capture_output=True)
        disk = root / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(GIB)
        subprocess.run(
            ["sgdisk",
             "-n", f"1:{EXT4_START // SECTOR}:+64M", "-t", "1:8300", "-c", "1:root",
             "-n", "2:0:+320M", "-t", "2:8300", "-c", "2:data",
             "-n", "3:0:+8M", "-t", "3:8300", str(disk)],
            check=True, capture_output=True,
        )  # fmt: skip
        for image, start in ((ext4, EXT4_START), (xfs, XFS_START)):
            subprocess.run(
                ["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={start // MIB}",
                 "conv=notrunc,sparse", "status=none"],
                check=True,
            )  # fmt: skip
        blocks = _file_blocks(disk)
        sha256, md5 = _digests(blocks, GIB)
        yield GptDisk(disk, ext4, xfs, files, blocks, sha256, md5)
    finally:
        sweep(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def wenv(env: dict[str, str], workdir: Path) -> dict[str, str]:
    """The emulator's environment, with the chains' private directories inside workdir."""
    return {**env, "EBSFUSE_RUNTIME_DIR": str(workdir / "run")}


@pytest.fixture
def sid(emu: Emulator, gpt_disk: GptDisk) -> str:
    return emu.create_snapshot(blocks=gpt_disk.blocks, volume_size_gib=1)


def ebsfuse_processes(workdir: Path) -> list[int]:
    found = []
    needle = str(workdir).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ebsfuse" in args and any(needle in a for a in args):
            found.append(int(entry))
    return found


def assert_nothing_left(workdir: Path, *keep: Path) -> None:
    """No ebsfuse process, mount (but `keep`), loop device or runtime file under workdir."""
    wait_for(lambda: not ebsfuse_processes(workdir), timeout=20, what="ebsfuse processes to exit")
    assert [m for m in mounts_under(workdir) if m not in map(str, keep)] == []
    assert loops_backed_by(workdir) == []
    run = workdir / "run"
    assert not run.exists() or list(run.iterdir()) == [], list(run.rglob("*"))


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("ebsfuse") and "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def no_writes(emu: Emulator) -> None:
    requests = emu.counters()["requests"]
    assert not any(requests.get(op, 0) for op in WRITES), requests


def tree_of(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below root: type, mode, owner, mtime, content or link target, and its
    extended attributes (capabilities, ACLs and labels included) with their values."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                body = None
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size  # a directory's varies by fs
            xattrs = {
                name: os.getxattr(path, name, follow_symlinks=False)
                for name in sorted(os.listxattr(path, follow_symlinks=False))
            }
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, size, body, xattrs)
    return out


@pytest.fixture
def reference(gpt_disk: GptDisk, workdir: Path) -> Iterator[dict[str, Path]]:
    """The source partitions loop-mounted here: what browse and restore must reproduce."""
    with (
        loop_device(gpt_disk.ext4) as ext4_dev,
        mounted_filesystem(ext4_dev, workdir / "ref-ext4") as ext4,
        loop_device(gpt_disk.xfs) as xfs_dev,
        mounted_filesystem(xfs_dev, workdir / "ref-xfs", "ro,norecovery,nouuid") as xfs,
    ):
        yield {"1": ext4, "2": xfs}


# -- browse -----------------------------------------------------------------------------------


def test_partition_files_have_the_right_sizes(
    emu: Emulator, env: dict[str, str], workdir: Path, gpt_disk: GptDisk, sid: str
) -> None:
    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        sizes = {n: os.path.getsize(mount.mountpoint / n) for n in os.listdir(mount.mountpoint)}
        assert sizes == {
            f"{sid}.img": GIB,
            f"{sid}-part1.img": EXT4_SIZE,
            f"{sid}-part2.img": XFS_SIZE,
            f"{sid}-part3.img": RAW_SIZE,
        }
        with open(mount.mountpoint / f"{sid}-part1.img", "rb") as f:
            assert (
                hashlib.sha256(f.read()).digest()
                == hashlib.sha256(gpt_disk.ext4.read_bytes()).digest()
            )
        with open(mount.mountpoint / f"{sid}-part2.img", "rb") as f, open(gpt_disk.xfs, "rb") as g:
            assert f.read(4 * MIB) == g.read(4 * MIB)


def test_browse_each_filesystem_byte_identical(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str, reference: dict[str, Path]
) -> None:
    target = workdir / "browse"
    target.mkdir()
    # Two mountable filesystems: browse lists them and asks.
    done = run_ebsfuse("browse", sid, str(target), env=wenv)
    assert_one_line_error(done, "partition 1 (ext4", "partition 2 (xfs", "--partition")
    assert_nothing_left(workdir / "run")
    for number in ("1", "2"):
        done = run_ebsfuse("browse", sid, str(target), "--partition", number, env=wenv)
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(target)
        assert tree_of(target) == tree_of(reference[number])
        with pytest.raises(OSError):
            (target / "new-file").write_bytes(b"x")  # read-only
        if number == "1":
            done = run_ebsfuse("unmount", str(target), env=wenv)
            assert done.returncode == 0, done.stderr
        else:
            (state,) = (workdir / "run").glob("browse-*/state.json")
            os.kill(json.loads(state.read_text())["keeper_pid"], signal.SIGTERM)
        wait_for(lambda: not os.path.ismount(target), what="the chain to come down")
        assert_nothing_left(workdir / "run")
        assert not loops_backed_by(workdir)
    no_writes(emu)


# The tools that make each filesystem, and put the tree in it without mounting where they can.
WHOLE_DISK_TOOLS = {
    "btrfs": ("mkfs.btrfs",),
    "ntfs": ("mkntfs", "ntfs-3g"),
    "squashfs": ("mksquashfs",),
    "vfat": ("mkfs.vfat", "mcopy"),
    "iso9660": ("genisoimage",),
}


def kernel_reads(fstype: str) -> bool:
    """Whether this kernel can mount `fstype` (NTFS: ntfs-3g through FUSE always can)."""
    if fstype == "ntfs":
        return True
    filesystems = Path("/proc/filesystems").read_text().split()
    if fstype in filesystems:
        return True
    return (
        subprocess.run(["modprobe", "-q", fstype], capture_output=True).returncode == 0
        if (shutil.which("modprobe"))
        else False
    )


def whole_disk_image(fstype: str, tree: Path, image: Path) -> None:
    """A filesystem of `fstype` holding `tree`, made with its own tools."""
    if fstype in ("squashfs", "iso9660"):
        if fstype == "squashfs":
            subprocess.run(["mksquashfs", str(tree), str(image), "-quiet", "-noappend"], check=True)
        else:  # Rock Ridge: names and modes as the tree has them
            subprocess.run(["genisoimage", "-quiet", "-R", "-o", str(image), str(tree)], check=True)
        with open(image, "r+b") as f:  # whole 512 KiB blocks, as a volume has
            f.truncate(-(-os.path.getsize(image) // BLOCK_SIZE) * BLOCK_SIZE)
        return
    with open(image, "wb") as f:
        f.truncate(256 * MIB)
    if fstype == "btrfs":
        subprocess.run(["mkfs.btrfs", "-q", "-f", "-r", str(tree), str(image)], check=True)
        return
    if fstype == "vfat":
        subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
        entries = [str(p) for p in tree.iterdir()]
        subprocess.run(["mcopy", "-s", "-i", str(image), *entries, "::"], check=True)
        return
    subprocess.run(["mkntfs", "-q", "-F", "-f", str(image)], check=True, capture_output=True)
    mnt = image.with_suffix(".mnt")
    mnt.mkdir()
    subprocess.run(["ntfs-3g", str(image), str(mnt)], check=True)
    try:
        subprocess.run(["cp", "-r", f"{tree}/.", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("fstype", sorted(WHOLE_DISK_TOOLS))
def test_browse_and_restore_each_listed_filesystem_for_real(
    emu: Emulator, wenv: dict[str, str], workdir: Path, fstype: str
) -> None:
    """btrfs, NTFS (ntfs-3g), squashfs, vfat and iso9660 as the README lists them (ext4 and
    XFS above; exfat has no tool that fills it without mounting it)."""
    need(*WHOLE_DISK_TOOLS[fstype])
    if not kernel_reads(fstype):
        pytest.skip(f"this kernel has no {fstype} driver (the README: if the kernel has it)")
    tree = workdir / "tree"
    tree.mkdir()
    files = sample_tree(tree)
    image = workdir / f"{fstype}.img"
    whole_disk_image(fstype, tree, image)
    sid = emu.create_snapshot(blocks=_file_blocks(image), volume_size_gib=1)
    image.unlink()
    target = workdir / "browse"
    target.mkdir()
    done = run_ebsfuse("browse", sid, str(target), env=wenv)
    assert done.returncode == 0, done.stderr
    try:
        for name, data in files.items():
            assert (target / name).read_bytes() == data, name
        with pytest.raises(OSError):
            (target / "new-file").write_bytes(b"x")  # read-only
    finally:
        assert run_ebsfuse("unmount", str(target), env=wenv).returncode == 0
    wait_for(lambda: not os.path.ismount(target), what="the chain to come down")
    # The whole disk is the filesystem: --partition 0 says so explicitly.
    dest = workdir / "dest"
    done = run_ebsfuse("restore", sid, "data", str(dest), "--partition", "0", env=wenv)
    assert done.returncode == 0, done.stderr
    assert (dest / "random.bin").read_bytes() == files["data/random.bin"]
    no_writes(emu)
    assert_nothing_left(workdir / "run")


def test_restore_never_leaves_the_snapshot(
    wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    """`..` and absolute symbolic links resolve inside the snapshot's filesystem: what the host
    has at those paths (its /etc/hostname) is never read."""
    assert Path("/etc/hostname").exists()  # the host has it; the snapshot does not
    dest = workdir / "dest"
    dest.mkdir()
    for path in ("../../../etc/hostname", "data/escape/etc/hostname", "/data/../../etc/hostname"):
        done = run_ebsfuse("restore", sid, path, str(dest), "--partition", "1", env=wenv)
        assert_one_line_error(done, "no such file or directory in the snapshot", path)
    # Through the absolute link to "/", the snapshot's own root is reached.
    done = run_ebsfuse(
        "restore", sid, "data/escape/docs/readme.md", str(dest), "--partition", "1", env=wenv
    )
    assert done.returncode == 0, done.stderr
    assert (dest / "readme.md").read_bytes() == gpt_disk.files["docs/readme.md"]
    assert sorted(p.name for p in dest.iterdir()) == ["readme.md"]
    assert_nothing_left(workdir / "run")


def test_browse_of_an_xfs_whose_uuid_is_already_mounted(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    """The snapshot's XFS has the UUID of one mounted on this machine (a clone of the host)."""
    target = workdir / "browse"
    target.mkdir()
    with (
        loop_device(gpt_disk.xfs) as device,
        mounted_filesystem(device, workdir / "host-xfs", "ro,norecovery") as host,
    ):
        assert (host / "hello.txt").exists()
        done = run_ebsfuse("browse", sid, str(target), "--partition", "2", env=wenv)
        assert done.returncode == 0, done.stderr
        try:
            assert (target / "hello.txt").read_bytes() == gpt_disk.files["hello.txt"]
        finally:
            assert run_ebsfuse("unmount", str(target), env=wenv).returncode == 0
    assert_nothing_left(workdir / "run")


def test_external_umount_and_a_killed_keeper_still_clean_up(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str
) -> None:
    target = workdir / "browse"
    target.mkdir()
    # Someone runs plain umount DIR: the keeper removes the rest.
    assert run_ebsfuse("browse", sid, str(target), "--partition", "1", env=wenv).returncode == 0
    subprocess.run(["umount", str(target)], check=True)
    assert_nothing_left(workdir)
    # The keeper is killed outright: `ebsfuse unmount DIR` still undoes the whole chain.
    assert run_ebsfuse("browse", sid, str(target), "--partition", "1", env=wenv).returncode == 0
    (state,) = (workdir / "run").glob("browse-*/state.json")
    os.kill(json.loads(state.read_text())["keeper_pid"], signal.SIGKILL)
    done = run_ebsfuse("unmount", str(target), env=wenv)
    assert done.returncode == 0, done.stderr
    assert_nothing_left(workdir)


# -- restore ----------------------------------------------------------------------------------


def test_restore_a_file_and_a_directory(
    emu: Emulator,
    wenv: dict[str, str],
    workdir: Path,
    sid: str,
    gpt_disk: GptDisk,
    reference: dict[str, Path],
) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    before = emu.counters()["requests"].get("GetSnapshotBlock", 0)
    done = run_ebsfuse(
        "restore", sid, "/data/random.bin", str(dest), "--partition", "1", "--json", env=wenv
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    restored = dest / "random.bin"
    assert restored.read_bytes() == gpt_disk.files["data/random.bin"]
    assert result["bytes_restored"] == len(gpt_disk.files["data/random.bin"])
    fetched = emu.counters()["requests"]["GetSnapshotBlock"] - before
    # The daemon's count is the wire's, but for readahead still in flight when restore read
    # the counters (on the wire, not yet counted): at most a readahead window's first blocks.
    in_flight = fetched * BLOCK_SIZE - result["bytes_fetched"]
    assert 0 <= in_flight <= 4 * BLOCK_SIZE, (fetched, result["bytes_fetched"])
    assert fetched < 20  # only what the file and its metadata need, not the 64 MiB partition
    ref = reference["1"] / "data" / "random.bin"
    assert os.stat(restored).st_mtime_ns == os.stat(ref).st_mtime_ns
    assert stat.S_IMODE(os.stat(restored).st_mode) == stat.S_IMODE(os.stat(ref).st_mode)
    for number in ("1", "2"):
        out = dest / f"data-{number}"
        done = run_ebsfuse("restore", sid, "data", str(out), "--partition", number, env=wenv)
        assert done.returncode == 0, done.stderr
        assert f"-> {out}" in done.stdout and "fetched" in done.stdout
        assert tree_of(out) == tree_of(reference[number] / "data")
        assert os.stat(out / "owned.txt").st_ino == os.stat(out / "hardlink").st_ino
        assert os.readlink(out / "absolute-link") == "/etc/passwd"  # kept as a link, not followed
        assert os.stat(out / "sparse.bin").st_blocks * 512 < MIB  # the hole stayed a hole
    # A path through a symlink, and a symlink itself.
    done = run_ebsfuse("restore", sid, "/data/link", str(dest / "l"), "--partition", "1", env=wenv)
    assert done.returncode == 0 and os.readlink(dest / "l") == "../hello.txt"
    assert list(dest.glob(".*")) == []  # no temporary names left
    no_writes(emu)
    assert_nothing_left(workdir / "run")


def entry_of(path: Path) -> tuple[object, ...]:
    """One entry as tree_of records those below a root."""
    return tree_of(path.parent)[path.name]


def test_restore_several_paths_keeps_capabilities_acls_labels_and_nanoseconds(
    emu: Emulator,
    wenv: dict[str, str],
    workdir: Path,
    sid: str,
    gpt_disk: GptDisk,
    reference: dict[str, Path],
) -> None:
    for number in ("1", "2"):  # ext4, then XFS
        dest = workdir / f"dest-{number}"
        dest.mkdir()
        manifest = workdir / f"manifest-{number}.jsonl"
        done = run_ebsfuse(
            "restore", sid, "data", "/docs", "hello.txt", str(dest), "--partition", number,
            "--manifest", str(manifest), "--verify", env=wenv,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""  # nothing refused, nothing lost
        source = reference[number]
        for name in ("data", "docs", "hello.txt"):
            assert entry_of(dest / name) == entry_of(source / name), name
        assert tree_of(dest / "data") == tree_of(source / "data")
        assert tree_of(dest / "docs") == tree_of(source / "docs")
        caps = subprocess.run(
            ["getcap", str(dest / "data" / "ping")], capture_output=True, text=True
        )
        assert CAPABILITY in caps.stdout, (number, caps)
        acl = subprocess.run(
            ["getfacl", "-cp", str(dest / "data" / "shared.txt")], capture_output=True, text=True
        )
        assert "user:1234:r--" in acl.stdout
        assert os.stat(dest / "data" / "tool").st_mode & stat.S_ISGID
        if number == "2":  # XFS holds the nanoseconds (mkfs.ext4 -d kept whole seconds only)
            assert os.stat(dest / "hello.txt").st_mtime_ns == MTIME_NS
        entries = {e["path"]: e for e in map(json.loads, manifest.read_text().splitlines())}
        files = sum(e["kind"] == "file" for e in entries.values())
        assert files == 9 and f"verified: {files} files" in done.stdout, done.stdout
        ping = entries["/data/ping"]
        assert ping["written"] == str(dest / "data" / "ping") and ping["kind"] == "file"
        assert ping["sha256"] == hashlib.sha256(gpt_disk.files["data/ping"]).hexdigest()
        assert ping["mode"] == "0755"
        assert ping["mtime_ns"] == os.stat(source / "data" / "ping").st_mtime_ns
        assert "security.capability" in ping["xattrs"]
        # Copied in name order: the second name of the pair is the link.
        assert entries["/data/owned.txt"]["kind"] == "hardlink"
        assert entries["/data/owned.txt"]["link_to"] == str(dest / "data" / "hardlink")
        assert (
            entries["/data/sparse.bin"]["sha256"]
            == hashlib.sha256(gpt_disk.files["data/sparse.bin"]).hexdigest()
        )
        restored = {str(Path(e["written"]).relative_to(dest)) for e in entries.values()}
        assert restored == {"data", "docs", "hello.txt"} | {
            f"{top}/{rel}" for top in ("data", "docs") for rel in tree_of(dest / top)
        }
    assert list(workdir.glob(".manifest*")) == []  # written aside, renamed into place
    no_writes(emu)
    assert_nothing_left(workdir / "run")


def test_verify_names_a_restored_file_altered_before_the_check(
    wenv: dict[str, str], workdir: Path, sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ebsfuse.fuse.mount import MountOptions
    from ebsfuse.workflows.restore import restore

    monkeypatch.setenv("EBSFUSE_RUNTIME_DIR", wenv["EBSFUSE_RUNTIME_DIR"])
    dest = workdir / "dest"
    dest.mkdir()
    altered = dest / "data" / "random.bin"

    def alter() -> None:
        with open(altered, "r+b") as f:
            f.seek(BLOCK_SIZE + 7)
            byte = f.read(1)
            f.seek(BLOCK_SIZE + 7)
            f.write(bytes([byte[0] ^ 1]))

    result = restore(
        sid, ["data"], str(dest), partition=1, mount_options=MountOptions([], ""),
        verify=True, before_verify=alter,
    )  # fmt: skip
    assert result.mismatched == [str(altered)]
    assert result.verified == result.files - 1
    assert_nothing_left(workdir / "run")


def test_a_missing_path_among_several_is_named_and_the_rest_restored(
    wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    done = run_ebsfuse(
        "restore", sid, "hello.txt", "/no/such", "docs", str(dest), "--partition", "1", env=wenv
    )
    assert_one_line_error(done, "no such file or directory in the snapshot: /no/such")
    assert (dest / "hello.txt").read_bytes() == gpt_disk.files["hello.txt"]
    assert (dest / "docs" / "readme.md").read_bytes() == gpt_disk.files["docs/readme.md"]
    assert sorted(p.name for p in dest.iterdir()) == ["docs", "hello.txt"]
    assert_nothing_left(workdir / "run")


def test_a_destination_without_extended_attributes_says_what_it_lost(
    wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    ramfs = workdir / "ramfs"  # ramfs keeps owners and modes, and no extended attribute
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True)
    try:
        done = run_ebsfuse(
            "restore", sid, "data/owned.txt", "data/ping", str(ramfs), "--partition", "1",
            "--json", env=wenv,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "warning" in lines[0], done.stderr
        assert json.loads(done.stdout)["not_kept"] == ["user.origin", "security.capability"]
        for lost in ("security.capability", "user.origin"):
            assert lost in lines[0]
        assert (ramfs / "owned.txt").read_bytes() == gpt_disk.files["data/owned.txt"]
        assert os.stat(ramfs / "owned.txt").st_uid == 1234  # what it could keep, it kept
    finally:
        subprocess.run(["umount", str(ramfs)], capture_output=True)
    assert_nothing_left(workdir / "run")


def test_restore_as_of_a_time_picks_the_newest_snapshot_started_before_it(
    emu: Emulator, wenv: dict[str, str], workdir: Path
) -> None:
    volume = "vol-0123456789abcdef0"
    picked = []
    for day in range(3):
        tree = workdir / f"tree-{day}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "motd").write_text(f"as it was on day {day}\n")
        image = workdir / f"day-{day}.img"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
        started = datetime(2026, 11, 1 + day, 3, 0, tzinfo=UTC)
        picked.append(
            emu.create_snapshot(
                blocks=_file_blocks(image), volume_size_gib=1, volume_id=volume, start_time=started
            )
        )
    dest = workdir / "motd"
    done = run_ebsfuse(
        "restore", "--volume", volume, "--at", "2026-11-02T12:00:00Z", "/etc/motd", str(dest),
        env=wenv,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert dest.read_text() == "as it was on day 1\n"
    assert f"{volume} as of 2026-11-02T12:00:00Z: {picked[1]}, started 2026-11-02T03:00:00Z" in (
        done.stderr
    )
    assert_nothing_left(workdir / "run")


# -- hash and evidence ------------------------------------------------------------------------


def assert_audit_lines_prove_the_bytes(audit: Path, sid: str, gpt_disk: GptDisk) -> set[int]:
    """Every audit line names the snapshot and a block whose SHA-256 is that block's, as the
    source disk holds it (an independent digest); returns the blocks it lists."""
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries, "no audit line"
    for entry in entries:
        assert entry["snapshot"] == sid and entry["bytes"] == BLOCK_SIZE
        digest = hashlib.sha256(gpt_disk.blocks[entry["block"]]).digest()
        assert entry["sha256"] == base64.b64encode(digest).decode()
    return {entry["block"] for entry in entries}


def test_browse_and_restore_write_the_audit_log_of_what_they_fetched(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    restored = workdir / "restore-audit.jsonl"
    done = run_ebsfuse(
        "restore", sid, "/data/random.bin", str(dest), "--partition", "1",
        "--audit-log", str(restored), "--json", env=wenv,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = assert_audit_lines_prove_the_bytes(restored, sid, gpt_disk)
    assert len(listed) >= json.loads(done.stdout)["blocks_fetched"]
    browsed = workdir / "browse-audit.jsonl"
    target = workdir / "browse"
    target.mkdir()
    done = run_ebsfuse(
        "browse", sid, str(target), "--partition", "2", "--audit-log", str(browsed), env=wenv
    )
    assert done.returncode == 0, done.stderr
    try:
        assert (target / "data" / "random.bin").read_bytes() == gpt_disk.files["data/random.bin"]
    finally:
        assert run_ebsfuse("unmount", str(target), env=wenv).returncode == 0
    wait_for(lambda: not os.path.ismount(target), what="the chain to come down")
    blocks = assert_audit_lines_prove_the_bytes(browsed, sid, gpt_disk)
    # The file's blocks are in partition 2 (XFS): the audit names blocks there.
    assert any(XFS_START // BLOCK_SIZE <= b < (XFS_START + XFS_SIZE) // BLOCK_SIZE for b in blocks)
    assert_nothing_left(workdir / "run")


def test_hash_equals_sha256sum_and_the_audit_log_lists_the_blocks_fetched(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    audit = workdir / "audit.jsonl"
    done = run_ebsfuse("hash", sid, "--md5", "--audit-log", str(audit), env=wenv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"SHA256 ({sid}.img) = {gpt_disk.sha256}",
        f"MD5 ({sid}.img) = {gpt_disk.md5}",
    ]
    # As sha256sum of the image file would say (the source disk, a 1 GiB sparse file).
    sha256sum = subprocess.run(
        ["sha256sum", str(gpt_disk.path)], capture_output=True, text=True, check=True
    )
    assert sha256sum.stdout.split()[0] == gpt_disk.sha256
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    fetched = emu.counters()["requests"]["GetSnapshotBlock"]
    assert len(entries) == fetched == len(gpt_disk.blocks)  # holes cost nothing
    assert sorted(e["block"] for e in entries) == sorted(gpt_disk.blocks)
    for entry in entries:
        digest = hashlib.sha256(gpt_disk.blocks[entry["block"]]).digest()
        assert entry["sha256"] == base64.b64encode(digest).decode()
        assert entry["snapshot"] == sid and entry["bytes"] == BLOCK_SIZE
    no_writes(emu)


def test_hash_through_faults_is_still_exact(
    emu: Emulator, wenv: dict[str, str], sid: str, gpt_disk: GptDisk
) -> None:
    emu.set_faults(fail_rate=0.1, truncate_rate=0.05)
    done = run_ebsfuse("hash", sid, "--json", env=wenv)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sha256"] == gpt_disk.sha256


def test_sleuth_kit_on_the_image_and_a_partition_file(
    emu: Emulator, env: dict[str, str], workdir: Path, sid: str, gpt_disk: GptDisk
) -> None:
    need("mmls", "fls", "icat")

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    with MountedSnapshots(workdir / "mnt", [sid], env) as mount:
        image = mount.image()
        part1 = str(mount.mountpoint / f"{sid}-part1.img")
        assert run("mmls", str(image)) == run("mmls", str(gpt_disk.path))
        listing = run("fls", "-r", "-p", part1)
        assert listing == run(
            "fls", "-r", "-p", "-o", str(EXT4_START // SECTOR), str(gpt_disk.path)
        )
        assert listing == run("fls", "-r", "-p", str(gpt_disk.ext4))
        (line,) = [row for row in listing.splitlines() if row.endswith("data/random.bin")]
        inode = line.split()[1].rstrip(":").split("-")[0]
        content = subprocess.run(["icat", part1, inode], capture_output=True, check=True).stdout
        assert content == gpt_disk.files["data/random.bin"]
    no_writes(emu)


# -- a dirty journal ----------------------------------------------------------------------------


@pytest.fixture
def dirty_ext4(workdir: Path) -> Path:
    """An ext4 image copied while mounted read-write: its journal needs recovery."""
    need("dumpe2fs")
    tree = workdir / "dirty-tree"
    tree.mkdir()
    sample_tree(tree)
    image = workdir / "clean.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "32M"], check=True)
    dirty = workdir / "dirty.img"
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with mounted_filesystem(device, workdir / "rw", "rw") as mnt:
            (mnt / "written-while-mounted.txt").write_bytes(b"journalled\n")
            subprocess.run(["sync", "-f", str(mnt)], check=True)
            shutil.copyfile(image, dirty)  # the superblock still says needs_recovery
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True)
    header = subprocess.run(["dumpe2fs", "-h", str(dirty)], capture_output=True, text=True).stdout
    assert "needs_recovery" in header, "could not make a dirty journal"
    return dirty


def test_dirty_journal_browses_without_replay_and_nothing_writes(
    emu: Emulator, wenv: dict[str, str], workdir: Path, dirty_ext4: Path
) -> None:
    raw = dirty_ext4.read_bytes()
    sid = emu.create_snapshot(raw, volume_size_gib=1)
    expected = hashlib.sha256(raw + bytes(GIB - len(raw))).hexdigest()
    # The trap: a plain read-only mount of a read-only device refuses a journal to replay.
    with loop_device(dirty_ext4) as device:
        plain = subprocess.run(
            ["mount", "-o", "ro", device, str(workdir / "rw")], capture_output=True, text=True
        )
        if plain.returncode == 0:
            subprocess.run(["umount", str(workdir / "rw")])
        assert plain.returncode != 0
    target = workdir / "browse"
    target.mkdir()
    done = run_ebsfuse("browse", sid, str(target), env=wenv)  # the whole disk: no table
    assert done.returncode == 0, done.stderr
    assert "the whole disk (ext4" in done.stdout
    assert (target / "hello.txt").read_bytes() == b"hello from an EBS snapshot\n"
    assert run_ebsfuse("unmount", str(target), env=wenv).returncode == 0
    done = run_ebsfuse("restore", sid, "docs", str(workdir / "docs"), env=wenv)
    assert done.returncode == 0, done.stderr
    done = run_ebsfuse("hash", sid, env=wenv)
    assert done.returncode == 0 and expected in done.stdout
    no_writes(emu)
    assert_nothing_left(workdir / "run")


# -- Ctrl-C -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["image", "filesystem"])
def test_ctrl_c_during_restore_leaves_nothing(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str, stage: str
) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    emu.set_faults(latency_ms=150)  # slow enough to interrupt each stage
    proc = subprocess.Popen(
        ebsfuse_cmd("restore", sid, "data", str(dest / "data"), "--partition", "1"),
        env=wenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wanted = 1 if stage == "image" else 2
        wait_for(
            lambda: len(mounts_under(workdir)) >= wanted or proc.poll() is not None,
            what=f"the {stage} mount",
        )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(dest.iterdir()) == []
    assert_nothing_left(workdir)


def test_ctrl_c_during_browse_leaves_nothing(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str
) -> None:
    target = workdir / "browse"
    target.mkdir()
    emu.set_faults(latency_ms=300)
    proc = subprocess.Popen(
        ebsfuse_cmd("browse", sid, str(target), "--partition", "2"),
        env=wenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: mounts_under(workdir) or proc.poll() is not None, what="the image mount")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_nothing_left(workdir)


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_one_line_each_and_nothing_left(
    emu: Emulator, wenv: dict[str, str], workdir: Path, sid: str
) -> None:
    dest = workdir / "dest"
    dest.mkdir()
    target = workdir / "browse"
    target.mkdir()
    readonly = workdir / "readonly"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(readonly)], check=True)
    cases = [
        (("restore", sid, "/no/such/file", str(dest), "--partition", "1"),
         ("/no/such/file", "no such file")),
        (("restore", sid, "/hello.txt", str(dest), "--partition", "9"),
         ("no partition 9", "1, 2, 3")),
        (("browse", sid, str(target), "--partition", "9"), ("no partition 9",)),
        (("restore", sid, "/hello.txt", str(dest), "--partition", "3"),
         ("partition 3", "no filesystem")),
        (("browse", sid, str(target), "--partition", "3"), ("partition 3", "no filesystem")),
        (("restore", sid, "/hello.txt", str(readonly), "--partition", "1"),
         (str(readonly), "Read-only file system")),
        (("restore", sid, "/hello.txt", str(workdir / "missing" / "x")), ("does not exist",)),
        (("restore", "snap-nothex", "/x", str(dest)), ("not a snapshot id",)),
        (("restore", "snap-0123456789abcdef0", "/x", str(dest)), ("snap-0123456789abcdef0",)),
        (("browse", sid, str(workdir / "missing")), ("does not exist",)),
        (("browse", sid, str(target), "--partition", "x"), ("not a partition number",)),
        (("hash", "snap-0123456789abcdef0"), ("snap-0123456789abcdef0",)),
        (("restore", sid, "hello.txt", "data/../hello.txt", str(dest)),
         ("would both be restored as", str(dest / "hello.txt"))),
        (("restore", sid, "/hello.txt", str(dest), "--manifest", str(workdir / "no" / "m")),
         ("cannot write the manifest", "No such file or directory")),
        (("restore", sid, "/hello.txt", "/docs", str(dest / "new")),
         ("DEST must be an existing directory",)),
        (("restore", "--volume", "vol-ffffffff", "--at", "2001-01-01", "/x", str(dest)),
         ("vol-ffffffff has no completed snapshot started at or before 2001-01-01T00:00:00Z",)),
        (("restore", "--at", "yesterday", sid, "/x", str(dest)), ("--at needs --volume",)),
        (("restore", "--volume", "vol-1", "--at", "now", "/x", str(dest)), ("not a volume id",)),
        (("restore", "--volume", "vol-ffffffff", "--at", "soon", "/x", str(dest)),
         ("cannot read the time 'soon'",)),
    ]  # fmt: skip
    try:
        for args, needles in cases:
            done = run_ebsfuse(*args, env=wenv)
            assert_one_line_error(done, *needles)
            assert_nothing_left(workdir, readonly)
            assert list(dest.iterdir()) == []
    finally:
        subprocess.run(["umount", str(readonly)], capture_output=True)
    # A browse target already in use is refused, and the first browse is left alone.
    assert run_ebsfuse("browse", sid, str(target), "--partition", "1", env=wenv).returncode == 0
    done = run_ebsfuse("browse", sid, str(target), "--partition", "1", env=wenv)
    assert_one_line_error(done, "already")
    assert os.path.ismount(target)
    # Busy: `ebsfuse unmount` says so and changes nothing; --lazy detaches anyway.
    holder = subprocess.Popen(["sleep", "60"], cwd=target)
    try:
        done = run_ebsfuse("unmount", str(target), env=wenv)
        assert_one_line_error(done, "busy")
        assert os.path.ismount(target)
        assert run_ebsfuse("unmount", "--lazy", str(target), env=wenv).returncode == 0
    finally:
        holder.kill()
        holder.wait()
    assert_nothing_left(workdir)
    no_writes(emu)
