"""Recognise a slide file and describe it: levels, sizes, tiles, compression, pixel size.

Three families are read: TIFF (OME-TIFF with a SubIFD pyramid, and any other TIFF) with
tifffile; OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) with zarr; and the vendor formats
OpenSlide reads (Aperio, Hamamatsu, MIRAX, ...). Our OME-TIFFs go to tifffile rather than
OpenSlide, which sees only the first level of a SubIFD pyramid.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nca_tiles.errors import NcaTilesError
from nca_tiles.wsi.slide import (
    OPENSLIDE_EXTENSIONS,
    check_intact,
    damage_reason,
    damaged,
    open_tiff,
    quiet_tifffile,
)

SlideKind = Literal["tiff", "ome-zarr", "openslide"]

GENERATOR_NAMESPACE = "nca-tiles.generator"  # MapAnnotation namespace written by ometiff.py
GENERATOR_MARKER = " Generator: "  # precedes the generator JSON in ometiff.py's Description
# µm per ResolutionUnit (2: inch, 3: centimetre)
UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0}
UM_PER_NGFF_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "meter": 1e6, "angstrom": 1e-4}


@dataclass
class ZarrLevel:
    path: str
    array: Any
    scale: list[float] | None


@dataclass
class OmeZarrImage:
    """An OME-Zarr multiscale image: its levels (largest first) and axes."""

    version: str
    name: str | None
    axes: list[dict[str, Any]]
    levels: list[ZarrLevel]
    attrs: dict[str, Any]


def ngff_multiscales(attrs: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(version, first multiscales entry) from group attributes of NGFF 0.4 or 0.5, else None."""
    if isinstance(attrs.get("ome"), dict) and attrs["ome"].get("multiscales"):  # 0.5
        return str(attrs["ome"].get("version", "0.5")), attrs["ome"]["multiscales"][0]
    if attrs.get("multiscales"):  # 0.4 and earlier
        entry = attrs["multiscales"][0]
        return str(entry.get("version", "?")), entry
    return None


