"""Tissue patches: extraction from slides into a zarr v3 store, and reading the store back.

Store layout (a contract the training code relies on)::

    patches.zarr/
      images       uint8 (N, P, P, 3), chunks of up to 256 patches
      slide_index  int32 (N)   index into attrs["nca_tiles"]["slides"]
      x, y         int64 (N)   patch top-left in level-0 pixels of its slide
      split        uint8 (N)   0 train, 1 val, 2 test
      attrs["nca_tiles"] = {"kind": "patches", "format_version": 1, "target_mpp", "patch_size",
                            "slides": [{"path", "width", "height", "mpp", "n_patches"}, ...],
                            "tool_version", "split_by": "slide" | "region", "seed"}

Geometry: patches are read from the pyramid level at or just finer than ``target_mpp`` (level
downsample ``d``), covering ``round(patch_size * target_mpp / slide_mpp / d)`` whole pixels of that
level, on a grid of whole level pixels, area-averaged to ``patch_size`` pixels. Snapping to whole
level pixels keeps patch positions and region borders exact integers and, where a level is already
at the target resolution, copies its pixels instead of blurring them by a sub-pixel resampling; it
changes the scale by at most half a level pixel per patch (< 0.8 % for 64 px patches).

Splits (about 80/10/10 of the patches, seeded): with at least 3 slides that have tissue, whole
slides go to train, val or test. With fewer, each slide is cut into a grid of square regions, whole
regions go to the splits, and patches crossing a region border are dropped, so no pixel of a val
or test patch is in a train patch. The region side (level-0 px) is stored per slide as
``region_size``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nca_tiles import __version__
from nca_tiles.errors import NcaTilesError
from nca_tiles.runtime.outputs import atomic_output

ATTRS_KEY = "nca_tiles"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
MAX_PATCH_SIZE = 1024
CHUNK_PATCHES = 256
MAX_CHUNK_BYTES = 4 << 20  # big patches get fewer per chunk: a chunk is what one read decodes
MIN_SLIDES_FOR_SLIDE_SPLIT = 3
SPLIT_POLICIES = ("auto", "slide", "region")
VAL_FRACTION = TEST_FRACTION = 0.1
# Region split: aim for this many tissue regions per slide, so val and test get 2-3 regions each
# while regions stay as large as possible (fewer patches lost at borders, less spatial leakage).
REGIONS_PER_SLIDE = 25
SMALL_SLIDE_REGION_FOOTPRINTS = 2  # see _region_size
# Asking for a slightly finer µm/px than the scan (e.g. 0.5 of a 0.5021 slide) is not upsampling
# worth refusing.
UPSAMPLE_TOLERANCE = 0.02
# Thumbnail pixels per patch side for the tissue mask.
MASK_PIXELS_PER_PATCH = 8


# --- reading a store ----------------------------------------------------------------------------


@dataclass
class PatchStore:
    """An opened patch store. ``images`` stays on disk (a zarr array); the per-patch metadata
    (``split``, ``slide_index``, ``x``, ``y``) is small and loaded."""

    path: Path
    images: Any  # zarr.Array (N, P, P, 3) uint8
    split: np.ndarray  # uint8 (N)
    slide_index: np.ndarray  # int32 (N)
    x: np.ndarray  # int64 (N)
    y: np.ndarray  # int64 (N)
    attrs: dict[str, Any] = field(repr=False)

    @property
    def mpp(self) -> float:
        return float(self.attrs["target_mpp"])

    @property
    def patch_size(self) -> int:
        return int(self.attrs["patch_size"])

    @property
    def slides(self) -> list[dict[str, Any]]:
        return list(self.attrs["slides"])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def indices(self, split_name: str) -> np.ndarray:
        """Patch indices (int64, ascending) of ``split_name``: "train", "val" or "test"."""
        if split_name not in SPLIT_NAMES:
            raise NcaTilesError(f"unknown split {split_name!r}: use one of {', '.join(SPLIT_NAMES)}")
        return np.flatnonzero(self.split == SPLIT_NAMES.index(split_name))

    @cached_property
    def identity(self) -> str:
        """Short stable hash of the store's data, the same wherever the slides and the store are:
        the extraction settings in the attributes, each slide's file name, size, µm/px and patch
        count (not its path, nor the nca-tiles version that wrote the store), N, every patch's
        slide, position and split, and the pixels of a few patches spread over the store. Cheap
        (reads at most 4 chunks); the same store re-extracted from the same slides in another
        folder or checkout has the same identity, other slides or settings give another one."""
        attrs = {key: value for key, value in self.attrs.items() if key not in ("slides", "tool_version")}
        attrs["slides"] = [{**{key: value for key, value in slide.items() if key != "path"},
                            "name": Path(slide["path"]).name} for slide in self.slides]
        digest = hashlib.sha256(json.dumps({"identity": 2, **attrs}, sort_keys=True).encode())
        digest.update(str(len(self)).encode())
        for column, dtype in ((self.split, "u1"), (self.slide_index, "<i4"), (self.x, "<i8"), (self.y, "<i8")):
            digest.update(column.astype(dtype).tobytes())
        self._update_with_patches(digest)
        return digest.hexdigest()[:16]

    @cached_property
    def legacy_identity(self) -> str:
        """The identity as nca-tiles 0.1.0 computed it: its attributes as written, the slides'
        absolute paths at extraction included. Checkpoints of runs started then record it."""
        digest = hashlib.sha256(json.dumps(self.attrs, sort_keys=True).encode())
        digest.update(str(len(self)).encode())
        digest.update(self.split.tobytes())
        self._update_with_patches(digest)
        return digest.hexdigest()[:16]

    def has_identity(self, recorded: str) -> bool:
        """Whether ``recorded`` (a checkpoint's record of the store it was trained on) names this
        store: its ``identity``, or its ``legacy_identity`` so that runs started with nca-tiles
        0.1.0 still resume from the store they were trained on."""
        return recorded == self.identity or recorded == self.legacy_identity

    def _update_with_patches(self, digest: Any) -> None:
        n = len(self)
        for index in sorted({round(i) for i in np.linspace(0, n - 1, num=min(n, 4))}):
            digest.update(np.ascontiguousarray(self.images[index]).tobytes())


def is_patch_store(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a patch store (reads one small JSON file)."""
    try:
        attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"][ATTRS_KEY]
        return attrs["kind"] == "patches"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def open_patch_store(path: str | os.PathLike[str]) -> PatchStore:
    """Open a store written by ``extract_patches``; ``NcaTilesError`` if missing or corrupt."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise NcaTilesError(f"{path} does not exist: create a patch store with nca-tiles extract-patches")
    if not is_patch_store(path):
        raise NcaTilesError(f"{path} is not a patch store: create one with nca-tiles extract-patches")
    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs[ATTRS_KEY])
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise NcaTilesError(
                f"{path} is patch store format {version}; this nca-tiles reads format {FORMAT_VERSION}: "
                "re-extract it or upgrade nca-tiles"
            )
        images = group["images"]
        n, size = images.shape[0], int(attrs["patch_size"])
        if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
            raise ValueError(f"images are {images.dtype} {images.shape}, expected uint8 (N, {size}, {size}, 3)")
        columns = {name: np.asarray(group[name][:]) for name in ("split", "slide_index", "x", "y")}
        for name, column in columns.items():
            if column.shape != (n,):
                raise ValueError(f"{name} has shape {column.shape}, expected ({n},)")
        float(attrs["target_mpp"]), list(attrs["slides"])  # present and well-typed
    except NcaTilesError:
        raise
    except Exception as exc:  # noqa: BLE001 - any zarr/JSON failure means the same to the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NcaTilesError(f"{path} is a corrupt patch store ({reason}): extract it again") from exc
    return PatchStore(path=path, images=images, attrs=attrs, **columns)


def describe_store(path: str | os.PathLike[str]) -> str:
    """Human summary: patches, resolution, split counts, slides. ``nca-tiles info`` prints it."""
    store = open_patch_store(path)
    a = store.attrs
    counts = [len(store.indices(name)) for name in SPLIT_NAMES]
    lines = [
        f"patch store {store.path}",
        f"  {len(store)} patches of {store.patch_size}x{store.patch_size} px at {store.mpp:g} µm/px,"
        f" split by {a['split_by']} (seed {a['seed']})",
        "  " + " | ".join(f"{name} {count}" for name, count in zip(SPLIT_NAMES, counts, strict=True)),
        f"  {len(store.slides)} slide{'s' if len(store.slides) != 1 else ''}:",
    ]
    per_slide = np.zeros((len(store.slides), len(SPLIT_NAMES)), np.int64)
    np.add.at(per_slide, (store.slide_index, store.split), 1)
    for index, slide in enumerate(store.slides):
        splits = ", ".join(f"{n} {c}" for n, c in zip(SPLIT_NAMES, per_slide[index], strict=True) if c)
        lines.append(
            f"    [{index}] {Path(slide['path']).name}  {slide['width']}x{slide['height']} px"
            f" at {slide['mpp']:g} µm/px: {slide['n_patches']} patches ({splits or 'none'})"
        )
    lines.append(f"  written by nca-tiles {a.get('tool_version', '?')}; identity {store.identity}")
    return "\n".join(lines)


# --- extraction ---------------------------------------------------------------------------------


@dataclass
class SkippedSlide:
    path: Path
    reason: str


@dataclass
class ExtractionResult:
    out: Path
    n_patches: int
    split_counts: dict[str, int]
    split_by: str
    slides: list[dict[str, Any]]  # as stored in the attributes
    skipped: list[SkippedSlide]
    n_files: int  # slide files found in the inputs

    def summary(self) -> str:
        """Slides read, ``describe_store`` of the result, and the files skipped and why."""
        lines = [f"read {len(self.slides)} of {self.n_files} slide file{'s' if self.n_files != 1 else ''}"]
        lines.append(describe_store(self.out))
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} file{'s' if len(self.skipped) != 1 else ''}:")
            lines.extend(f"    {s.path}: {s.reason}" for s in self.skipped)
        return "\n".join(lines)


@dataclass(frozen=True)
class _Settings:
    patch_size: int
    target_mpp: float
    stride: int  # at target_mpp
    min_tissue: float
    max_per_slide: int | None
    seed: int
    source_mpp: "SourceMpp"
    progress: bool


@dataclass
class _SlidePlan:
    """Where one slide's tissue patches are, and how they are read."""

    order: int  # position among the input files: seeds its sampling independently of skips
    width: int
    height: int
    mpp: float
    level: int  # pyramid level the patches are read from
    footprint: int  # level-0 px a patch covers
    stride: int  # level-0 px between patch positions
    xs: np.ndarray  # level-0 top-left of every tissue patch position, row-major
    ys: np.ndarray


# µm/px of slides whose metadata has none: one value for all, or {file-name pattern: µm/px}.
SourceMpp = float | dict[str, float] | None


def source_mpp_of(path: Path, source_mpp: SourceMpp) -> float | None:
    """The --source-mpp that applies to ``path``: the first pattern (fnmatch on the file name, or on
    the whole path) that matches it."""
    if not isinstance(source_mpp, dict):
        return source_mpp
    import fnmatch

    for pattern, mpp in source_mpp.items():
        if fnmatch.fnmatch(Path(path).name, pattern) or fnmatch.fnmatch(str(path), pattern):
            return mpp
    return None


def extract_patches(
    slides: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    patch_size: int = 64,
    target_mpp: float = 1.0,
    stride: int | None = None,
    min_tissue: float = 0.6,
    max_per_slide: int | None = None,
    seed: int = 0,
    source_mpp: "SourceMpp" = None,
    overwrite: bool = False,
    allow_upsample: bool = False,
    split_by: str = "auto",
    skip_too_coarse: bool = False,
    progress: bool = True,
) -> ExtractionResult:
    """Extract tissue patches of ``patch_size`` px at ``target_mpp`` µm/px from ``slides`` (files
    and/or folders) into a new patch store at ``out``.

    Unreadable slides and slides without tissue are skipped (listed in the result); everything
    else that is wrong raises ``NcaTilesError`` before anything is written. The store is built
    beside ``out`` under a temporary name and renamed when complete, so ``out`` is never
    half-written; a lock beside it (``.NAME.lock``) refuses a second extraction to the same
    ``out`` while this one runs. ``progress`` shows a bar per slide on a terminal.

    ``split_by``: "slide" (whole slides per split: honest held-out data, but every tissue only in
    one split), "region" (square regions of every slide in every split: each tissue is trained
    on), or "auto" (by slide with 3 or more usable slides, else by region). ``skip_too_coarse``:
    skip (and list) slides coarser than ``target_mpp`` instead of refusing the job, as a level of
    a multi-resolution extraction does. ``source_mpp``: one µm/px for slides whose metadata has
    none, or {file-name pattern: µm/px}.
    """
    from nca_tiles.runtime.outputs import output_lock, remove_stale_temporaries

    stride = patch_size if stride is None else stride
    _check_settings(patch_size, target_mpp, stride, min_tissue, max_per_slide, source_mpp)
    if split_by not in SPLIT_POLICIES:
        raise NcaTilesError(f"unknown --split-by {split_by!r}: use one of {', '.join(SPLIT_POLICIES)}")
    settings = _Settings(patch_size, target_mpp, stride, min_tissue, max_per_slide, seed, source_mpp, progress)
    out = Path(out)
    _check_location(out)
    # Held to the end: a second extraction to the same --out would replace the store under this one.
    with output_lock(out, "--out"):
        remove_stale_temporaries(out)  # of an extraction killed with -9
        _check_output(out, overwrite)
        return _extract(slides, out, split_by, allow_upsample, settings, skip_too_coarse)


def _extract(
    slides: Sequence[str | os.PathLike[str]], out: Path, split_by: str, allow_upsample: bool, settings: _Settings,
    skip_too_coarse: bool = False,
) -> ExtractionResult:
    from nca_tiles.wsi.slide import find_slides

    files = find_slides(slides)
    skipped: list[SkippedSlide] = []
    candidates = _check_resolutions(files, settings.target_mpp, settings.source_mpp, allow_upsample, skipped,
                                    skip_too_coarse)

    with atomic_output(out) as partial:
        while True:
            if not candidates:
                raise NcaTilesError(_nothing_usable_message(files, skipped))
            # Decided before tissue is known, so that each slide is read once, straight into the
            # store; if too few slides turn out usable to split by slide, the store is redone.
            split_by_now = split_by
            if split_by == "auto":
                split_by_now = "slide" if len(candidates) >= MIN_SLIDES_FOR_SLIDE_SPLIT else "region"
            attrs, unusable = _write_store(partial, candidates, split_by_now, settings)
            skipped.extend(unusable)
            written = {entry["path"] for entry in attrs["slides"]}
            used = [(order, path) for order, path in candidates if str(path) in written]
            too_few_to_split_by_slide = split_by_now == "slide" and len(used) < MIN_SLIDES_FOR_SLIDE_SPLIT
            if len(used) == 0 or too_few_to_split_by_slide:
                if split_by == "slide" and used:
                    raise NcaTilesError(
                        f"--split-by slide needs at least {MIN_SLIDES_FOR_SLIDE_SPLIT} usable slides, found {len(used)}: "
                        "add slides or use --split-by region"
                    )
                shutil.rmtree(partial, ignore_errors=True)
                candidates = used
                continue
            break

    store = open_patch_store(out)
    return ExtractionResult(
        out=out,
        n_patches=len(store),
        split_counts={name: len(store.indices(name)) for name in SPLIT_NAMES},
        split_by=split_by_now,
        slides=attrs["slides"],
        skipped=skipped,
        n_files=len(files),
    )


def _check_settings(
    patch_size: int,
    target_mpp: float,
    stride: int,
    min_tissue: float,
    max_per_slide: int | None,
    source_mpp: float | None,
) -> None:
    if not 0 < patch_size <= MAX_PATCH_SIZE:
        raise NcaTilesError(f"--patch-size must be 1..{MAX_PATCH_SIZE} px, got {patch_size}")
    if not stride > 0:
        raise NcaTilesError(f"--stride must be a positive number of pixels, got {stride}")
    if not (target_mpp > 0 and math.isfinite(target_mpp)):
        raise NcaTilesError(f"--mpp must be a positive µm/px, got {target_mpp}")
    values = source_mpp.values() if isinstance(source_mpp, dict) else [] if source_mpp is None else [source_mpp]
    for value in values:
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise NcaTilesError(f"--source-mpp must be a positive µm/px, got {value}")
    if not 0 <= min_tissue <= 1:
        raise NcaTilesError(f"--min-tissue is a fraction in 0..1, got {min_tissue}")
    if max_per_slide is not None and max_per_slide < 1:
        raise NcaTilesError(f"--max-per-slide must be at least 1, got {max_per_slide}")


def _check_location(out: Path) -> None:
    """The folder of ``out`` exists and this process can write there (tried for real)."""
    from nca_tiles.runtime.preflight import check_writable

    if not out.parent.is_dir():
        raise NcaTilesError(f"the folder of --out {out} does not exist: create it first")
    check_writable(out, "--out")


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise NcaTilesError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    if not is_patch_store(out):
        # --overwrite replaces a patch store, never an arbitrary folder or file.
        raise NcaTilesError(f"{out} exists and is not a patch store: refusing to replace it; choose another --out")


def _check_resolutions(
    files: list[Path], target_mpp: float, source_mpp: "SourceMpp", allow_upsample: bool, skipped: list[SkippedSlide],
    skip_too_coarse: bool = False,
) -> list[tuple[int, Path]]:
    """Open every file once, cheaply. Unreadable ones join ``skipped``; a missing µm/px or an
    unwanted upsampling raises now, before minutes of reading. Returns (order, path) of the
    readable ones."""
    from nca_tiles.wsi.slide import SlideReadError, open_slide

    readable = []
    for order, path in enumerate(files):
        try:
            with open_slide(path, source_mpp_of(path, source_mpp)) as slide:
                native = slide.mpp  # raises if neither metadata nor --source-mpp gives it
        except SlideReadError as exc:
            skipped.append(SkippedSlide(path, _strip_path(str(exc), path)))
            continue
        if target_mpp < native * (1 - UPSAMPLE_TOLERANCE) and not allow_upsample:
            if skip_too_coarse:
                skipped.append(SkippedSlide(path, f"its {native:g} µm/px is coarser than --mpp {target_mpp:g}"))
                continue
            raise NcaTilesError(
                f"--mpp {target_mpp:g} is finer than {path.name}'s {native:g} µm/px: use --mpp {native:g} "
                "or coarser, or pass --allow-upsample to interpolate"
            )
        readable.append((order, path))
    return readable


def _plan_slide(slide: Any, order: int, settings: _Settings) -> _SlidePlan | str:
    """The tissue patch positions of an open slide, or why it has none."""
    from nca_tiles.wsi.slide import best_level
    from nca_tiles.wsi.tissue import tissue_mask

    factor = settings.target_mpp / slide.mpp  # level-0 px per patch px
    level = best_level(slide, factor)
    downsample = slide.level_downsamples[level]
    footprint = round(max(1, round(settings.patch_size * factor / downsample)) * downsample)
    step = round(max(1, round(settings.stride * factor / downsample)) * downsample)
    width, height = slide.dimensions
    if footprint > min(width, height):
        return f"smaller than one {settings.patch_size} px patch at {settings.target_mpp:g} µm/px"
    mask = tissue_mask(slide, footprint / MASK_PIXELS_PER_PATCH)
    grid_x = np.arange(0, width - footprint + 1, step, dtype=np.int64)
    grid_y = np.arange(0, height - footprint + 1, step, dtype=np.int64)
    xs, ys = (a.ravel() for a in np.meshgrid(grid_x, grid_y))  # row-major: y, then x
    keep = mask.fractions(xs, ys, footprint) >= settings.min_tissue
    if not keep.any():
        return f"no patch with at least {settings.min_tissue:.0%} tissue"
    return _SlidePlan(order, width, height, slide.mpp, level, footprint, step, xs[keep], ys[keep])


def _select(plan: _SlidePlan, split_by: str, settings: _Settings) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The patch positions to extract, and the region side for a region split: patches crossing a
    region border are dropped, then at most ``max_per_slide`` are drawn at random."""
    xs, ys, region_size = plan.xs, plan.ys, None
    if split_by == "region":
        region_size = _region_size(plan)
        inside = ((xs + plan.footprint - 1) // region_size == xs // region_size) & (
            (ys + plan.footprint - 1) // region_size == ys // region_size
        )
        xs, ys = xs[inside], ys[inside]
    if settings.max_per_slide is not None and len(xs) > settings.max_per_slide:
        rng = np.random.default_rng([settings.seed, plan.order])
        chosen = np.sort(rng.choice(len(xs), size=settings.max_per_slide, replace=False))
        xs, ys = xs[chosen], ys[chosen]
    return xs, ys, region_size


def _write_store(
    partial: Path, candidates: list[tuple[int, Path]], split_by: str, settings: _Settings
) -> tuple[dict[str, Any], list[SkippedSlide]]:
    """Write the store at ``partial``, one slide after the other. Returns its attributes and the
    slides that gave no patch, and why (a slide failing mid-read has its patches rolled back)."""
    import zarr
    from tqdm import tqdm

    from nca_tiles.wsi.slide import SlideReadError, open_slide

    size = settings.patch_size
    shutil.rmtree(partial, ignore_errors=True)
    group = zarr.open_group(partial, mode="w", zarr_format=3)
    chunk = max(1, min(CHUNK_PATCHES, MAX_CHUNK_BYTES // (size * size * 3)))
    images = group.create_array("images", shape=(0, size, size, 3), dtype="uint8", chunks=(chunk, size, size, 3))
    entries: list[dict[str, Any]] = []
    columns: dict[str, list[np.ndarray]] = {"x": [], "y": [], "split": []}
    unusable: list[SkippedSlide] = []

    for order, path in candidates:
        n_before, stage = images.shape[0], ""
        try:
            with open_slide(path, source_mpp_of(path, settings.source_mpp)) as slide:
                plan = _plan_slide(slide, order, settings)
                if isinstance(plan, str):
                    unusable.append(SkippedSlide(path, plan))
                    continue
                xs, ys, region_size = _select(plan, split_by, settings)
                if len(xs) == 0:
                    unusable.append(SkippedSlide(path, "no patch fits inside one split region"))
                    continue
                stage = " (while reading patches)"
                reader = _PatchReader(slide, plan.level, plan.footprint, size)
                order_read = reader.reading_order(xs, ys)
                xs, ys = xs[order_read], ys[order_read]  # the store keeps the reading order
                disable = None if settings.progress else True  # None: a bar only on a terminal
                with tqdm(total=len(xs), desc=path.name, unit="patch", disable=disable) as bar:
                    for batch in reader.patches(xs, ys, chunk):
                        images.append(batch, axis=0)
                        bar.update(len(batch))
        except SlideReadError as exc:
            images.resize((n_before, size, size, 3))
            unusable.append(SkippedSlide(path, _strip_path(str(exc), path) + stage))
            continue
        entry: dict[str, Any] = {
            "path": str(path),
            "width": plan.width,
            "height": plan.height,
            "mpp": plan.mpp,
            "n_patches": len(xs),
        }
        if region_size is not None:
            entry["region_size"] = int(region_size)
            columns["split"].append(_split_regions(xs // region_size, ys // region_size, settings.seed, order))
        entries.append(entry)
        columns["x"].append(xs.astype(np.int64))
        columns["y"].append(ys.astype(np.int64))

    counts = [entry["n_patches"] for entry in entries]
    slide_index = np.repeat(np.arange(len(entries), dtype=np.int32), counts)
    if split_by == "slide":  # known only now: slides skipped above take no split with them
        columns["split"] = [_split_slides(np.asarray(counts), settings.seed)[slide_index]]
    data = {
        "slide_index": slide_index,
        **{name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in columns.items()},
    }
    for name, dtype in (("slide_index", np.int32), ("x", np.int64), ("y", np.int64), ("split", np.uint8)):
        values = data[name].astype(dtype)
        group.create_array(name, data=values, chunks=(max(1, min(len(values), 1 << 16)),))
    attrs = {
        "kind": "patches",
        "format_version": FORMAT_VERSION,
        "target_mpp": float(settings.target_mpp),
        "patch_size": int(size),
        "slides": entries,
        "tool_version": __version__,
        "split_by": split_by,
        "seed": int(settings.seed),
    }
    group.attrs[ATTRS_KEY] = attrs
    return attrs, unusable


class _PatchReader:
    """Reads patches of one slide block by block: the slide is read in windows of at most
    ~``MAX_READ_SIDE`` level pixels a side, each window once, whatever the number of patches."""

    def __init__(self, slide: Any, level: int, footprint: int, patch_size: int):
        from nca_tiles.wsi.slide import MAX_READ_SIDE

        self.slide, self.level, self.footprint, self.patch_size = slide, level, footprint, patch_size
        self.downsample = slide.level_downsamples[self.level]
        self.block = max(MAX_READ_SIDE * self.downsample, footprint)  # level-0 px per block side

    def _block_ids(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        per_row = int(self.slide.dimensions[0] // self.block) + 1
        return (ys // self.block).astype(np.int64) * per_row + (xs // self.block).astype(np.int64)

    def reading_order(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Permutation grouping the patches by block, row-major inside a block."""
        return np.lexsort((xs, ys, self._block_ids(xs, ys)))

    def patches(self, xs: np.ndarray, ys: np.ndarray, batch: int):
        """Yield the patches at level-0 (xs, ys), in that order (``reading_order`` first, or
        blocks are read more than once), as uint8 arrays of up to ``batch`` patches."""
        from nca_tiles.wsi.slide import resample_box

        ids = self._block_ids(xs, ys)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], len(ids)]
        ds, side = self.downsample, self.footprint / self.downsample
        pending: list[np.ndarray] = []
        for start, end in zip(starts, ends, strict=True):
            bx, by = xs[start:end], ys[start:end]
            # The window, in level pixels: the bounding box of the block's patches.
            left, top = math.floor(bx.min() / ds), math.floor(by.min() / ds)
            right = math.ceil((bx.max() + self.footprint) / ds)
            bottom = math.ceil((by.max() + self.footprint) / ds)
            pixels = self.slide.read_region(self.level, left, top, right - left, bottom - top)
            for x, y in zip(bx, by, strict=True):
                box = (x / ds - left, y / ds - top, x / ds - left + side, y / ds - top + side)
                pending.append(resample_box(pixels, box, self.patch_size, self.patch_size))
                if len(pending) == batch:
                    yield np.stack(pending)
                    pending = []
        if pending:
            yield np.stack(pending)


