"""torch.compile for the cell rule: one compiled copy per process, eager where it cannot be used.

The rule is compiled as a pure function of tensors (``model.cell_rule``), so every model in a
process — each pipeline a dask worker or the trainer's sample grids load — shares one compiled
copy. Inference compiles the rule on one band of rows with symbolic shapes: windows and bands of
any size reuse it (sizes of 1 are specialised by torch, so bands are never 1 row high). Training
compiles the whole-image rule, forward and backward, for its one batch shape. Numbers equal the
eager ones up to float rounding, so tiled still equals whole (docs/design.md §3).

Without a C++ compiler (CPU) or Triton and a C compiler (CUDA), or if compiling fails, the rule
runs eager, and the process says so in one line on stderr, once.

On a CPU ``--compile auto`` runs eager (``AUTO_DEVICES``). Where its trial finds the compiled
rule no faster than eager, the machine remembers it (:func:`remember_not_faster`, a small JSON
file in the user's cache directory, keyed by processor, device, threads and torch version, for
``VERDICT_DAYS``): later processes there run eager from the start instead of paying the compile
again (49 s on 2 CPU cores, measured) for a rule they would then drop.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nca_tiles.errors import NcaTilesError

MODES = ("auto", "on", "off")
# The default mode of this process and of the processes it starts (local dask workers load the
# model themselves, with load_model's default).
MODE_ENV = "NCA_TILES_COMPILE"

_compiled: dict[tuple[Callable, bool | None], Callable] = {}
_warm: set[Callable] = set()  # eager functions whose compiled copy has run once in this process
_disabled: str | None = None  # why compiling is off in this process, once it failed
_kept = False  # a --compile auto trial found the compiled rule faster here: later pipelines skip theirs

# Where this machine's --compile auto verdicts are kept (default: $XDG_CACHE_HOME/nca-tiles, else
# ~/.cache/nca-tiles), and for how long one holds: CPUs, drivers and torch change.
CACHE_ENV = "NCA_TILES_CACHE_DIR"
VERDICTS_FILE = "compile-verdicts.json"
VERDICT_DAYS = 30
# Devices where "auto" compiles at all (inference's trial, training from step 50). On a CPU the
# eager rule computes the MLP of fired cells only (model.fired_cell_rule), while the compiled rule
# is the dense one (inductor wants static shapes): the compiled inference step took 1.80× and the
# compiled training step 1.36× the eager one's time (docs/design.md §4). --compile still compiles.
AUTO_DEVICES = ("cuda",)


def auto_compiles(device: torch.device | str) -> bool:
    """Whether ``--compile auto`` may compile on ``device`` (``AUTO_DEVICES``)."""
    return torch.device(device).type in AUTO_DEVICES


def default_mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise NcaTilesError(f"{MODE_ENV}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def set_default_mode(mode: str | bool | None) -> None:
    """Set the default for this process and the worker processes it starts (True: on, False:
    off, None: leave it)."""
    if mode is None:
        return
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in MODES:
        raise NcaTilesError(f"compile mode {mode!r}: choose one of {', '.join(MODES)}")
    os.environ[MODE_ENV] = mode


def resolve_mode(mode: str | bool | None) -> str:
    """None: the process default; True/False: on/off."""
    if mode is None:
        return default_mode()
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in MODES:
        raise NcaTilesError(f"compile mode {mode!r}: choose one of {', '.join(MODES)}")
    return mode


def available(device: torch.device | str) -> bool:
    """Whether torch.compile can be used on ``device`` here; if not, says why once and turns
    compiling off for this process and the processes it starts."""
    if _disabled is not None:
        return False
    problem = _missing_toolchain(torch.device(device).type)
    if problem is not None:
        disable(problem)
        return False
    return True


@functools.cache
def _missing_toolchain(device_type: str) -> str | None:
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # what inductor itself runs: $CXX, else g++, checked with --version
        except Exception:
            return f"no working C++ compiler ({os.environ.get('CXX', 'g++')}; set CXX or install g++)"
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed"
        cc = os.environ.get("CC")
        if not (shutil.which(cc) if cc else any(shutil.which(c) for c in ("gcc", "clang", "cc"))):
            return f"no C compiler for Triton ({cc or 'gcc, clang or cc'}; set CC or install gcc)"
        return None
    return f"torch.compile is not set up for {device_type} here"


def disable(reason: str) -> None:
    """Run eager from now on, saying why in one line (once per process)."""
    _turn_off(reason, f"warning: torch.compile unavailable, running eager (slower): {reason}; "
                      "pass --no-compile to skip it")


def _turn_off(reason: str, line: str) -> None:
    """Eager from now on in this process and the processes it starts; ``line`` said once."""
    global _disabled
    if _disabled is None:
        _disabled = reason
        os.environ[MODE_ENV] = "off"  # worker processes started later need not find out again
        print(line, file=sys.stderr, flush=True)


def keep() -> None:
    """A ``--compile auto`` trial found the compiled rule faster than eager in this process."""
    global _kept
    _kept = True


def kept() -> bool:
    """Whether a trial in this process kept the compiled rule (a new pipeline needs none)."""
    return _kept


def not_faster(reason: str) -> None:
    """The compiled rule ran no faster than eager here (``--compile auto``'s trial): eager from
    now on in this process and the processes it starts, said in one line (once)."""
    _turn_off(reason, f"note: torch.compile {reason}: running eager from now on; later runs on this machine "
                      "skip the compile (--compile forces it)")


def cache_dir() -> Path:
    """This user's nca-tiles cache directory (``$NCA_TILES_CACHE_DIR`` if set)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nca-tiles"


def machine_key(device: torch.device | str) -> str:
    """What a compile verdict depends on: processor (or GPU), threads, torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        hardware = torch.cuda.get_device_name(index)
    else:
        hardware = cpu_model()
    return f"{device.type} | {hardware} | {torch.get_num_threads()} threads | torch {torch.__version__}"


@functools.cache
def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def _read_verdicts() -> dict:
    try:
        verdicts = json.loads((cache_dir() / VERDICTS_FILE).read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: a cache, so start afresh
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def remembered_not_faster(device: torch.device | str) -> str | None:
    """The date on which a trial on this machine found the compiled rule no faster than eager, if
    one did within ``VERDICT_DAYS``; else None."""
    entry = _read_verdicts().get(machine_key(device))
    try:
        when = datetime.datetime.fromisoformat(entry["measured"])
    except (TypeError, KeyError, ValueError):
        return None
    age = datetime.datetime.now(datetime.timezone.utc) - when
    return when.date().isoformat() if entry.get("faster") is False and age.days < VERDICT_DAYS else None


def remember_not_faster(device: torch.device | str, detail: str) -> None:
    """Keep a trial's "no faster" verdict for later processes on this machine. Written whole and
    renamed into place (a reader never sees half a file); failing to write only costs speed."""
    verdicts = _read_verdicts()
    verdicts[machine_key(device)] = {
        "faster": False,
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "detail": detail,
    }
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
            json.dump(verdicts, f, indent=1)
        os.replace(f.name, directory / VERDICTS_FILE)
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(f.name)


def skip_remembered(device: torch.device | str) -> bool:
    """Under ``--compile auto``: whether this machine remembers the compiled rule as no faster
    (then eager from now on in this process, said in one line)."""
    if _disabled is not None:
        return True
    measured = remembered_not_faster(device)
    if measured is None:
        return False
    _turn_off("remembered as no faster",
              f"note: torch.compile skipped: on this machine it ran no faster than eager (measured {measured}; "
              f"--compile forces it, or delete {cache_dir() / VERDICTS_FILE})")
    return True


def is_warm(fn: Callable) -> bool:
    """Whether the compiled copy of ``fn`` already ran in this process (compiling it again is
    almost free: new sizes reuse it)."""
    return fn in _warm


@contextlib.contextmanager
def warmth_unchanged() -> Iterator[None]:
    """Run the body (a calibration) without changing what this process's ``--compile auto``
    pipelines decide: what it compiles stays cached (compiling it again is then nearly free), but
    does not count as warm, which would make every later pipeline compile after one call."""
    warm = set(_warm)
    try:
        yield
    finally:
        _warm.intersection_update(warm)


def run(fn: Callable, *args, enabled: bool, dynamic: bool | None = None):
    """``fn(*args)``, through its compiled copy when ``enabled`` (and compiling works here)."""
    if not enabled or _disabled is not None:
        return fn(*args)
    compiled = _compiled.get((fn, dynamic))
    if compiled is None:
        compiled = _compiled[(fn, dynamic)] = torch.compile(fn, dynamic=dynamic)
    try:
        if dynamic:
            # Without duck sizing: a first window that happens to be square must not make
            # height == width a condition of the compiled rule (another compile for the others).
            from torch.fx.experimental import _config as fx_config

            with fx_config.patch(use_duck_shape=False):
                out = compiled(*args)
        else:
            out = compiled(*args)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # the compiler itself, not the numbers
        disable(str(error).strip().splitlines()[0][:200])
        return fn(*args)
    _warm.add(fn)
    return out


def forget_decisions() -> None:
    """Decide as a fresh process would — no trial's verdict, no failure, nothing warm — but keep
    the compiled copies (compiling again is then nearly free): tests, so that one test's compiling
    does not decide what the next one runs. A missing toolchain is found again by the next
    ``available``."""
    global _disabled, _kept
    _disabled = None
    _kept = False
    _warm.clear()


def reset() -> None:
    """Forget this process's compiled copies and any failure (tests: one test's compiling must not
    change what the next one runs)."""
    global _disabled, _kept
    _compiled.clear()
    _warm.clear()
    _disabled = None
    _kept = False
    _missing_toolchain.cache_clear()
    torch._dynamo.reset()
