"""One reader for every input image: ``open_slide(path)`` picks the reader, and every caller
(extract-patches, info, preview, evaluate) reads through the ``Slide`` it returns.

Readers, one subclass of ``Slide`` each, chosen by ``open_slide`` in this order:

* ``ZarrSlide``, for a folder: OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3), or a bare zarr
  array (axes guessed from its shape).
* ``TiffSlide``: OME-TIFF (pyramid levels as SubIFDs or as separate IFDs) and plain TIFF, with
  tifffile. OpenSlide would also open a tiled OME-TIFF, but only as "generic TIFF" without its
  SubIFD levels.
* ``OpenSlideSlide``: everything OpenSlide reads: Aperio .svs, Hamamatsu .ndpi, MIRAX .mrxs,
  Leica .scn, Ventana .bif, generic tiled TIFF, ...
* ``PillowSlide``: PNG, JPEG and other flat images (held whole in memory; fine for the small
  images these formats are used for).

``ArraySlide`` wraps an array already in memory (NumPy or zarr) in the same interface.

To add an input format: subclass ``Slide`` (the constructor sets ``level_dimensions`` and
``metadata``; ``_read`` returns RGB uint8 pixels) and pick it in ``open_slide``.

Coordinates: ``read_region(level, x, y, w, h)`` takes pixels *of that level*; everything else
(``read_level0_region``, patch positions) is in level-0 pixels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import xml.etree.ElementTree as ElementTree
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles.errors import NcaTilesError

# Extensions searched for inside folders (and OME-Zarr folders, found by their metadata). A file
# named explicitly is tried whatever its name.
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".png", ".jpg", ".jpeg",
)  # fmt: skip

# Formats only OpenSlide reads: when it does not recognise such a file, the file is damaged, and
# trying it as a plain TIFF would only give a worse message (or silently wrong metadata).
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")

# Largest side, in pixels of the level read, of one read: bounds memory whatever the slide size.
MAX_READ_SIDE = 1024

# µm/px outside this range is not a microscope's: typically the 72 dpi default that image
# libraries write in TIFF resolution tags (352.8 µm/px). Treated as "no µm/px".
PLAUSIBLE_MPP = (0.01, 50.0)

# µm per unit of length, the one table for every format: OME-XML UnitsLength symbols, OME-NGFF
# axis units (UDUNITS-2 names), TIFF/OpenSlide resolution units.
UM_PER_UNIT = {
    "pm": 1e-6, "picometer": 1e-6,
    "Å": 1e-4, "\u212b": 1e-4, "angstrom": 1e-4,
    "nm": 1e-3, "nanometer": 1e-3,
    "µm": 1.0, "\u03bcm": 1.0, "um": 1.0, "micrometer": 1.0, "micron": 1.0,
    "mm": 1e3, "millimeter": 1e3,
    "cm": 1e4, "centimeter": 1e4,
    "dm": 1e5, "decimeter": 1e5,
    "m": 1e6, "meter": 1e6,
    "in": 25400.0, "inch": 25400.0,
}  # fmt: skip
TIFF_RESOLUTION_UNITS = {2: "inch", 3: "centimeter"}  # TIFF ResolutionUnit codes

# How export/ometiff.py records the generator of a synthetic slide in its OME-XML.
GENERATOR_NAMESPACE = "nca-tiles.generator"  # MapAnnotation namespace
GENERATOR_MARKER = " Generator: "  # precedes the generator JSON in the image Description

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ZARR_METADATA = (".zattrs", ".zgroup", ".zarray", "zarr.json")


class SlideReadError(NcaTilesError):
    """A slide file that cannot be opened or decoded (corrupt, truncated, unsupported)."""


@dataclass
class SlideMetadata:
    """What a reader found out about its file besides the pixels; ``info`` prints it."""

    format: str  # the format and the library reading it, e.g. "OME-TIFF (read with tifffile)"
    mpp: tuple[float, float] | None = None  # µm/px (x, y) at level 0 per the file; None if absent or implausible
    name: str | None = None  # image name stored in the file
    pyramid: str | None = None  # how the levels are stored, e.g. "SubIFD pyramid"
    pixels: str | None = None  # colour model, samples, dtype, axes
    storage: str | None = None  # tiles or chunks, compression
    objective_power: str | None = None
    generator: dict[str, Any] | None = None  # provenance of a synthetic slide (nca-tiles exports)
    associated_images: tuple[str, ...] = ()  # label, macro, thumbnail, ...
    other_images: tuple[str, ...] = ()  # further images in the file, not read
    raw: dict[str, Any] = field(default_factory=dict)  # the format's own properties (OpenSlide's, zarr attributes)


class Slide(ABC):
    """A multi-resolution RGB image. Subclasses fill in ``path``, ``level_dimensions``,
    ``metadata``, ``format_name`` and ``_read``; callers use ``read_region``, which adds bounds
    handling and error wrapping."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, finest first
    metadata: SlideMetadata
    source_mpp: float | None = None  # the caller's µm/px, used only when metadata has none
    format_name: str = ""
    kind: str = ""  # which reader: "openslide", "tiff", "ome-zarr", "zarr", "image", "array"

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
    def metadata_mpp(self) -> float | None:
        """µm/px at level 0 from the file's own metadata (mean of x and y), else None."""
        mpp = self.metadata.mpp
        return (mpp[0] + mpp[1]) / 2 if mpp else None

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

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        """(width, height) of the blocks the level is stored in, if any: reads aligned to them
        decode each block once."""
        return None

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
            _settle_zarr_reads()
            reason = damage_reason(exc) or " (undecodable data)"
            raise SlideReadError(damaged(self.path, f"cannot decode its pixels{reason}")) from exc
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


