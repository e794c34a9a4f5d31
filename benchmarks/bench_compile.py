"""Eager vs compiled (torch.compile of the cell rule, nca_tiles.diffusion.compiled): inference
seconds per denoising step of a 512² canvas and training steps per hour, each also in units of one
2048² fp32 matmul on the same cores, and end-to-end figures that count the compile time.

    python benchmarks/bench_compile.py --quick                  # tiny preset, small sizes: ~1–2 min
    python benchmarks/bench_compile.py                          # small preset: 512², batch 16 of 64²
    python benchmarks/bench_compile.py --preset paper --device cuda --json compile.json

Inference: ``generate_region`` of one denoising step on a size² canvas (whole canvas in memory,
banded rule), eager and compiled, the median of ``--repeats`` calls; the compiled pipeline's first
call (which compiles) is timed apart: compile seconds = first call − median call. Training: the
trainer's ``diffusion_loss`` + backward + Adam step on random data, batch ``--batch-size`` of
``--patch``² patches, eager and compiled, timed the same way. Compile times are cold: inductor's
on-disk cache is a fresh temporary folder unless ``--warm-cache`` (then a rerun reuses kernels and
compiles in a fraction of the time, as a second nca-tiles process on this machine would).

"fraction of matmul FLOP/s": the model's nominal FLOPs (2 × ModelConfig.macs_per_pixel_step() per
pixel per NCA step; a training step counted as 3 forwards: forward, and backward's two products
per layer) per second, over the matmul's FLOP/s: the issue's target is ≥ 0.6 for inference. The
nominal count is the dense rule's: every cell's MLP. The eager CPU rule computes the MLP of the
cells the fire mask keeps only (half of them), so its fraction counts the work it is spared too —
a measure of speed, not of how busy the cores are. "eager, every cell" is the dense rule, eager.

On a CPU the training step is also timed with the eager rule issue 10 measured its "eager figure"
with (2026-11-24; issue10_baseline.py, beside this file): its target is today's steps per hour
≥ 2.5× that rule's, in the same run. The two are timed interleaved, two steps at a time, so that a
busy spell of a shared host slows both alike.

fp32 on a CPU (bf16 is far slower there: docs/design.md §4); ``--precision auto`` is bf16 autocast
on CUDA. Torch uses one thread per core unless OMP_NUM_THREADS says otherwise; on cores shared
with other busy processes OMP_NUM_THREADS=1 gives far steadier numbers (two threads that wait on
each other at every operation lose whole time slices to the other processes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_synthesis, beside this file

from bench_synthesis import (  # noqa: E402
    apply_defaults, format_table, header_lines, log, machine_info, matmul_flops, random_model, timed, write_json)

QUICK = {"preset": "tiny", "size": 64, "batch_size": 4, "patch": 32, "repeats": 2, "train_steps": 2}
FULL = {"preset": "small", "size": 512, "batch_size": 16, "patch": 64, "repeats": 5, "train_steps": 10}
JOB_STEPS = 50  # denoising steps of the end-to-end inference figure (DDIM's default)


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure_inference(args: argparse.Namespace, device, compile: bool, gather: bool = True) -> dict:
    """Seconds per denoising step of a size² canvas; compiled: also the first call's seconds.
    ``gather`` False: the eager rule computes every cell's MLP (the dense rule)."""
    from nca_tiles.diffusion.pipeline import build_pipeline, generate_region

    meta, state = random_model(args.preset)
    pipeline = build_pipeline(meta, state, device, args.precision, compile=compile)
    pipeline.model.gather_fired = gather
    if compile and not pipeline.model.compiled:
        return {}
    if not compile:
        generate_region(pipeline, 32, 32, steps=1)  # libraries and thread pools up
    before = graphs()
    first, _ = timed(lambda: generate_region(pipeline, args.size, args.size, seed=0, steps=1), device)
    times = [timed(lambda: generate_region(pipeline, args.size, args.size, seed=n, steps=1), device)[0]
             for n in range(1, args.repeats + 1)]
    result = {"s_per_step": statistics.median(times), "first_s": first, "graphs": graphs() - before}
    if compile:  # another canvas size, other window and band shapes: should reuse the graphs
        before = graphs()
        other = max(16, args.size - 37)
        generate_region(pipeline, other, other + 11, seed=0, steps=1)
        result["graphs_other_size"] = graphs() - before
    return result


