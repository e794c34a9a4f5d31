"""The tissue mix of ``evaluate``: each patch's most likely source slide, on real patches of two slides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nca_tiles.evaluation import tissue_mix
from nca_tiles.evaluation.encoder import load_encoder
from nca_tiles.evaluation.protocol import _text_table, evaluate_patches, format_table
from nca_tiles.training.patches import open_patch_store
from nca_tiles_cli.main import cli

TUMOUR = Path(__file__).resolve().parents[1] / "nca_tiles" / "data" / "training" / "ovary_hgsc_tumour.jpg"


@pytest.fixture(scope="module")
def two_slide_store(sample_slide: Path, tmp_path_factory) -> Path:
    """Skin (the sample slide) and ovarian carcinoma at 1 µm/px: two stains, two tissues."""
    from nca_tiles.training.patches import extract_patches

    out = tmp_path_factory.mktemp("mix") / "patches.zarr"
    extract_patches([sample_slide, TUMOUR], out, target_mpp=1.0, stride=24, max_per_slide=150,
                    source_mpp={"ovary_*": 0.25}, progress=False)  # val split: 14 skin, 16 tumour patches
    return out


def _split(store, name: str) -> tuple[np.ndarray, np.ndarray]:
    rows = store.indices(name)
    return np.asarray(store.images.oindex[rows]), store.slide_index[rows]


def test_the_classifier_tells_two_real_slides_apart_and_counts_each_sets_shares(two_slide_store):
    store = open_patch_store(two_slide_store)
    (train, train_src), (test, test_src) = _split(store, "train"), _split(store, "val")
    assert set(test_src) == {0, 1}
    tumour_only = test[test_src == 1]
    mix = tissue_mix.tissue_mix(train, train_src, test, test_src, tumour_only, ["skin", "tumour"], 1.0,
                                load_encoder())
    assert mix["heldout_accuracy"] >= 0.9
    # the held-out shares are the true ones; a set of one slide's patches is that slide's
    assert mix["shares"]["heldout"] == pytest.approx([np.mean(test_src == 0), np.mean(test_src == 1)])
    assert mix["shares"]["synthetic"][1] >= 0.9
    # no skin patch among the "synthetic" ones: too few for medians, said so, not made up
    assert mix["nuclei_medians"]["synthetic"][0] is None
    assert mix["nuclei_medians"]["heldout"][1]["density_per_mm2"] > 0
    json.dumps(mix)
    lines = tissue_mix.format_tissue_mix(mix, _text_table)
    assert any(line.startswith("skin") and "–" in line for line in lines)


def test_stain_statistics_alone_tell_two_stains_apart(two_slide_store):
    store = open_patch_store(two_slide_store)
    (train, train_src), (test, test_src) = _split(store, "train"), _split(store, "val")
    mix = tissue_mix.tissue_mix(train, train_src, test, test_src, test, ["skin", "tumour"], 1.0)
    assert mix["features"] == "stain statistics" and mix["heldout_accuracy"] >= 0.9
    # the same patches as held-out and as "synthetic": the same shares, but for misassigned ones
    assert np.allclose(mix["shares"]["synthetic"], mix["shares"]["heldout"], atol=1 - mix["heldout_accuracy"] + 1e-9)


def test_one_slide_has_no_mix(real_crops):
    sources = np.zeros(len(real_crops), np.int64)
    assert tissue_mix.tissue_mix(real_crops[:40], sources[:40], real_crops[40:80], sources[40:80], real_crops[80:120],
                                 ["skin"], 0.5) is None
    results = evaluate_patches(real_crops[:16], real_crops[16:32], real_crops[32:48], kid_subsets=4,
                               n_pixels=2_000, c2st_steps=10)
    assert "tissue mix" not in format_table(results)  # patches without sources: no table


def test_the_fit_is_a_pure_function_of_its_inputs(two_slide_store):
    store = open_patch_store(two_slide_store)
    train, train_src = _split(store, "train")
    features = tissue_mix.mix_features(train)
    a, b = (tissue_mix.fit_sources(features, train_src, 2, seed=0) for _ in range(2))
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias)


def test_cli_prints_the_mix_of_a_model_against_a_store_of_two_slides(two_slide_store, tmp_path):
    import torch

    from nca_tiles.diffusion.checkpoint import save_model_dir
    from nca_tiles.diffusion.model import PRESETS, DiffNCA
    from nca_tiles.diffusion.schedule import ScheduleConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiffNCA(PRESETS["tiny"])
        for parameter in model.to_update.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
    meta = {"model": PRESETS["tiny"].to_dict(), "schedule": ScheduleConfig().to_dict(),
            "data": {"mpp": 1.0, "patch_size": 64}}
    save_model_dir(tmp_path / "model", meta, model.state_dict())
    out = tmp_path / "m.json"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(tmp_path / "model"), "--patches", str(two_slide_store),
                                      "--split", "val", "--n", "16", "--steps", "1", "--min-tissue", "0",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "tissue mix, source slide" in result.output
    assert "cmu_small_region.svs" in result.output and "ovary_hgsc_tumour.jpg" in result.output
    saved = json.loads(out.read_text())["tissue_mix"]
    assert saved["sources"] == ["cmu_small_region.svs", "ovary_hgsc_tumour.jpg"]
    for shares in saved["shares"].values():
        assert sum(shares) == pytest.approx(1.0)


# --------------------------------------------------------------------------- a hand-over, per source


def test_a_redraw_is_scored_against_its_own_inputs_slide_by_slide(two_slide_store):
    from nca_tiles.evaluation import fibres, nuclei

    store = open_patch_store(two_slide_store)
    inputs, sources = _split(store, "val")
    threshold = nuclei.nuclei_threshold(inputs, 1.0)
    # a "redraw" that keeps the skin and swaps every tumour patch for a skin one
    skin, tumour = inputs[sources == 0], inputs[sources == 1]
    redraws = inputs.copy()
    redraws[sources == 1] = skin[np.arange(len(tumour)) % len(skin)]
    by_source = tissue_mix.redraw_by_source(inputs, redraws, sources, ["skin", "tumour"], 1.0, threshold)
    assert by_source["patches"] == [len(skin), len(tumour)]
    medians = by_source["nuclei_medians"]
    assert medians["inputs"][1] == {**nuclei.nuclei_medians(nuclei.nuclei_stats(tumour, threshold, 1.0)),
                                    "fibre_coherence": float(np.median(fibres.fibre_coherence(tumour, 1.0)))}
    assert medians["redraws"][0] == medians["inputs"][0]  # kept
    assert medians["redraws"][1] != medians["inputs"][1]  # the swapped slide shows it, the kept one does not
    # too few patches of a slide: no medians made up
    few = tissue_mix.redraw_by_source(inputs[:20], redraws[:20], np.r_[np.zeros(17, int), np.ones(3, int)],
                                      ["skin", "tumour"], 1.0, threshold)
    assert few["nuclei_medians"]["inputs"][1] is None and few["nuclei_medians"]["redraws"][1] is None
    json.dumps(by_source)
    lines = tissue_mix.format_redraw_by_source(few, _text_table)
    assert any(line.startswith("tumour") and "–" in line for line in lines)
    assert tissue_mix.redraw_by_source(inputs, redraws, np.zeros(len(inputs), int), ["skin"], 1.0, threshold) is None


def test_cli_prints_a_hand_overs_nuclei_per_source_slide(two_slide_store, tmp_path):
    from helpers import save_test_scale_space_model

    model = save_test_scale_space_model(tmp_path, factor=2, t_start=1)
    out = tmp_path / "h.json"
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--patches", str(two_slide_store),
                                      "--split", "val", "--n", "16", "--steps", "2", "--hand-over", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "redraw by source slide" in result.output
    saved = json.loads(out.read_text())
    by_source = saved["redraw_by_source"]
    assert by_source["sources"] == ["cmu_small_region.svs", "ovary_hgsc_tumour.jpg"]
    assert sum(by_source["patches"]) == saved["n"] and min(by_source["patches"]) > 0
    # the inputs' medians are those of the inputs: the tumour's nuclei are the denser ones
    inputs = by_source["nuclei_medians"]["inputs"]
    assert inputs[1]["density_per_mm2"] > inputs[0]["density_per_mm2"]


def test_results_saved_before_fibre_coherence_still_print():
    """A tissue mix saved before fibre coherence existed has no such key: its cells print as "–"."""
    old = {"sources": ["skin", "tumour"], "features": "stain statistics", "heldout_accuracy": 1.0,
           "shares": {"heldout": [0.5, 0.5], "synthetic": [1.0, 0.0]},
           "nuclei_medians": {"heldout": [{"density_per_mm2": 4000.0, "area_um2": 20.0}] * 2,
                              "synthetic": [{"density_per_mm2": 3000.0, "area_um2": 25.0}, None]}}
    lines = tissue_mix.format_tissue_mix(old, _text_table)
    skin = next(line for line in lines if line.startswith("skin"))
    assert [cell.strip() for cell in skin.split("|")][-2:] == ["–", "–"]
    assert [cell.strip() for cell in skin.split("|")][3:5] == ["4000", "3000"]
