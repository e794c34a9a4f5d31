"""Cost of tiled synthesis, measured in one run on this machine: speed per megapixel and
denoising step (tiled vs whole canvas vs in memory), halo overhead (measured vs predicted), peak
memory vs canvas size, and the model's achieved FLOP/s against a plain matmul.

    python benchmarks/bench_synthesis.py --quick                  # ~1–2 min on 2 CPU cores
    python benchmarks/bench_synthesis.py                          # ~10 min on 2 CPU cores
    python benchmarks/bench_synthesis.py --device cuda --preset paper --json synth.json

Sections (``--sections 1,2,3,4``):

1. Wall time per (canvas megapixel × denoising step) of ``synthesize_slide`` — the real path,
   through the zarr canvas, x_T sweep and export included, nothing subtracted — for a few chunk
   sizes and for one chunk covering the canvas; and of ``generate_region`` (whole canvas in
   memory, no I/O) to show the I/O overhead; each run ``--rounds`` times, interleaved, medians, with
   the seconds inside the model's calls apart from the rest. The rule is compiled first, for every window width
   to come (where it compiles at all), and sections 1, 2 and 4 then run it compiled: before, the
   first run timed paid ``--compile auto``'s eager phase and the compile, so the comparison
   measured the order of the runs (section 5 counts the compile, as a user meets it).
2. Halo overhead: predicted Σ window pixels ÷ canvas pixels (``plan.make_plan``) and the interior
   formula ((C + 2s)/C)², against measured compute time: ``predict_noise`` over every window of
   one sweep ÷ over the whole canvas.
3. Peak memory at growing canvas sizes with the same chunk, each in a fresh child process: RSS
   before the synthesis, ``ru_maxrss`` (and VmHWM) after it, GPU peak on CUDA.
4. Achieved FLOP/s of the model (2 × MAC per pixel per NCA step × s × pixels ÷ time) against a
   plain 2048² matmul on the same device.
5. End to end: ``nca-tiles synthesize`` of a 2048² canvas in a fresh process, as a user runs it
   (start-up, model load, compile, x_T, zarr I/O, every level of a scale-space model, the export),
   its useful FLOPs (each level's canvas pixels × steps × 2 MAC; the halo's repeated work not
   counted) ÷ wall time, against the same matmul.

The model: ``--model PATH``, else the bundled model if there is one, else random weights of
``--preset`` (default ``small``): speed does not depend on the weights' values.
"""

from __future__ import annotations

# Only the standard library and light nca_tiles helpers at module level: section 3 starts its
# child processes before this process imports torch (see run_rss_children), and bench_presets.py
# imports helpers from here.
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nca_tiles.runtime.memory import peak_kib, rss_bytes, ru_maxrss_bytes

MIB = 2**20
QUICK = {"canvas": 512, "chunks": "128,256", "steps": 1, "rounds": 1, "rss_sizes": "256,512,1024", "rss_chunk": 128,
         "e2e_canvas": 512, "e2e_steps": 3, "e2e_chunk": 256}
FULL = {"canvas": 1024, "chunks": "256,512", "steps": 2, "rounds": 3, "rss_sizes": "1024,2048,4096", "rss_chunk": 512,
        "e2e_canvas": 2048, "e2e_steps": 20, "e2e_chunk": 512}


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def apply_defaults(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Fill the options left unset with the --quick sizes or the full ones."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def write_json(path: Path | None, results: dict) -> None:
    """--json: the numbers behind the printed tables, for comparing runs."""
    if path:
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {path}")


# -- machine and timing helpers (also used by bench_presets.py) ----------------------------------
def machine_info(device) -> dict:
    """What the numbers were measured on: they mean little without it."""
    from nca_tiles.diffusion import compiled

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": compiled.cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def header_lines(info: dict) -> list[str]:
    gpu = f" ({info['gpu']})" if "gpu" in info else ""
    load = f", load average {info['load_average'][0]}" if info.get("load_average") else ""
    return [
        f"date: {info['date']}, host {info['host']}",
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads"
        f"{load}, python {info['python']}",
        f"device: {info['device']}{gpu}",
    ]


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Wall seconds of fn(), with the GPU's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def reset_gpu_peak(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mib(device) -> float | None:
    if device.type != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / MIB, 1)