def training_step(args: argparse.Namespace, device, compile: bool, gather: bool = True, issue10: bool = False):
    """A function of n running the trainer's step n (loss, backward, Adam) on a fresh model, and
    returning its loss. ``issue10``: the eager rule issue 10 timed (issue10_baseline.py), with the
    same initial weights."""
    import torch

    from nca_tiles.diffusion.model import DiffNCA, preset
    from nca_tiles.diffusion.pipeline import autocast
    from nca_tiles.diffusion.schedule import NoiseSchedule
    from nca_tiles.training.trainer import TrainConfig, diffusion_loss
    from issue10_baseline import Issue10BaselineNCA

    torch.manual_seed(0)
    model = (Issue10BaselineNCA if issue10 else DiffNCA)(preset(args.preset)).to(device).train()
    model.compiled = compile
    model.gather_fired = gather
    schedule = NoiseSchedule()
    cfg = TrainConfig()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)

    def step(n: int) -> float:
        generator = torch.Generator().manual_seed(n)  # as the trainer: every draw of step n from (seed, n)
        x0 = torch.rand((args.batch_size, 3, args.patch, args.patch), generator=generator) * 2 - 1
        loss, _ = diffusion_loss(model, schedule, x0, generator, device, lambda: autocast(device, args.precision))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def measure_training(args: argparse.Namespace, device, compile: bool, gather: bool = True) -> dict:
    """Seconds per training step; compiled: also the first step's seconds."""
    from nca_tiles.diffusion import compiled

    if compile and not compiled.available(device):
        return {}
    step = training_step(args, device, compile, gather)
    before = graphs()
    first, first_loss = timed(lambda: step(0), device)
    times = [timed(lambda: step(n), device)[0] for n in range(1, args.train_steps + 1)]
    return {"s_per_step": statistics.median(times), "first_s": first, "graphs": graphs() - before,
            "first_loss": first_loss}


def measure_against_issue10(args: argparse.Namespace, device) -> dict:
    """Today's eager training step and issue 10's, interleaved: rounds of two steps of each, so a
    busy spell of the host (on these shared machines a step of the same rule varied by 15 %
    between runs minutes apart) slows both alike. Medians of ``--train-steps`` steps each."""
    today, issue10 = training_step(args, device, False), training_step(args, device, False, False, issue10=True)
    first_losses = today(0), issue10(0)  # warm-up steps, untimed
    times: dict[str, list[float]] = {"today": [], "issue10": []}
    for n in range(1, args.train_steps + 1, 2):
        for name, step in (("today", today), ("issue10", issue10)):
            times[name] += [timed(lambda: step(k), device)[0] for k in (n, n + 1)]
    return {"today_s": statistics.median(times["today"]), "issue10_s": statistics.median(times["issue10"]),
            "steps_each": len(times["today"]), "today_first_loss": first_losses[0],
            "issue10_first_loss": first_losses[1]}


def model_flop(settings: dict) -> dict:
    """Nominal FLOPs of one inference denoising step and of one training step (3 forwards)."""
    from nca_tiles.diffusion.model import preset

    config = preset(settings["preset"])
    per_pixel = 2 * config.macs_per_pixel_step() * config.nca_steps
    return {"inference": per_pixel * settings["size"] ** 2,
            "training": 3 * per_pixel * settings["batch_size"] * settings["patch"] ** 2}


