"""Option helpers shared by several commands."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError


def seed_option(default: int = 0):
    return click.option("--seed", type=int, default=default, show_default=True, help="Random seed.")


def model_option():
    """``--model``: a path, or the name of a model that ships with nca-tiles
    (nca_tiles.diffusion.checkpoint.model_location); None is the bundled default."""
    return click.option(
        "--model", type=click.Path(path_type=Path), default=None,
        help="Run directory, model directory or checkpoint file, or a bundled model: default (the most realistic), "
             "fast (half its time per slide, blurrier). Default: default.")


def overwrite_option():
    return click.option("--overwrite", is_flag=True, help="Replace an existing output.")


def device_option():
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="auto: CUDA if available, else CPU.",
    )


def threads_option():
    """``--threads N``: torch threads for the whole command, claimed on this host so that several
    nca-tiles processes share the cores (nca_tiles.runtime.threads). The command runs inside the
    claim; its function does not see the option."""

    def decorator(command):
        @functools.wraps(command)
        def run_with_threads(*args, threads: int | None = None, **kwargs):
            from nca_tiles.runtime.threads import thread_share

            with thread_share(threads):  # checks 1 … 1024 first: a one-line error
                return command(*args, **kwargs)

        return click.option(
            "--threads", type=int, default=None, metavar="N",
            help="CPU threads for torch (1-1024). Default: a fair share of the usable cores (CPU affinity, "
                 "cgroup quota, at most OMP_NUM_THREADS) left by other nca-tiles processes, re-checked as it runs.",
        )(run_with_threads)

    return decorator


def compile_option():
    """``--compile/--no-compile``: torch.compile of the cell rule (nca_tiles.diffusion.compiled).
    Neither: "auto", compiled where it pays (a GPU; compiled.AUTO_DEVICES). Set as the process
    default for the command's run, so that every model it loads, and the local dask workers it
    starts, follow it; its function does not see the option."""

    def decorator(command):
        @functools.wraps(command)
        def run_with_compile(*args, compile_mode: bool | None = None, **kwargs):
            if compile_mode is None:
                return command(*args, **kwargs)
            import os

            from nca_tiles.diffusion.compiled import MODE_ENV, set_default_mode

            previous = os.environ.get(MODE_ENV)
            set_default_mode(compile_mode)
            try:
                return command(*args, **kwargs)
            finally:  # in-process callers (tests, scripts) keep their own default
                if previous is None:
                    os.environ.pop(MODE_ENV, None)
                else:
                    os.environ[MODE_ENV] = previous

        return click.option(
            "--compile/--no-compile", "compile_mode", default=None,
            help="torch.compile the model (CPU: needs a C++ compiler; CUDA: Triton). Default: eager on a CPU, "
                 "where the eager rule skips the cells that do not fire and the compiled one cannot; on a GPU "
                 "where it pays (long training runs; sampling once eager has taken about as long as compiling "
                 "would, and not again on a machine where it ran no faster than eager).",
        )(run_with_compile)

    return decorator


def out_path_option(help: str, required: bool = True):
    return click.option("--out", "out", type=click.Path(path_type=Path), required=required, help=help)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if path.exists() and not overwrite:
        raise NcaTilesError(f"{path} exists: pass --overwrite to replace it, or choose another --out")


class PerLevel(click.ParamType):
    """One number for every level of a model, or one per level, coarse to fine (``A,B,C``); checked
    against the model where it is loaded."""

    def __init__(self, kind: type, example: str):
        self.kind, self.example = kind, example
        self.name = "N[,N...]" if kind is int else "X[,X...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (self.kind, tuple)):
            return value
        try:
            values = tuple(self.kind(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a {self.kind.__name__} or a comma-separated list of them, one per level "
                      f"(e.g. {self.example})", param, ctx)
        return values[0] if len(values) == 1 else values


STEP_COUNTS = PerLevel(int, "50 or 50,26,17")
ETAS = PerLevel(float, "0 or 0,1,0")


def steps_option():
    return click.option(
        "--steps", type=STEP_COUNTS, default=None,
        help="Denoising steps (ddim: default the steps the model records for each level (build-model --steps), "
             "else 50, shared by a scale-space model's levels, cheap coarse levels taking more; N,N,...: each "
             "level's, coarse to fine; ddpm: always all).")


def eta_option():
    return click.option(
        "--eta", type=ETAS, default=None,
        help="DDIM η (0: deterministic, 1: as much fresh noise as DDPM); X,X,...: each level's, coarse to fine. "
             "Default: the η the model records for each level (build-model --eta); else 0, and on a scale-space "
             "model 1 on a cheap relay-started level and 0.3 on the finest (docs/design.md §7).")
