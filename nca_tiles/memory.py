"""Keep the process's peak memory bounded by the chunk size, not by how many chunks ran.

glibc raises its mmap threshold every time a large block is freed (up to 32 MiB). After that,
window-sized buffers (MiB each) come from the heap instead of mmap, and freeing them in varied
sizes from several threads fragments the heap: the peak RSS then creeps up with the number of
chunks processed, i.e. with the canvas size. Pinning the threshold turns the dynamic adjustment
off. The pinned value sits above the per-band tensors of banded inference (~3 MB on a CPU),
which stay on the heap and are reused (mmapping them costs 2.3× the time), and below the
window-sized buffers (tens of MB), which are mmapped and returned to the system when freed.
Measured with benchmarks/bench_synthesis.py --sections 3: see the README.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 8 << 20


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere). Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        return False
