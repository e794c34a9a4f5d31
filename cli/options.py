"""Option helpers shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError


def seed_option(default: int = 0):
    return click.option("--seed", type=int, default=default, show_default=True, help="Random seed.")


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


def out_path_option(help: str, required: bool = True):
    return click.option("--out", "out", type=click.Path(path_type=Path), required=required, help=help)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if path.exists() and not overwrite:
        raise NcaTilesError(f"{path} exists: pass --overwrite to replace it, or choose another --out")
