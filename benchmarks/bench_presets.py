"""Training throughput and inference cost of each model preset on this machine: the numbers the
CPU presets are sized by ("~1–2 k training steps an hour on a 2-core CPU", model.py).

    python benchmarks/bench_presets.py --quick                    # tiny and small, < 1 min
    python benchmarks/bench_presets.py                            # tiny and small, ~2 min on 2 cores
    python benchmarks/bench_presets.py --include-paper            # + paper: ~4 min more on 2 cores
    python benchmarks/bench_presets.py --presets paper --device cuda --json presets.json

Per preset: parameters and MAC per pixel per denoising step (from the config); training steps
per second at batch 16 of 64² patches, fp32 — ``diffusion_loss`` + backward + Adam step on random
data, after warm-up steps (the trainer's EMA update, augmentation, validation and checkpoints are
not included); and inference seconds per megapixel per denoising step (``generate_region``, one
step at a time, whole canvas in memory).

Each timing loop stops after ``--steps`` steps or once ``--max-seconds`` have passed (at least
one step), so the paper preset (≈ 85 s per training step on 2 CPU cores) takes one timed step.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_synthesis, beside this file

from bench_synthesis import (  # noqa: E402
    apply_defaults, format_table, header_lines, log, machine_info, random_model, timed, write_json)

QUICK = {"steps": 5, "infer_size": 128, "max_seconds": 15.0}
FULL = {"steps": 20, "infer_size": 256, "max_seconds": 60.0}


def timed_loop(step, device, warmup: int, steps: int, max_seconds: float) -> list[float]:
    """Seconds of each timed call of step(n), after ``warmup`` untimed calls; stops after
    ``steps`` calls or once ``max_seconds`` have been spent timing (at least one call)."""
    for n in range(warmup):
        step(n)
    times: list[float] = []
    while len(times) < steps and (not times or sum(times) < max_seconds):
        seconds, _ = timed(lambda: step(warmup + len(times)), device)
        times.append(seconds)
    return times


def train_seconds(preset_name: str, device, batch: int, patch: int, warmup: int, steps: int,
                  max_seconds: float) -> list[float]:
    """Per-step seconds of fp32 training on random data, with the trainer's loss and optimizer."""
    import torch

    from nca_tiles.diffusion.model import DiffNCA, preset
    from nca_tiles.diffusion.schedule import NoiseSchedule
    from nca_tiles.training.trainer import TrainConfig, diffusion_loss

    torch.manual_seed(0)
    model = DiffNCA(preset(preset_name)).to(device).train()
    schedule = NoiseSchedule()
    cfg = TrainConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)

    def step(n: int) -> None:
        generator = torch.Generator().manual_seed(n)  # as the trainer: every draw of step n from (seed, n)
        x0 = torch.rand((batch, 3, patch, patch), generator=generator) * 2 - 1
        loss, _ = diffusion_loss(model, schedule, x0, generator, device, contextlib.nullcontext)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed_loop(step, device, warmup, steps, max_seconds)


def inference_seconds(preset_name: str, device, size: int, steps: int, max_seconds: float) -> list[float]:
    """Seconds of each single-denoising-step ``generate_region`` on a size² canvas, fp32, eager
    (``--compile auto`` would compile and try the compiled rule inside the timed calls;
    bench_compile.py compares the two)."""
    from nca_tiles.diffusion.pipeline import build_pipeline, generate_region

    meta, state = random_model(preset_name)
    pipeline = build_pipeline(meta, state, device, "fp32", compile="off")
    generate_region(pipeline, 32, 32, steps=1)  # warm-up, on a small canvas

    def step(n: int) -> None:
        generate_region(pipeline, size, size, seed=n, steps=1)

    return timed_loop(step, device, 0, steps, max_seconds)


