"""The ``nca-tiles`` command group.

Each command lives in its own module and is imported only when it runs (or when its help is
shown), so ``nca-tiles --help`` stays instant: torch, zarr and dask are imported inside command
bodies.
"""

from __future__ import annotations

import errno
import importlib
import signal
import sys

import click

from nca_tiles import __version__
from nca_tiles.errors import NcaTilesError

# command name -> (module in this package, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "extract-patches": ("extract_patches", "extract_patches", "Extract tissue patches from slides into a zarr store."),
    "train": ("train", "train", "Train a Diff-NCA model on a patch store."),
    "synthesize": ("synthesize", "synthesize", "Synthesize a whole-slide image of any size, chunk by chunk."),
    "export": ("export", "export", "Export a kept canvas as pyramidal OME-TIFF or OME-Zarr."),
    "preview": ("preview", "preview", "Write a PNG thumbnail of a slide."),
    "info": ("info", "info", "Describe a patch store, model, preset or slide."),
    "evaluate": ("evaluate", "evaluate", "Quality metrics of a model against real patches, or a slide's seam score."),
    "train-encoder": ("train_encoder", "train_encoder",
                      "Train a patch encoder (self-supervised) for evaluate's learned-feature FD."),
    "build-model": ("build_model", "build_model", "Stack models trained at several µm/px into one scale-space model."),
    "demo": ("demo", "demo", "Run the whole pipeline on the bundled sample slide."),
}


# What an interrupted command leaves behind, and how to go on.
INTERRUPTED = {
    "train": "the last checkpoint is saved; run the same command with --resume to continue",
    "synthesize": "finished sweeps are kept; run the same command again to resume",
    "demo": "finished steps are kept; run the same command again to resume",
}
INTERRUPTED_DEFAULT = "no output was written; run the command again"

# What to do about an operating-system error, by errno.
OS_ERROR_HINTS = {
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.EROFS: "choose an output location on a writable disk",
    errno.ENOSPC: "free some space, or choose an output location on another disk; then run again",
    errno.EDQUOT: "free some space, or choose an output location on another disk; then run again",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file, not a folder",
    errno.EISDIR: "check the path: it is a folder, not a file",
    errno.EIO: "check the disk, then run again",
    errno.EMFILE: "raise the open-file limit (ulimit -n), then run again",
}
OS_ERROR_DEFAULT = "check the paths and the disk, then run the command again"


def os_error_message(exc: OSError) -> str:
    """One line for an error the operating system raised (permissions, full or read-only disk...)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    message = f"{what}: {where}" if where else what
    return " ".join(f"{message}: {OS_ERROR_HINTS.get(exc.errno, OS_ERROR_DEFAULT)}".split())


def end_progress_lines() -> bool:
    """Close the progress bars an aborted command left drawn: each ends its line, so a message
    printed next starts on a line of its own. True if there was one."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a broken bar must not hide the message
            pass
    return bool(bars)


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, _ = COMMANDS[name]
        module = importlib.import_module(f"{__package__}.{module_name}")
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above, so listing commands imports nothing.
        rows = [(name, short) for name, (_, _, short) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NcaTilesError as exc:
            end_progress_lines()
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            # Bad environment, not a bug: permissions, a full or read-only disk, a vanished file.
            end_progress_lines()
            raise click.ClickException(os_error_message(exc)) from None
        except KeyboardInterrupt as exc:
            # On a terminal the cursor is after a progress bar or the echoed ^C: start a new line.
            if not end_progress_lines() and click.get_text_stream("stderr").isatty():
                click.echo("", err=True)
            hint = INTERRUPTED.get(ctx.invoked_subcommand or "", INTERRUPTED_DEFAULT)
            click.echo(f"Interrupted: {hint}.", err=True)
            ctx.exit(128 + getattr(exc, "signum", signal.SIGINT))  # as a shell reports the signal


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nca-tiles")
def cli() -> None:
    """nca-tiles: learn tissue from a few slides, synthesize seamless gigapixel slides."""


if __name__ == "__main__":  # pragma: no cover
    cli()
