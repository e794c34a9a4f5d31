"""``nca-tiles train-encoder``: a patch encoder for ``evaluate``'s learned-feature FD."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles_cli.options import overwrite_option, seed_option, threads_option


@click.command(short_help="Train a patch encoder (self-supervised) for evaluate's learned-feature FD.")
@click.option("--patches", type=click.Path(path_type=Path), required=True,
              help="Patch store (.zarr from extract-patches): its training split is what the encoder learns.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The encoder directory to write.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Training steps.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Patches per step (two views each).")
@seed_option()
@overwrite_option()
@threads_option()
def train_encoder(patches: Path, out: Path, steps: int, batch_size: int, seed: int, overwrite: bool) -> None:
    """Train a small CNN on real patches by contrastive learning (SimCLR): two
    augmented views of a patch map close together, away from the other patches.
    The augmentations vary position, orientation and colour, so the features keep
    shape and texture. `evaluate --encoder DIR` then reports the Fréchet distance
    in these features beside the random-CNN one, which colour dominates.
    """
    from nca_tiles.evaluation.encoder import EncoderConfig, train_encoder_on_store

    config = EncoderConfig(steps=steps, batch_size=batch_size, seed=seed)
    encoder = train_encoder_on_store(patches, out, config, say=lambda line: click.echo(line, err=True),
                                     overwrite=overwrite)
    click.echo(f"wrote {out}: {encoder.config.features} features, trained {steps} steps on "
               f"{encoder.trained_on['patches']} patches at {encoder.trained_on['mpp']:g} µm/px")
