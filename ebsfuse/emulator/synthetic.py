"""Synthetic snapshots: huge volumes whose blocks are computed, never stored.

SPEC grammar (comma-separated `key=value`, order free):

    size=GIB                 volume size in GiB, 1..65536 (required)
    pattern=all              every block index is allocated (default)
    pattern=every:N          indexes 0, N, 2N, ...
    pattern=first:N          indexes 0 .. N-1
    pattern=random:FRACTION  each group of 1024 indexes holds about FRACTION of them, chosen by
                             a generator seeded from (seed, group): nothing is tabled
    seed=N                   integer picking the content and the random pattern (default 0)
    id=snap-HEX              the snapshot id (default: derived from the spec, so the same spec
                             always names the same snapshot)
    volume=vol-HEX           the volume EC2 DescribeSnapshots reports (default vol-ffffffff,
                             as for snapshots made with StartSnapshot)

Content: one pseudo-random 512 KiB buffer per seed, whose last 32 bytes are replaced by a stamp
(magic, seed, block index). Every block therefore differs, and its SHA-256 is the hash state of
the shared prefix (computed once) extended by 32 bytes: O(1) per block however large the volume.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .blocks import BLOCK_SIZE, BLOCKS_PER_GIB, Block

MAX_VOLUME_GIB = 65536
_STAMP = struct.Struct(">8sQQ8x")  # magic, seed, block index, padding: 32 bytes
_MAGIC = b"EBSFUSE\x00"
_PREFIX_LEN = BLOCK_SIZE - _STAMP.size
# Indexes of the random pattern are drawn per group; 1024 keeps a group's draw cheap (well
# under a millisecond) while a 10000-entry listing page touches only a few dozen groups.
_GROUP = 1024
# Groups kept drawn for GetSnapshotBlock membership checks: readers go mostly in order, so a
# few hundred groups (a few hundred KiB) cover every reader's working set.
_GROUP_CACHE = 256
_ID_RE = re.compile(r"^snap-[0-9a-f]{1,59}$")
_VOLUME_RE = re.compile(r"^vol-[0-9a-f]{8}([0-9a-f]{9})?$")


class SpecError(ValueError):
    """A SPEC that does not parse; the message says which part and why."""


@dataclass(frozen=True)
class SyntheticSpec:
    """A parsed SPEC."""

    size_gib: int
    pattern: str  # "all", "every", "first" or "random"
    arg: float  # N for every/first, FRACTION for random, unused for all
    seed: int
    snapshot_id: str
    volume_id: str | None = None

    def canonical(self) -> str:
        """The spec written out in full, the form persisted and compared."""
        volume = f",volume={self.volume_id}" if self.volume_id else ""
        return f"size={self.size_gib},pattern={self._pattern_text()},seed={self.seed}," + (
            f"id={self.snapshot_id}{volume}"
        )

    def _pattern_text(self) -> str:
        if self.pattern == "all":
            return "all"
        if self.pattern == "random":
            return f"random:{self.arg!r}"
        return f"{self.pattern}:{int(self.arg)}"


def parse_spec(text: str) -> SyntheticSpec:
    """Parse SPEC text (see the module docstring); raises SpecError."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise SpecError(f"synthetic spec {text!r}: expected key=value, got {part!r}")
        if key not in ("size", "pattern", "seed", "id", "volume"):
            raise SpecError(f"synthetic spec {text!r}: unknown key {key!r}")
        if key in fields:
            raise SpecError(f"synthetic spec {text!r}: {key} given twice")
        fields[key] = value
    if "size" not in fields:
        raise SpecError(f"synthetic spec {text!r}: size=GIB is required")
    size = _int(text, "size", fields["size"])
    if not 1 <= size <= MAX_VOLUME_GIB:
        raise SpecError(f"synthetic spec {text!r}: size must be 1..{MAX_VOLUME_GIB} GiB")
    seed = _int(text, "seed", fields.get("seed", "0"))
    if seed < 0 or seed >= 2**64:
        raise SpecError(f"synthetic spec {text!r}: seed must be 0..2**64-1")
    pattern, arg = _pattern(text, fields.get("pattern", "all"))
    snapshot_id = fields.get("id")
    if snapshot_id is None:
        spec_key = f"{size}|{pattern}|{arg!r}|{seed}".encode()
        snapshot_id = "snap-" + hashlib.sha256(spec_key).hexdigest()[:17]
    elif not _ID_RE.match(snapshot_id):
        raise SpecError(f"synthetic spec {text!r}: id must look like snap-0123456789abcdef0")
    volume_id = fields.get("volume")
    if volume_id is not None and not _VOLUME_RE.match(volume_id):
        raise SpecError(f"synthetic spec {text!r}: volume must look like vol-0123456789abcdef0")
    return SyntheticSpec(size, pattern, arg, seed, snapshot_id, volume_id)


