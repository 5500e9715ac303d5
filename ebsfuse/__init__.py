"""ebsfuse: mount Amazon EBS snapshots as sparse, read-only disk images, read lazily, verified."""

__version__ = "0.1.0"

BLOCK_SIZE = 524288
"""Every EBS snapshot block is 512 KiB; the direct APIs read and write whole blocks only."""

GIB = 1024**3