def random_model(preset_name: str, seed: int = 0) -> tuple[dict, dict]:
    """(meta, state dict) of an untrained model of a preset, like tests/helpers.save_test_model:
    its last layer made non-zero so that ε̂ is not identically 0 (the cost is the same)."""
    import torch

    from nca_tiles.diffusion.checkpoint import FORMAT_VERSION
    from nca_tiles.diffusion.model import DiffNCA, preset
    from nca_tiles.diffusion.schedule import ScheduleConfig

    config = preset(preset_name)
    torch.manual_seed(seed)
    model = DiffNCA(config)
    for p in model.to_update.parameters():
        torch.nn.init.normal_(p, std=0.2)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "schedule": ScheduleConfig().to_dict(),
        "data": {"mpp": 1.0, "patch_size": 64, "patch_store": "benchmark"},
        "training": {"preset": preset_name, "step": 0},
    }
    return meta, model.state_dict()


def load_pipeline(model: str | None, preset_name: str | None, device: str, precision: str):
    """(pipeline, description): --model, else the bundled model, else random weights of a preset."""
    from nca_tiles.diffusion.checkpoint import DEFAULT_MODEL_DIR
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.diffusion.pipeline import build_pipeline

    bundled = model is None and preset_name is None and DEFAULT_MODEL_DIR.exists()
    if bundled:
        model = str(DEFAULT_MODEL_DIR)
    if model is not None:
        # A scale-space model's per-pixel cost is its finest level's: that level is benchmarked.
        loaded = load_synthesis_model(model, device, precision)
        pipeline = loaded.finest
        source = (f"{model}" + (" (bundled)" if bundled else "")
                  + (f", finest level of {loaded.describe()}" if loaded.is_scale_space else ""))
    else:
        preset_name = preset_name or "small"
        meta, state = random_model(preset_name)
        pipeline = build_pipeline(meta, state, device, precision)
        source = f"random weights, preset {preset_name}"
    cfg = pipeline.model.config
    description = (
        f"{source}: {pipeline.model.num_parameters():,} parameters, c={cfg.channels} h={cfg.hidden} "
        f"s={cfg.nca_steps} (halo {pipeline.halo} px), {cfg.macs_per_pixel_step() * cfg.nca_steps:,} MAC "
        f"per pixel per denoising step, hash {pipeline.hash}, {pipeline.precision}"
    )
    return pipeline, description


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: numbers right-aligned, everything else left-aligned."""
    cells = [list(headers)] + [[format_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- one synthesis through the real path -----------------------------------------------------------
def synthesize(pipeline, size: int, chunk: int, steps: int, batch: int, seed: int, fmt: str, root: Path) -> float:
    """Seconds of one ``synthesize_slide`` of a size × size canvas (work dir and output in root)."""
    from nca_tiles.diffusion.levels import SynthesisModel
    from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        out = Path(tmp) / ("slide.ome.tif" if fmt == "ome-tiff" else "slide.ome.zarr")
        req = SlideRequest(width=size, height=size, out=out, seed=seed, chunk=chunk, steps=steps, batch=batch,
                           format=fmt)
        seconds, _ = timed(lambda: synthesize_slide(req, SynthesisModel.single(pipeline), progress=False), pipeline.device)
    return seconds


def import_synthesis_modules(fmt: str) -> None:
    """Import what a synthesis imports lazily, so that neither its time nor its memory counts."""
    import tqdm  # noqa: F401
    import zarr  # noqa: F401

    if fmt == "ome-tiff":
        import tifffile  # noqa: F401

        import nca_tiles.export.ometiff  # noqa: F401
    else:
        import nca_tiles.export.omezarr  # noqa: F401


def warm_up(pipeline, fmt: str, root: Path) -> None:
    """A tiny synthesis and an in-memory run first: imports, allocator, kernels, autocast."""
    from nca_tiles.diffusion.pipeline import generate_region

    import_synthesis_modules(fmt)
    side = max(64, 2 * pipeline.halo)
    synthesize(pipeline, side, side, 1, 1, 0, fmt, root)
    generate_region(pipeline, side, side, steps=1)
    synchronize(pipeline.device)


def window_widths(pipeline, canvas: int, chunks: list[int]) -> list[int]:
    """The widths of every window the timed runs compute (chunks ± halo, clipped; the canvas)."""
    from nca_tiles.diffusion.levels import SynthesisModel
    from nca_tiles.synthesis.job import level_grids, make_job

    model = SynthesisModel.single(pipeline)
    widths = {canvas}
    for chunk in chunks:
        (grid,) = level_grids(make_job(model, 0, canvas, canvas, chunk, "ddim", 1), model)
        widths |= {c.window_shape[1] for c in grid}
    return sorted(widths, reverse=True)


def compile_first(pipeline, widths: list[int]) -> float | None:
    """Compile the rule before anything is timed, for every window width to come, and switch the
    pipeline to compiled from its first call: otherwise whichever run comes first pays ``--compile
    auto``'s eager phase and the compile, and a comparison of runs measures their order. Seconds
    it took; None where the rule runs eager (--compile off, or auto on a CPU; no compiler)."""
    from nca_tiles.diffusion import compiled
    from nca_tiles.diffusion.model import DiffNCA
    from nca_tiles.diffusion.pipeline import generate_region

    if pipeline.compile == "off" or not compiled.available(pipeline.device):
        return None
    pipeline.compile, pipeline.model.compiled = "on", True
    start = time.perf_counter()
    for width in widths:  # two bands of rows at each width: the shapes the compiled rule runs on
        rows = 2 * max(2, DiffNCA.band_pixels(pipeline.device) // width)
        generate_region(pipeline, rows, width, steps=1)
    synchronize(pipeline.device)
    return time.perf_counter() - start


# -- section 1: tiled vs whole canvas, through zarr ------------------------------------------------
def cpu_ticks() -> tuple[int, int] | None:
    """(all, stolen) CPU ticks of this machine so far (/proc/stat), None where there is none: on a
    virtual machine the hypervisor's steal makes the same work take longer from one run to the next."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[0] == before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


