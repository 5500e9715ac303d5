"""Blocks and layers: the two shapes every snapshot's data takes, whatever backs it.

A *block* is one 512 KiB unit with its SHA-256 digest computed once (at upload, load or
synthesis), never per read. A *layer* is the set of blocks one snapshot wrote itself; a
snapshot's full content is its own layer over its parent's, and so on up the lineage. Layers
answer two questions only -- which of my block indexes are at or after N, and what is block N --
so a computed (synthetic) layer can stand beside a stored one without materialising anything.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Protocol

BLOCK_SIZE = 524288
"""Every EBS snapshot block is 512 KiB."""

BLOCKS_PER_GIB = (1024**3) // BLOCK_SIZE


@dataclass(frozen=True, slots=True)
class Block:
    """One block's content and its SHA-256 digest.

    The bytes on the wire are `data + tail`, or the whole file at `path`. Synthetic blocks share
    one `data` prefix and differ only in `tail`, so serving them copies nothing.
    """

    digest: bytes
    data: bytes | None = None
    tail: bytes = b""
    path: str | None = None

    def read(self) -> bytes:
        """The block's full content (a copy; the server sends the parts instead)."""
        if self.path is not None:
            with open(self.path, "rb") as f:
                return f.read()
        assert self.data is not None
        return self.data + self.tail


class Layer(Protocol):
    """The blocks one snapshot wrote itself."""

    def indexes_from(self, start: int, limit: int) -> list[int]:
        """At most `limit` of this layer's block indexes that are >= `start`, ascending."""
        ...

    def block(self, index: int) -> Block | None:
        """Block `index` of this layer, or None when this layer did not write it."""
        ...

    def count(self) -> int:
        """How many blocks this layer holds."""
        ...


class StoredLayer:
    """Blocks held in memory or in content-addressed files (uploads and seeded snapshots)."""

    def __init__(self) -> None:
        self._blocks: dict[int, Block] = {}
        # Built once when the snapshot completes (a completed layer never changes), so each
        # listing page is a bisect instead of a sort.
        self._sorted: list[int] | None = None

    def put(self, index: int, block: Block) -> None:
        """Write (or overwrite) one block; only before `freeze`."""
        if self._sorted is not None:
            raise RuntimeError("layer is frozen")
        self._blocks[index] = block

    def freeze(self) -> None:
        """Seal the layer: no more writes, and listings become cheap."""
        if self._sorted is None:
            self._sorted = sorted(self._blocks)

    def indexes_from(self, start: int, limit: int) -> list[int]:
        order = self._sorted if self._sorted is not None else sorted(self._blocks)
        first = bisect.bisect_left(order, start)
        return order[first : first + limit]

    def block(self, index: int) -> Block | None:
        return self._blocks.get(index)

    def count(self) -> int:
        return len(self._blocks)

    def items(self) -> list[tuple[int, Block]]:
        """All (index, block) pairs in ascending index order."""
        return sorted(self._blocks.items())


def file_block(digest: bytes, path: str | os.PathLike[str]) -> Block:
    """A block whose bytes live in a file of exactly BLOCK_SIZE bytes."""
    return Block(digest=digest, path=os.fspath(path))
