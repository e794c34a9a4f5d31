"""Open whole-slide images of any common format behind one small interface, and read regions at a
chosen resolution (µm/px).

Readers, tried in this order:

* OME-TIFF (pyramid levels as SubIFDs or as separate IFDs) and plain TIFF: tifffile. OpenSlide
  would also open a tiled OME-TIFF, but only as "generic TIFF" without its SubIFD levels.
* Everything OpenSlide reads: Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Ventana .bif,
  generic tiled TIFF, ...
* PNG, JPEG and other flat images: Pillow (the whole image is held in memory; fine for the small
  images these formats are used for).

Coordinates: ``read_region(level, x, y, w, h)`` takes pixels *of that level*; everything else
(``read_level0_region``, patch positions) is in level-0 pixels.
"""

from __future__ import annotations

import logging
import math
import os
import re
import xml.etree.ElementTree as ElementTree
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.errors import NcaTilesError

# Extensions searched for inside folders. A file named explicitly is tried whatever its name.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip

# Formats only OpenSlide reads: when it does not recognise such a file, the file is damaged, and
# trying it as a plain TIFF would only give a worse message (or silently wrong metadata).
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")

# Largest side, in pixels of the level read, of one read: bounds memory whatever the slide size.
MAX_READ_SIDE = 1024

# µm/px outside this range in TIFF resolution tags is not a microscope's: typically the 72 dpi
# default that image libraries write (352.8 µm/px). Treated as "no µm/px".
PLAUSIBLE_MPP = (0.01, 50.0)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UM_PER_UNIT = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "micron": 1.0, "mm": 1e3,
    "cm": 1e4, "dm": 1e5, "m": 1e6, "Å": 1e-4, "\u212b": 1e-4, "in": 25400.0, "inch": 25400.0,
}  # fmt: skip


class SlideReadError(NcaTilesError):
    """A slide file that cannot be opened or decoded (corrupt, truncated, unsupported)."""


