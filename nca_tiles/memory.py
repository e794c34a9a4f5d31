"""Keep the process's peak memory bounded by the chunk size, not by how many chunks ran.

Two glibc behaviours make the peak RSS of a long synthesis creep up with the number of chunks
processed, i.e. with the canvas size, though every chunk needs the same memory:

- glibc raises its mmap threshold every time a large block is freed (up to 32 MiB). After that,
  window-sized buffers come from the heap instead of mmap. Pinning the threshold turns the dynamic
  adjustment off: blocks above it are mmapped and go back to the system when freed. The pinned
  value sits above the per-band temporaries of banded inference (~3 MB on a CPU), which stay on
  the heap and are reused (mmapping them costs 2.3× the time).
- Buffers of a few MB allocated and freed in varied sizes by several threads (zarr's reader and
  writer, the model, the noise) leave free holes inside the heap, which keep their pages. Handing
  free pages back after every group of chunks (``malloc_trim``) keeps the heap's resident part at
  what is in use.

Measured with benchmarks/bench_synthesis.py --sections 3: see the README.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 8 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # AttributeError if this is not glibc (e.g. musl)
        return libc
    except (OSError, AttributeError):
        return None


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere). Returns whether it was set."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_heap() -> bool:
    """Give the free pages of every malloc arena back to the system (no-op outside glibc).
    Costs about a millisecond: call it between groups of chunks. Returns whether memory was released."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