def summarize(results: dict) -> dict:
    """Ratios, compile seconds and end-to-end figures from the raw timings."""
    mm = results["matmul_s"]
    flop = model_flop(results["settings"])
    out: dict[str, Any] = {}
    for kind in ("inference", "training"):
        eager, comp, dense = (results[kind][k] for k in ("eager", "compiled", "dense"))
        # FLOP/s over the matmul's: flop / s ÷ (2·2048³ / mm).
        of_matmul = flop[kind] * mm / (2 * 2048**3)
        row = {"eager_s": eager["s_per_step"], "eager_matmuls": eager["s_per_step"] / mm,
               "eager_of_matmul": of_matmul / eager["s_per_step"]}
        if dense:
            row.update(dense_s=dense["s_per_step"], dense_matmuls=dense["s_per_step"] / mm,
                       dense_of_matmul=of_matmul / dense["s_per_step"],
                       gather_speedup=dense["s_per_step"] / eager["s_per_step"])
        if comp:
            compile_s = max(0.0, comp["first_s"] - comp["s_per_step"])
            saved = eager["s_per_step"] - comp["s_per_step"]
            row.update(compiled_s=comp["s_per_step"], compiled_matmuls=comp["s_per_step"] / mm,
                       compiled_of_matmul=of_matmul / comp["s_per_step"],
                       speedup=eager["s_per_step"] / comp["s_per_step"], compile_s=compile_s,
                       break_even_steps=compile_s / saved if saved > 0 else None, graphs=comp["graphs"])
        out[kind] = row
    inf, tr = out["inference"], out["training"]
    inf["job_eager_s"] = JOB_STEPS * inf["eager_s"]
    tr["eager_steps_per_hour"] = 3600 / tr["eager_s"]
    if "dense_s" in tr:
        tr["dense_steps_per_hour"] = 3600 / tr["dense_s"]
    issue10 = results["training"].get("issue10")
    if issue10:
        tr.update(issue10_s=issue10["issue10_s"], issue10_today_s=issue10["today_s"],
                  issue10_steps_each=issue10["steps_each"], issue10_speedup=issue10["issue10_s"] / issue10["today_s"],
                  issue10_first_loss=issue10["issue10_first_loss"], eager_first_loss=issue10["today_first_loss"])
    if "compiled_s" in inf:
        inf["job_compiled_s"] = inf["compile_s"] + JOB_STEPS * inf["compiled_s"]
        inf["graphs_other_size"] = results["inference"]["compiled"]["graphs_other_size"]
    if "compiled_s" in tr:
        tr["compiled_steps_per_hour"] = 3600 / tr["compiled_s"]
        tr["compiled_steps_first_hour"] = max(0.0, 3600 - tr["compile_s"]) / tr["compiled_s"]
    return out


def print_results(results: dict) -> None:
    a, s = results["settings"], results["summary"]
    inf, tr = s["inference"], s["training"]
    print("# nca-tiles: eager vs torch.compile")
    print("\n".join(header_lines(results["machine"])))
    print(f"preset {a['preset']}, {a['precision']}; inference: generate_region, one denoising step of a "
          f"{a['size']}² canvas, median of {a['repeats']}; training: batch {a['batch_size']} of {a['patch']}², "
          f"diffusion_loss + backward + Adam, median of {a['train_steps']} steps; compile: "
          f"{'warm' if a['warm_cache'] else 'cold'} inductor cache")
    print(f"yardstick: one 2048² fp32 matmul = {results['matmul_s'] * 1e3:.1f} ms "
          f"({results['matmul_gflops']:.1f} GFLOP/s)\n")
    if "compiled_s" not in inf or "compiled_s" not in tr:
        print(f"torch.compile unavailable here: {results.get('compile_problem') or 'see the warning above'}\n")

    def trio(row: dict, key: str, speedups: bool = False) -> list:
        cells = [row.get(f"dense_{key}"), row.get(f"eager_{key}"), row.get(f"compiled_{key}")]
        return cells + ([row.get("gather_speedup"), row.get("speedup")] if speedups else [None, None])

    first_hour = tr.get("compiled_steps_first_hour")
    rows = [
        [f"inference s per {a['size']}² denoising step", *trio(inf, "s", True)],
        ["  in 2048² fp32 matmuls", *trio(inf, "matmuls")],
        ["  fraction of matmul FLOP/s", *trio(inf, "of_matmul")],
        [f"  end to end, {JOB_STEPS} steps incl. compile (s)", None, inf["job_eager_s"], inf.get("job_compiled_s"),
         None, inf["job_eager_s"] / inf["job_compiled_s"] if inf.get("job_compiled_s") else None],
        ["training s per step", *trio(tr, "s", True)],
        ["  in 2048² fp32 matmuls", *trio(tr, "matmuls")],
        ["  fraction of matmul FLOP/s", *trio(tr, "of_matmul")],
        ["  steps per hour, steady", *trio(tr, "steps_per_hour", True)],
        ["  steps in the first hour incl. compile", None, tr["eager_steps_per_hour"], first_hour,
         None, first_hour / tr["eager_steps_per_hour"] if first_hour else None],
    ]
    print(format_table(["", "eager, every cell", "eager", "compiled", "every cell / eager time",
                        "eager / compiled time"], rows))
    print("eager, every cell: the rule computing every cell's MLP (gather_fired off), as before 2026-12-06 "
          "and as compiled; eager: the MLP of fired cells only (a CPU; on a GPU the two are one rule)")
    if "issue10_s" in tr:
        print(f"\ntraining against the eager rule issue 10 timed (2026-11-24, benchmarks/issue10_baseline.py), "
              f"interleaved two steps at a time, median of {tr['issue10_steps_each']} each: {tr['issue10_s']:.3f} s "
              f"per step there, {tr['issue10_today_s']:.3f} s today: {tr['issue10_speedup']:.2f}× its steps per hour "
              f"(target ≥ 2.5×). Same weights, the first step's loss {tr['issue10_first_loss']:.6f} there, "
              f"{tr['eager_first_loss']:.6f} today")
    if "compile_s" in inf:
        print(f"\ninference: compile {inf['compile_s']:.1f} s ({inf['graphs']} graph(s); another canvas size: "
              f"{inf['graphs_other_size']} more); " + pays(inf["break_even_steps"], f"denoising steps of {a['size']}²"))
    if "compile_s" in tr:
        print(f"training: compile {tr['compile_s']:.1f} s ({tr['graphs']} graph(s), forward and backward); "
              f"{pays(tr['break_even_steps'], 'steps')}")