class Slide(ABC):
    """A multi-resolution RGB image. Subclasses fill in ``level_dimensions``, ``metadata_mpp`` and
    ``_read``; callers use ``read_region``, which adds bounds handling and error wrapping."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, finest first
    metadata_mpp: float | None  # µm/px at level 0 from the file's own metadata
    source_mpp: float | None = None  # the caller's µm/px, used only when metadata has none
    format_name: str = ""

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of each level.

        Pyramids are made by whole-number factors with the odd last pixel rounded down or up
        (2967 px / 4 -> 741 px), so the size ratio (4.004) misplaces far pixels by several level-0
        pixels; when both sizes are a rounding of the level-0 size over a whole number, that number
        is the downsample. Otherwise the mean of the x and y ratios, as OpenSlide.
        """
        w0, h0 = self.dimensions
        downsamples = []
        for w, h in self.level_dimensions:
            ratio = (w0 / w + h0 / h) / 2
            k = max(1, round(ratio))
            exact = all(size in (size0 // k, -(-size0 // k)) for size0, size in ((w0, w), (h0, h)))
            downsamples.append(float(k) if exact else ratio)
        return tuple(downsamples)

    @property
    def mpp(self) -> float:
        """µm/px at level 0: from the metadata, else the ``source_mpp`` given when opening."""
        if self.metadata_mpp is not None:
            return self.metadata_mpp
        if self.source_mpp is not None:
            return self.source_mpp
        raise NcaTilesError(
            f"{self.path} has no µm/px in its metadata: pass --source-mpp with its resolution "
            "(e.g. --source-mpp 0.5 for a 20x scan)"
        )

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of the rectangle at (x, y) in *level* pixels.

        Parts outside the image are white (slide background), so callers need not clip.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"empty region {w}x{h}")
        out = np.full((h, w, 3), 255, np.uint8)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            inside = self._read(level, x0, y0, x1 - x0, y1 - y0)
        except NcaTilesError:
            raise
        except Exception as exc:  # decoders raise anything on corrupt data; one message for all
            raise SlideReadError(damaged(self.path, f"cannot decode its pixels ({_reason(exc)})")) from exc
        out[y0 - y : y1 - y, x0 - x : x1 - x] = inside
        return out

    @abstractmethod
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a rectangle that lies inside the level."""

    def close(self) -> None:  # noqa: B027 - optional for readers holding nothing open
        """Release the file."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = self.metadata_mpp if self.metadata_mpp is not None else self.source_mpp
        return f"<{type(self).__name__} {self.path.name} {w}x{h} mpp={mpp} levels={self.level_count}>"


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide."""

    def __init__(self, path: Path):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
            self.level_dimensions = tuple(tuple(d) for d in self._osr.level_dimensions)
            props = dict(self._osr.properties)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{path}: OpenSlide cannot open it ({_reason(exc)}): the file is truncated, corrupt or of a kind "
                "OpenSlide does not read; copy it again from its source, or convert it to OME-TIFF"
            ) from exc
        self.format_name = f"OpenSlide {props.get('openslide.vendor', '?')}"
        self.metadata_mpp = _openslide_mpp(props)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        downsample = self._osr.level_downsamples[level]
        # OpenSlide wants the location in level-0 pixels, the size in level pixels.
        location = (round(x * downsample), round(y * downsample))
        rgba = np.asarray(self._osr.read_region(location, level, (w, h)))
        return _over_white(rgba)

    def close(self) -> None:
        self._osr.close()


class TiffSlide(Slide):
    """An OME-TIFF or plain TIFF read by tifffile, one zarr view per pyramid level, so a read
    decodes only the tiles or strips it touches."""

    def __init__(self, path: Path, tif: Any):
        import zarr

        self.path = path
        self._tif = tif
        try:
            with quiet_tifffile():
                if not tif.pages or not tif.series:
                    raise SlideReadError(damaged(path, "no image in it"))
                series = tif.series[0]
                _check_complete(path, (page for level in series.levels for page in level.pages))
            self.format_name = "OME-TIFF" if tif.is_ome else "TIFF"
            self._axes = series.axes
            if "Y" not in self._axes or "X" not in self._axes:
                raise SlideReadError(f"{path}: image axes {self._axes!r} have no Y and X")
            if series.dtype not in (np.uint8, np.uint16):
                raise SlideReadError(f"{path}: {series.dtype} pixels; only 8- or 16-bit images are read")
            self._channel_axis = "S" if "S" in self._axes else "C" if "C" in self._axes else None
            channels = series.shape[self._axes.index(self._channel_axis)] if self._channel_axis else 1
            if channels == 2:
                raise SlideReadError(f"{path}: two-channel image; only RGB or greyscale is read")
            # The first level of a series is the series itself (tifffile lists SubIFD levels too).
            self._levels = [zarr.open_array(tif.aszarr(level=i), mode="r") for i in range(len(series.levels))]
            self.level_dimensions = tuple(self._level_size(a.shape) for a in self._levels)
            self.metadata_mpp = _ome_mpp(tif.ome_metadata) if tif.is_ome else None
            if self.metadata_mpp is None:
                page = series.levels[0].keyframe
                self.metadata_mpp = _tiff_resolution_mpp(page.resolution[0], int(page.resolutionunit))
        except NcaTilesError:
            tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt files make tifffile/zarr raise anything
            tif.close()
            raise SlideReadError(damaged(path, f"tifffile cannot read it ({_reason(exc)})")) from exc

    def _level_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return shape[self._axes.index("X")], shape[self._axes.index("Y")]

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        with quiet_tifffile():  # a damaged tile raises (reported by read_region); no stray log lines
            return self._read_quietly(level, x, y, w, h)

    def _read_quietly(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        channel_axis = self._channel_axis
        index: list[Any] = []
        for axis in self._axes:
            if axis == "Y":
                index.append(slice(y, y + h))
            elif axis == "X":
                index.append(slice(x, x + w))
            elif axis == channel_axis:
                index.append(slice(None))
            else:  # time, z, extra series dimensions: the first plane
                index.append(0)
        data = np.asarray(self._levels[level][tuple(index)])
        kept = [a for a in self._axes if a in ("Y", "X", channel_axis)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(channel_axis)] if channel_axis else [])
        data = data.transpose(order)
        return _to_rgb8(data if channel_axis else data[..., None])

    def close(self) -> None:
        self._tif.close()


class PillowSlide(Slide):
    """A PNG, JPEG or other flat image, decoded whole by Pillow: a single level."""

    def __init__(self, path: Path):
        from PIL import Image, UnidentifiedImageError

        self.path = path
        try:
            with Image.open(path) as image:
                self.format_name = image.format or "image"
                image.load()  # decode now: a truncated file fails here, not mid-extraction
                rgb = image.convert("RGBA") if image.mode in ("RGBA", "LA", "PA") else image.convert("RGB")
                self._pixels = _over_white(np.asarray(rgb)) if rgb.mode == "RGBA" else np.asarray(rgb)
        except Image.DecompressionBombError as exc:
            raise SlideReadError(f"{path}: too large for a flat image; convert it to a tiled TIFF") from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise SlideReadError(f"{path}: not a slide format this tool reads ({_reason(exc)})") from exc
        h, w = self._pixels.shape[:2]
        self.level_dimensions = ((w, h),)
        # PNG/JPEG dpi fields are screen/print defaults, never a scanner's resolution.
        self.metadata_mpp = None

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y : y + h, x : x + w]


def open_slide(path: str | os.PathLike[str], source_mpp: float | None = None) -> Slide:
    """Open a slide of any supported format.

    ``source_mpp`` is the level-0 µm/px to use when the file's metadata has none (``slide.mpp``
    raises an ``NcaTilesError`` asking for ``--source-mpp`` if neither exists).
    Unreadable, corrupt or truncated files raise ``SlideReadError`` with the reason.
    """
    path = Path(path)
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist")
    if path.is_dir():
        raise SlideReadError(f"{path} is a folder, not a slide file")
    if source_mpp is not None and not source_mpp > 0:
        raise NcaTilesError(f"--source-mpp must be positive, got {source_mpp}")
    try:
        with open(path, "rb") as f:
            is_tiff = f.read(4) in _TIFF_MAGIC
    except OSError as exc:
        raise SlideReadError(f"{path}: cannot read the file ({_reason(exc)})") from exc

    slide: Slide
    tif = None
    openslide_format = _detect_openslide_format(path) is not None or path.suffix.lower() in OPENSLIDE_EXTENSIONS
    if is_tiff:
        # Also for the formats OpenSlide reads: it reports a truncated TIFF only when it reaches
        # the missing tiles, mid-extraction, and some damage it reports as "unsupported format".
        try:
            tif = open_tiff(path)
        except TiffOpenError:
            if not openslide_format:
                raise
    if tif is not None and tif.is_ome:
        slide = TiffSlide(path, tif)
    elif openslide_format:
        if tif is not None:
            tif.close()
        slide = OpenSlideSlide(path)
    elif tif is not None:
        slide = TiffSlide(path, tif)
    else:
        slide = PillowSlide(path)
    slide.source_mpp = source_mpp
    if slide.metadata_mpp is not None and not slide.metadata_mpp > 0:
        slide.metadata_mpp = None
    return slide


def find_slides(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Slide files named in ``paths``: files as given, folders searched recursively for
    ``SLIDE_EXTENSIONS`` (hidden entries skipped). Sorted within each folder, duplicates removed."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NcaTilesError(f"{path} does not exist")
        if path.is_dir():
            inside = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.name.lower().endswith(SLIDE_EXTENSIONS)
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not inside:
                raise NcaTilesError(
                    f"no slide files ({', '.join(e.lstrip('.') for e in SLIDE_EXTENSIONS)}) found in folder {path}"
                )
            found.extend(inside)
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


# --- reading at a chosen resolution ---------------------------------------------------------------


def best_level(slide: Slide, downsample: float) -> int:
    """The coarsest level at or finer than ``downsample`` (level-0 px per output px), so
    resampling only ever averages down from real pixels."""
    downsamples = slide.level_downsamples
    finer = [level for level, d in enumerate(downsamples) if d <= downsample * (1 + 1e-6)]
    return max(finer, key=lambda level: downsamples[level], default=0)


def read_level0_region(
    slide: Slide, x: float, y: float, w: float, h: float, out_w: int, out_h: int
) -> np.ndarray:
    """The level-0 rectangle (x, y, w, h) resampled to (out_h, out_w, 3) RGB uint8.

    Reads from the best pyramid level, in pieces of at most ``MAX_READ_SIDE`` pixels a side, and
    area-averages (``resample_box``): exact block means for whole-number factors, exact area
    weighting of partly covered pixels otherwise.
    """
    if out_w <= 0 or out_h <= 0 or w <= 0 or h <= 0:
        raise ValueError(f"empty region {w}x{h} -> {out_w}x{out_h}")
    scale_x, scale_y = w / out_w, h / out_h  # level-0 px per output px
    level = best_level(slide, min(scale_x, scale_y))
    downsample = slide.level_downsamples[level]
    # Output pixels per piece, so that one piece reads at most MAX_READ_SIDE level pixels a side.
    step_x = max(1, int(MAX_READ_SIDE * downsample / scale_x))
    step_y = max(1, int(MAX_READ_SIDE * downsample / scale_y))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for oy in range(0, out_h, step_y):
        th = min(step_y, out_h - oy)
        for ox in range(0, out_w, step_x):
            tw = min(step_x, out_w - ox)
            out[oy : oy + th, ox : ox + tw] = resample_from_level(
                slide,
                level,
                (x + ox * scale_x) / downsample,
                (y + oy * scale_y) / downsample,
                tw * scale_x / downsample,
                th * scale_y / downsample,
                tw,
                th,
            )
    return out


def read_region_at_mpp(slide: Slide, x: float, y: float, w: int, h: int, mpp: float) -> np.ndarray:
    """(h, w, 3) RGB uint8 at ``mpp`` µm/px whose top-left is (x, y) in level-0 pixels."""
    factor = mpp / slide.mpp
    return read_level0_region(slide, x, y, w * factor, h * factor, w, h)


def resample_from_level(
    slide: Slide, level: int, lx: float, ly: float, lw: float, lh: float, out_w: int, out_h: int
) -> np.ndarray:
    """Read the rectangle (lx, ly, lw, lh), in possibly fractional pixels of ``level``, and
    resample it to (out_h, out_w, 3) by area averaging."""
    ix0, iy0 = _floor(lx), _floor(ly)
    ix1, iy1 = _ceil(lx + lw), _ceil(ly + lh)
    region = slide.read_region(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    return resample_box(region, (lx - ix0, ly - iy0, lx - ix0 + lw, ly - iy0 + lh), out_w, out_h)


def resample_box(
    pixels: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int
) -> np.ndarray:
    """Resample the (possibly fractional) ``box`` (left, top, right, bottom) of an RGB uint8 array
    to (out_h, out_w, 3): each output pixel is the area-weighted mean of the input it covers,
    pixels cut by its border counting by the fraction inside. Enlarging interpolates bilinearly.
    """
    left, top, right, bottom = box
    fx, fy = (right - left) / out_w, (bottom - top) / out_h
    if fx < 1 or fy < 1:
        return _enlarge(pixels, box, out_w, out_h)
    if all(_is_whole(v) for v in (left, top, fx, fy)):  # whole-number factor: plain block means
        kx, ky, x0, y0 = round(fx), round(fy), round(left), round(top)
        crop = pixels[y0 : y0 + out_h * ky, x0 : x0 + out_w * kx]
        if kx == 1 and ky == 1:
            return np.ascontiguousarray(crop)
        blocks = crop.reshape(out_h, ky, out_w, kx, 3).sum(axis=(1, 3), dtype=np.uint32)
        n = kx * ky
        return ((blocks + n // 2) // n).astype(np.uint8)  # exact mean, rounded half up
    # PIL's BOX filter weighs each input pixel 0 or 1 by where its centre falls, which is not
    # area weighting at fractional factors; integrate exactly instead, one axis at a time.
    x0, y0 = _floor(left), _floor(top)
    crop = pixels[y0 : _ceil(bottom), x0 : _ceil(right)].astype(np.float64)
    crop = _area_mean_along(crop, 1, left - x0, fx, out_w)
    crop = _area_mean_along(crop, 0, top - y0, fy, out_h)
    return np.floor(crop + 0.5).clip(0, 255).astype(np.uint8)


def _area_mean_along(values: np.ndarray, axis: int, start: float, step: float, count: int) -> np.ndarray:
    """Means of ``values`` over the intervals [start + j*step, start + (j+1)*step), j < count, of
    the axis, treating each element as constant over its unit cell: differences of the piecewise-
    linear running integral, so O(n) whatever the factor."""
    length = values.shape[axis]
    bounds = np.clip(start + step * np.arange(count + 1), 0, length)
    cell = np.minimum(np.floor(bounds).astype(np.int64), length - 1)
    inside = (bounds - cell).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    running = np.concatenate([np.zeros_like(np.take(values, [0], axis)), np.cumsum(values, axis)], axis)
    integral = np.take(running, cell, axis) + inside * np.take(values, cell, axis)
    return np.diff(integral, axis=axis) / step


def _enlarge(pixels: np.ndarray, box: tuple[float, float, float, float], out_w: int, out_h: int) -> np.ndarray:
    """Bilinear resampling (``--allow-upsample``), reading a one-pixel margin for its support."""
    from PIL import Image

    left, top, right, bottom = box
    x0, y0 = max(0, _floor(left) - 1), max(0, _floor(top) - 1)
    crop = np.ascontiguousarray(pixels[y0 : _ceil(bottom) + 1, x0 : _ceil(right) + 1])
    image = Image.fromarray(crop)
    shifted = (left - x0, top - y0, right - x0, bottom - y0)
    return np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=shifted))


# --- metadata -----------------------------------------------------------------------------------


def _openslide_mpp(props: dict[str, str]) -> float | None:
    try:
        mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        unit = {"inch": 25400.0, "centimeter": 1e4}.get(props.get("tiff.ResolutionUnit", ""))
        try:
            resolution = float(props["tiff.XResolution"])
        except (KeyError, ValueError):
            return None
        return _plausible(unit / resolution) if unit and resolution > 0 else None
    return _plausible((mpp_x + mpp_y) / 2)


def _ome_mpp(ome_xml: str | None) -> float | None:
    """µm/px from the first image's PhysicalSizeX/Y, converted from its unit (µm by default)."""
    if not ome_xml:
        return None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in _UM_PER_UNIT:
            return None
        try:
            sizes.append(float(value) * _UM_PER_UNIT[unit])
        except ValueError:
            return None
    return _plausible(sum(sizes) / len(sizes)) if sizes else None


