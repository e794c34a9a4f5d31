"""Peak RSS of a snippet run in a fresh Python process, for the bounded-memory tests.

Read from VmHWM (Linux), the peak of the child's own address space: ru_maxrss would report the
pytest parent's peak, which Linux carries over fork and exec and which can hide the child's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")

PRELUDE = '''
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
def peak_kib():
    return status_kib("VmHWM")
'''


def run_measuring(script: str, *args: object) -> list[int]:
    """Run ``script`` (which may call ``peak_kib()`` or ``status_kib(field)`` and prints integers) in a child; its integers."""
    result = subprocess.run([sys.executable, "-c", PRELUDE + script, *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(v) for v in result.stdout.split()]