@contextmanager
def model_clock(device):
    """Seconds spent inside ``predict_noise`` (every model call of a run), whoever calls it: what
    separates the model's share of a run from the rest (x_T, zarr I/O, sampler, export)."""
    from nca_tiles.diffusion import pipeline as pipeline_module
    from nca_tiles.synthesis import sweeps

    spent = [0.0]
    real = pipeline_module.predict_noise

    def clocked(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = real(*args, **kwargs)
        synchronize(device)
        spent[0] += time.perf_counter() - start
        return out

    pipeline_module.predict_noise = sweeps.predict_noise = clocked
    try:
        yield spent
    finally:
        pipeline_module.predict_noise = sweeps.predict_noise = real


def section_speed(pipeline, canvas: int, chunks: list[int], steps: int, batch: int, seed: int, fmt: str,
                  root: Path, rounds: int) -> dict:
    """Each run ``rounds`` times, the runs interleaved (round 1: every run, round 2: every run...),
    medians: one run each measured the machine's drift as much as the runs (model calls of the
    same run differed by up to ±12 % between rounds on this virtual machine)."""
    from nca_tiles.diffusion.pipeline import generate_region

    work = canvas * canvas / 1e6 * steps  # canvas MP × denoising steps
    runs: list[tuple[str, int | None, Callable[[], Any]]] = []
    for chunk in chunks + [canvas]:
        label = f"synthesize_slide, chunk {chunk}"
        if chunk == canvas:
            label = f"synthesize_slide, whole canvas (chunk {canvas})"
        runs.append((label, chunk, lambda chunk=chunk: synthesize(pipeline, canvas, chunk, steps, batch, seed, fmt, root)))
    runs.append(("generate_region (in memory, no I/O)", None,
                 lambda: generate_region(pipeline, canvas, canvas, seed=seed, steps=steps)))
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    model_s: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    peaks: dict[str, float | None] = {}
    ticks = cpu_ticks()
    for r in range(rounds):
        for label, _, run in runs:
            log(f"[1] round {r + 1}/{rounds}: {label}, {canvas}², {steps} step(s)")
            reset_gpu_peak(pipeline.device)
            with model_clock(pipeline.device) as spent:
                wall, _ = timed(run, pipeline.device)
            seconds[label].append(wall)
            model_s[label].append(spent[0])
            peaks[label] = gpu_peak_mib(pipeline.device)
    rows = []
    for label, chunk, _ in runs:
        wall, model = statistics.median(seconds[label]), statistics.median(model_s[label])
        rows.append({"run": label, "chunk": chunk, "seconds": wall, "all_seconds": seconds[label],
                     "model_seconds": model, "rest_seconds": wall - model, "s_per_mp_step": wall / work,
                     "gpu_peak_mib": peaks[label]})
    whole, in_memory = rows[len(chunks)], rows[-1]
    for row in rows:
        row["vs_whole"] = row["s_per_mp_step"] / whole["s_per_mp_step"]
    return {"canvas": canvas, "steps": steps, "batch": batch, "format": fmt, "rounds": rounds, "rows": rows,
            "io_overhead": whole["seconds"] / in_memory["seconds"],
            "model_call_ratio": whole["model_seconds"] / in_memory["model_seconds"],
            "steal": steal_share(ticks, cpu_ticks())}


def print_speed(result: dict, device) -> None:
    print(f"\n## 1. Time per megapixel per denoising step ({result['canvas']}² canvas, {result['steps']} denoising "
          f"step(s), batch {result['batch']}, {result['format']}, median of {result['rounds']} interleaved round(s))")
    print("wall time of the whole call ÷ (canvas MP × denoising steps): x_T sweep, zarr I/O and export included; "
          "model s: inside predict_noise; rest: everything else")
    gpu = device.type == "cuda"
    headers = ["run", "wall s", "model s", "rest s", "s / (MP·step)", "÷ whole canvas"] + (["GPU peak MiB"] if gpu else [])
    rows = [[r["run"], r["seconds"], r["model_seconds"], r["rest_seconds"], r["s_per_mp_step"], r["vs_whole"]]
            + ([r["gpu_peak_mib"]] if gpu else []) for r in result["rows"]]
    print(format_table(headers, rows))
    print(f"I/O overhead (synthesize_slide whole canvas ÷ generate_region): {result['io_overhead']:.3f}×; "
          f"their model calls alone: {result['model_call_ratio']:.3f}×")
    if result.get("steal") is not None:
        print(f"CPU time stolen by the hypervisor during the section: {result['steal']:.1%}")


# -- section 2: halo overhead, compute only ----------------------------------------------------------
def sweep_compute_seconds(pipeline, canvas_tensor, chunk: int, batch: int, seed: int,
                          repeats: int) -> tuple[float, int, int]:
    """Seconds of predict_noise over every window of one sweep, with windows cut from an
    in-memory canvas (no zarr), the median of ``repeats``: (seconds, windows, Σ window pixels)."""
    import torch

    from nca_tiles.diffusion.pipeline import predict_noise
    from nca_tiles.synthesis.job import batches, chunk_grid

    _, _, height, width = canvas_tensor.shape
    chunks = chunk_grid(height, width, chunk, pipeline.halo)
    t = pipeline.schedule.timesteps - 1  # the first denoising step's t (the cost does not depend on it)

    def sweep() -> None:
        for group in batches(chunks, batch):
            windows = torch.cat([canvas_tensor[:, :, c.wy0 : c.wy1, c.wx0 : c.wx1] for c in group])
            predict_noise(pipeline, windows, t, [(c.wy0, c.wx0) for c in group], [seed] * len(group))

    seconds = statistics.median(timed(sweep, pipeline.device)[0] for _ in range(repeats))
    return seconds, len(chunks), sum(c.window_pixels for c in chunks)


def random_canvas(pipeline, size: int, seed: int):
    import torch

    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=generator, device=pipeline.device)