def _region_size(plan: _SlidePlan) -> int:
    """Region side in level-0 px: a whole number of strides, so that with stride >= patch size no
    patch crosses a border; about ``REGIONS_PER_SLIDE`` regions cover the slide's tissue.

    With overlapping patches (stride < patch) a region of side R keeps ((R − F)/S + 1)² of its
    (R/S)² positions (F the patch's footprint, S the stride): none where R < F (small slides at a
    coarse µm/px came out empty), only (S/F)² where R = F — 1 in 16 at stride = patch/4, so a
    1500 px ovarian slide gave 25 of its 400 patches at 1 µm/px. Regions are therefore at least
    ``SMALL_SLIDE_REGION_FOOTPRINTS`` patches wide, which keeps 39 % or more."""
    strides_per_region = max(1, math.floor(math.sqrt(len(plan.xs) / REGIONS_PER_SLIDE)))
    smallest = plan.footprint if plan.stride >= plan.footprint else SMALL_SLIDE_REGION_FOOTPRINTS * plan.footprint
    if strides_per_region * plan.stride < smallest:
        strides_per_region = math.ceil(smallest / plan.stride)
    return strides_per_region * plan.stride


def _split_slides(patches_per_slide: np.ndarray, seed: int) -> np.ndarray:
    """Split code per slide (see ``_assign``)."""
    return _assign(patches_per_slide, np.random.default_rng([seed, 0x51DE]))