def pays(steps: float | None, unit: str) -> str:
    return "never pays (not faster)" if steps is None else f"pays after {steps:.0f} {unit}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help=f"model preset (default {FULL['preset']}, quick {QUICK['preset']})")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 autocast on CUDA, fp32 on a CPU")
    parser.add_argument("--size", type=int, help=f"inference canvas side (default {FULL['size']}, quick {QUICK['size']})")
    parser.add_argument("--repeats", type=int, help="timed inference calls per variant")
    parser.add_argument("--batch-size", type=int, help="training batch")
    parser.add_argument("--patch", type=int, help="training patch side")
    parser.add_argument("--train-steps", type=int, help="timed training steps per variant")
    parser.add_argument("--warm-cache", action="store_true", help="use inductor's usual on-disk cache (warm compiles)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, small sizes: checks that the script runs")
    parser.add_argument("--json", type=Path, help="also save the numbers to this JSON file")
    args = parser.parse_args(argv)
    apply_defaults(args, QUICK, FULL)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache = None
    if not args.warm_cache:  # before torch reads it
        cache = tempfile.mkdtemp(prefix="bench-compile-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        return run(args)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from nca_tiles.diffusion import compiled
    from nca_tiles.diffusion.model import preset
    from nca_tiles.diffusion.pipeline import resolve_device, resolve_precision
    from nca_tiles.errors import NcaTilesError

    import torch

    preset(args.preset)  # an unknown name fails now
    device = resolve_device(args.device)
    args.precision = resolve_precision(device, args.precision)
    if args.precision == "bf16" and device.type == "cpu":
        raise NcaTilesError("bf16 on a CPU is hundreds of times slower than fp32: use --precision fp32")
    started = time.perf_counter()
    log("2048² fp32 matmul")
    flops = matmul_flops(device, torch.float32)
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {k: getattr(args, k) for k in ("preset", "precision", "size", "repeats", "batch_size", "patch",
                                                   "train_steps", "warm_cache")},
        "matmul_s": 2 * 2048**3 / flops, "matmul_gflops": flops / 1e9,
        "inference": {}, "training": {},
    }
    if device.type == "cpu":
        # First, while nothing is compiled: `nca-tiles train` on a CPU trains eager and never
        # compiles, and in a process that had compiled the same eager step was 23 % slower
        # (0.566 s against 0.460 s, 2026-12-06), which took issue 10's ratio from 2.8× to 2.2×.
        log(f"training, today's eager rule and issue 10's, interleaved, batch {args.batch_size} of {args.patch}²")
        results["training"]["issue10"] = measure_against_issue10(args, device)
    variants = [("dense", False, False), ("eager", False, True), ("compiled", True, True)]
    for name, compile, gather in variants:
        if name == "dense" and device.type != "cpu":  # the fired-cells rule is a CPU rule
            results["inference"][name] = results["training"][name] = {}
            continue
        log(f"inference, {name}, {args.size}²")
        results["inference"][name] = measure_inference(args, device, compile, gather)
        log(f"training, {name}, batch {args.batch_size} of {args.patch}²")
        results["training"][name] = measure_training(args, device, compile, gather)
    results["compile_problem"] = compiled._disabled
    results["summary"] = summarize(results)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print_results(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