def open_ome_zarr(path: Path) -> OmeZarrImage:
    """Open the multiscale image of an OME-Zarr group (NcaTilesError if it is not one)."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise NcaTilesError(f"{path} is not a zarr group ({type(exc).__name__}): cannot read it as OME-Zarr") from None
    attrs = dict(group.attrs)
    found = ngff_multiscales(attrs)
    if found is None:
        raise NcaTilesError(f"{path} is a zarr group without OME-NGFF 'multiscales' metadata")
    version, entry = found
    axes = [axis if isinstance(axis, dict) else {"name": str(axis)} for axis in entry.get("axes", [])]
    levels = []
    for dataset in entry.get("datasets", []):
        scale = next(
            (t.get("scale") for t in dataset.get("coordinateTransformations", []) if t.get("type") == "scale"), None
        )
        try:
            levels.append(ZarrLevel(dataset["path"], group[dataset["path"]], scale))
        except KeyError:
            raise NcaTilesError(f"{path}: multiscales names a missing array {dataset.get('path')!r}") from None
    if not levels:
        raise NcaTilesError(f"{path}: multiscales lists no datasets")
    if not axes:  # NGFF < 0.4 had no axes: assume the classic t, c, z, y, x tail
        axes = [{"name": n} for n in "tczyx"[-len(levels[0].array.shape) :]]
    return OmeZarrImage(version, entry.get("name"), axes, levels, attrs)


def slide_kind(path: str | Path) -> SlideKind:
    """Which reader opens ``path``, or NcaTilesError when none does."""
    path = Path(path)
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist")
    if path.is_dir():
        for meta in (".zattrs", "zarr.json"):
            if (path / meta).is_file():
                try:
                    attrs = json.loads((path / meta).read_text())
                except (OSError, ValueError):
                    continue
                attrs = attrs.get("attributes", attrs) if meta == "zarr.json" else attrs
                if ngff_multiscales(attrs) is not None:
                    return "ome-zarr"
        raise NcaTilesError(f"{path} is a directory but not an OME-Zarr image (no multiscales metadata)")

    import openslide

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        vendor = None
    if vendor is not None and vendor != "generic-tiff":
        return "openslide"
    if _is_tiff(path):
        return "tiff"
    if vendor is not None:
        return "openslide"
    if path.suffix.lower() in OPENSLIDE_EXTENSIONS:
        raise NcaTilesError(
            f"{path}: OpenSlide cannot open it: the file is truncated, corrupt or of a kind OpenSlide does not "
            "read; copy it again from its source, or convert it to OME-TIFF"
        )
    raise NcaTilesError(
        f"cannot read {path} as a slide: expected an OME-TIFF/TIFF, an OME-Zarr directory, "
        "or a format OpenSlide reads (.svs, .ndpi, .mrxs, ...)"
    )


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def describe_slide(path: str | Path) -> str:
    """A human-readable description of a slide file (NcaTilesError when it cannot be read)."""
    path = Path(path)
    kind = slide_kind(path)
    try:
        with quiet_tifffile():  # its warnings about damaged files would be stray lines
            if kind == "tiff":
                return _describe_tiff(path)
            if kind == "ome-zarr":
                return _describe_ome_zarr(path)
            return _describe_openslide(path)
    except NcaTilesError:
        raise
    except Exception as exc:  # a corrupt or truncated file: say so in one line
        raise NcaTilesError(damaged(path, f"cannot read it{damage_reason(exc)}")) from None


def _size_line(width: int, height: int, um_x: float | None, um_y: float | None) -> str:
    if um_x is None or um_y is None:
        return "pixel size: unknown"
    return (
        f"pixel size: {um_x:g} x {um_y:g} µm/px; "
        f"physical size: {width * um_x / 1000:.3f} x {height * um_y / 1000:.3f} mm"
    )


def _levels_lines(sizes: list[tuple[int, int]]) -> list[str]:
    """'level i: W x H px (downsample d)' lines, sizes given as (width, height)."""
    width0, height0 = sizes[0]
    lines = []
    for i, (w, h) in enumerate(sizes):
        factor = round(width0 / w)
        # A level halved k times with odd sizes rounded up is a downsample of exactly 2**k.
        if not (factor > 0 and -(-width0 // factor) == w and -(-height0 // factor) == h):
            factor = f"{width0 / w:.4g}"
        lines.append(f"  level {i}: {w} x {h} px (downsample {factor})")
    return lines


def _describe_tiff(path: Path) -> str:
    with open_tiff(path) as tif:  # refuses a truncated or corrupt file
        series = tif.series[0]
        page = series.keyframe
        kind = "OME-TIFF" if tif.is_ome else f"TIFF ({series.kind})" if series.kind else "TIFF"
        lines = [f"{path}", f"format: {kind}{', BigTIFF' if tif.is_bigtiff else ''} (read with tifffile)"]
        if series.name:
            lines.append(f"image name: {series.name}")
        sizes = [(_axis_size(level, "X"), _axis_size(level, "Y")) for level in series.levels]
        pyramid = "SubIFD pyramid" if len(series.levels) > 1 and page.subifds else "pyramid"
        lines.append(f"levels: {len(sizes)}" + (f" ({pyramid})" if len(sizes) > 1 else ""))
        lines += _levels_lines(sizes)
        colour = page.photometric.name
        if colour == "YCBCR" and page.subsampling:
            colour = f"RGB stored as YCbCr {page.subsampling[0]}x{page.subsampling[1]}"
        lines.append(
            f"pixels: {colour}, {page.samplesperpixel} samples x {page.dtype}, "
            f"{'interleaved' if page.planarconfig == 1 else 'planar'}; axes {series.axes}"
        )
        if page.is_tiled:
            layout = f"tiles {page.tilewidth} x {page.tilelength}"
        else:
            layout = f"strips of {page.rowsperstrip} rows"
        lines.append(f"storage: {layout}, compression {page.compression.name}" + _predictor(page))
        um_x, um_y, generator = _tiff_pixel_size_and_generator(tif, page)
        lines.append(_size_line(sizes[0][0], sizes[0][1], um_x, um_y))
        if generator:
            lines.append(f"generator: {json.dumps(generator, ensure_ascii=False)}")
        extra = [s.name or s.kind for s in tif.series[1:]]
        if extra:
            lines.append(f"other images: {', '.join(extra)}")
    return "\n".join(lines)


def _axis_size(level: Any, axis: str) -> int:
    return int(level.shape[level.axes.index(axis)]) if axis in level.axes else 1


def _predictor(page: Any) -> str:
    predictor = getattr(page, "predictor", 1)
    return f", predictor {int(predictor)}" if predictor and int(predictor) > 1 else ""


def _tiff_pixel_size_and_generator(tif: Any, page: Any) -> tuple[float | None, float | None, dict[str, Any] | None]:
    """µm/px from the OME-XML (else the resolution tags), and the generator that ometiff.py
    records (as JSON at the end of the image Description, and as a MapAnnotation)."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ElementTree.fromstring(tif.ome_metadata)
        except ElementTree.ParseError:
            root = None
        if root is not None:
            pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels")), None)
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
            if pixels is not None and pixels.get("PhysicalSizeX") and pixels.get("PhysicalSizeY"):
                return (
                    _to_um(float(pixels.get("PhysicalSizeX")), pixels.get("PhysicalSizeXUnit", "µm")),
                    _to_um(float(pixels.get("PhysicalSizeY")), pixels.get("PhysicalSizeYUnit", "µm")),
                    generator,
                )
    unit = int(page.resolutionunit)
    x_res, y_res = page.resolution
    if unit in UM_PER_RESOLUTION_UNIT and x_res > 0 and y_res > 0 and (x_res, y_res) != (1.0, 1.0):
        factor = UM_PER_RESOLUTION_UNIT[unit]
        return factor / x_res, factor / y_res, None
    return None, None, None


