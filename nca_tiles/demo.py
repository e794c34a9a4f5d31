"""``nca-tiles demo``: the whole pipeline on the bundled sample slide, and its comparison figure."""

from __future__ import annotations

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


def check_options(width: int, height: int, chunk: int, steps: int, seed: int, halo: int, timesteps: int) -> None:
    """Refuse numbers the demo cannot use, before it writes anything."""
    for option, side in (("--width", width), ("--height", height)):
        check_int(option, side, MIN_SIDE, MAX_SIDE, " (larger slides: nca-tiles synthesize)" if side > MAX_SIDE else "")
    check_int("--chunk", chunk, 2 * halo, MAX_SIDE, f" (at least twice the model's halo of {halo} px)")
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

