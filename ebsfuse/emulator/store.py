"""Snapshots, their lineage and their life cycle (pending -> completed | error).

The store owns every snapshot and enforces the service's rules that need global state:
parents, idempotent StartSnapshot, the pending-snapshot quota, timeouts, the write and
completion checks. It knows nothing of HTTP; it raises `ApiError` for rule violations.

A snapshot's content is its lineage: its own layer over its parent's and so on. Reads resolve a
block by walking the lineage child-first; listings merge the layers' index streams. Nothing is
flattened, so a small child of a 64 TiB synthetic parent costs only its own blocks.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .blocks import BLOCK_SIZE, BLOCKS_PER_GIB, Block, Layer, StoredLayer, file_block
from .clock import Clock
from .errors import ApiError, not_found, validation
from .persist import DataDir
from .synthetic import SyntheticLayer, SyntheticSpec, parse_spec

log = logging.getLogger(__name__)

MAX_VOLUME_GIB = 65536  # 64 TiB, the service's limit
DEFAULT_TIMEOUT_MINUTES = 60  # the model's documented default for StartSnapshot.Timeout
MAX_PENDING = 100  # default quota of pending snapshots per account
OWNER_ID = "111122223333"  # any 12 digits: the emulator has one account
# The volume AWS reports for snapshots made with StartSnapshot (and copies): not a real one.
PLACEHOLDER_VOLUME = "vol-ffffffff"


@dataclass(eq=False)
class Snapshot:
    """One snapshot: metadata, its own layer and a link to its parent."""

    snapshot_id: str
    volume_size: int
    layer: Layer
    start_time: float
    parent: Snapshot | None = None
    owner_id: str = OWNER_ID
    volume_id: str = PLACEHOLDER_VOLUME
    description: str = ""
    tags: list[dict[str, str]] = field(default_factory=list)
    encrypted: bool = False
    kms_key_arn: str | None = None
    timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES
    last_activity: float = 0.0
    state: str = "pending"  # as stored; a pending snapshot past its timeout reads as "error"
    # A completed snapshot reads "pending" until this (emulator clock): AWS completes it
    # asynchronously, minutes after CompleteSnapshot for a large one.
    completes_at: float = 0.0
    synthetic: str | None = None  # canonical SPEC of a synthetic snapshot
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nblocks(self) -> int:
        """Number of block indexes of the volume (valid indexes are 0 .. nblocks-1)."""
        return self.volume_size * BLOCKS_PER_GIB

    def status(self, now: float) -> str:
        """The status as a client sees it at `now` (timeouts are evaluated lazily here)."""
        if self.state == "pending" and now > self.last_activity + self.timeout_minutes * 60:
            return "error"
        if self.state == "completed" and now < self.completes_at:
            return "pending"
        return self.state

    def lineage(self) -> list[Snapshot]:
        """This snapshot, then its parent, then the grandparent ..."""
        out: list[Snapshot] = []
        s: Snapshot | None = self
        while s is not None:
            out.append(s)
            s = s.parent
        return out

    def resolve(self, index: int) -> Block | None:
        """Block `index` as this snapshot holds it (own write, else the nearest ancestor's)."""
        s: Snapshot | None = self
        while s is not None:
            block = s.layer.block(index)
            if block is not None:
                return block
            s = s.parent
        return None

    def describe(self) -> dict[str, Any]:
        """The StartSnapshot response document."""
        doc: dict[str, Any] = {
            "SnapshotId": self.snapshot_id,
            "OwnerId": self.owner_id,
            "Status": self.state,
            "StartTime": self.start_time,
            "VolumeSize": self.volume_size,
            "BlockSize": BLOCK_SIZE,
            "SseType": "sse-kms" if self.encrypted else "sse-ebs",
        }
        if self.description:
            doc["Description"] = self.description
        if self.tags:
            doc["Tags"] = [dict(t) for t in self.tags]
        if self.parent is not None:
            doc["ParentSnapshotId"] = self.parent.snapshot_id
        if self.kms_key_arn:
            doc["KmsKeyArn"] = self.kms_key_arn
        return doc


def merged_indexes(layers: Iterable[Layer], start: int, limit: int) -> list[int]:
    """The first `limit` distinct indexes >= `start` found in any of `layers`, ascending."""
    streams = [layer.indexes_from(start, limit) for layer in layers]
    out: list[int] = []
    last = -1
    for index in heapq.merge(*streams):
        if index != last:
            out.append(index)
            last = index
            if len(out) == limit:
                break
    return out


def linear_checksum(digests: Iterable[bytes]) -> str:
    """LINEAR aggregation: SHA-256 over the concatenated per-block digests, base64."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d)
    return base64.b64encode(h.digest()).decode("ascii")


def default_kms_arn(owner_id: str) -> str:
    """The key an encrypted snapshot names when the request gave none (a made-up default)."""
    return f"arn:aws:kms:us-east-1:{owner_id}:key/ebsfuse-emulator-default-key"


class Store:
    """All snapshots of the emulated account."""

    def __init__(
        self, clock: Clock, data_dir: DataDir | None = None, max_pending: int = MAX_PENDING
    ) -> None:
        self.clock = clock
        self.data_dir = data_dir
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._pending: set[str] = set()
        # ClientToken -> (request fingerprint, snapshot id), for StartSnapshot idempotency.
        self._client_tokens: dict[str, tuple[str, str]] = {}
        if data_dir is not None:
            self._load(data_dir)

    # Lookup ---------------------------------------------------------------------------------

    def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot, or ResourceNotFoundException."""
        snap = self._snapshots.get(snapshot_id)
        if snap is None:
            raise not_found(snapshot_id)
        return snap

    def delete(self, snapshot_id: str) -> None:
        """DeleteSnapshot: gone from both APIs; its children keep the blocks they inherit."""
        if self.data_dir is not None:
            raise ValueError("deleting a snapshot of a data directory is not supported")
        with self._lock:
            self.get(snapshot_id)
            del self._snapshots[snapshot_id]

    def ids(self) -> list[str]:
        """Every snapshot id (for diagnostics)."""
        with self._lock:
            return list(self._snapshots)

    def _new_id(self) -> str:
        while True:
            sid = "snap-" + secrets.token_hex(9)[:17]
            if sid not in self._snapshots:
                return sid

    # StartSnapshot --------------------------------------------------------------------------

    def start(
        self,
        *,
        volume_size: int,
        parent_id: str | None,
        tags: list[dict[str, str]],
        description: str,
        client_token: str | None,
        encrypted: bool,
        kms_key_arn: str | None,
        timeout_minutes: int,
        fingerprint: str,
    ) -> Snapshot:
        """Create a pending snapshot (or return the one a repeated ClientToken names)."""
        now = self.clock.now()
        with self._lock:
            if client_token is not None and client_token in self._client_tokens:
                seen_fingerprint, sid = self._client_tokens[client_token]
                if seen_fingerprint != fingerprint:
                    raise ApiError(
                        "ConflictException",
                        "The ClientToken was already used by a request with other parameters.",
                    )
                return self._snapshots[sid]
            parent = None
            if parent_id is not None:
                parent = self._snapshots.get(parent_id)
                if parent is None:
                    raise not_found(parent_id)
                parent_status = parent.status(now)
                if parent_status != "completed":
                    raise validation(
                        f"The parent snapshot '{parent_id}' is {parent_status}, not completed.",
                        "INVALID_PARAMETER_VALUE",
                    )
                if volume_size < parent.volume_size:
                    raise validation(
                        f"The volume size {volume_size} GiB is smaller than the parent "
                        f"snapshot's {parent.volume_size} GiB.",
                        "INVALID_VOLUME_SIZE",
                    )
                encrypted = parent.encrypted
                kms_key_arn = parent.kms_key_arn
            elif encrypted and not kms_key_arn:
                kms_key_arn = default_kms_arn(OWNER_ID)
            self._expire_pending(now)
            if len(self._pending) >= self.max_pending:
                raise ApiError(
                    "ConcurrentLimitExceededException",
                    f"You have reached the limit of {self.max_pending} pending snapshots.",
                )
            snap = Snapshot(
                snapshot_id=self._new_id(),
                volume_size=volume_size,
                layer=StoredLayer(),
                start_time=now,
                parent=parent,
                description=description,
                tags=tags,
                encrypted=encrypted,
                kms_key_arn=kms_key_arn if encrypted else None,
                timeout_minutes=timeout_minutes,
                last_activity=now,
            )
            self._snapshots[snap.snapshot_id] = snap
            self._pending.add(snap.snapshot_id)
            if client_token is not None:
                self._client_tokens[client_token] = (fingerprint, snap.snapshot_id)
        log.info("started %s (%d GiB, parent %s)", snap.snapshot_id, volume_size, parent_id)
        return snap

    def _expire_pending(self, now: float) -> None:
        """Drop timed-out snapshots from the pending count (caller holds the lock)."""
        for sid in [s for s in self._pending if self._snapshots[s].status(now) != "pending"]:
            self._pending.discard(sid)

    # PutSnapshotBlock -----------------------------------------------------------------------

    def put_block(self, snap: Snapshot, index: int, data: bytes, digest: bytes) -> None:
        """Write one verified block to a pending snapshot."""
        now = self.clock.now()
        status = snap.status(now)
        if status != "pending":
            raise validation(
                f"The snapshot '{snap.snapshot_id}' is {status}; blocks can only be written "
                "to a pending snapshot.",
                "INVALID_PARAMETER_VALUE",
            )
        if self.data_dir is not None:
            block = file_block(digest, self.data_dir.write_block(digest, data))
        else:
            block = Block(digest=digest, data=data)
        layer = snap.layer
        assert isinstance(layer, StoredLayer)
        with snap.lock:
            if snap.state != "pending":  # completed while we wrote the file
                raise validation(
                    f"The snapshot '{snap.snapshot_id}' is {snap.state}; blocks can only be "
                    "written to a pending snapshot.",
                    "INVALID_PARAMETER_VALUE",
                )
            layer.put(index, block)
            snap.last_activity = max(snap.last_activity, now)

    # CompleteSnapshot -----------------------------------------------------------------------

    def complete(
        self, snap: Snapshot, changed_blocks: int, checksum: str | None, aggregation: str | None
    ) -> None:
        """Seal a pending snapshot after checking the block count and aggregated checksum."""
        now = self.clock.now()
        layer = snap.layer
        with snap.lock:
            status = snap.status(now)
            if snap.state == "completed":
                return  # completing twice is harmless, as a retried request must be
            if status != "pending":
                raise validation(
                    f"The snapshot '{snap.snapshot_id}' is {status} and cannot be completed.",
                    "INVALID_PARAMETER_VALUE",
                )
            assert isinstance(layer, StoredLayer)
            items = layer.items()
            if changed_blocks != len(items):
                raise validation(
                    f"ChangedBlocksCount is {changed_blocks} but {len(items)} blocks were "
                    "written to this snapshot.",
                    "INVALID_PARAMETER_VALUE",
                )
            if checksum is not None:
                if aggregation not in (None, "LINEAR"):
                    raise validation(
                        f"Unsupported checksum aggregation method {aggregation!r}.",
                        "INVALID_PARAMETER_VALUE",
                    )
                expected = linear_checksum(block.digest for _, block in items)
                if checksum != expected:
                    raise validation(
                        "The aggregated checksum does not match the blocks written.",
                        "INVALID_PARAMETER_VALUE",
                    )
            if self.data_dir is not None:
                # Durable first: if this write fails the snapshot stays pending and writable.
                self.data_dir.write_snapshot(self._meta(snap, items))
            layer.freeze()
            snap.state = "completed"
        with self._lock:
            self._pending.discard(snap.snapshot_id)
        log.info("completed %s (%d blocks written)", snap.snapshot_id, len(items))

    # Seeding (no HTTP) ----------------------------------------------------------------------

    def seed(
        self,
        *,
        blocks: dict[int, bytes],
        volume_size: int,
        parent_id: str | None,
        status: str,
        description: str,
        encrypted: bool,
        start_time: float | None,
        volume_id: str = PLACEHOLDER_VOLUME,
        tags: list[dict[str, str]] | None = None,
    ) -> Snapshot:
        """Create a snapshot directly from block contents, in any status."""
        if status not in ("pending", "completed", "error"):
            raise ValueError(f"status must be pending, completed or error, not {status!r}")
        if not 1 <= volume_size <= MAX_VOLUME_GIB:
            raise ValueError(f"volume_size_gib must be 1..{MAX_VOLUME_GIB}")
        nblocks = volume_size * BLOCKS_PER_GIB
        layer = StoredLayer()
        for index, data in blocks.items():
            if not 0 <= index < nblocks:
                raise ValueError(f"block index {index} is outside a {volume_size} GiB volume")
            if len(data) != BLOCK_SIZE:
                raise ValueError(f"block {index} is {len(data)} bytes, not {BLOCK_SIZE}")
            data = bytes(data)
            digest = hashlib.sha256(data).digest()
            if self.data_dir is not None:
                layer.put(index, file_block(digest, self.data_dir.write_block(digest, data)))
            else:
                layer.put(index, Block(digest=digest, data=data))
        now = self.clock.now()
        with self._lock:
            parent = None
            if parent_id is not None:
                parent = self.get(parent_id)
                if volume_size < parent.volume_size:
                    raise ValueError("a child cannot be smaller than its parent")
            snap = Snapshot(
                snapshot_id=self._new_id(),
                volume_size=volume_size,
                layer=layer,
                start_time=now if start_time is None else start_time,
                parent=parent,
                description=description,
                encrypted=encrypted or (parent is not None and parent.encrypted),
                last_activity=now,
                state=status,
                volume_id=volume_id,
                tags=list(tags or []),
            )
            if snap.encrypted:
                snap.kms_key_arn = parent.kms_key_arn if parent else default_kms_arn(OWNER_ID)
            self._snapshots[snap.snapshot_id] = snap
            if status == "pending":
                self._pending.add(snap.snapshot_id)
        if status != "pending":
            layer.freeze()
        if status == "completed" and self.data_dir is not None:
            self.data_dir.write_snapshot(self._meta(snap, layer.items()))
        return snap

    def add_synthetic(self, spec: SyntheticSpec) -> Snapshot:
        """Register a synthetic snapshot (or return the one that already has this spec)."""
        canonical = spec.canonical()
        with self._lock:
            existing = self._snapshots.get(spec.snapshot_id)
            if existing is not None:
                if existing.synthetic == canonical:
                    return existing
                raise ValueError(f"{spec.snapshot_id} already exists with other content")
            snap = Snapshot(
                snapshot_id=spec.snapshot_id,
                volume_size=spec.size_gib,
                layer=SyntheticLayer(spec),
                start_time=self.clock.now(),
                description=f"synthetic {canonical}",
                state="completed",
                synthetic=canonical,
                volume_id=spec.volume_id or PLACEHOLDER_VOLUME,
            )
            self._snapshots[snap.snapshot_id] = snap
        if self.data_dir is not None:
            # Persisted as its spec, so children uploaded on top of it survive a restart.
            self.data_dir.write_snapshot({"SnapshotId": snap.snapshot_id, "Synthetic": canonical})
        log.debug("synthetic snapshot %s: %s", snap.snapshot_id, canonical)
        return snap

    # Persistence ----------------------------------------------------------------------------

    def _meta(self, snap: Snapshot, items: list[tuple[int, Block]]) -> dict[str, Any]:
        meta = snap.describe()
        meta.update(
            Status="completed",
            Encrypted=snap.encrypted,
            Description=snap.description,
            Blocks=[[index, block.digest.hex()] for index, block in items],
        )
        return meta

    def _load(self, data_dir: DataDir) -> None:
        for meta in data_dir.load_snapshots():
            sid = meta["SnapshotId"]
            try:
                if "Synthetic" in meta:
                    spec = parse_spec(meta["Synthetic"])
                    if spec.snapshot_id != sid:
                        raise ValueError("synthetic spec names another id")
                    self.add_synthetic(spec)
                    continue
                parent = None
                if meta.get("ParentSnapshotId"):
                    parent = self._snapshots[meta["ParentSnapshotId"]]
                layer = StoredLayer()
                for index, hexdigest in meta["Blocks"]:
                    digest = bytes.fromhex(hexdigest)
                    path = data_dir.block_path(digest)
                    if not path.exists():
                        raise FileNotFoundError(path)
                    layer.put(int(index), file_block(digest, path))
                layer.freeze()
                self._snapshots[sid] = Snapshot(
                    snapshot_id=sid,
                    volume_size=int(meta["VolumeSize"]),
                    layer=layer,
                    start_time=float(meta["StartTime"]),
                    parent=parent,
                    owner_id=meta.get("OwnerId", OWNER_ID),
                    description=meta.get("Description", ""),
                    tags=meta.get("Tags", []),
                    encrypted=bool(meta.get("Encrypted")),
                    kms_key_arn=meta.get("KmsKeyArn"),
                    state="completed",
                )
            except (KeyError, ValueError, TypeError, OSError) as e:
                log.warning("cannot load snapshot %s from %s: %r", sid, data_dir.root, e)
        log.info("loaded %d snapshots from %s", len(self._snapshots), data_dir.root)