def section_halo(pipeline, canvas: int, chunks: list[int], batch: int, seed: int, repeats: int,
                 cache: dict) -> dict:
    from nca_tiles.synthesis.plan import make_plan
    from nca_tiles.diffusion.levels import SynthesisModel
    from nca_tiles.synthesis.job import make_job

    x = random_canvas(pipeline, canvas, seed)
    whole_seconds = whole_compute_seconds(pipeline, canvas, seed, repeats, cache)
    s = pipeline.halo
    rows = []
    for chunk in chunks:
        log(f"[2] predict_noise over the windows of a {canvas}² sweep, chunk {chunk}")
        seconds, windows, window_pixels = sweep_compute_seconds(pipeline, x, chunk, batch, seed, repeats)
        job = make_job(SynthesisModel.single(pipeline), seed, canvas, canvas, chunk, "ddim", 1)
        predicted = make_plan(SynthesisModel.single(pipeline), job, batch, calibrate=False).halo_overhead
        measured = seconds / whole_seconds
        rows.append({"chunk": chunk, "windows": windows, "window_pixels": window_pixels, "seconds": seconds,
                     "predicted": predicted, "interior": ((chunk + 2 * s) / chunk) ** 2, "measured": measured,
                     "measured_vs_predicted": measured / predicted})
    cache["tiled"] = rows
    return {"canvas": canvas, "halo": s, "batch": batch, "repeats": repeats, "whole_seconds": whole_seconds,
            "rows": rows}


def whole_compute_seconds(pipeline, canvas: int, seed: int, repeats: int, cache: dict) -> float:
    """predict_noise on the whole canvas as one window: shared by sections 2 and 4."""
    if "whole_seconds" not in cache:
        log(f"[2] predict_noise on the whole {canvas}² canvas")
        x = random_canvas(pipeline, canvas, seed)
        seconds, _, _ = sweep_compute_seconds(pipeline, x, canvas, 1, seed, repeats)
        cache.update(whole_seconds=seconds, whole_pixels=canvas * canvas)
    return cache["whole_seconds"]