def _tiff_resolution_mpp(x_resolution: float, unit: int) -> float | None:
    """µm/px from the TIFF XResolution (pixels per unit) and ResolutionUnit (2 inch, 3 cm)."""
    um_per_unit = {2: 25400.0, 3: 1e4}.get(unit)
    if um_per_unit is None or not x_resolution > 0:
        return None
    return _plausible(um_per_unit / x_resolution)


def _plausible(mpp: float) -> float | None:
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


# --- small helpers ------------------------------------------------------------------------------


def _detect_openslide_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def damaged(path: Path, detail: str) -> str:
    """The one-line message for a slide file that is truncated or corrupt."""
    return f"{path}: {detail}: the file is truncated or corrupt; copy it again from its source"


class TiffOpenError(SlideReadError):
    """tifffile cannot even parse the header: damage, or a TIFF dialect OpenSlide may still read."""


def _check_complete(path: Path, pages: Iterable[Any]) -> None:
    """Raise if any tile or strip of ``pages`` lies past the end of the file (a truncated copy):
    cheaper to say now than to fail in the middle of an extraction."""
    size = path.stat().st_size
    for page in pages:
        if page is None or not hasattr(page, "dataoffsets"):
            continue
        offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
        if offsets.size and int((offsets + counts).max()) > size:
            raise SlideReadError(damaged(path, "image data runs past the end of the file"))