class _AxesSlide(Slide):
    """A slide whose levels are arrays with lettered axes (Y, X; a channel axis C or S; any other
    axis, such as T or Z, is read at index 0). Sliced lazily: a read decodes only the tiles or
    chunks it touches."""

    _levels: list[Any]
    _axes: str
    _channel_axis: str | None = None
    _unreadable: str | None = None  # why the pixels cannot be read, said when they are

    def _set_levels(self, levels: list[Any], axes: str, dtype: Any) -> None:
        if "Y" not in axes or "X" not in axes:
            raise SlideReadError(f"{self.path}: image axes {axes!r} have no Y and X")
        self._levels, self._axes = levels, axes
        self._channel_axis = "S" if "S" in axes else "C" if "C" in axes else None
        channels = levels[0].shape[axes.index(self._channel_axis)] if self._channel_axis else 1
        # Refused when pixels are read, not when opening: info still describes such a file.
        if np.dtype(dtype) not in (np.uint8, np.uint16):
            self._unreadable = f"{np.dtype(dtype)} pixels; only 8- or 16-bit images are read"
        elif channels == 2:
            self._unreadable = "two-channel image; only RGB or greyscale is read"
        self.level_dimensions = tuple(
            (int(a.shape[axes.index("X")]), int(a.shape[axes.index("Y")])) for a in levels
        )

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        chunks = getattr(self._levels[level], "chunks", None)
        if not chunks or not isinstance(chunks, tuple):
            return None
        return int(chunks[self._axes.index("X")]), int(chunks[self._axes.index("Y")])

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._unreadable:
            raise SlideReadError(f"{self.path}: {self._unreadable}")
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


class TiffSlide(_AxesSlide):
    """An OME-TIFF or plain TIFF read by tifffile, one zarr view per pyramid level."""

    kind = "tiff"

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
                # The first level of a series is the series itself (tifffile lists SubIFD levels too).
                levels = [zarr.open_array(tif.aszarr(level=i), mode="r") for i in range(len(series.levels))]
                self._set_levels(levels, series.axes, series.dtype)
                self.metadata = _tiff_metadata(tif, series)
        except NcaTilesError:
            tif.close()
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt files make tifffile/zarr raise anything
            tif.close()
            raise SlideReadError(damaged(path, f"tifffile cannot read it ({_reason(exc)})")) from exc

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        with quiet_tifffile():  # a damaged tile raises (reported by read_region); no stray log lines
            return super()._read(level, x, y, w, h)

    def close(self) -> None:
        self._tif.close()