def print_halo(result: dict) -> None:
    print(f"\n## 2. Halo overhead, compute only ({result['canvas']}² canvas, halo s = {result['halo']} px, "
          f"batch {result['batch']}, median of {result['repeats']} run(s))")
    print(f"predict_noise on the whole canvas: {result['whole_seconds']:.3f} s; predicted = Σ window pixels ÷ canvas "
          "pixels (plan.make_plan), interior = ((C + 2s)/C)², measured = tiled sweep s ÷ whole-canvas s")
    headers = ["chunk C", "windows", "sweep s", "predicted", "interior", "measured", "measured ÷ predicted"]
    rows = [[r["chunk"], r["windows"], r["seconds"], r["predicted"], r["interior"], r["measured"],
             r["measured_vs_predicted"]] for r in result["rows"]]
    print(format_table(headers, rows))
    print("measured ÷ predicted ≠ 1: windows of that size run faster (< 1) or slower (> 1) per pixel than the "
          "whole canvas")


# -- section 3: peak memory vs canvas size, one child process each --------------------------------
def rss_child(args: argparse.Namespace) -> dict:
    """In a fresh process: one synthesis of an rss_child² canvas; its memory before and peak after."""
    from nca_tiles.synthesis.plan import make_plan
    from nca_tiles.diffusion.levels import SynthesisModel
    from nca_tiles.synthesis.job import make_job

    pipeline, _ = load_pipeline(args.model, args.preset, args.device, args.precision)
    import_synthesis_modules(args.format)
    size, chunk = args.rss_child, args.rss_chunk
    job = make_job(SynthesisModel.single(pipeline), args.seed, size, size, chunk, "ddim", 1)
    # Compiled before the peak is taken, so every size runs alike: under --compile auto only the
    # sizes whose eager calls pass 10 s would compile, and pay its one-time footprint in the run.
    loaded = rss_bytes()
    compile_s = compile_first(pipeline, window_widths(pipeline, size, [chunk]))
    plan = make_plan(SynthesisModel.single(pipeline), job, args.batch, calibrate=False)  # compiled: no compile share
    reset_gpu_peak(pipeline.device)
    before = rss_bytes()
    root = Path(args.dir) if args.dir else None
    # One denoising step: every sweep does the same work, so more steps cannot raise the peak.
    seconds = synthesize(pipeline, size, chunk, 1, args.batch, args.seed, args.format, root)
    peak, hwm = ru_maxrss_bytes(), peak_kib()
    return {
        "size": size,
        "chunk": chunk,
        "seconds": seconds,
        "rss_before_mib": round(before / MIB, 1),
        "compile_s": compile_s,
        "compile_mib": round((before - loaded) / MIB, 1),
        "ru_maxrss_mib": round(peak / MIB, 1),
        "vm_hwm_mib": None if hwm is None else round(hwm * 1024 / MIB, 1),
        "growth_mib": round((peak - before) / MIB, 1),
        "plan_host_mib": round(plan.host_bytes / MIB, 1),
        "plan_device_mib": round(plan.device_bytes / MIB, 1),
        "gpu_peak_mib": gpu_peak_mib(pipeline.device),
    }