def measure_preset(name: str, args: argparse.Namespace, device) -> dict:
    from nca_tiles.diffusion.model import DiffNCA, preset

    config = preset(name)
    mac_step = config.macs_per_pixel_step() * config.nca_steps  # per pixel per denoising step
    log(f"{name}: training, batch {args.batch_size}, {args.patch}² patches")
    train = train_seconds(name, device, args.batch_size, args.patch, args.warmup, args.steps, args.max_seconds)
    log(f"{name}: inference, {args.infer_size}² canvas")
    infer = inference_seconds(name, device, args.infer_size, args.steps, args.max_seconds)
    s_per_step = sum(train) / len(train)
    s_per_mp_step = sum(infer) / len(infer) / (args.infer_size**2 / 1e6)
    train_pixels = args.batch_size * args.patch**2
    return {
        "preset": name,
        "parameters": DiffNCA(config).num_parameters(),
        "halo": config.halo,
        "mac_per_pixel_nca_step": config.macs_per_pixel_step(),
        "mac_per_pixel_denoising_step": mac_step,
        "train_steps_timed": len(train),
        "train_s_per_step": s_per_step,
        "train_steps_per_s": 1 / s_per_step,
        "train_steps_per_hour": 3600 / s_per_step,
        # Backward ≈ twice the forward's FLOPs: a training step ≈ 3 forward passes.
        "train_gflops_estimate": 3 * 2 * mac_step * train_pixels / s_per_step / 1e9,
        "infer_steps_timed": len(infer),
        "infer_s_per_mp_step": s_per_mp_step,
        "infer_gflops": 2 * mac_step / s_per_mp_step / 1e3,
    }


def print_results(results: dict) -> None:
    print("# nca-tiles preset benchmark")
    print("\n".join(header_lines(results["machine"])))
    a = results["settings"]
    print(f"training: batch {a['batch_size']}, {a['patch']}² patches, fp32, diffusion_loss + backward + Adam, "
          f"random data, after {a['warmup']} warm-up step(s); inference: {a['infer_size']}² canvas, generate_region, "
          "one denoising step per call, fp32\n")
    headers = ["preset", "parameters", "halo", "MAC/px/NCA step", "MAC/px/denoising step", "train s/step",
               "steps/s", "steps/hour", "≈ train GFLOP/s", "infer s/(MP·step)", "infer GFLOP/s"]
    rows = [[r["preset"], r["parameters"], r["halo"], r["mac_per_pixel_nca_step"],
             r["mac_per_pixel_denoising_step"], r["train_s_per_step"], r["train_steps_per_s"],
             round(r["train_steps_per_hour"]), r["train_gflops_estimate"], r["infer_s_per_mp_step"],
             r["infer_gflops"]] for r in results["presets"]]
    print(format_table(headers, rows))
    machine = results["machine"]
    print("\ntimed steps: " + ", ".join(f"{r['preset']} {r['train_steps_timed']} training, {r['infer_steps_timed']} "
                                         "inference" for r in results["presets"]))
    print("≈ train GFLOP/s counts a training step as 3 forward passes (backward ≈ 2×)")
    for r in results["presets"]:
        print(f"{r['preset']}: {r['train_steps_per_hour'] / 1000:.2f} k training steps per hour on this machine "
              f"({machine['cores']} cores, {machine['torch_threads']} torch threads, {machine['device']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets (tiny, small, medium, wide, paper)")
    parser.add_argument("--include-paper", action="store_true", help="add the paper preset (slow on a CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, help=f"at most this many timed steps per measurement "
                                                  f"(default {FULL['steps']}, quick {QUICK['steps']})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--max-seconds", type=float,
                        help="stop a timing loop after this long (at least one step; "
                             f"default {FULL['max_seconds']:.0f}, quick {QUICK['max_seconds']:.0f})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch", type=int, default=64, help="training patch side")
    parser.add_argument("--infer-size", type=int, help=f"inference canvas side (default {FULL['infer_size']}, "
                                                       f"quick {QUICK['infer_size']})")
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller canvas: ~1 min for tiny,small")
    parser.add_argument("--json", type=Path, help="also save the numbers to this JSON file")
    args = parser.parse_args(argv)
    apply_defaults(args, QUICK, FULL)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    if args.include_paper and "paper" not in args.presets:
        args.presets.append("paper")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nca_tiles.diffusion.model import preset
    from nca_tiles.diffusion.pipeline import resolve_device

    for name in args.presets:
        preset(name)  # an unknown name fails now, not after minutes of measuring the others
    device = resolve_device(args.device)
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {k: getattr(args, k) for k in ("batch_size", "patch", "warmup", "steps", "max_seconds",
                                                   "infer_size")},
        "presets": [],
    }
    started = time.perf_counter()
    for name in args.presets:
        results["presets"].append(measure_preset(name, args, device))
    log(f"done in {time.perf_counter() - started:.0f} s")
    print_results(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
