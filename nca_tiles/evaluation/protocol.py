"""The evaluation protocol: every metric for synthetic patches, bracketed by a floor and a ceiling.

A metric value means little alone (random-feature FD has no published scale), so each metric is
computed three times, always against held-out real patches the model never saw:

- floor:     held-out real vs training real   (two real samples: the best a model can hope for)
- synthetic: synthetic vs held-out real        (the result)
- ceiling:   colour-matched noise vs held-out real (right colours, no tissue: any model must beat it)

All three comparisons use the same number of patches n, because FD, KID's spread and C2ST power
all depend on n.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.evaluation import fibres, metrics, nuclei, spectrum, tissue_mix
from nca_tiles.errors import NcaTilesError

COMPARISONS: dict[str, str] = {
    "floor": "held-out real vs train real",
    "synthetic": "synthetic vs held-out real",
    "ceiling": "colour-matched noise vs held-out real",
}
# comparison -> the set compared with the held-out real patches
COMPARED_SETS: dict[str, str] = {"floor": "train", "synthetic": "synthetic", "ceiling": "noise"}

# metric key -> table label
METRICS: dict[str, str] = {
    "fd_random": "FD, random features",
    "fd_structure": "FD, grey structure",
    "fd_learned": "FD, learned features",
    "kid_random": "KID x 1e3, random features",
    "w1_haematoxylin": "W1 haematoxylin OD",
    "w1_eosin": "W1 eosin OD",
    "w1_dab": "W1 DAB OD",
    "c2st_auc": "C2ST AUC (0.5 = same)",
    "c2st_structure": "C2ST AUC, grey structure",
    "nuclei_density_per_mm2": "W1 nuclei per mm²",
    "nuclei_area_um2": "W1 nucleus area µm²",
    "nuclei_eccentricity": "W1 nucleus eccentricity",
    "nuclei_nearest_um": "W1 nearest nucleus µm",
    "spectrum": "power spectrum |Δ log10|",
    "fibre_coherence": "W1 fibre coherence",
}

# sets whose nuclei medians are printed, and their column titles
MEDIAN_SETS: dict[str, str] = {"heldout": "held-out real", "train": "train real", "synthetic": "synthetic",
                               "noise": "noise"}
MEDIAN_LABELS: dict[str, str] = {
    "density_per_mm2": "nuclei per mm²",
    "area_um2": "nucleus area µm²",
    "eccentricity": "nucleus eccentricity",
    "nearest_um": "nearest nucleus µm",
}


def _subsample(patches: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(patches) == n:
        return patches
    return patches[np.sort(rng.choice(len(patches), n, replace=False))]


@dataclass(frozen=True)
class _Measured:
    """One set of patches with everything the metrics compare: computed once per set."""

    patches: np.ndarray
    features: np.ndarray  # random-CNN features of the patches
    structure: np.ndarray  # grey, contrast-standardised copies (metrics.structure_patches)
    structure_features: np.ndarray
    nuclei: nuclei.NucleiStats
    spectrum: np.ndarray
    fibre_coherence: np.ndarray  # per patch (fibres.fibre_coherence)
    learned_features: np.ndarray | None  # of the self-supervised encoder, if one is given

    @classmethod
    def of(cls, patches: np.ndarray, seed: int, threshold: float, mpp: float, encoder=None) -> "_Measured":
        structure = metrics.structure_patches(patches)
        return cls(patches, metrics.random_features(patches, seed=seed), structure,
                   metrics.random_features(structure, seed=seed), nuclei.nuclei_stats(patches, threshold, mpp),
                   spectrum.power_spectrum(patches), fibres.fibre_coherence(patches, mpp),
                   None if encoder is None else encoder.features(patches))


def _compare(measured: _Measured, reference: _Measured, seed: int, kid_subset_size: int, kid_subsets: int,
             n_pixels: int, c2st_steps: int) -> dict[str, float]:
    kid_mean, kid_std = metrics.kernel_inception_distance(
        measured.features, reference.features, n_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    stains = metrics.stain_wasserstein(measured.patches, reference.patches, n_pixels=n_pixels, seed=seed)
    return {
        "fd_random": metrics.feature_frechet_distance(measured.features, reference.features),
        "fd_structure": metrics.feature_frechet_distance(measured.structure_features, reference.structure_features),
        **({} if measured.learned_features is None else
           {"fd_learned": metrics.feature_frechet_distance(measured.learned_features, reference.learned_features)}),
        "kid_random": kid_mean,
        "kid_random_std": kid_std,
        **{f"w1_{stain}": value for stain, value in stains.items()},
        "c2st_auc": metrics.c2st_auc(reference.patches, measured.patches, seed=seed, steps=c2st_steps),
        "c2st_structure": metrics.c2st_auc(reference.structure, measured.structure, seed=seed, steps=c2st_steps),
        **{f"nuclei_{name}": value for name, value in nuclei.nuclei_distances(measured.nuclei, reference.nuclei).items()},
        "spectrum": spectrum.spectrum_distance(measured.spectrum, reference.spectrum),
        "fibre_coherence": fibres.coherence_distance(measured.fibre_coherence, reference.fibre_coherence),
    }


def evaluate_patches(
    real_train: np.ndarray,
    real_heldout: np.ndarray,
    synthetic: np.ndarray,
    seed: int = 0,
    *,
    kid_subsets: int = 100,
    n_pixels: int = 200_000,
    c2st_steps: int = 300,
    mpp: float = 1.0,
    encoder=None,
) -> dict[str, Any]:
    """Every metric for the floor, synthetic and ceiling comparisons (see the module docstring).

    The three sets are cut to a common n (seeded random subsets). KID uses ``kid_subsets`` subsets
    of min(1000, n // 2) so its standard deviation is informative. ``mpp`` (µm/px of the patches)
    puts nuclei statistics in µm; their threshold comes from the held-out real patches. ``encoder``
    (``encoder.Encoder``): also the FD in its learned features. Returns a JSON-serialisable dict:
    ``{"note", "seed", "n", "patch_size", "comparisons": {name: description},
    "results": {name: {metric: value}}, "nuclei_medians": {set: {statistic: median}},
    "spectrum_bands": {"period_px": [[longest, shortest], ...], name: [power ratio per band]}}``.
    """
    real_train = metrics.check_patches(real_train, "real_train", min_count=4)
    real_heldout = metrics.check_patches(real_heldout, "real_heldout", min_count=4)
    synthetic = metrics.check_patches(synthetic, "synthetic", min_count=4)
    shapes = {real_train.shape[1:], real_heldout.shape[1:], synthetic.shape[1:]}
    if len(shapes) != 1:
        raise NcaTilesError(f"all patches must have the same size, got {sorted(shapes)}")

    rng = np.random.default_rng(seed)
    n = min(len(real_train), len(real_heldout), len(synthetic))
    sets = {
        "train": _subsample(real_train, n, rng),
        "heldout": _subsample(real_heldout, n, rng),
        "synthetic": _subsample(synthetic, n, rng),
    }
    # Noise coloured like the training patches: the model saw those colours, not the held-out ones.
    sets["noise"] = metrics.colour_matched_noise(sets["train"], n, seed=seed)
    threshold = nuclei.nuclei_threshold(sets["heldout"], mpp)
    measured = {name: _Measured.of(patches, seed, threshold, mpp, encoder) for name, patches in sets.items()}
    options = {
        "seed": seed,
        "kid_subset_size": max(2, min(1000, n // 2)),
        "kid_subsets": kid_subsets,
        "n_pixels": n_pixels,
        "c2st_steps": c2st_steps,
    }
    results = {
        comparison: _compare(measured[name], measured["heldout"], **options)
        for comparison, name in COMPARED_SETS.items()
    }
    return {
        "note": metrics.NOT_INCEPTION_NOTE,
        "seed": int(seed),
        "n": int(n),
        "mpp": float(mpp),
        "nuclei_threshold_haematoxylin_od": threshold,
        "patch_size": [int(s) for s in synthetic.shape[1:3]],
        "comparisons": dict(COMPARISONS),
        "results": results,
        "nuclei_medians": {name: nuclei.nuclei_medians(measured[name].nuclei) for name in MEDIAN_SETS},
        # Fibres or not: stroma runs one way, speckle and noise every way (fibres.py).
        "fibre_coherence_medians": {name: float(np.median(measured[name].fibre_coherence)) for name in MEDIAN_SETS},
        # Which scales the spectrum distance comes from, and which way: power ÷ the held-out real's.
        "spectrum_bands": {
            "period_px": [list(periods) for periods in spectrum.band_periods(min(synthetic.shape[1:3]))],
            **{comparison: spectrum.power_ratio(measured[name].spectrum, measured["heldout"].spectrum).tolist()
               for comparison, name in COMPARED_SETS.items()},
        },
        "encoder": None if encoder is None else encoder.trained_on,
    }


def _format_value(key: str, values: dict[str, float]) -> str:
    if key == "kid_random":
        return f"{values[key] * 1e3:.2f} ± {values['kid_random_std'] * 1e3:.2f}"
    if key == "c2st_auc":
        return f"{values[key]:.3f}"
    return f"{values[key]:.4g}"


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)]


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table: metric | real vs real (floor) | synthetic | noise (ceiling); then, where
    the results have them, each set's nuclei medians and its power per scale over the held-out
    real patches'."""
    hand_over = results.get("hand_over")
    floor = "inputs vs real (floor)" if hand_over else "real vs real (floor)"
    header = ["metric", floor, "synthetic", "noise (ceiling)"]
    rows = [
        [label] + [_format_value(key, results["results"][name]) for name in ("floor", "synthetic", "ceiling")]
        for key, label in METRICS.items()
        if key in results["results"]["floor"]  # the learned FD: with an encoder only
    ]
    lines = [
        f"Note: {results['note']}",
        f"n = {results['n']} patches per set, {results['patch_size'][0]} x {results['patch_size'][1]} px, "
        f"seed {results['seed']}; every column is compared with held-out real patches; "
        "lower is better, except C2ST AUC, where 0.5 is best.",
    ]
    kept, drawn = results.get("synthetic_kept"), results.get("synthetic_drawn")
    if drawn:
        lines.append(f"synthetic: {kept} patches with ≥ {results['min_tissue']:.0%} tissue of {drawn} drawn "
                     f"({kept / drawn:.0%})" + ("; the rest were glass (a layout level draws background)"
                                                if kept < drawn else "")
                     + (f"; cut from {results['canvas']} x {results['canvas']} px canvases" if results.get("canvas") else ""))
    if hand_over:
        lines.append(f"synthetic: level {hand_over['level']}'s redraw of the inputs, half of the {results['split']} "
                     f"split's real patches, handed over at t = {hand_over['t_start']} blurred as by a level "
                     f"{hand_over['ratio']}x coarser (a perfect one); the reference: the other half")
    lines += ["", *_text_table(header, rows)]
    titles = [("inputs" if hand_over and name == "train" else title) for name, title in MEDIAN_SETS.items()]
    medians = results.get("nuclei_medians")  # absent in results saved before it existed
    if medians:
        m_rows = [[label] + [f"{medians[name][key]:.4g}" for name in MEDIAN_SETS] for key, label in MEDIAN_LABELS.items()]
        lines += ["", *_text_table(["nuclei, median per set", *titles], m_rows)]
    fibre = results.get("fibre_coherence_medians")  # absent in results saved before it existed
    if fibre and not all(np.isnan(v) for v in fibre.values()):  # all NaN: strands too fine for the µm/px
        lines += ["", *_text_table(["eosin texture, median per set", *titles],
                                   [["fibre coherence (0–1)", *(f"{fibre[name]:.3f}" for name in MEDIAN_SETS)]])]
    bands = results.get("spectrum_bands")  # absent in results saved before it existed
    if bands:
        mpp = results.get("mpp", 1.0)
        b_rows = [[f"{longest * mpp:.3g}–{shortest * mpp:.3g} µm"] + [f"{bands[name][i]:.3g}" for name in
                                                                     ("floor", "synthetic", "ceiling")]
                  for i, (longest, shortest) in enumerate(bands["period_px"])]
        lines += ["", *_text_table(["power ÷ held-out real's, period", "inputs" if hand_over else "train real",
                                    "synthetic", "noise"], b_rows)]
    if results.get("tissue_mix"):  # a model against a store of several slides
        lines += ["", *tissue_mix.format_tissue_mix(results["tissue_mix"], _text_table)]
    if results.get("redraw_by_source"):  # a hand-over from a store of several slides
        lines += ["", *tissue_mix.format_redraw_by_source(results["redraw_by_source"], _text_table)]
    return "\n".join(lines)


# -- a model against a patch store, and a slide's seams ---------------------------------------------
MIN_PATCHES = 4
# Synthetic patches are held to the tissue criterion real ones were extracted with: a model with a
# layout level draws background too, and glass compared with tissue says nothing about tissue.
# Real held-out patches have ≥ 62 % stained pixels (the bundled store's val split), background ≤ 10 %.
MIN_TISSUE = 0.5
MAX_SAMPLING_ROUNDS = 8  # rounds of n candidates, at most, to find n tissue patches
# Synthetic patches are cut from canvases this wide, as a user cuts them from a slide: a patch
# sampled alone is all border, and a layout level 16× coarser decides it on 4 × 4 cells
# (docs/design.md §8). 512 px: 32² cells of such a level, 64 patches of 64² per canvas.
DEFAULT_CANVAS = 512
MAX_CANVAS = 2048  # sampled whole in memory (generate_levels): peak RSS 1.4 GB for the bundled model at 2048²


def cut_patches(canvas: np.ndarray, size: int) -> np.ndarray:
    """The non-overlapping size × size patches of an (H, W, 3) canvas, row by row."""
    rows, cols = canvas.shape[0] // size, canvas.shape[1] // size
    grid = canvas[: rows * size, : cols * size].reshape(rows, size, cols, size, canvas.shape[2])
    return grid.swapaxes(1, 2).reshape(rows * cols, size, size, canvas.shape[2])


def sample_tissue_patches(sample: Callable[[int, int], np.ndarray], n: int, min_tissue: float,
                          max_rounds: int = MAX_SAMPLING_ROUNDS) -> tuple[np.ndarray, int]:
    """n patches with at least ``min_tissue`` stained pixels (fewer if ``max_rounds`` rounds of n
    candidates hold fewer), and how many candidates were drawn. ``sample(count, seed)`` draws
    candidates; round r uses seed r, so the first round is what sampling n patches alone draws."""
    from nca_tiles.wsi.tissue import pixel_tissue_fractions

    kept, drawn = [], 0
    for round_ in range(max_rounds):
        candidates = sample(n, round_)
        drawn += len(candidates)
        kept.extend(candidates[pixel_tissue_fractions(candidates) >= min_tissue] if min_tissue > 0 else candidates)
        if len(kept) >= n:
            break
    return (np.stack(kept[:n]) if kept else np.zeros((0, *candidates.shape[1:]), np.uint8)), drawn


def synthetic_patches(model, count: int, size: int, canvas: int, seed: int, steps: int | tuple[int, ...] | None,
                      sampler: str, eta: float | tuple[float, ...] | None = None) -> np.ndarray:
    """``count`` size × size patches cut from canvas × canvas canvases of a SynthesisModel, canvas i
    seeded (seed, i); ``canvas == size``: each patch sampled alone (``generate_level_patches``)."""
    from nca_tiles.diffusion.levels import generate_level_patches, generate_levels
    from nca_tiles.diffusion.rng import derive_seed

    if canvas == size:
        return generate_level_patches(model, count, size=size, seed=seed, steps=steps, sampler=sampler, eta=eta)
    per_canvas = (canvas // size) ** 2
    canvases = (generate_levels(model, canvas, canvas, derive_seed(seed, i), steps, sampler, eta)
                for i in range(-(-count // per_canvas)))
    return np.concatenate([cut_patches(c, size) for c in canvases])[:count]


def _read_rows(images: Any, rows: np.ndarray) -> np.ndarray:
    rows = np.sort(np.asarray(rows))
    oindex = getattr(images, "oindex", None)  # zarr: orthogonal selection reads only those rows
    return np.asarray(oindex[rows] if oindex is not None else images[rows])


def evaluate_model(
    model: str | os.PathLike[str] | None,
    patches: str | os.PathLike[str],
    split: str = "test",
    n: int = 1024,
    seed: int = 0,
    steps: int | tuple[int, ...] | None = None,
    sampler: str = "ddim",
    device: str = "auto",
    say: Callable[[str], None] | None = None,
    min_tissue: float = MIN_TISSUE,
    canvas: int = DEFAULT_CANVAS,
    eta: float | tuple[float, ...] | None = None,
    hand_over: int | None = None,
    encoder=None,
) -> dict[str, Any]:
    """Sample ``n`` synthetic patches from ``model`` (None: the bundled one) and score them with
    ``evaluate_patches`` against ``n`` real patches of the store's ``split`` ("val" or "test"),
    the floor being ``n`` of its training patches. Fewer patches in the store: n shrinks to
    fit. Synthetic patches with fewer than ``min_tissue`` stained pixels (glass) are drawn again,
    as the real ones were extracted from tissue; how many were drawn is in the results
    (``synthetic_drawn``). Synthetic patches are cut from ``canvas`` × ``canvas`` canvases, one
    seed each (``canvas`` equal to the patch size: each patch sampled alone). ``say`` receives
    progress lines. Returns ``evaluate_patches``' results
    plus the inputs.

    ``hand_over``: score one level of a scale-space model instead — the synthetic patches are what
    that level makes of half the split's real patches (the inputs) handed over as a perfect coarser
    level would hand them (``levels.hand_over_patches``), so its own errors show apart from those
    of the levels below it; the other half is the reference, the inputs themselves the floor. The
    store holds patches at that level's µm/px.

    ``encoder`` (``encoder.Encoder``): also the Fréchet distance in its learned features."""
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.training.patches import open_patch_store

    say = say or (lambda line: None)
    if split not in ("val", "test"):
        raise NcaTilesError(f"unknown --split {split!r}: val or test (held-out patches)")
    if n < MIN_PATCHES:
        raise NcaTilesError(f"--n must be at least {MIN_PATCHES}, got {n}")
    if isinstance(steps, int) and steps < 1:  # per-level counts: checked against the model below
        raise NcaTilesError(f"--steps must be at least 1, got {steps}")
    if isinstance(eta, (int, float)) and not 0 <= eta <= 1:  # per-level values: checked against the model below
        raise NcaTilesError(f"--eta must be between 0 (deterministic DDIM) and 1, got {eta}")
    if not 0 <= min_tissue < 1:
        raise NcaTilesError(f"--min-tissue is a fraction in 0..1 (0: keep every patch), got {min_tissue}")
    patches = Path(patches)
    if not patches.exists():
        raise NcaTilesError(f"{patches} does not exist: give the patch store written by extract-patches")
    store = open_patch_store(patches)
    size = store.patch_size
    if canvas < size or canvas % size or canvas > MAX_CANVAS:
        raise NcaTilesError(f"--canvas must be a multiple of the store's {size} px patches up to {MAX_CANVAS}, "
                            f"got {canvas}")
    rng = np.random.default_rng(seed)
    picked = {}
    for name in ("train", split):
        rows = np.asarray(store.indices(name))
        if len(rows) < MIN_PATCHES:
            raise NcaTilesError(
                f"{patches} has {len(rows)} patches in its {name!r} split: evaluation needs at least {MIN_PATCHES}"
            )
        picked[name] = np.sort(rows if len(rows) <= n else rng.choice(rows, n, replace=False))
    n_used = min(n, *(len(rows) for rows in picked.values()))
    if n_used < n:
        say(f"note: the store has fewer patches than --n {n}: evaluating on {n_used} per set")
    real_train, real_heldout = _read_rows(store.images, picked["train"]), _read_rows(store.images, picked[split])
    encoder_mpp = None if encoder is None else encoder.trained_on.get("mpp")
    if isinstance(encoder_mpp, (int, float)) and abs(encoder_mpp - store.mpp) > 0.01 * store.mpp:
        say(f"note: the encoder learned {encoder_mpp:g} µm/px patches and these are {store.mpp:g} µm/px: its FD "
            "still ranks the sets (floor, synthetic and ceiling alike), but sees their structure less well")

    loaded = load_synthesis_model(model, device)
    if hand_over is not None and not 1 <= hand_over < len(loaded.levels):
        raise NcaTilesError(f"--hand-over {hand_over}: give a level above the coarsest of a scale-space model "
                            f"(this one has {len(loaded.levels)} level{'s' if len(loaded.levels) > 1 else ''}: "
                            f"{'1 to ' + str(len(loaded.levels) - 1) if len(loaded.levels) > 1 else 'none'})")
    level_mpp = loaded.mpp if hand_over is None else loaded.levels[hand_over].pipeline.mpp
    if abs(level_mpp - store.mpp) > 0.01 * store.mpp:
        which = "the model was" if hand_over is None else f"level {hand_over} was"
        raise NcaTilesError(
            f"{which} trained at {level_mpp:g} µm/px but {patches} holds {store.mpp:g} µm/px patches: "
            f"compare at the same resolution (extract-patches --mpp {level_mpp:g})"
        )
    from nca_tiles.diffusion.levels import hand_over_patches, level_etas, level_timesteps

    # Resolved per level (refusing bad step counts and η before any sampling): what the record says.
    level_steps = [len(ts) for ts in level_timesteps(loaded, sampler, steps)]
    etas = level_etas(loaded, eta)
    sources = [Path(slide["path"]).name for slide in store.slides]
    if hand_over is not None:
        # Half the held-out patches are handed over, the other half is the reference: a perfect
        # level's redraw would be as close to it as the inputs are (the floor), whatever the split's
        # mix of tissues.
        rows = rng.permutation(np.asarray(store.indices(split)))
        half = min(n, len(rows) // 2)
        if half < MIN_PATCHES:
            raise NcaTilesError(f"{patches} has {len(rows)} patches in its {split!r} split: a hand-over needs at "
                                f"least {2 * MIN_PATCHES}")
        input_rows = np.sort(rows[:half])  # sorted once: the order _read_rows reads them, and their sources'
        inputs, reference = _read_rows(store.images, input_rows), _read_rows(store.images, rows[half : 2 * half])
        say(f"level {hand_over}: redrawing {half} real {size} x {size} patches of the {split} split, handed over "
            f"at t = {loaded.levels[hand_over].t_start} ({sampler}, {level_steps[hand_over]} steps, "
            f"eta {etas[hand_over]:g}), against {half} others...")
        synthetic = hand_over_patches(loaded, hand_over, inputs, seed, steps, sampler, etas)
        say("computing metrics...")
        results = evaluate_patches(inputs, reference, synthetic, seed=seed, mpp=store.mpp, encoder=encoder)
        results["redraw_by_source"] = tissue_mix.redraw_by_source(
            inputs, synthetic, store.slide_index[input_rows], sources, store.mpp,
            results["nuclei_threshold_haematoxylin_od"])
        level = loaded.levels[hand_over]
        results.update(model=None if model is None else str(model), patches=str(patches), split=split, steps=steps,
                       level_steps=level_steps, sampler=sampler, eta=etas,
                       hand_over={"level": hand_over, "t_start": level.t_start,
                                  "ratio": loaded.levels[hand_over - 1].factor // level.factor})
        return results
    say(f"sampling {n_used} synthetic {size} x {size} patches ({sampler}) with ≥ {min_tissue:.0%} tissue, "
        f"cut from {canvas} x {canvas} canvases...")

    from nca_tiles.diffusion.rng import derive_seed

    def sample(count: int, round_: int) -> np.ndarray:
        round_seed = seed if round_ == 0 else derive_seed(seed, round_)
        return synthetic_patches(loaded, count, size, canvas, round_seed, steps, sampler, etas)

    synthetic, drawn = sample_tissue_patches(sample, n_used, min_tissue)
    if len(synthetic) < MIN_PATCHES:
        raise NcaTilesError(f"the model drew {len(synthetic)} patches with ≥ {min_tissue:.0%} tissue in {drawn}: "
                            "too few to evaluate (lower --min-tissue, or 0 to keep every patch)")
    if len(synthetic) < n_used:
        say(f"note: {len(synthetic)} of {drawn} synthetic patches had ≥ {min_tissue:.0%} tissue: "
            f"evaluating on {len(synthetic)} per set")
    say("computing metrics...")
    results = evaluate_patches(real_train, real_heldout, synthetic, seed=seed, mpp=store.mpp, encoder=encoder)
    results["tissue_mix"] = tissue_mix.tissue_mix(
        real_train, store.slide_index[picked["train"]], real_heldout, store.slide_index[picked[split]], synthetic,
        sources, store.mpp, encoder, seed, threshold=results["nuclei_threshold_haematoxylin_od"])
    results.update(model=None if model is None else str(model), patches=str(patches), split=split, steps=steps,
                   level_steps=level_steps, sampler=sampler, eta=etas, min_tissue=min_tissue, synthetic_drawn=drawn,
                   synthetic_kept=len(synthetic), canvas=canvas)
    return results


def recorded_chunk(slide: str | os.PathLike[str]) -> int | None:
    """The chunk side an nca-tiles slide was synthesized with, from its generator record."""
    from nca_tiles.wsi.slide import open_slide

    with open_slide(slide) as opened:
        chunk = (opened.metadata.generator or {}).get("chunk")
    try:
        return int(chunk) if chunk is not None else None
    except (TypeError, ValueError):
        return None


def evaluate_slide(slide: str | os.PathLike[str], chunk: int | None = None, real: Sequence[str | os.PathLike[str]] = (),
                   layout_mpp: float = 8.0, real_source_mpp: float | None = None) -> dict[str, Any]:
    """The seam score of a synthesized slide and its shifted-grid control
    (``metrics.seam_statistics``); ``chunk`` defaults to the one the slide records. With ``real``
    slides, also its layout at ``layout_mpp`` µm/px against theirs (``layout.evaluate_layout``)."""
    if chunk is None:
        chunk = recorded_chunk(slide)
        if chunk is None:
            raise NcaTilesError(f"{slide} records no chunk size: give --chunk, the chunk it was synthesized with")
    results = {"slide": str(slide), **metrics.seam_statistics(Path(slide), chunk)}
    if real:
        from nca_tiles.evaluation.layout import evaluate_layout, slide_layout

        results["layout"] = evaluate_layout([slide_layout(slide, layout_mpp)],
                                            [slide_layout(path, layout_mpp, real_source_mpp) for path in real])
    return results


def format_seam_report(results: dict[str, Any]) -> str:
    """``evaluate_slide``'s results as a few lines of text."""
    height, width = results["shape"]
    lines = [
        f"{results['slide']}: {width} x {height} px, chunk {results['chunk']} px",
        f"seam score {results['score']:.3f} (1.00 = no seam): border gradient {results['border_gradient']:.3f}, "
        f"interior {results['interior_gradient']:.3f}",
    ]
    if results["control_score"] is not None:
        lines.append(
            f"control {results['control_score']:.3f}: the same ratio on a grid shifted by {results['control_shift']} px; "
            "JPEG blocks lift both, a seam only the first"
        )
    if "layout" in results:
        from nca_tiles.evaluation.layout import format_layout_table

        lines += ["", format_layout_table(results["layout"])]
    return "\n".join(lines)