def _int(text: str, key: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise SpecError(f"synthetic spec {text!r}: {key} must be an integer") from None


def _pattern(text: str, value: str) -> tuple[str, float]:
    name, _, arg = value.partition(":")
    if name == "all" and not arg:
        return "all", 0.0
    if name in ("every", "first"):
        n = _int(text, "pattern", arg)
        if n < 1:
            raise SpecError(f"synthetic spec {text!r}: {name}:N needs N >= 1")
        return name, float(n)
    if name == "random":
        try:
            fraction = float(arg)
        except ValueError:
            raise SpecError(f"synthetic spec {text!r}: random:FRACTION needs a number") from None
        if not 0.0 <= fraction <= 1.0:
            raise SpecError(f"synthetic spec {text!r}: random FRACTION must be 0..1")
        return "random", fraction
    raise SpecError(
        f"synthetic spec {text!r}: pattern must be all, every:N, first:N or random:FRACTION"
    )


class _Content:
    """The shared 512 KiB prefix of one seed and its SHA-256 state."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # SHAKE-256 as a seeded stream generator: deterministic and done once per seed.
        self.prefix = hashlib.shake_256(b"ebsfuse-synthetic" + seed.to_bytes(8, "big")).digest(
            _PREFIX_LEN
        )
        self.prefix_hash = hashlib.sha256(self.prefix)

    def block(self, index: int) -> Block:
        stamp = _STAMP.pack(_MAGIC, self.seed, index)
        h = self.prefix_hash.copy()
        h.update(stamp)
        return Block(digest=h.digest(), data=self.prefix, tail=stamp)


class SyntheticLayer:
    """A layer whose allocated indexes and contents are functions of the spec."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self.nblocks = spec.size_gib * BLOCKS_PER_GIB
        self._content = _Content(spec.seed)
        self._groups: OrderedDict[int, list[int]] = OrderedDict()
        self._groups_lock = threading.Lock()

    # Layer interface ------------------------------------------------------------------------

    def indexes_from(self, start: int, limit: int) -> list[int]:
        start = max(start, 0)
        spec, n = self.spec, self.nblocks
        if start >= n or limit <= 0:
            return []
        if spec.pattern == "all":
            return list(range(start, min(n, start + limit)))
        if spec.pattern == "first":
            return list(range(start, min(n, int(spec.arg), start + limit)))
        if spec.pattern == "every":
            step = int(spec.arg)
            first = -(-start // step) * step
            return list(range(first, n, step)[:limit])
        out: list[int] = []
        group = start // _GROUP
        while len(out) < limit and group * _GROUP < n:
            out.extend(i for i in self._group(group) if i >= start)
            group += 1
        return out[:limit]

    def block(self, index: int) -> Block | None:
        return self._content.block(index) if self.allocated(index) else None

    def count(self) -> int:
        spec, n = self.spec, self.nblocks
        if spec.pattern == "all":
            return n
        if spec.pattern == "first":
            return min(n, int(spec.arg))
        if spec.pattern == "every":
            return -(-n // int(spec.arg))
        groups = -(-n // _GROUP)
        return sum(len(self._draw(g)) for g in range(groups))

    # Helpers --------------------------------------------------------------------------------

    def allocated(self, index: int) -> bool:
        """Whether the pattern allocates block `index`."""
        spec = self.spec
        if not 0 <= index < self.nblocks:
            return False
        if spec.pattern == "all":
            return True
        if spec.pattern == "first":
            return index < spec.arg
        if spec.pattern == "every":
            return index % int(spec.arg) == 0
        return index in self._group(index // _GROUP)

    def _group(self, group: int) -> list[int]:
        with self._groups_lock:
            members = self._groups.get(group)
            if members is not None:
                self._groups.move_to_end(group)
                return members
        members = self._draw(group)
        with self._groups_lock:
            self._groups[group] = members
            while len(self._groups) > _GROUP_CACHE:
                self._groups.popitem(last=False)
        return members

    def _draw(self, group: int) -> list[int]:
        """The allocated indexes of one group, ascending; a pure function of (seed, group)."""
        base = group * _GROUP
        size = min(_GROUP, self.nblocks - base)
        rng = random.Random(f"{self.spec.seed}:{group}")
        count = min(size, int(self.spec.arg * size + rng.random()))
        return sorted(base + i for i in rng.sample(range(size), count))