# What tifffile logs, and carries on after, when a file's TIFF structure is broken: directories
# or tag values pointing past the end of a truncated file, garbage where a directory should be.
# An odd private tag of an intact scanner file may log an invalid offset too: only one past the
# end of the file counts.
_TIFF_OFFSET = re.compile(r"invalid (?:\w+ )*offset\D*(\d+)", re.I)
_TIFF_GARBLED = re.compile(r"corrupted tag list|contains no pages|circular reference", re.I)


def _tiff_damage_logged(messages: list[str], size: int) -> bool:
    for message in messages:
        offset = _TIFF_OFFSET.search(message)
        if (offset and int(offset.group(1)) >= size) or _TIFF_GARBLED.search(message):
            return True
    return False


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Collect what tifffile logs for the duration instead of printing it (without logging set
    up, Python prints warnings to stderr: stray lines before our one-line error). Yields the list
    the messages go to; the logger is as before afterwards."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


def open_tiff(path: Path) -> Any:
    """A ``tifffile.TiffFile`` of ``path`` whose every directory and image data lie inside the
    file, or ``SlideReadError`` saying it is truncated or corrupt. Nothing is printed."""
    import tifffile

    path = Path(path)
    with quiet_tifffile() as log:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # noqa: BLE001 - a damaged header makes tifffile raise anything
            raise TiffOpenError(damaged(path, f"not a readable TIFF ({_reason(exc)})")) from None
        try:
            pages = list(tif.pages)  # reads every directory: a broken chain shows now
            levels = [page for series in tif.series for level in series.levels for page in level.pages]
            if _tiff_damage_logged(log, path.stat().st_size):
                raise SlideReadError(damaged(path, "its TIFF directories point past its end or are garbled"))
            if not pages:
                raise SlideReadError(damaged(path, "no image directory in it"))
            _check_complete(path, [*pages, *levels])
        except SlideReadError:
            tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - as above
            tif.close()
            raise SlideReadError(damaged(path, f"unreadable TIFF directories ({_reason(exc)})")) from None
    return tif


