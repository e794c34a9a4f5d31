"""Keep the process's peak memory bounded by the chunk size, not by how many chunks ran.

Two glibc behaviours make the peak RSS of a long synthesis creep up with the number of chunks
processed, i.e. with the canvas size, though every chunk needs the same memory:

- glibc raises its mmap threshold every time a large block is freed (up to 32 MiB). After that,
  window-sized buffers come from the heap instead of mmap. Pinning the threshold turns the dynamic
  adjustment off: blocks above it are mmapped and go back to the system when freed. The pinned
  value sits above the per-band temporaries of banded inference (~3 MB on a CPU), which stay on
  the heap and are reused.
- Buffers of a few MB allocated and freed in varied sizes by several threads (zarr's reader and
  writer, the model, the noise) leave free holes inside the heap, which keep their pages. Handing
  free pages back after every group of chunks (``release_free_heap``) keeps the heap's resident
  part at what is in use.

Pinning the mmap threshold also stops glibc from raising its trim threshold with it, and at the
default 128 KiB every band's freed temporaries were handed back to the system and faulted in
again by the next band: 2–3× slower inference. The trim threshold is therefore set far above
any band's work; ``release_free_heap`` does the trimming, between groups.

Measured with benchmarks/bench_synthesis.py --sections 3: see the README. The functions that
measure (``status_kib``, ``peak_rss_bytes``...) serve the benchmarks and the bounded-memory tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 1 << 30


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


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold and leave trimming to ``release_free_heap`` (no-op elsewhere).
    Returns whether both were set."""
    libc = _glibc()
    return (libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)))


def release_free_heap() -> bool:
    """Give the free pages of every malloc arena back to the system (no-op outside glibc).
    Costs about a millisecond: call it between groups of chunks. Returns whether memory was released."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


# -- measuring this process's memory -----------------------------------------------------------
def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (``VmRSS``, ``VmHWM``...), or None without one (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def peak_kib() -> int | None:
    """Peak RSS of this process's own address space (VmHWM): unlike ru_maxrss, not the peak of
    the parent it was forked from, which Linux carries over fork and exec."""
    return status_kib("VmHWM")


def reset_peak_rss() -> None:
    """Make the peak-RSS mark (VmHWM) the current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def ru_maxrss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kilobytes on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM where there is one, else ru_maxrss."""
    hwm = peak_kib()
    return hwm * 1024 if hwm is not None else ru_maxrss_bytes()