def _to_um(value: float, unit: str | None) -> float | None:
    factors = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
    factor = factors.get(unit or "µm")
    return value * factor if factor is not None else None


def _describe_ome_zarr(path: Path) -> str:
    image = open_ome_zarr(path)
    names = [str(axis.get("name")) for axis in image.axes]
    lines = [f"{path}", f"format: OME-Zarr (NGFF {image.version}, zarr v{image.levels[0].array.metadata.zarr_format})"]
    if image.name:
        lines.append(f"image name: {image.name}")
    sizes = []
    for level in image.levels:
        shape = dict(zip(names, level.array.shape))
        sizes.append((int(shape.get("x", 1)), int(shape.get("y", 1))))
    lines.append(f"levels: {len(sizes)}")
    lines += _levels_lines(sizes)
    first = image.levels[0].array
    shape0 = dict(zip(names, first.shape))
    chunks = dict(zip(names, first.chunks))
    lines.append(f"pixels: axes {','.join(names)}, {shape0.get('c', 1)} channels x {first.dtype}")
    lines.append(f"storage: chunks {chunks.get('x', '?')} x {chunks.get('y', '?')}, compression {_zarr_codecs(first)}")
    um_x = um_y = None
    scale = image.levels[0].scale
    if scale and "x" in names and "y" in names:
        units = {str(a.get("name")): a.get("unit") for a in image.axes}
        fx = UM_PER_NGFF_UNIT.get(units.get("x") or "")
        fy = UM_PER_NGFF_UNIT.get(units.get("y") or "")
        if fx is not None and fy is not None:
            um_x, um_y = scale[names.index("x")] * fx, scale[names.index("y")] * fy
    lines.append(_size_line(sizes[0][0], sizes[0][1], um_x, um_y))
    ours = image.attrs.get("nca_tiles")
    if isinstance(ours, dict) and ours.get("generator"):
        lines.append(f"generator: {json.dumps(ours['generator'], ensure_ascii=False)}")
    return "\n".join(lines)


def _zarr_codecs(array: Any) -> str:
    metadata = array.metadata
    if metadata.zarr_format == 2:
        compressor = metadata.compressor
        return "none" if compressor is None else str(compressor)
    return ", ".join(type(c).__name__ for c in array.compressors) or "none"


def _describe_openslide(path: Path) -> str:
    import openslide

    check_intact(path)  # OpenSlide opens a truncated file and fails only at the missing tiles
    try:
        slide = openslide.OpenSlide(str(path))
    except Exception as exc:
        raise NcaTilesError(
            f"{path}: OpenSlide cannot open it{damage_reason(exc)}: the file is truncated, corrupt or of a kind "
            "OpenSlide does not read; copy it again from its source, or convert it to OME-TIFF"
        ) from None
    with slide:
        props = slide.properties
        lines = [f"{path}", f"format: {props.get('openslide.vendor', '?')} (read with OpenSlide)"]
        sizes = [(int(w), int(h)) for w, h in slide.level_dimensions]
        lines.append(f"levels: {slide.level_count}")
        lines += _levels_lines(sizes)
        tile_w = props.get("openslide.level[0].tile-width")
        tile_h = props.get("openslide.level[0].tile-height")
        layout = f"tiles {tile_w} x {tile_h}" if tile_w and tile_h else "tiles: not reported"
        lines.append(f"storage: {layout}, compression {_tiff_compression(path)}")
        mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        lines.append(
            _size_line(sizes[0][0], sizes[0][1], float(mpp_x) if mpp_x else None, float(mpp_y) if mpp_y else None)
        )
        if props.get("openslide.objective-power"):
            lines.append(f"objective power: {props['openslide.objective-power']}x")
        if slide.associated_images:
            lines.append(f"associated images: {', '.join(slide.associated_images)}")
    return "\n".join(lines)


def _tiff_compression(path: Path) -> str:
    """Compression of a TIFF-based vendor file (Aperio, ...), which OpenSlide does not report."""
    if not _is_tiff(path):
        return "not reported"
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].compression.name
    except Exception:
        return "not reported"
