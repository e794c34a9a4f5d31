"""Exclusive locks on output locations: two processes never write one job.

A lock is an ``flock`` on a file *beside* the location it guards (``.NAME.lock`` in the same
folder), so it can be taken before the location exists and survives its deletion. The kernel drops
an ``flock`` when its process dies, even by kill -9: a lock left by a dead process never blocks a
rerun. The file holds who took the lock (process, host, command), for the error message; it is
removed on release. On NFS, Linux maps ``flock`` to NFS byte-range locks, which hold across hosts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nca_tiles.errors import NcaTilesError


def lock_path(target: Path) -> Path:
    """The lock file that guards ``target``."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}


def describe_holder(path: Path, wait_s: float = 2.0) -> str:
    """Who holds the lock at ``path``, as written by the holder (best effort). The holder writes
    its record just after taking the lock, so a reader refused in between waits up to ``wait_s``
    for it to appear."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            h = json.loads(path.read_text())
            return f"process {h['pid']} on host {h['host']} (since {h['since']}: {h['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


def _acquire(path: Path) -> int:
    """An fd holding the lock on ``path``, or ``BlockingIOError`` if another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The previous holder removes the file on release: if it did so between our open and
            # our flock, we hold a lock on a file nobody else will ever open. Start again.
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def exclusive_lock(target: Path, what: str, alternative: str) -> Iterator[None]:
    """Hold the lock on ``target`` for the body, or refuse at once with a one-line error naming
    the holder. ``what`` names the location ("work dir"), ``alternative`` the way out
    ("use another --work-dir")."""
    target = Path(target)
    path = lock_path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path)
    except BlockingIOError:
        raise NcaTilesError(
            f"{what} {target} is in use by {describe_holder(path)}: wait for it to finish, or {alternative}"
        ) from None
    except OSError as exc:
        raise NcaTilesError(f"cannot lock {what} {target} ({exc.strerror}): choose a location you can write to") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        yield
    finally:
        try:
            os.unlink(path)  # while still holding it: see _acquire
        except OSError:
            pass
        os.close(fd)
