"""Output files and folders: written atomically, one writer at a time, temporaries that a rerun
can recognise.

Every file or folder nca-tiles writes goes through ``atomic_output``: it is written under a
temporary name in its folder and renamed when complete, so ``out`` is never half-written. A
writer killed with -9 cannot remove its temporaries, so they are named after the tool and the
output (``.NAME.nca-tiles-KIND-UUID.tmp``); whoever holds the output's lock (``output_lock``)
knows that every such temporary of ``out`` belongs to a dead writer and removes it
(``remove_stale_temporaries``). Scratch folders elsewhere (the export's pyramid levels) also
carry a hash of ``out``'s path, so that outputs of the same name in different folders never take
each other's scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.locking import exclusive_lock

TAG = "nca-tiles"
_held: dict[Path, int] = {}  # outputs this process holds the lock of -> the holding thread
_held_guard = threading.Lock()


def _key(out: Path) -> Path:
    return Path(out).absolute()


@contextmanager
def output_lock(out: Path, what: str = "output") -> Iterator[None]:
    """Hold the lock on ``out`` for the body; re-entrant within one thread (a job that holds its
    output's lock calls writers that take it too); another process is refused at once, with
    ``what`` naming ``out`` in the message."""
    key = _key(out)
    me = threading.get_ident()
    with _held_guard:
        mine = _held.get(key) == me
    if mine:
        yield
        return
    with exclusive_lock(Path(out), what, "choose another --out"):  # named as given; locked absolute
        with _held_guard:
            _held[key] = me
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)


def holds_output_lock(out: Path) -> bool:
    with _held_guard:
        return _held.get(_key(out)) == threading.get_ident()


def _path_tag(out: Path) -> str:
    return hashlib.sha256(str(_key(out)).encode()).hexdigest()[:8]


def temporary_path(out: Path, kind: str) -> Path:
    """A new temporary name beside ``out`` (kind: "new" for the file being written, "old" for a
    replaced output not yet removed)."""
    out = _key(out)
    return out.with_name(f".{out.name}.{TAG}-{kind}-{uuid.uuid4().hex[:12]}.tmp")


def scratch_prefix(out: Path) -> str:
    """Prefix of ``out``'s scratch folders (in any folder)."""
    return f".{_key(out).name}.{TAG}-scratch-{_path_tag(out)}-"


def _is_temporary_of(name: str, out: Path) -> bool:
    base = re.escape(_key(out).name)
    return bool(
        re.fullmatch(rf"\.{base}\.{TAG}-(new|old)-[0-9a-f]{{12}}\.tmp", name)
        or (name.startswith(scratch_prefix(out)) and name.endswith(".tmp"))
    )


def remove_stale_temporaries(out: Path, *folders: Path) -> list[Path]:
    """Remove the temporaries of ``out`` left by killed writers, in ``out``'s folder and in
    ``folders`` (scratch locations). Only while holding ``out``'s lock: then no live writer of
    ``out`` exists. Returns what was removed."""
    if not holds_output_lock(out):
        raise RuntimeError(f"remove_stale_temporaries({out}) needs the output's lock")
    removed = []
    for folder in {_key(out).parent, *(Path(f).absolute() for f in folders)}:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if not _is_temporary_of(entry.name, out):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except OSError:
                pass  # not ours to fail on: the new write goes on under another name
    return removed


def _remove(path: Path) -> None:
    """Remove a temporary file or folder, if there is one; a failure keeps the error that is
    on its way (a rerun under the lock removes what is left)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _move_into_place(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``. A file replaces a file in one atomic rename; a folder cannot
    replace anything in one step, so an existing ``out`` is moved aside first, and removed only
    once ``new`` has its name (put back if that rename fails)."""
    if not new.is_dir() or not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    old = temporary_path(out, "old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


@contextmanager
def atomic_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Write ``out`` atomically: yields a temporary path beside it (``temporary_path(out,
    "new")``) where the body creates a file or a folder; when the body returns, that is renamed
    to ``out``, replacing an existing one; when it raises, it is removed. Its folder is created
    if missing."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = temporary_path(out, "new")
    try:
        yield new
        _move_into_place(new, out)
    except BaseException:
        _remove(new)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (fsynced before the rename)."""
    with atomic_output(path) as new:
        with open(new, "xb") as f:  # the usual permissions (umask), unlike mkstemp's 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, sort_keys: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def os_error_message(exc: OSError, out: Path) -> NcaTilesError:
    """A one-line error for a failed write of ``out`` (tifffile reports a full disk as a short
    write, without errno: the free space says it)."""
    from nca_tiles.runtime.preflight import nearest_existing

    reason = (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()[0]
    where = f" ({exc.filename})" if exc.filename else ""
    folder = nearest_existing(_key(out).parent)
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free under {folder}"
    except OSError:
        free = ""
    return NcaTilesError(f"writing {out} failed: {reason}{where}{free}: free space or choose another --out, then rerun")
