"""How many threads torch may use, so that several nca-tiles processes share the cores.

Several processes that each start one thread per core oversubscribe the machine: OpenMP threads
spin while they wait, and on 2 cores three synthesize runs with 2 threads each ran about 8× slower
than with 1 thread each. So every long-running command *claims* its threads in a per-user folder
on this host, and a process without ``--threads`` takes a fair share of the cores left by the
others, re-checked as it runs (``ThreadShare.rebalance``) so the share grows back when others end.
An ``OMP_NUM_THREADS`` in the environment caps that share (an explicit ``--threads`` does not).

Commands claim with ``thread_share`` (once per command run: nested uses join the outer claim);
long loops call ``rebalance_threads()``, a no-op when nothing claimed and cheap otherwise.

A claim is a file holding the thread count, ``flock``-ed by its process for its lifetime: the
kernel drops the lock when the process dies (kill -9 included), so a dead process's claim is
recognised and removed by the next one that looks.
"""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nca_tiles.errors import NcaTilesError

MAX_THREADS = 1024
REBALANCE_S = 1.0  # rebalance_threads looks at the others at most this often


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def env_thread_limit() -> int | None:
    """The thread count ``OMP_NUM_THREADS`` asks for (its first level), None if unset or invalid."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        return max(1, int(value))
    except ValueError:
        return None


def check_threads(threads: int | None) -> None:
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise NcaTilesError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


def claims_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"nca-tiles-threads-{os.getuid()}"


class ThreadShare:
    """This process's claim on the cores. ``threads`` None: a fair share, rebalanced on demand,
    and at most ``limit`` threads if given."""

    def __init__(self, threads: int | None = None, folder: Path | None = None, limit: int | None = None):
        check_threads(threads)
        self.fixed = threads
        self.limit = limit
        self.folder = folder or claims_dir()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{os.getpid()}"
        # Locked before it gets its visible name, so no one takes it for a dead process's claim.
        staging = self.folder / f".{os.getpid()}.new"
        self._fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.replace(staging, self.path)
        self.threads = 0
        self._claim = ""
        self.checked = 0.0  # time.monotonic() of the last rebalance
        self.rebalance()

    def _write_claim(self, kind: str, threads: int) -> None:
        claim = f"{kind} {threads}\n"
        if claim != self._claim:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, claim.encode(), 0)
            self._claim = claim

    def others(self) -> tuple[int, int]:
        """(threads claimed by fixed claims, number of auto claims) of other live processes."""
        fixed, auto = 0, 0
        for entry in self.folder.iterdir():
            if entry == self.path or not entry.name.isdigit():
                continue
            try:
                fd = os.open(entry, os.O_RDONLY)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # held: its process is alive
                    kind, _, count = os.pread(fd, 64, 0).decode().partition(" ")
                    if kind == "fixed":
                        fixed += int(count or 0)
                    else:
                        auto += 1
                else:  # nobody holds it: its process is gone
                    entry.unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
            finally:
                os.close(fd)
        return fixed, auto

    def rebalance(self) -> int:
        """Set torch's thread count to this process's share now; returns it."""
        import torch

        self.checked = time.monotonic()
        kind = "fixed"
        if self.fixed:
            threads = self.fixed
        else:
            fixed, auto = self.others()
            threads = max(1, (usable_cores() - fixed) // (auto + 1))
            if self.limit is not None and self.limit < threads:
                threads = self.limit  # claimed as fixed: the others share what it leaves
            else:
                kind = "auto"
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        self._write_claim(kind, threads)
        return threads

    def close(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ThreadShare":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_current: ThreadShare | None = None  # the claim of the command running in this process


@contextmanager
def thread_share(threads: int | None = None, folder: Path | None = None) -> Iterator[int]:
    """Claim torch threads for the duration of a command: ``threads`` exactly, or (None) a fair
    share of the usable cores left by other nca-tiles processes, at most ``OMP_NUM_THREADS``.
    Yields the thread count set. Nested uses join the outer claim; torch's previous thread count
    is restored at the end. Where no claim can be written (e.g. a read-only temporary folder) the
    count is set without one."""
    global _current
    check_threads(threads)
    if _current is not None:
        yield _current.threads
        return
    import torch

    before = torch.get_num_threads()
    try:
        share = ThreadShare(threads, folder, limit=env_thread_limit())
    except OSError:
        share = None
        torch.set_num_threads(threads or min(usable_cores(), env_thread_limit() or MAX_THREADS))
    _current = share
    try:
        yield torch.get_num_threads()
    finally:
        _current = None
        if share is not None:
            share.close()
        torch.set_num_threads(before)


def rebalance_threads(every_s: float = REBALANCE_S) -> int | None:
    """Re-check this process's fair share (at most every ``every_s`` seconds), so it shrinks when
    other nca-tiles processes start and grows back when they end. Returns the thread count; None
    (and does nothing) when no command claimed threads in this process. Call it from long loops."""
    share = _current
    if share is None:
        return None
    if time.monotonic() - share.checked < every_s:
        return share.threads
    return share.rebalance()
