"""The ``nca-tiles`` command group.

Each command lives in its own module and is imported only when it runs (or when its help is
shown), so ``nca-tiles --help`` stays instant: torch, zarr and dask are imported inside command
bodies.
"""

from __future__ import annotations

import importlib

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
    "demo": ("demo", "demo", "Run the whole pipeline on the bundled sample slide."),
}


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
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted: progress is saved; run the same command again to resume (train: add --resume).", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="nca-tiles")
def cli() -> None:
    """nca-tiles: learn tissue from a few slides, synthesize seamless gigapixel slides."""


if __name__ == "__main__":  # pragma: no cover
    cli()
