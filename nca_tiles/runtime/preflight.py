"""Checks made before any work starts, so a job never computes for hours and then fails to write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from nca_tiles.errors import NcaTilesError


def nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its closest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str) -> None:
    """Refuse ``path`` (a file or folder to be created, or replaced) unless this process can
    create files where it goes. Tried for real with a probe file, because permission bits do not
    tell for root, read-only mounts or ACLs."""
    path = Path(path)
    folder = nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise NcaTilesError(f"cannot write {what} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nca-tiles-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NcaTilesError(
            f"cannot write {what} {path}: {folder} is not writable ({exc.strerror}): choose another location"
        ) from None
