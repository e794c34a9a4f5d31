"""``nca-tiles evaluate``: quality metrics of a model against real patches, or a slide's seam score."""

from __future__ import annotations

from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError
from nca_tiles_cli.options import (
    compile_option,
    device_option,
    eta_option,
    model_option,
    seed_option,
    steps_option,
    threads_option,
)


@click.command(short_help="Quality metrics of a model against real patches, or a slide's seam score.")
@model_option()
@click.option("--patches", type=click.Path(path_type=Path), help="Patch store (.zarr from extract-patches) holding the real patches.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True, help="Held-out real patches to compare with.")
@click.option("--n", "n", type=int, default=1024, show_default=True, help="Patches per set (synthetic, held-out real, train real, noise).")
@seed_option()
@steps_option()
@click.option("--sampler", default="ddim", show_default=True, help="Sampler: ddim or ddpm.")
@eta_option()
@click.option("--min-tissue", type=float, default=0.5, show_default=True,
              help="Keep synthetic patches with at least this share of stained pixels, as real patches were "
                   "extracted from tissue; draw others instead (0: keep every patch).")
@click.option("--canvas", type=int, default=512, show_default=True,
              help="Cut the synthetic patches from canvases this wide, as from a slide (a multiple of the patch "
                   "size, at most 2048; the patch size itself: each patch sampled alone, all border).")
@click.option("--hand-over", "hand_over", type=int, metavar="LEVEL",
              help="Score one level of a scale-space model (1 = the one above the coarsest): its redraw of real "
                   "patches of the other held-out split, handed over as a perfect coarser level would. --patches "
                   "at that level's µm/px.")
@click.option("--encoder", default="bundled", show_default=True, metavar="DIR|bundled|none",
              help="Patch encoder for the learned-feature FD (a directory from train-encoder; none: skip it).")
@device_option()
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON to this file.")
@click.option("--slide", type=click.Path(path_type=Path), help="Score the seams of this synthesized slide (OME-TIFF or OME-Zarr) instead.")
@click.option("--chunk", type=int, help="With --slide: the chunk size it was synthesized with. Default: as the slide records.")
@click.option("--real", "real_slides", type=click.Path(path_type=Path), multiple=True,
              help="With --slide: real slides to compare its tissue layout with (repeatable).")
@click.option("--layout-mpp", type=float, default=8.0, show_default=True,
              help="With --real: µm/px at which tissue fraction, tissue regions and lumina are measured.")
@click.option("--real-source-mpp", type=float, help="With --real: µm/px of real slides whose metadata has none.")
@compile_option()
@threads_option()
def evaluate(
    model: Path | None,
    patches: Path | None,
    split: str,
    n: int,
    seed: int,
    steps: int | tuple[int, ...] | None,
    sampler: str,
    eta: float | tuple[float, ...] | None,
    min_tissue: float,
    canvas: int,
    hand_over: int | None,
    encoder: str,
    device: str,
    json_path: Path | None,
    slide: Path | None,
    chunk: int | None,
    real_slides: tuple[Path, ...],
    layout_mpp: float,
    real_source_mpp: float | None,
) -> None:
    """Measure how close a model's patches are to real held-out patches, or score a slide's seams.

    \b
    With --patches: sample n synthetic patches from --model and compare them
    with n held-out real patches (--split), beside two references: train vs
    held-out real (the floor) and colour-matched noise (the ceiling).
    Metrics: Fréchet distance and KID in the features of a fixed random CNN
    (NOT Inception-FID: not comparable to published numbers), and FD in the
    features of a small encoder trained on real patches (--encoder, from
    train-encoder: colour-blind by training, so it sees structure); Wasserstein-1
    of haematoxylin, eosin and DAB optical densities; a classifier two-sample
    test (AUC 0.5 = real and synthetic cannot be told apart); nuclei
    statistics; the power spectrum per scale; fibre coherence (whether the
    eosin texture runs one way, as stroma fibres do).
    A store of several slides adds the tissue mix: each slide's share of the
    held-out patches and of the synthetic ones (by a classifier trained on
    the train patches), with each one's nuclei and fibre medians.

    \b
    With --hand-over LEVEL: the synthetic patches are that level's redraw of
    real patches blurred as its coarser level hands them over (area-averaged
    and upsampled by the levels' ratio, re-noised to its first timestep):
    its own errors, apart from those of the levels below it.

    \b
    With --slide FILE [--chunk C]: the seam score, mean gradient across chunk
    borders / inside chunks (1.00 = no seam), and a control on a shifted grid
    (JPEG blocks lift both; a seam lifts only the score). The slide is read
    in strips, so any size fits in memory. With --real SLIDE...: the slide's
    tissue layout at --layout-mpp (tissue fraction, areas of tissue regions
    and lumina) against the real slides', beside a real-vs-real floor.
    """
    if slide is not None:
        if patches is not None or model is not None or hand_over is not None:
            raise NcaTilesError("give either --slide with --chunk (seam score) or --patches with --model, not both")
        from nca_tiles.evaluation.protocol import evaluate_slide, format_seam_report

        results = evaluate_slide(slide, chunk, real_slides, layout_mpp, real_source_mpp)
        click.echo(format_seam_report(results))
    else:
        if chunk is not None or real_slides:
            raise NcaTilesError("--chunk and --real go with --slide: give the slide to score")
        if patches is None:
            raise NcaTilesError("give --patches STORE (and --model) to evaluate a model, or --slide FILE --chunk C")
        from nca_tiles.evaluation.encoder import load_encoder
        from nca_tiles.evaluation.protocol import evaluate_model, format_table

        learned = None if encoder == "none" else load_encoder(None if encoder == "bundled" else Path(encoder))
        results = evaluate_model(model, patches, split, n, seed, steps, sampler, device,
                                 say=lambda line: click.echo(line, err=True), min_tissue=min_tissue,
                                 canvas=canvas, eta=eta, hand_over=hand_over, encoder=learned)
        click.echo(format_table(results))
    if json_path is not None:
        from nca_tiles.runtime.outputs import atomic_write_json

        try:
            atomic_write_json(json_path, results, sort_keys=False)
        except OSError as exc:
            raise NcaTilesError(f"cannot write {json_path}: {exc.strerror}") from None
        click.echo(f"wrote {json_path}", err=True)
