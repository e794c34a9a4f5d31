"""Everything the tests share but fixtures (those are in conftest.py): small real models,
slides and canvases written on the spot, running the CLI and checking its error contract,
read-only folders and small file systems, and peak memory measured in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner, Result
from PIL import Image

from nca_tiles.diffusion.checkpoint import save_model_dir
from nca_tiles.diffusion.model import PRESETS, DiffNCA, ModelConfig
from nca_tiles.diffusion.schedule import ScheduleConfig
from nca_tiles_cli.main import cli


# -- models: the tiny preset with non-zero weights, saved as a model directory ---------------------
def save_test_model(directory: Path, config: ModelConfig = PRESETS["tiny"], timesteps: int = 300,
                    seed: int = 0, mpp: float = 1.0, beta_schedule: str = "linear") -> Path:
    """An untrained but non-trivial model (a fresh model's last layer is zero: its ε̂ would be 0)."""
    torch.manual_seed(seed)
    model = DiffNCA(config)
    for p in model.to_update.parameters():
        torch.nn.init.normal_(p, std=0.2)
    meta = {
        "model": config.to_dict(),
        "schedule": ScheduleConfig(timesteps=timesteps, beta_schedule=beta_schedule).to_dict(),
        "data": {"mpp": mpp, "patch_size": 64, "patch_store": "test"},
        "training": {"preset": "tiny", "step": 0},
    }
    save_model_dir(directory, meta, model.state_dict())
    return directory


# -- slides: pyramidal OME-TIFFs, plain TIFFs, PNGs, damaged copies --------------------------------
# Two stain-like colours: both saturated enough to count as tissue.
PINK = (230, 130, 180)
PURPLE = (110, 50, 140)


def checkerboard(height: int, width: int, square: int, colors=(PINK, PURPLE)) -> np.ndarray:
    """RGB uint8 checkerboard of ``square`` px squares, colour 0 at the top-left."""
    yy, xx = np.mgrid[0:height, 0:width]
    parity = ((yy // square) + (xx // square)) % 2
    return np.asarray(colors, np.uint8)[parity]


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean (rounded), cropping an odd last row/column: the next pyramid level."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    blocks = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint32).sum(axis=(1, 3))
    return ((blocks + 2) // 4).astype(np.uint8)


def write_ome_pyramid(
    path: Path,
    image: np.ndarray,
    physical_size: float,
    unit: str = "µm",
    levels: int = 3,
    tile: int = 128,
    compression: str | None = None,
) -> list[np.ndarray]:
    """Tiled OME-TIFF with PhysicalSizeX/Y, reduced levels stored as SubIFDs of level 0 (the
    layout of current OME-TIFF writers). Returns the levels written."""
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(halve(pyramid[-1]))
    metadata = {
        "axes": "YXS",
        "PhysicalSizeX": physical_size,
        "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": physical_size,
        "PhysicalSizeYUnit": unit,
    }
    with tifffile.TiffWriter(path) as tif:
        common = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
        tif.write(pyramid[0], subifds=levels - 1, metadata=metadata, **common)
        for level in pyramid[1:]:
            tif.write(level, subfiletype=1, **common)
    return pyramid


def corrupt_fine_levels(path: Path, levels: int) -> None:
    """Overwrite the middle of every tile of the first ``levels`` pyramid levels with noise: the
    file still opens and its coarse levels read, but decoding finer pixels fails (needs a
    compressed file)."""
    with tifffile.TiffFile(path) as tif:
        spans = [
            span
            for level in tif.series[0].levels[:levels]
            for span in zip(level.keyframe.dataoffsets, level.keyframe.databytecounts, strict=True)
        ]
    noise = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for offset, count in spans:
            f.seek(offset + count // 4)
            f.write(noise.integers(0, 256, count // 2, dtype=np.uint8).tobytes())


def write_plain_tiff(path: Path, image: np.ndarray, mpp: float | None, unit: str = "CENTIMETER", tiled=False) -> None:
    """Single-level TIFF; µm/px (if any) stored as XResolution/YResolution in ``unit``."""
    kwargs: dict = {"photometric": "rgb", "metadata": None}
    if tiled:
        kwargs["tile"] = (128, 128)
    if mpp is not None:
        per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit] / mpp
        kwargs.update(resolution=(per_unit, per_unit), resolutionunit=unit)
    tifffile.imwrite(path, image, **kwargs)


def write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def random_bytes(target: Path, size: int = 20_000, seed: int = 0) -> Path:
    target.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return target


def copy(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


# -- canvases for the export tests, laid out as the synthesis writes them --------------------------
MPP = 0.5
GENERATOR = {"model": "test-model", "model_hash": "abc123", "seed": 7, "sampler": "ddim", "steps": [999, 500, 0]}


def smooth_image(height: int, width: int) -> np.ndarray:
    """Low-frequency colour gradients: JPEG reproduces them within a few grey levels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    red = 128 + 100 * np.sin(xx / 97.0) * np.cos(yy / 131.0)
    green = 40 + 180 * yy / max(height - 1, 1)
    blue = 220 - 180 * xx / max(width - 1, 1)
    return np.clip(np.rint(np.stack([red, green, blue], axis=-1)), 0, 255).astype(np.uint8)


def noisy_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random pixels: every rounding case of the 2x2 average shows up."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_canvas(
    work_dir: Path,
    image: np.ndarray,
    *,
    chunk: int = 256,
    inner: int | None = None,
    mpp: float | None = MPP,
    generator: dict | None = GENERATOR,
) -> Path:
    """Write ``image`` as WORK_DIR/canvas.zarr/rgb (sharded when ``inner`` is given, like the
    synthesis) with the attributes the synthesis records; return the work directory."""
    import zarr

    attrs: dict = {}
    if mpp is not None:
        attrs["mpp"] = mpp
    if generator is not None:
        attrs["generator"] = generator
    group = zarr.open_group(str(work_dir / "canvas.zarr"), mode="w")
    if inner is None:
        rgb = group.create_array("rgb", shape=image.shape, chunks=(chunk, chunk, 3), dtype="uint8", attributes=attrs)
    else:
        rgb = group.create_array(
            "rgb",
            shape=image.shape,
            chunks=(inner, inner, 3),
            shards=(chunk, chunk, 3),
            dtype="uint8",
            attributes=attrs,
        )
    rgb[:] = image
    return work_dir


def reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """Levels by the definition: each the mean (float64, rounded half to even) of the 2x2
    blocks of the one above, an odd last row/column averaged over the pixels that exist."""
    result = [image]
    for _ in range(levels - 1):
        above = result[-1].astype(np.float64)
        h, w = above.shape[:2]
        rows, cols = np.arange(0, h, 2), np.arange(0, w, 2)
        sums = np.add.reduceat(np.add.reduceat(above, rows, axis=0), cols, axis=1)
        counts = np.add.reduceat(np.add.reduceat(np.ones((h, w)), rows, axis=0), cols, axis=1)
        result.append(np.rint(sums / counts[..., None]).astype(np.uint8))
    return result


def corrupt_last_chunk(work_dir: Path) -> Path:
    """Overwrite the canvas' last chunk file with garbage, so a full read fails near the end."""
    files = sorted(
        (p for p in (work_dir / "canvas.zarr" / "rgb" / "c").rglob("*") if p.is_file()),
        key=lambda p: [int(part) for part in p.relative_to(work_dir / "canvas.zarr" / "rgb" / "c").parts],
    )
    files[-1].write_bytes(b"not a zstd frame" * 10)
    return files[-1]


# -- the CLI in-process (click's CliRunner) and its error contract --------------------------------
def run_cli(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """The command failed the way a user error should: one line on stderr that starts with
    ``Error:``, a non-zero exit, no traceback. Returns the message."""
    assert result.exit_code != 0, result.output
    # A user error exits through click (SystemExit), never an uncaught exception.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- jobs in real processes: CLI subprocesses, one-line errors, waiting on their files -------------
W, H = 70, 52


def command(*args) -> list[str]:
    return [sys.executable, "-m", "nca_tiles_cli.main", *(str(a) for a in args)]


def synth_args(model: Path, out: Path, *args, width=W, height=H, steps=2, chunk=32) -> list:
    return ["synthesize", "--model", model, "--width", width, "--height", height, "--out", out, "--chunk", chunk,
            "--steps", steps, "--device", "cpu", "--compression", "none", "--tile", 32, "--no-progress", *args]


def one_line_error(stderr: str, *fragments: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def sweeps_done(work: Path) -> int:
    try:
        return json.loads((work / "manifest.json").read_text())["sweeps_done"]
    except (OSError, ValueError):
        return -1


def canvas_paths(work: Path) -> list:
    """Every way to name a work dir's canvas: the work dir, canvas.zarr (with and without a
    trailing slash), the rgb array."""
    return [work, work / "canvas.zarr", f"{work / 'canvas.zarr'}/", work / "canvas.zarr" / "rgb"]


# -- folders nobody can write to, and small file systems -----------------------------------------
def save_test_scale_space_model(folder: Path, factor: int = 2, timesteps: int = 300, t_start: int = 120,
                                coarse_schedule: str = "linear") -> Path:
    """Two tiny levels: a coarse rule at factor × 1 µm/px and a fine one at 1 µm/px."""
    from nca_tiles.diffusion.levels import save_scale_space_model

    coarse = save_test_model(folder / "coarse", timesteps=timesteps, seed=3, mpp=float(factor),
                             beta_schedule=coarse_schedule)
    fine = save_test_model(folder / "fine", timesteps=timesteps, seed=4, mpp=1.0)
    return save_scale_space_model(folder / "model", [coarse, fine], [factor, 1], [None, t_start])


def synthesize_test_slide(model_dir: Path, out: Path, width: int, height: int, chunk: int, sampler: str = "ddim",
                          steps: int | None = 4, *, precision: str = "fp32", **request) -> "np.ndarray":
    """Synthesize a slide in this process (seed 7, uncompressed) and read its full resolution back.
    ``precision="bf16"``: under bf16 autocast, as on CUDA (users get it there only)."""
    import tifffile

    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide

    model = load_synthesis_model(model_dir, "cpu")
    for level in model.levels:
        level.pipeline.precision = precision
    req = SlideRequest(width=width, height=height, out=out, seed=7, chunk=chunk, sampler=sampler, steps=steps,
                       compression="none", tile=64, **request)
    synthesize_slide(req, model, progress=False)
    return tifffile.imread(out, level=0)


def assert_same_image(a: "np.ndarray", b: "np.ndarray") -> None:
    """Equal up to float rounding: at most 1 level apart, and 99.9 % of the pixels identical."""
    assert a.shape == b.shape
    diff = abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1, diff.max()
    assert (diff == 0).mean() >= 0.999


@contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """A folder nobody can write to, root included: a read-only tmpfs mounted there (root), or
    mode 0555 (other users). Skips the test where neither is possible."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with _tmpfs(path, "ro,size=1m"):
        yield path


@contextmanager
def small_file_system(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (a tmpfs) mounted at ``path``; skips unless root may mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    with _tmpfs(path, f"size={size}"):
        yield path


@contextmanager
def _tmpfs(path: Path, options: str) -> Iterator[None]:
    """A tmpfs mounted at ``path`` with ``options`` for the body; skips where mounting is refused."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


# -- peak memory of a snippet in a fresh Python process ------------------------------------------
# Read from VmHWM (Linux), the peak of the child's own address space: ru_maxrss would report the
# pytest parent's peak, which Linux carries over fork and exec and which can hide the child's.
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")

PRELUDE = "from nca_tiles.runtime.memory import peak_kib, status_kib\n"


def run_measuring(script: str, *args: object, env: dict[str, str] | None = None) -> list[int]:
    """Run ``script`` (which may call ``peak_kib()`` or ``status_kib(field)`` and prints integers) in a child,
    with ``env`` added to its environment; its integers."""
    result = subprocess.run([sys.executable, "-c", PRELUDE + script, *map(str, args)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return [int(v) for v in result.stdout.split()]


HOLD_LOCK = """
import sys, time
from pathlib import Path
from nca_tiles.runtime.locking import exclusive_lock
with exclusive_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):
    print("locked", flush=True)
    time.sleep(60)
"""


@contextmanager
def lock_held_elsewhere(target: Path, what: str = "--out",
                        hint: str = "choose another --out") -> Iterator[subprocess.Popen]:
    """Another process holding the lock on ``target`` (as ``exclusive_lock(target, what, hint)``,
    which ``output_lock`` takes too) for the body; yields that process, killed after."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(target), what, hint], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
