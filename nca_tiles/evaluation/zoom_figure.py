"""Real and synthetic slides side by side at several zooms: the picture a pathologist looks at
first (layout at low power, tissue at medium, cells at high power).

Each row is one slide; each column one field of view (in µm), nested: every field is centred on
the same point, chosen where the widest field holds the most tissue and the point itself is
tissue. A panel shows its field at ``panel`` px whatever the slide's resolution: a close field of a
low-magnification slide is enlarged (nearest neighbour, so its pixels stay visible rather than
looking smoother than they are), and a field larger than the slide shows white beyond it, as a
scanner's background. Labels say "um": PIL's default bitmap font has no µ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from nca_tiles.errors import NcaTilesError

DEFAULT_FIELDS_UM = (2048.0, 512.0, 128.0)


@dataclass(frozen=True)
class FigureRow:
    path: str | os.PathLike[str]
    label: str
    source_mpp: float | None = None  # µm/px of a slide whose metadata has none


def field_centre(slide, field_um: float) -> tuple[float, float]:
    """Level-0 (x, y) of the centre of the ``field_um`` square with the most tissue; among equal
    squares, the one nearest the slide's centre."""
    from nca_tiles.wsi.tissue import tissue_mask

    width, height = slide.dimensions
    side = field_um / slide.mpp  # level-0 px
    mask = tissue_mask(slide, downsample=max(1.0, min(width, height) / 256))
    step = max(side / 8, 1.0)
    xs = np.arange(min(0.0, width - side), max(1.0, width - side + 1), step)
    ys = np.arange(min(0.0, height - side), max(1.0, height - side + 1), step)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    fractions = mask.fractions(np.clip(gx, 0, None), np.clip(gy, 0, None), side)
    # The centre pixel must be tissue too, so the closest field shows tissue, not a lumen.
    cx, cy = gx + side / 2, gy + side / 2
    mi = np.clip((cy / mask.downsample).astype(int), 0, mask.mask.shape[0] - 1)
    mj = np.clip((cx / mask.downsample).astype(int), 0, mask.mask.shape[1] - 1)
    score = fractions + mask.mask[mi, mj]
    distance = np.hypot(cx - width / 2, cy - height / 2)
    best = np.lexsort((distance, -score))[0]
    return float(cx[best]), float(cy[best])


def field_panel(slide, centre: tuple[float, float], field_um: float, panel: int) -> np.ndarray:
    """The ``field_um`` square around ``centre`` at ``panel`` px: averaged down from the slide's
    pixels, or enlarged by nearest neighbour where the slide is coarser than the panel."""
    from PIL import Image

    from nca_tiles.wsi.slide import read_level0_region

    side0 = field_um / slide.mpp  # the field in level-0 px
    x0, y0 = centre[0] - side0 / 2, centre[1] - side0 / 2
    native = max(1, min(panel, int(round(side0))))  # never more pixels than the slide has
    pixels = read_level0_region(slide, x0, y0, side0, side0, native, native)
    if native == panel:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((panel, panel), Image.Resampling.NEAREST))


def zoom_figure(rows: list[FigureRow], fields_um: tuple[float, ...] = DEFAULT_FIELDS_UM,
                panel: int = 320) -> np.ndarray:
    """One row per slide, one column per field of view; boxes mark where the next field lies."""
    from PIL import Image, ImageDraw

    from nca_tiles.wsi.slide import open_slide

    if not rows:
        raise NcaTilesError("zoom figure: no slides given")
    fields = sorted(fields_um, reverse=True)
    if any(f <= 0 for f in fields):
        raise NcaTilesError("zoom figure: fields of view must be > 0 µm")
    gap, title = 8, 18
    header = title
    width = len(fields) * panel + (len(fields) - 1) * gap
    height = header + len(rows) * (panel + title + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, f in enumerate(fields):
        draw.text((j * (panel + gap) + 2, 3), f"field {f:g} um", fill="black")
    for i, row in enumerate(rows):
        top = header + i * (panel + title + gap)
        with open_slide(row.path, row.source_mpp) as slide:
            draw.text((2, top + 2), f"{row.label} ({slide.mpp:g} um/px)", fill="black")
            centre = field_centre(slide, fields[0])
            for j, f in enumerate(fields):
                left = j * (panel + gap)
                canvas.paste(Image.fromarray(field_panel(slide, centre, f, panel)), (left, top + title))
                if j + 1 < len(fields):  # where the next, closer field lies
                    half = panel * fields[j + 1] / f / 2
                    c = panel / 2
                    draw.rectangle([left + c - half, top + title + c - half, left + c + half, top + title + c + half],
                                   outline="yellow", width=2)
    return np.asarray(canvas)


def write_zoom_figure(rows: list[FigureRow], out: str | os.PathLike[str],
                      fields_um: tuple[float, ...] = DEFAULT_FIELDS_UM, panel: int = 320) -> None:
    from PIL import Image

    from nca_tiles.runtime.outputs import atomic_output

    image = zoom_figure(rows, fields_um, panel)
    with atomic_output(out) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
