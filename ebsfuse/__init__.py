"""ebsfuse: mount Amazon EBS snapshots as sparse, read-only disk images, read lazily, verified."""

__version__ = "0.1.0"

BLOCK_SIZE = 524288
"""Every EBS snapshot block is 512 KiB; the direct APIs read and write whole blocks only."""

GIB = 1024**3

DEFAULT_TIMEOUT_S = 60.0
"""The bound a reader is promised (`--timeout`): a block's bytes, or EIO, within a minute,
whatever the service, a proxy or the network does (README, "How a read works")."""
