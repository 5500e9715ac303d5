"""Set-up of an ebsfuse process before any thread starts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

# glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8
# glibc gives each of up to 8 x cores threads an arena of its own. Blocks are allocated in a
# worker thread and freed on the trio thread a moment later, so with 64 workers each arena
# keeps a block or two it no longer needs: 15-20 MiB of peak RSS in a download (measured with
# scripts/bench-download: 110-114 MiB, 96-100 with 1, 2 or 4 arenas, at the same speed).
# Large allocations take the arena's lock only once per block, so four are plenty.
MALLOC_ARENAS = 4


def limit_malloc_arenas() -> None:
    """Fewer malloc arenas (glibc only; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
