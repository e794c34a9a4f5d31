"""Tissue mix: which real slide each patch looks like most, so a score can be read as mix or make.

A model trained on several slides draws its own mix of their tissues, and the held-out patches
have theirs (each slide's share of the store's area). FD and the nuclei distances mix both
errors: a model that draws the ovarian tumour three times as often as the held-out patches hold it
scores worse even if it drew each tissue well. A linear classifier trained on the store's training
patches (stain statistics, and the learned encoder's features where one is given) assigns every
patch to its most likely source slide; the shares per set and each source's nuclei medians say how
much of a gap is the mix (docs/design.md §8, "Tissue mix"). Synthetic patches lie off the real
manifold, so their assignment is a nearest guess: the classifier's accuracy on held-out real
patches is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nca_tiles.evaluation import fibres, metrics, nuclei

L2_PENALTY = 1e-2  # on the standardised features: a few hundred patches, tens of features
LBFGS_ITERATIONS = 500
MIN_PATCHES_FOR_MEDIANS = 5  # a source's nuclei medians from fewer patches say little


def stain_statistics(patches: np.ndarray) -> np.ndarray:
    """Per patch (N, 12): mean and standard deviation of the haematoxylin, eosin and DAB optical
    densities and of R, G, B in 0..1 — the hue and contrast that tell one slide's stain from another's."""
    hed = metrics.stain_optical_density(patches, n_pixels=None).reshape(len(patches), -1, 3)
    rgb = patches.reshape(len(patches), -1, 3) / 255.0
    return np.concatenate([hed.mean(1), hed.std(1), rgb.mean(1), rgb.std(1)], axis=1).astype(np.float32)


def mix_features(patches: np.ndarray, encoder=None) -> np.ndarray:
    """The classifier's input: stain statistics, plus the encoder's features where one is given."""
    stains = stain_statistics(patches)
    return stains if encoder is None else np.concatenate([stains, encoder.features(patches)], axis=1)


@dataclass(frozen=True)
class SourceClassifier:
    """Multinomial logistic regression on standardised features (weights from :func:`fit_sources`)."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (features - self.mean) / self.scale
        return np.argmax(z @ self.weight.T + self.bias, axis=1)


