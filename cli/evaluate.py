"""``nca-tiles evaluate``: quality metrics of a model against real patches, or a slide's seam score."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nca_tiles.errors import NcaTilesError
from nca_tiles_cli.options import device_option, seed_option


@click.command(short_help="Quality metrics of a model against real patches, or a slide's seam score.")
@click.option("--model", type=click.Path(path_type=Path), help="Trained model (run directory or checkpoint). Default: the bundled model.")
@click.option("--patches", type=click.Path(path_type=Path), help="Patch store (.zarr from extract-patches) holding the real patches.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True, help="Held-out real patches to compare with.")
@click.option("--n", "n", type=int, default=1024, show_default=True, help="Patches per set (synthetic, held-out real, train real, noise).")
@seed_option()
@click.option("--steps", type=int, help="DDIM sampling steps (default 50; ddpm always takes all).")
@click.option("--sampler", default="ddim", show_default=True, help="Sampler: ddim or ddpm.")
@device_option()
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Also write the results as JSON to this file.")
@click.option("--slide", type=click.Path(path_type=Path), help="Score the seams of this synthesized slide (OME-TIFF or OME-Zarr) instead.")
@click.option("--chunk", type=int, help="With --slide: the chunk size the slide was synthesized with, in pixels.")
def evaluate(
    model: Path | None,
    patches: Path | None,
    split: str,
    n: int,
    seed: int,
    steps: int | None,
    sampler: str,
    device: str,
    json_path: Path | None,
    slide: Path | None,
    chunk: int | None,
) -> None:
    """Measure how close a model's patches are to real held-out patches, or score a slide's seams.

    \b
    With --patches: sample n synthetic patches from --model and compare them
    with n held-out real patches (--split), beside two references: train vs
    held-out real (the floor) and colour-matched noise (the ceiling).
    Metrics: Fréchet distance and KID in the features of a fixed random CNN
    (NOT Inception-FID: not comparable to published numbers); Wasserstein-1
    of haematoxylin, eosin and DAB optical densities; and a classifier
    two-sample test (AUC 0.5 = real and synthetic cannot be told apart).

    \b
    With --slide FILE --chunk C: the seam score, mean gradient across chunk
    borders / inside chunks (1.00 = no seam), and a control on a shifted grid
    (JPEG blocks lift both; a seam lifts only the score). The slide is read
    in strips, so any size fits in memory.
    """
    if slide is not None:
        if patches is not None or model is not None:
            raise NcaTilesError("give either --slide with --chunk (seam score) or --patches with --model, not both")
        if chunk is None:
            raise NcaTilesError("--slide needs --chunk: the chunk size the slide was synthesized with")
        _evaluate_slide(slide, chunk, json_path)
        return
    if chunk is not None:
        raise NcaTilesError("--chunk goes with --slide: give the slide to score")
    if patches is None:
        raise NcaTilesError("give --patches STORE (and --model) to evaluate a model, or --slide FILE --chunk C")
    if n < 4:
        raise NcaTilesError(f"--n must be at least 4, got {n}")
    if steps is not None and steps < 1:
        raise NcaTilesError(f"--steps must be at least 1, got {steps}")
    _evaluate_model(model, patches, split, n, seed, steps, sampler, device, json_path)


def _evaluate_slide(slide: Path, chunk: int, json_path: Path | None) -> None:
    from nca_tiles.evaluation.metrics import seam_statistics

    stats = seam_statistics(slide, chunk)
    height, width = stats["shape"]
    click.echo(f"{slide}: {width} x {height} px, chunk {chunk} px")
    click.echo(
        f"seam score {stats['score']:.3f} (1.00 = no seam): border gradient {stats['border_gradient']:.3f}, "
        f"interior {stats['interior_gradient']:.3f}"
    )
    if stats["control_score"] is not None:
        click.echo(
            f"control {stats['control_score']:.3f}: the same ratio on a grid shifted by {stats['control_shift']} px; "
            "JPEG blocks lift both, a seam only the first"
        )
    _write_json(json_path, {"slide": str(slide), **stats})


def _read_rows(images, rows):
    import numpy as np

    rows = np.sort(np.asarray(rows))
    oindex = getattr(images, "oindex", None)  # zarr: orthogonal selection reads only those rows
    return np.asarray(oindex[rows] if oindex is not None else images[rows])


def _evaluate_model(
    model: Path | None,
    patches: Path,
    split: str,
    n: int,
    seed: int,
    steps: int | None,
    sampler: str,
    device: str,
    json_path: Path | None,
) -> None:
    import numpy as np

    from nca_tiles.evaluation.protocol import evaluate_patches, format_table
    from nca_tiles.training.patches import open_patch_store
    from nca_tiles.diffusion.pipeline import generate_patches, load_model

    if not patches.exists():
        raise NcaTilesError(f"{patches} does not exist: give the patch store written by extract-patches")
    store = open_patch_store(patches)
    rng = np.random.default_rng(seed)
    picked = {}
    for name in ("train", split):
        rows = np.asarray(store.indices(name))
        if len(rows) < 4:
            raise NcaTilesError(f"{patches} has {len(rows)} patches in its {name!r} split: evaluation needs at least 4")
        picked[name] = rows if len(rows) <= n else rng.choice(rows, n, replace=False)
    n_used = min(n, *(len(rows) for rows in picked.values()))
    if n_used < n:
        click.echo(f"note: the store has fewer patches than --n {n}: evaluating on {n_used} per set", err=True)
    real_train, real_heldout = _read_rows(store.images, picked["train"]), _read_rows(store.images, picked[split])
    size = real_heldout.shape[1]

    pipeline = load_model(model, device)
    if abs(pipeline.mpp - store.mpp) > 0.01 * store.mpp:
        raise NcaTilesError(
            f"the model was trained at {pipeline.mpp:g} µm/px but {patches} holds {store.mpp:g} µm/px patches: "
            f"compare at the same resolution (extract-patches --mpp {pipeline.mpp:g})"
        )
    click.echo(f"sampling {n_used} synthetic {size} x {size} patches ({sampler})...", err=True)
    synthetic = generate_patches(pipeline, n_used, size=size, seed=seed, steps=steps, sampler=sampler)

    click.echo("computing metrics...", err=True)
    results = evaluate_patches(real_train, real_heldout, synthetic, seed=seed, mpp=store.mpp)
    results.update(model=None if model is None else str(model), patches=str(patches), split=split, steps=steps, sampler=sampler)
    click.echo(format_table(results))
    _write_json(json_path, results)


def _write_json(json_path: Path | None, results: dict) -> None:
    if json_path is None:
        return
    try:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    except OSError as exc:
        raise NcaTilesError(f"cannot write {json_path}: {exc.strerror}") from None
    click.echo(f"wrote {json_path}", err=True)
