"""``nca-tiles demo``: the whole pipeline on the bundled sample slide, and its comparison figure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nca_tiles.bounds import check_int, check_seed

SAMPLE_SLIDE = Path(__file__).parent / "data" / "sample" / "cmu_small_region.svs"
PANEL = 512  # side of the real and synthetic panels, in pixels at the model's µm/px
ZOOM_CROP = 96  # side of the crop around a chunk corner, shown enlarged
ZOOM = 3
# The demo reads its whole slide into memory for the figure (8192² px: 192 MiB) and takes minutes
# per megapixel on a CPU; larger slides are for `nca-tiles synthesize`.
MAX_SIDE = 8192
# 2 × 2 chunks of 512: a chunk corner at the centre for the zoom, and minutes on 2 CPU cores with the
# bundled model's recorded steps (1280² until 2026-12-07, when its fine steps doubled).
DEMO_SIDE = 1024
MIN_SIDE = 2


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def patches(self) -> Path:
        return self.root / "patches.zarr"

    @property
    def slide(self) -> Path:
        return self.root / "synthetic.ome.tif"

    @property
    def figure(self) -> Path:
        return self.root / "real_vs_synthetic.png"

    @property
    def thumbnail(self) -> Path:
        return self.root / "synthetic_thumbnail.png"


@dataclass(frozen=True)
class DemoResult:
    paths: DemoPaths
    width: int
    height: int
    mpp: float

    def summary(self) -> str:
        paths = self.paths
        return (
            f"done. In {paths.root}/:\n"
            f"  {paths.slide.name}  pyramidal OME-TIFF, {self.width} × {self.height} px at {self.mpp} µm/px\n"
            f"  {paths.figure.name}  real vs synthetic tissue, and a zoom across a chunk border\n"
            f"  {paths.thumbnail.name}  a thumbnail of the synthetic slide\n"
            f"  {paths.patches.name}  the real patches (nca-tiles info {paths.patches})\n"
            f"Open the slide in QuPath: File > Open... > {paths.slide} (read by Bio-Formats, pixel size in µm).\n"
            f"Bigger: nca-tiles synthesize --width 100000 --height 100000 --out big.ome.tif --dry-run"
        )


def run_demo(out: str | os.PathLike[str] = "demo", *, model: str | os.PathLike[str] | None = None,
             width: int = DEMO_SIDE, height: int = DEMO_SIDE, chunk: int = 512, steps: int | None = None, seed: int = 0,
             device: str = "auto", overwrite: bool = False, progress: bool = True,
             say: Callable[[str], None] | None = None) -> DemoResult:
    """The whole pipeline on the bundled sample slide, into the folder ``out``: patches, a
    ``width`` × ``height`` slide from ``model`` (None: the bundled one) as a pyramidal OME-TIFF,
    the real-vs-synthetic figure and a thumbnail. ``steps``: DDIM steps, None for as many as
    ``synthesize`` takes by default, so that the demo shows what a user's slides look like. Rerun
    to resume an interrupted demo; a finished one is refused unless ``overwrite``. ``say``
    receives a line per step; ``progress`` shows the synthesis' progress bar."""
    from nca_tiles.runtime.preflight import check_writable

    out = Path(out)
    model = None if model is None else Path(model)
    check_writable(out, "--out")  # before minutes of work
    import tifffile

    from nca_tiles.diffusion.levels import level_timesteps, load_synthesis_model
    from nca_tiles.errors import NcaTilesError
    from nca_tiles.synthesis.slide_job import SlideRequest, default_work_dir, synthesize_slide
    from nca_tiles.training.patches import extract_patches
    from nca_tiles.training.sample_grid import save_png
    from nca_tiles.wsi.thumbnail import write_preview

    say = say or (lambda line: None)
    loaded = load_synthesis_model(model, device)
    check_options(width, height, chunk, steps, seed, loaded.max_halo, loaded.timesteps)
    paths = DemoPaths(out)
    if paths.figure.exists():
        if not overwrite:
            raise NcaTilesError(f"a finished demo is already in {out}: pass --overwrite to run it again, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    say(f"1/4 extracting tissue patches from the sample slide ({SAMPLE_SLIDE.name}) ...")
    if not paths.patches.exists():
        result = extract_patches([SAMPLE_SLIDE], paths.patches, target_mpp=loaded.mpp, progress=False)
        say(f"    {result.n_patches} patches of 64 px at {loaded.mpp} µm/px -> {paths.patches}")

    counts = [len(ts) for ts in level_timesteps(loaded, "ddim", steps)]
    say(f"2/4 synthesizing a {width} × {height} px slide in {chunk} px chunks, "
        f"{' + '.join(map(str, counts))} DDIM steps{' (coarse to fine)' if len(counts) > 1 else ''} ...")
    # The slide appears only when complete, and its work dir goes only after that: a slide with
    # no work dir is finished (synthesize_slide cannot tell it from a stranger's without the
    # manifest); with one, the job resumes, or finishes the clean-up a killed run left.
    if not paths.slide.exists() or default_work_dir(paths.slide).exists():
        req = SlideRequest(width=width, height=height, out=paths.slide, seed=seed, chunk=chunk, steps=steps)
        synthesize_slide(req, loaded, progress=progress)

    say("3/4 drawing real vs synthetic tissue and a zoom across a chunk border ...")
    synthetic_full = tifffile.imread(paths.slide, level=0)
    side = min(PANEL, width, height)
    real = densest_tissue_region(SAMPLE_SLIDE, loaded.mpp, side)
    y0, x0 = (height - side) // 2, (width - side) // 2
    figure = comparison_figure(real, synthetic_full[y0 : y0 + side, x0 : x0 + side], synthetic_full, chunk)
    save_png(figure, paths.figure)

    say("4/4 writing a thumbnail ...")
    write_preview(paths.slide, paths.thumbnail, size=1024)
    return DemoResult(paths, width, height, loaded.mpp)


def check_options(width: int, height: int, chunk: int, steps: int | None, seed: int, halo: int, timesteps: int) -> None:
    """Refuse numbers the demo cannot use, before it writes anything."""
    for option, side in (("--width", width), ("--height", height)):
        check_int(option, side, MIN_SIDE, MAX_SIDE, " (larger slides: nca-tiles synthesize)" if side > MAX_SIDE else "")
    check_int("--chunk", chunk, 2 * halo, MAX_SIDE, f" (at least twice the model's halo of {halo} px)")
    if steps is not None:  # None: synthesize's default
        check_int("--steps", steps, 1, timesteps, " (DDIM steps: at most the model's timesteps)")
    check_seed("--seed", seed)


def densest_tissue_region(slide_path: Path, mpp: float, side: int) -> np.ndarray:
    """The ``side``² region (at ``mpp``) of the slide with the most tissue, as uint8 (side, side, 3)."""
    from nca_tiles.wsi.slide import open_slide, read_region_at_mpp
    from nca_tiles.wsi.tissue import tissue_mask

    with open_slide(slide_path) as slide:
        size0 = side * mpp / slide.mpp  # the region's side in level-0 pixels
        mask = tissue_mask(slide, downsample=16)
        width, height = slide.dimensions
        step = size0 / 4
        xs, ys = np.meshgrid(np.arange(0, max(1, width - size0), step), np.arange(0, max(1, height - size0), step))
        fractions = mask.fractions(xs.ravel(), ys.ravel(), size0)
        best = int(np.argmax(fractions))
        return read_region_at_mpp(slide, float(xs.ravel()[best]), float(ys.ravel()[best]), side, side, mpp)


def chunk_corner_crop(image: np.ndarray, chunk: int, crop: int) -> tuple[np.ndarray, int, int]:
    """A crop centred on the chunk corner nearest the image centre; returns it and the corner's
    position inside the crop (row, column)."""
    h, w = image.shape[:2]
    cy = min(max(chunk, round(h / 2 / chunk) * chunk), h - 1)
    cx = min(max(chunk, round(w / 2 / chunk) * chunk), w - 1)
    y0 = int(np.clip(cy - crop // 2, 0, max(0, h - crop)))
    x0 = int(np.clip(cx - crop // 2, 0, max(0, w - crop)))
    return image[y0 : y0 + crop, x0 : x0 + crop], cy - y0, cx - x0


def comparison_figure(real: np.ndarray, synthetic: np.ndarray, synthetic_full: np.ndarray, chunk: int) -> np.ndarray:
    """Real tissue | synthetic tissue | an enlarged crop across a chunk corner, with the chunk
    borders marked in the margin (not on the pixels, so a seam would stay visible)."""
    from PIL import Image, ImageDraw

    crop, by, bx = chunk_corner_crop(synthetic_full, chunk, ZOOM_CROP)
    zoom = np.asarray(Image.fromarray(crop).resize((crop.shape[1] * ZOOM, crop.shape[0] * ZOOM), Image.Resampling.NEAREST))
    gap, title, margin = 16, 22, 10
    h = title + max(real.shape[0], synthetic.shape[0], zoom.shape[0] + margin)
    w = real.shape[1] + synthetic.shape[1] + zoom.shape[1] + 2 * gap + margin
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for image, label in ((real, "real (sample slide)"), (synthetic, "synthetic (nca-tiles)")):
        canvas.paste(Image.fromarray(image), (x, title))
        draw.text((x + 2, 4), label, fill="black")
        x += image.shape[1] + gap
    zx, zy = x + margin, title + margin
    canvas.paste(Image.fromarray(zoom), (zx, zy))
    draw.text((x + 2, 4), f"chunk corner, {ZOOM}x (borders marked)", fill="black")
    mx, my = zx + bx * ZOOM, zy + by * ZOOM
    draw.line([(mx, zy - margin), (mx, zy - 2)], fill="red", width=2)
    draw.line([(zx - margin, my), (zx - 2, my)], fill="red", width=2)
    return np.asarray(canvas)