def check_intact(path: Path) -> None:
    """For files OpenSlide reads: raise ``SlideReadError`` if a TIFF-based one is truncated or
    corrupt (OpenSlide opens such a file and fails only on reaching the missing tiles)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return
    try:
        open_tiff(path).close()
    except TiffOpenError:
        pass  # a TIFF dialect tifffile does not parse: OpenSlide has the last word


def damage_reason(exc: BaseException) -> str:
    """`` (reason)`` for errors of the readers, which describe the file; nothing for Python's own
    (an IndexError deep in a reader says nothing to the user)."""
    module = type(exc).__module__ or ""
    if module.split(".")[0] in ("tifffile", "openslide", "imagecodecs", "PIL") and str(exc).strip():
        return f" ({_reason(exc)})"
    return ""


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA image composited over white: transparent areas are slide background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _to_rgb8(data: np.ndarray) -> np.ndarray:
    """(h, w, c) of uint8/uint16 to RGB uint8: grey repeated, alpha and extra channels dropped."""
    if data.dtype == np.uint16:
        data = ((data.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if data.shape[-1] == 1:
        return np.repeat(data, 3, axis=-1)
    return np.ascontiguousarray(data[..., :3])


def _reason(exc: BaseException | None) -> str:
    text = " ".join(str(exc).split()) if exc is not None else ""
    return text or type(exc).__name__


def _is_whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-6


def _floor(value: float) -> int:
    return round(value) if _is_whole(value) else math.floor(value)


def _ceil(value: float) -> int:
    return round(value) if _is_whole(value) else math.ceil(value)


__all__: Sequence[str] = (
    "SLIDE_EXTENSIONS", "Slide", "SlideReadError", "OpenSlideSlide", "TiffSlide", "PillowSlide",
    "open_slide", "find_slides", "best_level", "read_level0_region", "read_region_at_mpp",
    "resample_from_level", "resample_box",
)  # fmt: skip
