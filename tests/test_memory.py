"""glibc tuning that keeps a long synthesis's peak RSS flat (nca_tiles.runtime.memory)."""

from __future__ import annotations

import sys

import pytest

from helpers import needs_proc, run_measuring

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")

FRAGMENTED_HEAP = """
import sys
import numpy as np
from nca_tiles.runtime.memory import configure_allocator, release_free_heap
assert configure_allocator()
before = status_kib("VmRSS")
# 3 MB buffers (below the pinned mmap threshold: heap), each followed by a small one that stays:
# freeing the big ones leaves holes that the heap cannot shrink past.
big, small = [], []
for _ in range(40):
    big.append(np.ones(3 << 20, dtype=np.uint8))
    small.append(np.ones(64 << 10, dtype=np.uint8))
big.clear()
held = status_kib("VmRSS")
release = sys.argv[1] == "release"
if release:
    assert release_free_heap()
print(before, held, status_kib("VmRSS"))
"""


@glibc_only
@needs_proc
def test_released_heap_holes_leave_the_resident_set():
    before, held, after = run_measuring(FRAGMENTED_HEAP, "release")
    assert held - before > 100 * 1024  # the freed 120 MB of holes are still resident
    assert after - before < 16 * 1024, (before, held, after)


@glibc_only
@needs_proc
def test_without_release_the_holes_stay_resident():
    # The control: what release_free_heap fixes is real.
    before, held, after = run_measuring(FRAGMENTED_HEAP, "keep")
    assert after - before > 100 * 1024, (before, held, after)