def run_rss_children(args: argparse.Namespace, sizes: list[int]) -> dict:
    """One child per size. This runs before the parent imports torch: a child started by
    vfork+exec (what subprocess does) inherits the parent's peak RSS in ru_maxrss, so the parent
    must still be small here for ru_maxrss to be the child's own."""
    rows = []
    for size in sizes:
        log(f"[3] synthesize_slide {size}², chunk {args.rss_chunk}, 1 step, in a child process")
        command = [sys.executable, __file__, "--rss-child", str(size), "--rss-chunk", str(args.rss_chunk),
                   "--device", args.device, "--precision", args.precision, "--batch", str(args.batch),
                   "--seed", str(args.seed), "--format", args.format]
        command += ["--model", args.model] if args.model else []
        command += ["--preset", args.preset] if args.preset else []
        command += ["--dir", str(args.dir)] if args.dir else []
        child = subprocess.run(command, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            raise SystemExit(f"the child process for {size}² failed (exit {child.returncode})")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return {"chunk": args.rss_chunk, "steps": 1, "rows": rows,
            "growth_range_mib": rows[-1]["ru_maxrss_mib"] - rows[0]["ru_maxrss_mib"],
            "pixels_ratio": (sizes[-1] / sizes[0]) ** 2}


def print_rss(result: dict, device) -> None:
    print(f"\n## 3. Peak memory vs canvas size (chunk {result['chunk']}, {result['steps']} denoising step, "
          "a fresh process each)")
    print("RSS before = after imports, model load and compile (compile = what compiling the rule added, once "
          "per process; eager: 0); peak = ru_maxrss after the run (VmHWM: the same, from /proc); plan = make_plan's "
          "estimate of what the run adds (made after the compile: no compile share);\n"
          "x_t buffer = one float32 canvas, what holding the canvas in memory would cost")
    headers = ["canvas", "wall s", "compile MiB", "RSS before MiB", "peak MiB", "growth MiB", "VmHWM MiB",
               "plan host MiB", "x_t buffer MiB"]
    gpu = device.type == "cuda"
    headers += ["GPU peak MiB", "plan device MiB"] if gpu else []
    rows = [[f"{r['size']}²", r["seconds"], r["compile_mib"], r["rss_before_mib"], r["ru_maxrss_mib"], r["growth_mib"],
             r["vm_hwm_mib"], r["plan_host_mib"], round(r["size"] ** 2 * 3 * 4 / MIB, 1)]
            + ([r["gpu_peak_mib"], r["plan_device_mib"]] if gpu else [])
            for r in result["rows"]]
    print(format_table(headers, rows))
    print(f"peak from the smallest to the largest canvas: {result['growth_range_mib']:+.1f} MiB for "
          f"{result['pixels_ratio']:.0f}× the pixels")


# -- section 4: achieved FLOP/s vs a matmul ------------------------------------------------------------
def matmul_flops(device, dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a plain n × n matmul: the median of ``repeats`` timings, after a warm-up."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    inner = 20 if device.type == "cuda" else 1  # one GPU matmul is too short to time alone

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b)

    run()
    times = [timed(run, device)[0] for _ in range(repeats)]
    return 2 * n**3 * inner / statistics.median(times)


def section_flops(pipeline, canvas: int, seed: int, repeats: int, cache: dict) -> dict:
    import torch

    cfg = pipeline.model.config
    flop_per_pixel = 2 * cfg.macs_per_pixel_step() * cfg.nca_steps  # per denoising step
    whole_seconds = whole_compute_seconds(pipeline, canvas, seed, repeats, cache)
    rows = [{"run": f"model, whole {canvas}² canvas ({pipeline.precision})",
             "flops": flop_per_pixel * cache["whole_pixels"] / whole_seconds}]
    for r in cache.get("tiled", []):  # window pixels: the halo is computed too
        rows.append({"run": f"model, {canvas}² in chunks of {r['chunk']} ({pipeline.precision})",
                     "flops": flop_per_pixel * r["window_pixels"] / r["seconds"]})
    log("[4] 2048² matmul, fp32")
    matmul = matmul_flops(pipeline.device, torch.float32)
    rows.append({"run": "matmul 2048², fp32", "flops": matmul})
    if pipeline.precision == "bf16" and pipeline.device.type == "cuda":
        log("[4] 2048² matmul, bf16")
        rows.append({"run": "matmul 2048², bf16", "flops": matmul_flops(pipeline.device, torch.bfloat16)})
    for row in rows:
        row["vs_fp32_matmul"] = row["flops"] / matmul
    return {"flop_per_pixel_step": flop_per_pixel, "rows": rows}


def print_flops(result: dict) -> None:
    print(f"\n## 4. Achieved FLOP/s ({result['flop_per_pixel_step']:,} FLOP per pixel per denoising step "
          "= 2 × MAC of the convolutions × s)")
    rows = [[r["run"], r["flops"] / 1e9, r["vs_fp32_matmul"]] for r in result["rows"]]
    print(format_table(["run", "GFLOP/s", "÷ fp32 matmul"], rows))


# -- section 5: end to end, the CLI in a fresh process, against a matmul ---------------------------
def section_end_to_end(args: argparse.Namespace, tmp: Path) -> dict | None:
    """``nca-tiles synthesize`` as a user runs it, timed from outside; FLOPs from the job's plan."""
    import torch

    from nca_tiles.diffusion.checkpoint import DEFAULT_MODEL_DIR
    from nca_tiles.diffusion.levels import load_synthesis_model
    from nca_tiles.synthesis.job import make_job
    from nca_tiles.synthesis.plan import make_plan

    if args.preset:
        log("[5] skipped: needs a model directory (--model or the bundled one), not --preset")
        return None
    size, steps, chunk = args.e2e_canvas, args.e2e_steps, args.e2e_chunk
    model = load_synthesis_model(args.model, args.device, args.precision)
    plan = make_plan(model, make_job(model, args.seed, size, size, chunk, "ddim", steps), args.batch, calibrate=False)
    useful = sum(2.0 * lv.macs_per_cell_step * lv.width * lv.height * lv.steps for lv in plan.levels)
    computed = sum(lv.flops for lv in plan.levels)
    out = tmp / "end-to-end.ome.tif"
    command = [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", "--width", str(size), "--height", str(size),
               "--chunk", str(chunk), "--steps", str(steps), "--seed", str(args.seed), "--batch", str(args.batch),
               "--device", args.device, "--precision", args.precision, "--out", str(out), "--no-progress"]
    command += ["--model", str(args.model or DEFAULT_MODEL_DIR)]
    log("[5] 2048² matmul, fp32, before")
    matmul_before = matmul_flops(torch.device(args.device), torch.float32)
    log(f"[5] {' '.join(command[2:])}")
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"[5] nca-tiles synthesize failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    log("[5] 2048² matmul, fp32, after")
    matmul_after = matmul_flops(torch.device(args.device), torch.float32)
    # The yardstick drifts with the virtual machine (80 to 156 GFLOP/s on the same cores in one
    # evening): timed on both sides of the run, their mean is the one ratio printed.
    matmul = (matmul_before + matmul_after) / 2
    return {"canvas": size, "steps": steps, "chunk": chunk, "levels": len(plan.levels), "wall_s": wall,
            "useful_flop": useful, "computed_flop": computed, "useful_flops": useful / wall,
            "matmul_before_flops": matmul_before, "matmul_after_flops": matmul_after,
            "matmul_flops": matmul, "vs_fp32_matmul": useful / wall / matmul,
            "computed_vs_fp32_matmul": computed / wall / matmul}


def print_end_to_end(r: dict) -> None:
    print(f"\n## 5. End to end: `nca-tiles synthesize` of a {r['canvas']}² canvas, {r['steps']} DDIM steps, "
          f"chunk {r['chunk']}, a fresh process")
    print("wall time of the whole process (start-up, model load, compile, x_T, zarr I/O, export); useful FLOP = each "
          "level's canvas pixels × its steps × 2 MAC per pixel per denoising step (the halo's repeated work not "
          "counted; with it: computed)")
    rows = [[f"synthesize {r['canvas']}², {r['levels']} level(s)", r["wall_s"], r["useful_flop"] / 1e12,
             r["computed_flop"] / 1e12, r["useful_flops"] / 1e9, r["vs_fp32_matmul"], r["computed_vs_fp32_matmul"]],
            ["matmul 2048², fp32 (mean of before and after)", None, None, None, r["matmul_flops"] / 1e9, 1.0, None]]
    print(format_table(["run", "wall s", "useful TFLOP", "computed TFLOP", "useful GFLOP/s", "÷ fp32 matmul",
                        "computed ÷ matmul"], rows))
    before, after = r["matmul_before_flops"], r["matmul_after_flops"]
    print(f"matmul before the run {before / 1e9:.1f} GFLOP/s, after {after / 1e9:.1f}"
          + (" — they differ by more than 15 %: the machine's speed drifted, run it again" if
             abs(before - after) > 0.15 * max(before, after) else ""))


# -- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="run directory, model directory or checkpoint (default: the bundled "
                                        "model if there is one, else random weights of --preset)")
    parser.add_argument("--preset", help="random weights of this preset (default small; not with --model)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (the pipeline's default)")
    parser.add_argument("--steps", type=int, help=f"denoising steps in section 1 (default {FULL['steps']}, "
                                                  f"quick {QUICK['steps']})")
    parser.add_argument("--canvas", type=int, help=f"canvas side in sections 1, 2, 4 (default {FULL['canvas']}, "
                                                   f"quick {QUICK['canvas']})")
    parser.add_argument("--chunks", help=f"chunk sides to compare (default {FULL['chunks']}, quick {QUICK['chunks']})")
    parser.add_argument("--rss-sizes", help=f"canvas sides of section 3 (default {FULL['rss_sizes']}, "
                                             f"quick {QUICK['rss_sizes']})")
    parser.add_argument("--rss-chunk", type=int, help=f"chunk side of section 3 (default {FULL['rss_chunk']}, "
                                                      f"quick {QUICK['rss_chunk']})")
    parser.add_argument("--e2e-canvas", type=int, help=f"canvas side of section 5 (default {FULL['e2e_canvas']}, "
                                                       f"quick {QUICK['e2e_canvas']})")
    parser.add_argument("--e2e-steps", type=int, help=f"DDIM steps of section 5 (default {FULL['e2e_steps']}, "
                                                      f"quick {QUICK['e2e_steps']})")
    parser.add_argument("--e2e-chunk", type=int, help=f"chunk side of section 5 (default {FULL['e2e_chunk']}, "
                                                      f"quick {QUICK['e2e_chunk']})")
    parser.add_argument("--batch", type=int, default=1, help="windows per model call (as synthesize --batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="sections 2 and 4 time each sweep this many times and take the median")
    parser.add_argument("--rounds", type=int, help=f"section 1 runs every case this many times, interleaved, "
                                                   f"and takes the medians (default {FULL['rounds']}, quick {QUICK['rounds']})")
    parser.add_argument("--format", default="ome-tiff", choices=("ome-tiff", "ome-zarr"), help="export format")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run, e.g. 1,2")
    parser.add_argument("--quick", action="store_true", help="small sizes: ~1–2 min on 2 CPU cores")
    parser.add_argument("--dir", type=Path, help="where to put temporary canvases (default: the system temp dir)")
    parser.add_argument("--json", type=Path, help="also save the numbers to this JSON file")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model and args.preset:
        parser.error("give --model or --preset, not both")
    apply_defaults(args, QUICK, FULL)
    args.sections = {int(s) for s in args.sections.split(",") if s.strip()}
    return args


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args)))
        return 0

    results: dict[str, Any] = {"args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items() if k != "rss_child"}}
    if args.device in ("auto", "cuda"):  # resolved without torch: the children must all use one device
        cuda = _cuda_available_in_child()
        if args.device == "cuda" and not cuda:
            raise SystemExit("--device cuda: no CUDA device is available (use --device cpu or auto)")
        args.device = "cuda" if cuda else "cpu"
    if 3 in args.sections:
        results["peak_memory"] = run_rss_children(args, ints(args.rss_sizes))

    from nca_tiles.runtime.memory import configure_allocator

    configure_allocator()  # as synthesize_slide does, so every section runs under the same malloc settings
    pipeline, model_description = load_pipeline(args.model, args.preset, args.device, args.precision)
    results["machine"] = machine_info(pipeline.device)
    results["model"] = model_description
    canvas = args.canvas
    chunks = [c for c in ints(args.chunks) if 2 * pipeline.halo <= c < canvas]
    for c in set(ints(args.chunks)) - set(chunks):
        log(f"skipping chunk {c}: not between twice the halo ({2 * pipeline.halo}) and the canvas ({canvas})")
    cache: dict = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if args.sections & {1, 2, 4}:
            log("warm-up")
            warm_up(pipeline, args.format, Path(tmp))
            log("compiling the rule for every window width to come (where the run compiles it)")
            results["compile_first_s"] = compile_first(pipeline, window_widths(pipeline, canvas, chunks))
        if 1 in args.sections:
            results["speed"] = section_speed(pipeline, canvas, chunks, args.steps, args.batch, args.seed,
                                             args.format, Path(tmp), args.rounds)
        if 5 in args.sections:
            results["end_to_end"] = section_end_to_end(args, Path(tmp))
    if 2 in args.sections:
        results["halo"] = section_halo(pipeline, canvas, chunks, args.batch, args.seed, args.repeats, cache)
    if 4 in args.sections:
        results["flops"] = section_flops(pipeline, canvas, args.seed, args.repeats, cache)

    print("# nca-tiles synthesis benchmark")
    print("\n".join(header_lines(results["machine"])))
    print(f"model: {model_description}")
    if "compile_first_s" in results:
        first = results["compile_first_s"]
        print("the rule: " + ("eager (--compile off, or auto on a CPU, or no compiler)" if first is None else
                              f"compiled before anything was timed ({first:.1f} s), so every run below is compiled "
                              "from its first call (section 5 counts the compile)"))
    if "speed" in results:
        print_speed(results["speed"], pipeline.device)
    if "halo" in results:
        print_halo(results["halo"])
    if "peak_memory" in results:
        print_rss(results["peak_memory"], pipeline.device)
    if "flops" in results:
        print_flops(results["flops"])
    if results.get("end_to_end"):
        print_end_to_end(results["end_to_end"])
    write_json(args.json, results)
    return 0


def _cuda_available_in_child() -> bool:
    """torch.cuda.is_available() asked in a throw-away process, keeping torch out of this one
    until section 3's children have run."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())