def fit_sources(features: np.ndarray, labels: np.ndarray, classes: int, seed: int = 0) -> SourceClassifier:
    """Fit :class:`SourceClassifier` to ``labels`` in 0..classes-1 (L-BFGS, L2 penalty; seeded)."""
    import torch

    mean, scale = features.mean(0), features.std(0) + 1e-6
    x = torch.as_tensor((features - mean) / scale, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(x.shape[1], classes)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + L2_PENALTY * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return SourceClassifier(mean, scale, linear.weight.detach().numpy().copy(), linear.bias.detach().numpy().copy())


def _shares(labels: np.ndarray, classes: int) -> list[float]:
    return (np.bincount(labels, minlength=classes) / max(1, len(labels))).tolist()


def _medians_by_source(patches: np.ndarray, labels: np.ndarray, classes: int, threshold: float,
                       mpp: float) -> list[dict[str, float] | None]:
    """Each source's nuclei medians and median fibre coherence (None where fewer than
    MIN_PATCHES_FOR_MEDIANS patches have it)."""
    out: list[dict[str, float] | None] = []
    for source in range(classes):
        picked = patches[labels == source]
        out.append({**nuclei.nuclei_medians(nuclei.nuclei_stats(picked, threshold, mpp)),
                    "fibre_coherence": float(np.median(fibres.fibre_coherence(picked, mpp)))}
                   if len(picked) >= MIN_PATCHES_FOR_MEDIANS else None)
    return out


def tissue_mix(train: np.ndarray, train_sources: np.ndarray, heldout: np.ndarray, heldout_sources: np.ndarray,
               synthetic: np.ndarray, source_names: list[str], mpp: float, encoder=None,
               seed: int = 0, threshold: float | None = None) -> dict[str, Any] | None:
    """Each source slide's share of the held-out real patches (their true sources) and of the
    synthetic ones (assigned by a classifier trained on ``train``), with each source's nuclei
    medians in both; the classifier's accuracy on the held-out patches. None where the training
    patches come from fewer than two slides (nothing to tell apart). JSON-serialisable.
    ``threshold``: the nuclei threshold the other nuclei statistics used (None: taken from
    ``heldout``, as ``evaluate_patches`` takes it)."""
    classes = len(source_names)
    if len(np.unique(train_sources)) < 2:
        return None
    classifier = fit_sources(mix_features(train, encoder), train_sources, classes, seed)
    assigned_heldout = classifier.predict(mix_features(heldout, encoder))
    assigned_synthetic = classifier.predict(mix_features(synthetic, encoder))
    threshold = nuclei.nuclei_threshold(heldout, mpp) if threshold is None else threshold
    return {
        "sources": list(source_names),
        "features": "stain statistics" + ("" if encoder is None else " + learned features"),
        "heldout_accuracy": float(np.mean(assigned_heldout == heldout_sources)),
        "shares": {"heldout": _shares(heldout_sources, classes), "synthetic": _shares(assigned_synthetic, classes)},
        "nuclei_medians": {
            "heldout": _medians_by_source(heldout, heldout_sources, classes, threshold, mpp),
            "synthetic": _medians_by_source(synthetic, assigned_synthetic, classes, threshold, mpp),
        },
    }


def _median_cell(table: dict[str, Any]):
    """A table cell of one source's median: table["nuclei_medians"][set][source][statistic], "–" where
    None (or, in results saved before it existed, no fibre coherence)."""

    def median(which: str, i: int, key: str) -> str:
        values = table["nuclei_medians"][which][i]
        value = None if values is None else values.get(key)
        return "–" if value is None else f"{value:.3g}" if key == "fibre_coherence" else f"{value:.4g}"

    return median


def format_tissue_mix(mix: dict[str, Any], table) -> list[str]:
    """Lines of the tissue-mix table (``table``: the protocol's plain-text table writer)."""

    median = _median_cell(mix)
    rows = [[name, f"{mix['shares']['heldout'][i]:.2f}", f"{mix['shares']['synthetic'][i]:.2f}",
             median("heldout", i, "density_per_mm2"), median("synthetic", i, "density_per_mm2"),
             median("heldout", i, "area_um2"), median("synthetic", i, "area_um2"),
             median("heldout", i, "fibre_coherence"), median("synthetic", i, "fibre_coherence")]
            for i, name in enumerate(mix["sources"])]
    header = ["tissue mix, source slide", "held-out share", "synthetic share", "nuclei/mm² held-out",
              "synthetic", "area µm² held-out", "synthetic", "fibre coherence held-out", "synthetic"]
    return [f"tissue mix: each patch's most likely source slide, by a linear classifier on the train patches' "
            f"{mix['features']}",
            f"(held-out real patches assigned right: {mix['heldout_accuracy']:.0%}; synthetic ones are a nearest "
            f"guess); nuclei and fibre-coherence medians per source (–: under {MIN_PATCHES_FOR_MEDIANS} patches)", *table(header, rows)]


def redraw_by_source(inputs: np.ndarray, redraws: np.ndarray, sources: np.ndarray, source_names: list[str],
                     mpp: float, threshold: float) -> dict[str, Any] | None:
    """A hand-over's nuclei per source slide: each input patch's redraw comes from the input's slide,
    so no classifier is needed. The whole set's medians average tissues a level redraws differently
    (one gaining nuclei, another losing them, docs/design.md §8, "Tissue mix"). None for a store of
    one slide. JSON-serialisable."""
    classes = len(source_names)
    if classes < 2:
        return None
    return {
        "sources": list(source_names),
        "patches": np.bincount(sources, minlength=classes).tolist(),
        "nuclei_medians": {
            "inputs": _medians_by_source(inputs, sources, classes, threshold, mpp),
            "redraws": _medians_by_source(redraws, sources, classes, threshold, mpp),
        },
    }


def format_redraw_by_source(by_source: dict[str, Any], table) -> list[str]:
    """Lines of the hand-over's per-source nuclei table."""

    median = _median_cell(by_source)
    columns = (("density_per_mm2", "nuclei/mm²"), ("area_um2", "area µm²"), ("nearest_um", "nearest µm"),
               ("fibre_coherence", "fibre coherence"))
    header = ["redraw by source slide", "patches"]
    for _, label in columns:
        header += [f"{label} inputs", "redraws"]
    rows = [[name, str(by_source["patches"][i])]
            + [median(which, i, key) for key, _ in columns for which in ("inputs", "redraws")]
            for i, name in enumerate(by_source["sources"])]
    return [f"nuclei and fibre-coherence medians of each source slide's inputs and their redraws (–: under {MIN_PATCHES_FOR_MEDIANS} "
            "patches)", *table(header, rows)]