class ZarrSlide(_AxesSlide):
    """An OME-Zarr image (NGFF 0.4 on zarr v2, 0.5 on zarr v3): the levels of its first
    multiscale, axes and µm/px from its metadata. A bare zarr array is read as one level, its
    axes guessed from its shape."""

    kind = "ome-zarr"

    def __init__(self, path: Path):
        import zarr

        self.path = path
        if not any((path / name).is_file() for name in _ZARR_METADATA):
            raise SlideReadError(f"{path}: a folder without zarr metadata: not a slide file or an OME-Zarr image")
        try:
            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Array):
                self._open_array(node)
            else:
                self._open_multiscales(node)
        except NcaTilesError:
            raise
        except Exception as exc:  # noqa: BLE001 - damaged metadata makes zarr raise anything
            raise SlideReadError(damaged(path, f"zarr cannot read it ({_reason(exc)})")) from exc

    def _open_array(self, array: Any) -> None:
        self.kind, self.format_name = "zarr", "zarr"
        axes = _guess_axes(tuple(array.shape), str(self.path))
        self._set_levels([array], axes, array.dtype)
        self.metadata = SlideMetadata(
            format=f"zarr array (zarr v{array.metadata.zarr_format})",
            pixels=_array_pixels(axes, array),
            storage=_zarr_storage(axes, array),
            raw=dict(array.attrs),
        )

    def _open_multiscales(self, group: Any) -> None:
        attrs = dict(group.attrs)
        found = _ngff_multiscales(attrs)
        if found is None:
            raise SlideReadError(f"{self.path}: a zarr group without OME-NGFF 'multiscales' metadata: not an image")
        version, entry = found
        datasets = entry.get("datasets") or []
        if not datasets:
            raise SlideReadError(damaged(self.path, "its multiscales lists no datasets"))
        levels = []
        for dataset in datasets:
            try:
                levels.append(group[dataset["path"]])
            except KeyError:
                raise SlideReadError(
                    damaged(self.path, f"its multiscales names a missing array {dataset.get('path')!r}")
                ) from None
        axis_entries = [a if isinstance(a, dict) else {"name": str(a)} for a in entry.get("axes") or []]
        names = [str(a.get("name", "")).lower() for a in axis_entries]
        if names:
            axes = "".join(n.upper() if n in ("t", "c", "z", "y", "x") else "?" for n in names)
        else:  # NGFF < 0.4 has no axes
            axes = _guess_axes(tuple(levels[0].shape), str(self.path))
            names = [a.lower() for a in axes]
        self.format_name = "OME-Zarr"
        self._set_levels(levels, axes, levels[0].dtype)
        units = {str(a.get("name", "")).lower(): a.get("unit") for a in axis_entries}
        ours = attrs.get("nca_tiles")
        generator = ours.get("generator") if isinstance(ours, dict) else None
        first = levels[0]
        self.metadata = SlideMetadata(
            format=f"OME-Zarr (NGFF {version}, zarr v{first.metadata.zarr_format})",
            mpp=_ngff_mpp(entry, datasets[0], names, units),
            name=entry.get("name") or None,
            pixels=_array_pixels(axes, first),
            storage=_zarr_storage(axes, first),
            generator=generator or None,
            raw=attrs,
        )