def _split_regions(region_x: np.ndarray, region_y: np.ndarray, seed: int, order: int) -> np.ndarray:
    """Split code per patch: its region's (see ``_assign``)."""
    keys = region_y.astype(np.int64) * (int(region_x.max()) + 1) + region_x
    _, region_of_patch, patches_per_region = np.unique(keys, return_inverse=True, return_counts=True)
    codes = _assign(patches_per_region, np.random.default_rng([seed, order, 0x4E6]))
    return codes[region_of_patch].astype(np.uint8)


def _assign(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Codes 0 train / 1 val / 2 test for groups (slides or regions) of ``weights`` patches.

    Groups are taken in a seeded random order: into test while that brings it closer to
    ``TEST_FRACTION`` of the patches, then into val likewise, the rest into train. With at least
    three groups each split gets at least one. Balancing patches rather than groups keeps val and
    test near 10 % even when groups differ in size (tissue-edge regions hold few patches).
    """
    n = len(weights)
    codes = np.zeros(n, np.uint8)
    if n < 3:
        return codes
    order, total, i = rng.permutation(n), float(np.sum(weights)), 0
    for code, fraction, keep_back in ((2, TEST_FRACTION, 2), (1, VAL_FRACTION, 1)):
        taken = 0.0
        while i < n - keep_back and (taken == 0 or weights[order[i]] / 2 < fraction * total - taken):
            codes[order[i]] = code
            taken += weights[order[i]]
            i += 1
    return codes


def _nothing_usable_message(files: list[Path], skipped: list[SkippedSlide]) -> str:
    if all("no patch with" in s.reason for s in skipped):
        return (
            f"no tissue found in {len(files)} slide{'s' if len(files) != 1 else ''}: "
            "lower --min-tissue, or check that the slides are brightfield (H&E) scans"
        )
    reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped[:5])
    more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
    return f"none of the {len(files)} slide files is usable: {reasons}{more}"


def _strip_path(message: str, path: Path) -> str:
    """The reason alone, for lists that already name the file."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
