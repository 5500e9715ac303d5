"""A minute of 16 readers against a service that answers badly a fifth of the time.

Sixteen reader processes read random ranges of a mounted snapshot for a minute while the
emulator fails about 20% of the requests in mixed ways: 5xx, bare 429s, corrupted and cut
bodies, stalls, malformed listing pages. Every byte a reader gets is checked against content
it computes itself; a read may fail with EIO (at once, or after returning the right bytes
before the failed block), never return a wrong byte. The daemon must live,
log no traceback, serve everything right once the faults stop, and stay within the memory
bound the README states (README, "How a read works").
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ebsfuse import BLOCK_SIZE
from ebsfuse.core.fetchpool import HOME_SLACK
from ebsfuse.core.reader import FAILED_HOLD_S
from ebsfuse.emulator import Emulator

from .conftest import MountedSnapshots, daemon_pids, needs_fuse

pytestmark = needs_fuse

READERS = 16
DURATION_S = 60.0
WRITTEN_BLOCKS = 192  # 96 MiB of content...
READ_SPAN = 256 * BLOCK_SIZE  # ...read with the 32 MiB of holes after it
CACHE_MIB = 32
MAX_CONCURRENCY = 64
# A short budget keeps stalls from holding many of the 64 request slots (a third of it each).
BLOCK_TIMEOUT_S = 9.0
# The README's bound: the cache, the blocks of the requests in flight (each at most 512 KiB:
# larger bodies are refused unread), the fetch workers' few homes of slack, and the
# interpreter, boto3, pyfuse3 and trio (~80 MiB measured at rest), with room for the copies a
# reply makes.
RSS_BOUND_MIB = CACHE_MIB + (MAX_CONCURRENCY + HOME_SLACK) * BLOCK_SIZE // 2**20 + 112

MIXED_FAULTS = {
    "fail_rate": 0.06,  # InternalServerException (500)
    "bare_429_rate": 0.03,  # a proxy's 429, no AWS error type
    "corrupt_rate": 0.05,  # one byte flipped: checksum mismatch
    "truncate_rate": 0.04,  # body cut halfway
    "body_fault": "stall",
    "body_fault_rate": 0.01,  # half a body, then silence
    "list_fault": "malformed",
    "list_fault_rate": 0.2,
}

READER = textwrap.dedent(
    """
    import json, os, random, sys, time
    B = 524288
    path, seed, written, span, duration = sys.argv[1:6]
    written, span, duration = int(written), int(span), float(duration)
    rng = random.Random(int(seed))

    def content(index):
        if index >= written:
            return bytes(B)
        return random.Random(index).randbytes(B)

    # The bytes read, and whether a read failed with EIO after them. POSIX lets a read that
    # fails part-way return the bytes before the failure (the kernel does so when a page under
    # the range fails): the read after them must then fail too, or return the rest. An empty
    # answer before the end is a wrong EOF.
    def read_all(fd, size, offset):
        data = b""
        while len(data) < size:
            try:
                part = os.pread(fd, size - len(data), offset + len(data))
            except OSError as error:
                if error.errno != 5:
                    raise
                return data, True
            if not part:
                break
            data += part
        return data, False

    ok = eio = partial = wrong = 0
    fd = os.open(path, os.O_RDONLY)
    stop = time.monotonic() + duration
    while time.monotonic() < stop:
        size = rng.choice((4096, 65536, 1 << 20))
        offset = rng.randrange(0, span - size) // 4096 * 4096
        data, failed = read_all(fd, size, offset)
        if failed and not data:
            eio += 1
            continue
        first, last = offset // B, (offset + size - 1) // B
        expected = b"".join(content(i) for i in range(first, last + 1))
        start = offset - first * B
        if failed and data == expected[start : start + len(data)]:
            partial += 1  # right bytes up to a block that failed, then EIO
        elif data != expected[start : start + size]:
            wrong += 1
            # Say what was wrong (a short read, or where the bytes first differ), for the log.
            want = expected[start : start + size]
            diffs = (i for i, (a, b) in enumerate(zip(data, want)) if a != b)
            at = next(diffs, min(len(data), len(want)))
            print(f"WRONG at {offset}+{size}: got {len(data)} bytes, first difference at {at}",
                  file=sys.stderr)
        else:
            ok += 1
        # Drop what the kernel kept, so the next reads reach the daemon again.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    print(json.dumps({"ok": ok, "eio": eio, "partial": partial, "wrong": wrong}))
    """
)


def content(index: int) -> bytes:
    return random.Random(index).randbytes(BLOCK_SIZE)


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


def test_sixteen_readers_for_a_minute_under_mixed_faults(
    emu: Emulator, env: dict[str, str], workdir: Path
) -> None:
    sid = emu.create_snapshot(
        blocks={i: content(i) for i in range(WRITTEN_BLOCKS)}, volume_size_gib=1
    )
    options = ["--cache-size", f"{CACHE_MIB}M", "--max-concurrency", str(MAX_CONCURRENCY)]
    options += ["--block-timeout", str(BLOCK_TIMEOUT_S)]
    with MountedSnapshots(workdir / "mnt", [sid], env, *options) as mount:
        (pid,) = daemon_pids(mount.mountpoint)
        at_rest = memory_kib(pid)["VmRSS"]
        emu.seed_faults(9)
        emu.set_faults(**MIXED_FAULTS)
        script = workdir / "reader.py"
        script.write_text(READER)
        readers = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(script),
                    str(mount.image()),
                    str(seed),
                    str(WRITTEN_BLOCKS),
                    str(READ_SPAN),
                    str(DURATION_S),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for seed in range(READERS)
        ]
        try:
            # Each read ends within the block timeout, so a reader ends soon after its minute.
            results = [json.loads(r.communicate(timeout=DURATION_S + 60)[0]) for r in readers]
        finally:
            for r in readers:
                if r.poll() is None:
                    r.kill()
                    r.wait()
        assert all(r.returncode == 0 for r in readers)
        memory = memory_kib(pid)
        injected = emu.counters()["errors_injected"]
        totals = {k: sum(r[k] for r in results) for k in ("ok", "eio", "partial", "wrong")}
        print(
            f"\nsoak: {totals}, injected {injected}, RSS at rest {at_rest // 1024} MiB, "
            f"peak {memory['VmHWM'] // 1024} MiB (bound {RSS_BOUND_MIB} MiB)"
        )
        assert totals["wrong"] == 0
        # EIO (whole or after a correct prefix) is the exception, within the bound.
        assert totals["ok"] > 20 * (totals["eio"] + totals["partial"])
        assert sum(injected.values()) > 200  # the faults really happened
        assert daemon_pids(mount.mountpoint), "the daemon died"
        assert memory["VmHWM"] <= RSS_BOUND_MIB * 1024, memory
        # The faults stop: everything reads right, nothing was learned from them.
        emu.set_faults(**{k: 0.0 for k in MIXED_FAULTS if k.endswith("_rate")})
        time.sleep(FAILED_HOLD_S + 1)  # past the hold of blocks that failed moments ago
        with open(mount.image(), "rb") as f:
            for index in range(WRITTEN_BLOCKS):
                assert f.read(BLOCK_SIZE) == content(index), index
            assert f.read(READ_SPAN - WRITTEN_BLOCKS * BLOCK_SIZE) == bytes(
                READ_SPAN - WRITTEN_BLOCKS * BLOCK_SIZE
            )
        assert "Traceback" not in mount.log()