class ArraySlide(_AxesSlide):
    """An image array already open (NumPy, zarr, anything sliceable with a shape and a dtype), as
    one level: (y, x), (y, x, c), (c, y, x) or (t, c, z, y, x), unless ``axes`` names them."""

    kind = "array"

    def __init__(self, array: Any, axes: str | None = None, mpp: float | None = None, name: str = "the image"):
        self.path = Path(name)
        self.format_name = "array"
        shape = tuple(int(s) for s in array.shape)
        axes = axes.upper() if axes else _guess_axes(shape, name)
        if len(axes) != len(shape):
            raise NcaTilesError(f"axes {axes!r} do not fit an array of shape {shape}")
        self._set_levels([array], axes, array.dtype)
        self.metadata = SlideMetadata(format="array in memory", mpp=(mpp, mpp) if mpp else None)


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide. ``compression``: what tifffile saw in a TIFF-based file
    (OpenSlide does not report it)."""

    kind = "openslide"

    def __init__(self, path: Path, compression: str | None = None):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
            self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
            props = dict(self._osr.properties)
            associated = tuple(self._osr.associated_images)
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{path}: OpenSlide cannot open it ({_reason(exc)}): the file is truncated, corrupt or of a kind "
                "OpenSlide does not read; copy it again from its source, or convert it to OME-TIFF"
            ) from exc
        vendor = props.get("openslide.vendor", "?")
        self.format_name = f"OpenSlide {vendor}"
        tile = self.tile_size(0)
        layout = f"tiles {tile[0]} x {tile[1]}" if tile else "tiles: not reported"
        self.metadata = SlideMetadata(
            format=f"{vendor} (read with OpenSlide)",
            mpp=_openslide_mpp(props),
            storage=f"{layout}, compression {compression or 'not reported'}",
            objective_power=props.get("openslide.objective-power") or None,
            associated_images=associated,
            raw=props,
        )

    def tile_size(self, level: int = 0) -> tuple[int, int] | None:
        props = self._osr.properties
        try:
            return (
                int(props[f"openslide.level[{level}].tile-width"]),
                int(props[f"openslide.level[{level}].tile-height"]),
            )
        except (KeyError, ValueError):
            return None

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        downsample = self._osr.level_downsamples[level]
        # OpenSlide wants the location in level-0 pixels, the size in level pixels.
        location = (round(x * downsample), round(y * downsample))
        rgba = np.asarray(self._osr.read_region(location, level, (w, h)))
        return _over_white(rgba)

    def close(self) -> None:
        self._osr.close()


class PillowSlide(Slide):
    """A PNG, JPEG or other flat image, decoded whole by Pillow: a single level."""

    kind = "image"

    def __init__(self, path: Path):
        from PIL import Image, UnidentifiedImageError

        self.path = path
        try:
            with Image.open(path) as image:
                self.format_name = image.format or "image"
                mode = image.mode
                image.load()  # decode now: a truncated file fails here, not mid-extraction
                rgb = image.convert("RGBA") if image.mode in ("RGBA", "LA", "PA") else image.convert("RGB")
                self._pixels = _over_white(np.asarray(rgb)) if rgb.mode == "RGBA" else np.asarray(rgb)
        except Image.DecompressionBombError as exc:
            raise SlideReadError(f"{path}: too large for a flat image; convert it to a tiled TIFF") from exc
        except UnidentifiedImageError as exc:
            raise SlideReadError(
                f"{path}: cannot read it as a slide: not a format this tool reads (expected a format OpenSlide "
                "reads such as .svs, .ndpi, .mrxs; an OME-TIFF or TIFF; an OME-Zarr folder; PNG or JPEG)"
            ) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise SlideReadError(damaged(path, f"cannot decode it ({_reason(exc)})")) from exc
        h, w = self._pixels.shape[:2]
        self.level_dimensions = ((w, h),)
        # PNG/JPEG dpi fields are screen/print defaults, never a scanner's resolution.
        self.metadata = SlideMetadata(
            format=f"{self.format_name} (read with Pillow)",
            pixels=f"Pillow mode {mode}",
            storage="one image, decoded whole",
        )

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._pixels[y : y + h, x : x + w]


def open_slide(path: str | os.PathLike[str], source_mpp: float | None = None) -> Slide:
    """Open a slide of any supported format with the reader that fits it.

    ``source_mpp`` is the level-0 µm/px to use when the file's metadata has none (``slide.mpp``
    raises an ``NcaTilesError`` asking for ``--source-mpp`` if neither exists).
    Unreadable, corrupt or truncated files raise ``SlideReadError`` with the reason.
    """
    path = Path(path)
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist")
    if source_mpp is not None and not source_mpp > 0:
        raise NcaTilesError(f"--source-mpp must be positive, got {source_mpp}")
    slide: Slide
    if path.is_dir():
        slide = ZarrSlide(path)
        slide.source_mpp = source_mpp
        return slide
    try:
        with open(path, "rb") as f:
            is_tiff = f.read(4) in _TIFF_MAGIC
    except OSError as exc:
        raise SlideReadError(f"{path}: cannot read the file ({_reason(exc)})") from exc

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
        compression = None
        if tif is not None:
            compression = tif.pages[0].compression.name
            tif.close()
        slide = OpenSlideSlide(path, compression)
    elif tif is not None:
        slide = TiffSlide(path, tif)
    else:
        slide = PillowSlide(path)
    slide.source_mpp = source_mpp
    return slide


def is_zarr_image(path: Path) -> bool:
    """Whether the folder ``path`` holds an OME-Zarr image (NGFF multiscales metadata)."""
    for name in (".zattrs", "zarr.json"):
        try:
            attrs = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(attrs, dict):
            attrs = attrs.get("attributes", {}) if name == "zarr.json" else attrs
            if isinstance(attrs, dict) and _ngff_multiscales(attrs) is not None:
                return True
    return False


def find_slides(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Slide files named in ``paths``: files and zarr folders as given, other folders searched
    recursively for ``SLIDE_EXTENSIONS`` and OME-Zarr folders (hidden entries skipped, zarr stores
    not entered). Sorted within each folder, duplicates removed."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise NcaTilesError(f"{path} does not exist")
        if path.is_dir() and not any((path / name).is_file() for name in _ZARR_METADATA):
            inside = sorted(_search(path))
            if not inside:
                raise NcaTilesError(
                    f"no slide files ({', '.join(e.lstrip('.') for e in SLIDE_EXTENSIONS)}) or OME-Zarr "
                    f"folders found in folder {path}"
                )
            found.extend(inside)
        else:
            found.append(path)
    unique: dict[Path, None] = {}
    for p in found:
        unique.setdefault(p.resolve(), None)
    return list(unique)


def _search(folder: Path) -> Iterator[Path]:
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if any((entry / name).is_file() for name in _ZARR_METADATA):
                if is_zarr_image(entry):  # other zarr stores (patch stores, canvases) are no slides
                    yield entry
            else:
                yield from _search(entry)
        elif entry.is_file() and entry.name.lower().endswith(SLIDE_EXTENSIONS):
            yield entry


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


def um_per_unit(unit: str | None) -> float | None:
    """µm in one ``unit`` (any spelling in ``UM_PER_UNIT``); None for a missing or unknown unit."""
    return UM_PER_UNIT.get(unit) if unit else None


def _pixel_size(x: float | None, y: float | None) -> tuple[float, float] | None:
    """(x, y) µm/px when plausible; one given size serves for both axes."""
    x, y = (x if x is not None else y), (y if y is not None else x)
    if x is None or y is None or not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in (x, y)):
        return None
    return float(x), float(y)


def _openslide_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    try:
        return _pixel_size(float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
    except (KeyError, ValueError):
        pass
    um = um_per_unit(props.get("tiff.ResolutionUnit"))
    try:
        resolution = [float(props[f"tiff.{axis}Resolution"]) for axis in ("X", "Y")]
    except (KeyError, ValueError):
        return None
    if um is None or not all(r > 0 for r in resolution):
        return None
    return _pixel_size(um / resolution[0], um / resolution[1])


def _tiff_metadata(tif: Any, series: Any) -> SlideMetadata:
    page = series.keyframe
    kind = "OME-TIFF" if tif.is_ome else f"TIFF ({series.kind})" if series.kind else "TIFF"
    colour = page.photometric.name
    if colour == "YCBCR" and page.subsampling:
        colour = f"RGB stored as YCbCr {page.subsampling[0]}x{page.subsampling[1]}"
    layout = f"tiles {page.tilewidth} x {page.tilelength}" if page.is_tiled else f"strips of {page.rowsperstrip} rows"
    predictor = getattr(page, "predictor", 1)
    mpp, generator = (_ome_xml_metadata(tif.ome_metadata) if tif.is_ome else (None, None))
    if mpp is None:
        mpp = _tiff_resolution_mpp(page)
    return SlideMetadata(
        format=f"{kind}{', BigTIFF' if tif.is_bigtiff else ''} (read with tifffile)",
        mpp=mpp,
        name=series.name or None,
        pyramid=("SubIFD pyramid" if page.subifds else "pyramid") if len(series.levels) > 1 else None,
        pixels=(
            f"{colour}, {page.samplesperpixel} samples x {page.dtype}, "
            f"{'interleaved' if page.planarconfig == 1 else 'planar'}; axes {series.axes}"
        ),
        storage=(
            f"{layout}, compression {page.compression.name}"
            + (f", predictor {int(predictor)}" if predictor and int(predictor) > 1 else "")
        ),
        generator=generator,
        other_images=tuple(s.name or s.kind for s in tif.series[1:]),
    )


def _ome_xml_metadata(ome_xml: str | None) -> tuple[tuple[float, float] | None, dict[str, Any] | None]:
    """µm/px from the first image's PhysicalSizeX/Y (in their units, µm by default), and the
    generator that export/ometiff.py records (JSON at the end of the image Description, and a
    MapAnnotation of strings)."""
    if not ome_xml:
        return None, None
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None, None
    generator = None
    for annotation in root.iter():
        if annotation.tag.endswith("}MapAnnotation") and annotation.get("Namespace") == GENERATOR_NAMESPACE:
            generator = {m.get("K"): m.text or "" for m in annotation.iter() if m.tag.endswith("}M")}
    description = next((e.text for e in root.iter() if e.tag.endswith("}Description")), None) or ""
    if GENERATOR_MARKER in description:
        try:
            generator = json.loads(description.split(GENERATOR_MARKER, 1)[1])
        except ValueError:
            pass  # keep the MapAnnotation's strings
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, generator
    sizes: list[float | None] = []
    for axis in ("X", "Y"):
        value, um = pixels.get(f"PhysicalSize{axis}"), um_per_unit(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            sizes.append(float(value) * um if value is not None and um is not None else None)
        except ValueError:
            sizes.append(None)
    return _pixel_size(*sizes), generator


def _tiff_resolution_mpp(page: Any) -> tuple[float, float] | None:
    """µm/px from the TIFF X/YResolution (pixels per unit) and ResolutionUnit tags."""
    um = um_per_unit(TIFF_RESOLUTION_UNITS.get(int(page.resolutionunit)))
    x_res, y_res = page.resolution
    if um is None or not (x_res > 0 and y_res > 0):
        return None
    return _pixel_size(um / x_res, um / y_res)


def _ngff_multiscales(attrs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(version, first multiscales entry) from group attributes of NGFF 0.4 or 0.5, else None."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and ome.get("multiscales"):  # 0.5
        return str(ome.get("version", "0.5")), ome["multiscales"][0]
    if attrs.get("multiscales"):  # 0.4 and earlier
        entry = attrs["multiscales"][0]
        return str(entry.get("version", "?")), entry
    return None


def _ngff_mpp(
    entry: dict[str, Any], dataset: dict[str, Any], names: list[str], units: dict[str, Any]
) -> tuple[float, float] | None:
    """µm/px of the first dataset: its scale (times the multiscale's own, if any) in the axes' units."""

    def scale_of(item: dict[str, Any]) -> list[float] | None:
        transforms = item.get("coordinateTransformations") or []
        return next((t.get("scale") for t in transforms if isinstance(t, dict) and t.get("type") == "scale"), None)

    scale = scale_of(dataset)
    if not scale or len(scale) != len(names) or "x" not in names or "y" not in names:
        return None
    overall = scale_of(entry)
    if overall and len(overall) == len(names):
        scale = [a * b for a, b in zip(scale, overall, strict=True)]
    ux, uy = um_per_unit(units.get("x")), um_per_unit(units.get("y"))
    if ux is None or uy is None:
        return None
    return _pixel_size(scale[names.index("x")] * ux, scale[names.index("y")] * uy)


def _guess_axes(shape: tuple[int, ...], name: str) -> str:
    """Axes of an image array without names: (y, x), (y, x, c), (c, y, x) or (t, c, z, y, x)."""
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return "YXC"
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return "CYX"
    if len(shape) == 5:
        return "TCZYX"
    raise SlideReadError(
        f"cannot tell the image axes of {name} from its shape {shape}: expected (y, x), (y, x, c) or (c, y, x)"
    )


def _array_pixels(axes: str, array: Any) -> str:
    channels = array.shape[axes.index("C")] if "C" in axes else 1
    return f"axes {','.join(axes.lower())}, {channels} channels x {array.dtype}"


def _zarr_storage(axes: str, array: Any) -> str:
    chunks = dict(zip(axes, array.chunks, strict=True))
    metadata = array.metadata
    if metadata.zarr_format == 2:
        codecs = "none" if metadata.compressor is None else str(metadata.compressor)
    else:
        codecs = ", ".join(type(c).__name__ for c in array.compressors) or "none"
    return f"chunks {chunks.get('X', '?')} x {chunks.get('Y', '?')}, compression {codecs}"


# --- small helpers ------------------------------------------------------------------------------


def _detect_openslide_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


def _settle_zarr_reads() -> None:
    """After a failed zarr read, wait for the chunk reads still running beside the one that
    failed and collect their errors: zarr gathers them on its own event loop without cancelling
    them, and left alone they print tracebacks ("exception was never retrieved", "Task was
    destroyed but it is pending") later or at exit."""
    try:
        from zarr.core import sync as zarr_sync
    except ImportError:  # another zarr layout: nothing to settle that we know of
        return
    if getattr(zarr_sync, "loop", [None])[0] is None:  # no zarr read has run
        return

    async def settle() -> None:
        current = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not current and not t.done()]:
            await asyncio.gather(*others, return_exceptions=True)

    try:
        zarr_sync.sync(settle())
    except Exception:  # noqa: BLE001 - only tidying up after an error already being reported
        pass


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
    "SLIDE_EXTENSIONS", "UM_PER_UNIT", "Slide", "SlideMetadata", "SlideReadError", "OpenSlideSlide", "TiffSlide",
    "ZarrSlide", "PillowSlide", "ArraySlide", "open_slide", "find_slides", "is_zarr_image", "best_level",
    "read_level0_region", "read_region_at_mpp", "resample_from_level", "resample_box", "um_per_unit",
)  # fmt: skip
