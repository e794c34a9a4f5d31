"""``nca-tiles build-model``: stack single-scale models into one scale-space model."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import ETAS, STEP_COUNTS


@click.command(short_help="Stack models trained at several µm/px into one scale-space model.")
@click.option("--level", "levels", type=click.Path(path_type=Path), multiple=True, required=True,
              help="A trained model (run dir, model dir or checkpoint), coarsest first; repeat for each level.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The scale-space model directory to write.")
@click.option("--t-start", "t_starts", type=int, multiple=True,
              help="Timestep at which each finer level takes over (one per level after the first). "
                   "Default: measured on --patches.")
@click.option("--patches", "patch_stores", type=click.Path(path_type=Path), multiple=True,
              help="Real patches at each finer level's µm/px (one store per level after the first), to measure "
                   "where its noise hides what the coarser level cannot draw.")
@click.option("--eta", type=ETAS, default=None,
              help="DDIM η each level samples with unless synthesize --eta says otherwise: X for every level, or "
                   "X,X,... coarse to fine, chosen with evaluate --hand-over's power per scale (docs/design.md §7). "
                   "Default: none recorded (0 on the coarsest, 1 on a cheap relay-started level, 0.3 on the finest).")
@click.option("--steps", type=STEP_COUNTS, default=None,
              help="DDIM steps each level takes unless synthesize --steps says otherwise: N,N,... coarse to fine "
                   "(docs/design.md §7, \"Steps per level\"). Default: none recorded (50 shared by the levels, "
                   "cheap coarse levels taking more).")
def build_model(levels, out, t_starts, patch_stores, eta, steps) -> None:
    """Stack single-scale models, trained on patches at coarser and finer µm/px, into one
    scale-space model: the noisy early denoising steps run on the coarse level (a cell is several
    pixels, so the rule reaches further at a fraction of the cost), the late steps at full
    resolution. The factor of each level is its µm/px over the finest one's (a power of two).
    """
    from nca_tiles.diffusion.levels import build_scale_space_model

    model = build_scale_space_model(out, list(levels), list(t_starts) or None, list(patch_stores) or None, eta, steps)
    click.echo(f"wrote {out}: {model.describe()}, model {model.hash}")
