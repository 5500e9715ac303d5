"""The on-disk layout behind `--data-dir`, written so a completed snapshot survives `kill -9`.

    DIR/secret                   the token key (so block and page tokens survive a restart)
    DIR/blocks/ab/abcdef...      one file per distinct block content, named by its SHA-256
    DIR/snapshots/snap-....json  one file per completed snapshot: metadata and block digests

Every file is written to a temporary name, fsynced, renamed into place, and its directory
fsynced. A snapshot's JSON is written only at completion, after all of its block files are
durable, so a crash leaves either the whole snapshot or none of it. Pending snapshots live in
memory only; their block files may remain as unreferenced garbage after a crash, which is
harmless (content addressing makes a later upload of the same content reuse them).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DataDir:
    """One emulator's persistent state."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blocks = self.root / "blocks"
        self.snapshots = self.root / "snapshots"
        for d in (self.root, self.blocks, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)

    def secret(self) -> bytes:
        """The persisted token key, created on first use."""
        path = self.root / "secret"
        try:
            data = path.read_bytes()
            if len(data) == 32:
                return data
            log.warning("%s is damaged; issuing a new token key", path)
        except FileNotFoundError:
            pass
        data = secrets.token_bytes(32)
        _atomic_write(path, data)
        return data

    def block_path(self, digest: bytes) -> Path:
        """Where the block with this SHA-256 lives (whether or not it exists yet)."""
        name = digest.hex()
        return self.blocks / name[:2] / name

    def write_block(self, digest: bytes, data: bytes | memoryview) -> Path:
        """Store a block durably, once per distinct content; returns its path."""
        path = self.block_path(digest)
        if path.exists():
            return path
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, data)
        return path

    def write_snapshot(self, meta: dict[str, Any]) -> None:
        """Persist a completed snapshot's metadata; the snapshot exists on disk from here on."""
        path = self.snapshots / f"{meta['SnapshotId']}.json"
        _atomic_write(path, json.dumps(meta, separators=(",", ":")).encode())

    def load_snapshots(self) -> list[dict[str, Any]]:
        """Every persisted snapshot's metadata, parents before children."""
        metas: dict[str, dict[str, Any]] = {}
        for path in sorted(self.snapshots.glob("snap-*.json")):
            try:
                meta = json.loads(path.read_bytes())
                metas[meta["SnapshotId"]] = meta
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping unreadable snapshot file %s: %s", path, e)
        ordered: list[dict[str, Any]] = []
        done: set[str] = set()

        def visit(sid: str, depth: int) -> None:
            if sid in done or depth > len(metas):
                return
            parent = metas[sid].get("ParentSnapshotId")
            if parent in metas:
                visit(parent, depth + 1)
            done.add(sid)
            ordered.append(metas[sid])

        for sid in metas:
            visit(sid, 0)
        return ordered


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
