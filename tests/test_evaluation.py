"""The evaluation protocol and ``nca-tiles evaluate`` on real H&E crops from the sample slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nca_tiles.errors import NcaTilesError
from nca_tiles.evaluation.encoder import load_encoder
from nca_tiles.evaluation.protocol import (
    METRICS, MIN_TISSUE, evaluate_model, evaluate_patches, format_table, sample_tissue_patches)
from nca_tiles_cli.main import cli


@pytest.fixture(scope="module")
def results(real_crops: np.ndarray) -> dict:
    import torch
    from skimage.filters import gaussian

    train, heldout, other = real_crops[:96], real_crops[96:192], real_crops[192:288]
    # A stand-in for a mediocre model: real tissue, blurred (sigma 2 px).
    blurred = np.rint(gaussian(other, sigma=(0, 2, 2, 0), channel_axis=-1) * 255).astype(np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate_patches(train, heldout, blurred, seed=0, kid_subsets=20, n_pixels=20_000, c2st_steps=60,
                                encoder=load_encoder())
    finally:
        torch.set_num_threads(threads)


def test_floor_is_below_the_noise_ceiling_on_real_crops(results):
    floor, synthetic, ceiling = (results["results"][name] for name in ("floor", "synthetic", "ceiling"))
    for key in METRICS:
        assert floor[key] < ceiling[key], key
    assert abs(floor["c2st_auc"] - 0.5) < 0.2 and ceiling["c2st_auc"] > 0.95
    # Blurred real tissue lands between real and noise in random-feature FD, and in learned features.
    assert floor["fd_random"] < synthetic["fd_random"] < ceiling["fd_random"]
    assert floor["fd_learned"] < synthetic["fd_learned"] < ceiling["fd_learned"]


def test_grey_structure_metrics_are_blind_to_colour_but_not_to_blur(real_crops):
    """The random-feature FD and the C2ST see colour first: paler or hue-swapped real tissue scores
    far from real. On grey structure patches they score it as real and still see what blurring
    took away."""
    from skimage.filters import gaussian

    from nca_tiles.evaluation.metrics import (
        c2st_auc, feature_frechet_distance, random_features, structure_patches)

    reference, real = real_crops[:96], real_crops[192:288]
    pale = np.clip(real.astype(np.float32) * 0.7 + 70, 0, 255).round().astype(np.uint8)
    hue_swapped = np.ascontiguousarray(real[..., ::-1])
    blurred = np.rint(gaussian(real, sigma=(0, 2, 2, 0), channel_axis=-1) * 255).astype(np.uint8)

    def fd(features, patches) -> float:
        return feature_frechet_distance(features(reference), features(patches))

    def structure_features(patches) -> np.ndarray:
        return random_features(structure_patches(patches))

    def c2st_grey(patches) -> float:
        return c2st_auc(structure_patches(reference), structure_patches(patches), steps=150)

    floor = fd(structure_features, real)
    for recoloured in (pale, hue_swapped):
        assert fd(structure_features, recoloured) < 1.5 * floor
        assert fd(random_features, recoloured) > 5 * fd(random_features, real)
        assert c2st_auc(reference, recoloured, steps=150) > 0.95 and c2st_grey(recoloured) < 0.65
    assert fd(structure_features, blurred) > 5 * floor
    assert c2st_grey(blurred) > 0.9


def test_results_are_json_serialisable_and_complete(results):
    again = json.loads(json.dumps(results, allow_nan=False))
    assert again["n"] == 96 and again["patch_size"] == [64, 64] and again["seed"] == 0
    assert set(again["results"]) == {"floor", "synthetic", "ceiling"}
    for values in again["results"].values():
        assert set(METRICS) | {"kid_random_std"} == set(values)
    assert "NOT Inception" in again["note"]
    assert set(again["nuclei_medians"]) == {"heldout", "train", "synthetic", "noise"}
    assert set(again["spectrum_bands"]) == {"period_px", "floor", "synthetic", "ceiling"}
    for medians in again["nuclei_medians"].values():
        assert set(medians) == {"density_per_mm2", "area_um2", "eccentricity", "nearest_um"}
        assert medians["density_per_mm2"] > 0  # real crops (and their blur) have nuclei
    assert set(again["fibre_coherence_medians"]) == {"heldout", "train", "synthetic", "noise"}


def test_format_table(results):
    table = format_table(results)
    assert "NOT Inception" in table and "not comparable to published" in table
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert [cell.strip() for cell in header.split("|")] == ["metric", "real vs real (floor)", "synthetic", "noise (ceiling)"]
    for label in METRICS.values():
        assert label in table
    medians = next(line for line in table.splitlines() if line.startswith("nuclei, median per set"))
    assert [cell.strip() for cell in medians.split("|")][1:] == ["held-out real", "train real", "synthetic", "noise"]
    area = next(line for line in table.splitlines() if line.startswith("nucleus area µm²"))
    assert float(area.split("|")[3]) == pytest.approx(results["nuclei_medians"]["synthetic"]["area_um2"], rel=1e-3)
    fibre = next(line for line in table.splitlines() if line.startswith("fibre coherence"))
    assert float(fibre.split("|")[3]) == pytest.approx(results["fibre_coherence_medians"]["synthetic"], abs=1e-3)


def test_fibre_coherence_sees_blur_and_noise(results):
    """Two real samples agree; noise points every way (below real); a σ = 2 px blur takes the
    fine, many-way detail and leaves the edges of larger structures, which run one way within a
    window (above real). The W1 distance puts both far above the real floor — coherence is read
    beside the power per scale, which tells a smooth image from a fibrous one (fibres.py)."""
    medians, w1 = results["fibre_coherence_medians"], {k: v["fibre_coherence"] for k, v in results["results"].items()}
    assert abs(medians["train"] - medians["heldout"]) < 0.05
    assert medians["noise"] < medians["heldout"] < medians["synthetic"]
    assert w1["synthetic"] > 3 * w1["floor"] and w1["ceiling"] > 3 * w1["floor"]


def test_power_per_scale_says_where_the_blurred_set_lost_its_contrast(results):
    """A Gaussian blur of σ = 2 px keeps a 40–64 px period and takes almost all of a 2–3 px one:
    the per-band ratios say so, in order, while the real floor stays near 1 at every band."""
    bands = results["spectrum_bands"]
    assert bands["period_px"][0] == [64.0, pytest.approx(41.5, abs=0.1)] and bands["period_px"][-1][1] == 2.0
    synthetic, floor = np.array(bands["synthetic"]), np.array(bands["floor"])
    assert synthetic[0] > 0.7 and synthetic[-1] < 0.01
    # The finer the scale, the more the blur took (down to the last band, where uint8 rounding is all
    # that is left of either set).
    assert np.all(np.diff(synthetic[2:-1]) < 0)
    assert np.all((floor > 0.7) & (floor < 1.4))
    table = format_table(results).splitlines()
    header = next(line for line in table if line.startswith("power ÷ held-out real's"))
    assert [cell.strip() for cell in header.split("|")][1:] == ["train real", "synthetic", "noise"]
    finest = next(line for line in table if line.startswith("3.08–2 µm"))
    assert float(finest.split("|")[2]) == pytest.approx(synthetic[-1], rel=1e-2)


def test_evaluate_patches_refuses_bad_input(real_crops):
    good = real_crops[:8]
    with pytest.raises(NcaTilesError):
        evaluate_patches(good, good, np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(NcaTilesError):
        evaluate_patches(good, good, good.astype(np.float32))
    with pytest.raises(NcaTilesError):
        evaluate_patches(good, good, good[:, :32, :32])  # another patch size
    with pytest.raises(NcaTilesError):
        evaluate_patches(good[:2], good, good)  # too few


# --------------------------------------------------------------------------- CLI: model metrics


@pytest.fixture(scope="module")
def store_and_model(sample_slide: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A patch store of the sample slide at 0.5 µm/px, and an untrained tiny model at 0.5 µm/px
    (random non-zero weights: a fresh model's output layer is zero)."""
    import torch

    from nca_tiles.diffusion.checkpoint import save_model_dir
    from nca_tiles.diffusion.model import PRESETS, DiffNCA
    from nca_tiles.training.patches import extract_patches
    from nca_tiles.diffusion.schedule import ScheduleConfig

    root = tmp_path_factory.mktemp("evaluate")
    extract_patches([sample_slide], root / "patches.zarr", target_mpp=0.5, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiffNCA(PRESETS["tiny"])
        for parameter in model.to_update.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
    meta = {
        "model": PRESETS["tiny"].to_dict(),
        "schedule": ScheduleConfig().to_dict(),
        "data": {"mpp": 0.5, "patch_size": 64},
    }
    save_model_dir(root / "model", meta, model.state_dict())
    return root / "patches.zarr", root / "model"


def test_cli_evaluates_a_model_against_a_patch_store(store_and_model, tmp_path):
    patches, model = store_and_model
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--model", str(model), "--patches", str(patches), "--n", "16", "--steps", "2", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "NOT Inception" in result.output and "real vs real (floor)" in result.output
    saved = json.loads(out.read_text())
    assert saved["n"] == 16 and saved["split"] == "test" and saved["model"] == str(model)
    # what each level ran, resolved: the steps asked (and the η defaults) shared out per level
    assert (saved["steps"], saved["level_steps"], saved["eta"]) == (2, [2], [0.0])
    # an untrained model's colour noise is all "stained": nothing drawn again
    assert (saved["min_tissue"], saved["synthetic_kept"], saved["synthetic_drawn"]) == (MIN_TISSUE, 16, 16)
    assert "synthetic: 16 patches with ≥ 50% tissue of 16 drawn (100%)" in result.output
    # An untrained model is far from real tissue: above the floor in every distance.
    floor, synthetic = saved["results"]["floor"], saved["results"]["synthetic"]
    for key in ("fd_random", "fd_learned", "w1_haematoxylin", "w1_eosin"):
        assert synthetic[key] > floor[key], key
    assert "FD, learned features" in result.output and saved["encoder"]["mpp"] == 1.0
    assert "note: the encoder learned 1 µm/px patches and these are 0.5 µm/px" in result.output


def test_cli_evaluates_without_an_encoder_or_refuses_a_bad_one_in_one_line(store_and_model, tmp_path):
    patches, model = store_and_model
    args = ["evaluate", "--model", str(model), "--patches", str(patches), "--n", "8", "--steps", "1"]
    result = CliRunner().invoke(cli, [*args, "--encoder", "none", "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "FD, learned features" not in result.output and "FD, random features" in result.output
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["encoder"] is None and "fd_learned" not in saved["results"]["floor"]
    result = CliRunner().invoke(cli, [*args, "--encoder", str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "is not an encoder directory" in result.output


def test_evaluate_model_refuses_bad_numbers_before_any_work(store_and_model, tmp_path):
    patches, model = store_and_model
    with pytest.raises(NcaTilesError, match="--n must be at least 4"):
        evaluate_model(model, patches, n=3)
    with pytest.raises(NcaTilesError, match="--steps must be at least 1"):
        evaluate_model(model, patches, steps=0)
    with pytest.raises(NcaTilesError, match=r"--steps gives 2 step counts for a model of 1 level"):
        evaluate_model(model, patches, steps=(2, 3))  # one count per level, checked before sampling
    for bad in (-0.1, 1.5):
        with pytest.raises(NcaTilesError, match="--eta must be between 0"):
            evaluate_model(model, patches, eta=bad)
    with pytest.raises(NcaTilesError, match="does not exist"):
        evaluate_model(model, tmp_path / "missing.zarr")
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(NcaTilesError, match="--min-tissue is a fraction"):
            evaluate_model(model, patches, min_tissue=bad)


GLASS = np.full((8, 8, 3), 245, np.uint8)
TISSUE = np.broadcast_to(np.array([236, 180, 220], np.uint8), (8, 8, 3))


def test_synthetic_glass_is_drawn_again_until_n_tissue_patches():
    """A model with a layout level draws glass as well: those patches are replaced, as real patches
    were extracted from tissue; the first round is what sampling n patches alone draws."""
    seeds = []

    def sample(count, seed):  # every other candidate glass, marked by its round in the red channel
        seeds.append(seed)
        out = np.stack([GLASS if i % 2 else TISSUE for i in range(count)]).copy()
        out[..., 0, 0, 1] = seed
        return out

    kept, drawn = sample_tissue_patches(sample, 5, 0.5)
    assert (len(kept), drawn, seeds) == (5, 10, [0, 1])
    assert kept[:, 0, 0, 1].tolist() == [0, 0, 0, 1, 1]
    assert (kept[:, 1:, 1:] == TISSUE[1:, 1:]).all()
    kept, drawn = sample_tissue_patches(lambda count, seed: np.stack([GLASS] * count), 5, 0.5, max_rounds=3)
    assert (len(kept), drawn) == (0, 15)  # evaluate_model then says the model drew too few
    kept, drawn = sample_tissue_patches(lambda count, seed: np.stack([GLASS] * count), 5, 0.0)
    assert (len(kept), drawn) == (5, 5)  # 0: keep every patch


def test_the_cli_default_min_tissue_is_the_librarys():
    from nca_tiles_cli.evaluate import evaluate

    option = next(p for p in evaluate.params if p.name == "min_tissue")
    assert option.default == MIN_TISSUE


def test_cli_refuses_a_model_at_another_resolution(store_and_model, sample_slide, tmp_path):
    from nca_tiles.training.patches import extract_patches

    _, model = store_and_model
    extract_patches([sample_slide], tmp_path / "coarse.zarr", target_mpp=1.0, max_per_slide=64, progress=False)
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--patches", str(tmp_path / "coarse.zarr"), "--n", "8"])
    assert result.exit_code != 0 and "Error:" in result.output and "µm/px" in result.output, result.output


# --------------------------------------------------------------------------- CLI: seam score


def test_cli_seam_score_of_the_real_slide(sample_slide, tmp_path):
    out = tmp_path / "seam.json"
    result = CliRunner().invoke(cli, ["evaluate", "--slide", str(sample_slide), "--chunk", "101", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "seam score" in result.output and "2220 x 2967" in result.output
    stats = json.loads(out.read_text())
    assert stats["chunk"] == 101 and stats["score"] == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slide", "missing.ome.tif", "--chunk", "64"], "does not exist"),
        (["--slide", "{slide}"], "--chunk"),
        (["--slide", "{slide}", "--chunk", "0"], "positive"),
        (["--chunk", "64"], "--slide"),
        ([], "--patches"),
        (["--slide", "{slide}", "--chunk", "64", "--patches", "p.zarr"], "not both"),
    ],
)
def test_cli_errors_are_one_line(args, message, sample_slide):
    args = [arg.format(slide=sample_slide) for arg in args]
    result = CliRunner().invoke(cli, ["evaluate", *args])
    assert result.exit_code != 0
    assert "Error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output


def test_slide_evaluation_reads_its_chunk_and_compares_layout_with_real_slides(tmp_path, sample_slide):
    from helpers import save_test_model

    model = save_test_model(tmp_path / "m")
    out = tmp_path / "s.ome.tif"
    result = CliRunner().invoke(cli, ["synthesize", "--model", str(model), "--width", "200", "--height", "150",
                                      "--chunk", "48", "--steps", "2", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["evaluate", "--slide", str(out), "--real", str(sample_slide), "--layout-mpp", "4"])
    assert result.exit_code == 0, result.output
    assert "chunk 48 px" in result.output  # from the slide's generator record
    assert "layout at 4 µm/px" in result.output and "W1 log10 tissue region area" in result.output


def test_cut_patches_tiles_a_canvas_row_by_row():
    from nca_tiles.evaluation.protocol import cut_patches

    canvas = np.arange(6 * 9 * 3, dtype=np.int32).reshape(6, 9, 3)
    patches = cut_patches(canvas, 3)
    assert patches.shape == (6, 3, 3, 3)
    for i, (r, c) in enumerate((r, c) for r in range(2) for c in range(3)):
        assert np.array_equal(patches[i], canvas[3 * r : 3 * r + 3, 3 * c : 3 * c + 3])


def test_synthetic_patches_are_cut_from_seeded_canvases(store_and_model):
    from nca_tiles.diffusion.levels import generate_level_patches, generate_levels, load_synthesis_model
    from nca_tiles.diffusion.rng import derive_seed
    from nca_tiles.evaluation.protocol import cut_patches, synthetic_patches

    model = load_synthesis_model(store_and_model[1], "cpu")
    patches = synthetic_patches(model, 5, 16, 32, seed=3, steps=2, sampler="ddim")
    expected = np.concatenate([cut_patches(generate_levels(model, 32, 32, derive_seed(3, i), 2), 16) for i in (0, 1)])
    assert np.array_equal(patches, expected[:5])
    alone = synthetic_patches(model, 2, 16, 16, seed=3, steps=2, sampler="ddim")
    assert np.array_equal(alone, generate_level_patches(model, 2, size=16, seed=3, steps=2))
    # DDIM η reaches the sampler: stochastic steps draw other patches, seeded alike each time.
    noisy = synthetic_patches(model, 5, 16, 32, seed=3, steps=2, sampler="ddim", eta=1.0)
    assert not np.array_equal(noisy, patches)
    assert np.array_equal(noisy, synthetic_patches(model, 5, 16, 32, seed=3, steps=2, sampler="ddim", eta=1.0))


def test_evaluate_refuses_a_canvas_that_does_not_hold_whole_patches(store_and_model):
    from nca_tiles_cli.evaluate import evaluate as command
    from nca_tiles.evaluation.protocol import DEFAULT_CANVAS, MAX_CANVAS

    patches, model = store_and_model
    from nca_tiles.training.patches import open_patch_store

    size = open_patch_store(patches).patch_size
    for bad in (size // 2, size + size // 2, MAX_CANVAS + size):
        with pytest.raises(NcaTilesError, match=f"--canvas must be a multiple of the store's {size} px patches"):
            evaluate_model(model, patches, n=4, canvas=bad)
    assert next(p.default for p in command.params if p.name == "canvas") == DEFAULT_CANVAS


# --------------------------------------------------------------------------- one level's hand-over


@pytest.fixture(scope="module")
def scale_space_and_fine_store(sample_slide: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A two-level tiny model (2 µm/px, then 1 µm/px from t = 1: an untrained level handed a
    nearly clean state returns nearly that state) and a 1 µm/px store."""
    from helpers import save_test_scale_space_model

    from nca_tiles.training.patches import extract_patches

    root = tmp_path_factory.mktemp("hand-over")
    model = save_test_scale_space_model(root, factor=2, t_start=1)
    extract_patches([sample_slide], root / "fine.zarr", target_mpp=1.0, stride=32, progress=False)
    return model, root / "fine.zarr"


def test_cli_scores_one_levels_redraw_of_real_patches(scale_space_and_fine_store, tmp_path):
    model, store = scale_space_and_fine_store
    common = ["evaluate", "--model", str(model), "--patches", str(store), "--n", "16", "--steps", "2"]
    result = CliRunner().invoke(cli, [*common, "--hand-over", "1", "--json", str(tmp_path / "h.json")])
    assert result.exit_code == 0, result.output
    assert "level 1's redraw of the inputs, half of the test split's real patches, handed over at t = 1" in result.output
    assert "inputs vs real (floor)" in result.output
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["hand_over"] == {"level": 1, "t_start": 1, "ratio": 2} and 8 <= saved["n"] <= 16  # half the split
    # Handed real tissue blurred by 2 at t = 1, the level returns about that: far closer to the
    # held-out patches than the whole model drawing from noise (untrained levels: colour noise).
    whole = CliRunner().invoke(cli, [*common, "--json", str(tmp_path / "whole.json")])
    assert whole.exit_code == 0, whole.output
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert saved["results"]["synthetic"]["fd_random"] < 0.5 * whole["results"]["synthetic"]["fd_random"]
    # The inputs are the floor: the reference is as close to them as a perfect redraw would be.
    assert saved["results"]["floor"]["fd_random"] < saved["results"]["synthetic"]["fd_random"]


def test_hand_over_patches_are_a_pure_function_of_the_seed(scale_space_and_fine_store):
    from nca_tiles.diffusion.levels import hand_over_patches, load_synthesis_model
    from nca_tiles.training.patches import open_patch_store

    model, store = scale_space_and_fine_store
    real = open_patch_store(store).images[:6]
    loaded = load_synthesis_model(model, "cpu")
    a = hand_over_patches(loaded, 1, real, seed=3, steps=2)
    np.testing.assert_array_equal(hand_over_patches(loaded, 1, real, seed=3, steps=2, batch=4), a)  # any batching
    assert not np.array_equal(hand_over_patches(loaded, 1, real, seed=4, steps=2), a)
    # At t = 1 (ᾱ ≈ 1) the state handed over is the real patch area-averaged by 2 and upsampled.
    import torch

    from nca_tiles.diffusion.scale_space import relay_start

    blurred = relay_start(torch.from_numpy(real).permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1).numpy()
    assert np.abs(a - blurred).mean() < 4 < np.abs(a.astype(float) - real).mean()
    with pytest.raises(NcaTilesError, match="above the coarsest"):
        hand_over_patches(loaded, 0, real)


@pytest.mark.parametrize("args, message", [
    (["--hand-over", "0"], "--hand-over 0: give a level above the coarsest"),
    (["--hand-over", "2"], "1 to 1"),
])
def test_cli_refuses_a_hand_over_to_no_such_level(scale_space_and_fine_store, args, message):
    model, store = scale_space_and_fine_store
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--patches", str(store), "--n", "8", *args])
    assert result.exit_code != 0 and "Error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output


def test_cli_refuses_a_hand_over_for_a_single_level_or_at_another_resolution(scale_space_and_fine_store,
                                                                               store_and_model):
    model, _ = scale_space_and_fine_store
    half_um_store, single = store_and_model
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(single), "--patches", str(half_um_store),
                                      "--n", "8", "--hand-over", "1"])
    assert result.exit_code != 0 and "this one has 1 level: none" in result.output, result.output
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--patches", str(half_um_store),
                                      "--n", "8", "--hand-over", "1"])
    assert result.exit_code != 0 and "level 1 was trained at 1 µm/px" in result.output, result.output
