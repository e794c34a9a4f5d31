"""How well ``nca-tiles synthesize --dry-run`` predicts the run: for each job, the dry run and then
the real run, each in a fresh process, exactly as a user would type them; the estimate, its
spread, the real wall time and real ÷ estimate, and whether that is within 1.5×.

    python benchmarks/bench_dry_run.py --quick             # a tiny canvas: checks that it runs (< 1 min)
    python benchmarks/bench_dry_run.py                     # the demo's synthesis and a 3000 × 2000 slide
    python benchmarks/bench_dry_run.py --json dry-run.json

Jobs (the bundled model, or ``--model``; seed 0, ``--device``, the default ``--compile`` unless
``--compile``/``--no-compile`` is given):

- ``demo``: the synthesis ``nca-tiles demo`` runs — 1024 × 1024 px in chunks of 512, the DDIM
  steps the model records (synthesize's default, which the demo takes; 50 shared where it records none);
- ``3000x2000``: a 3000 × 2000 px slide in chunks of 512, 10 DDIM steps (to keep it to minutes on
  a CPU);
- ``--quick``: ``tiny``, 384 × 256 px in chunks of 128, 2 DDIM steps.

Real time is the wall time of the whole ``nca-tiles synthesize`` process (start-up, model load,
synthesis, export, clean-up), what its user waits for. The estimate does not count start-up and
model load; a fresh process that only imports what a run imports and loads the model is timed too
("start-up": seconds, which only matter on small jobs), and real ÷ estimate is also given without
it. The 1.5× target is for the demo and the 3000 × 2000 job; ``--quick`` only checks the script. The dry run compiles the rule as the run will (under the
default ``--compile`` auto, where compiling pays): the run that follows then finds inductor's
on-disk cache warm, as it would after a user's dry run. Threads: both processes take the CLI's
default (a fair share of the cores left by other nca-tiles processes) unless ``--threads N``; the
dry run prints what it calibrated with. Numbers taken while something else loads the machine are
disturbed: the header's load average (before and after) shows it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_synthesis, beside this file

from bench_synthesis import format_table, header_lines, log, machine_info, write_json  # noqa: E402

JOBS = {
    "demo": {"width": 1024, "height": 1024, "chunk": 512, "steps": None},  # nca_tiles/demo.py's defaults
    "3000x2000": {"width": 3000, "height": 2000, "chunk": 512, "steps": 10},
}
QUICK_JOBS = {"tiny": {"width": 384, "height": 256, "chunk": 128, "steps": 2}}
TARGET = 1.5  # the estimate should be within this factor of the real time, either way
UNITS = {"s": 1, "min": 60, "h": 3600, "days": 86400, "years": 365 * 86400}
ESTIMATE_LINE = re.compile(r"^time \(estimate, calibrated on (?P<device>\S+) with (?P<threads>\d+) torch threads?\): "
                           r"(?P<value>[\d.]+) (?P<unit>\w+) \((?P<low>[\d.]+)–(?P<high>[\d.]+) (?P<span_unit>\w+) "
                           r"(?P<spread>[^)]*)\)$", re.MULTILINE)


def synthesize_command(args: argparse.Namespace, job: dict, out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", "--width", str(job["width"]),
               "--height", str(job["height"]), "--chunk", str(job["chunk"]),
               *([] if job["steps"] is None else ["--steps", str(job["steps"])]), "--seed", "0", "--out", str(out),
               "--device", args.device, "--no-progress", *extra]
    if args.model:
        command += ["--model", str(args.model)]
    if args.compile != "default":
        command += ["--compile" if args.compile == "on" else "--no-compile"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


def timed_process(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - start, proc


def parse_estimate(text: str) -> dict:
    """The estimate the dry run printed, in seconds, with its spread and what it says of it."""
    match = ESTIMATE_LINE.search(text)
    if match is None:
        raise SystemExit(f"no time estimate in the dry run's output:\n{text}")
    value = float(match["value"]) * UNITS[match["unit"]]
    low, high = (float(match[k]) * UNITS[match["span_unit"]] for k in ("low", "high"))
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("time (estimate"))
    calibration = []  # the indented lines under it
    for line in lines[first + 1:]:
        if not line.startswith("  "):
            break
        calibration.append(line.strip())
    return {"estimate_s": value, "low_s": low, "high_s": high, "spread": match["spread"],
            "threads": int(match["threads"]), "device": match["device"], "calibration": calibration}


def startup_seconds(args: argparse.Namespace) -> float:
    """Wall time of a fresh process that imports what a synthesize run imports (also what it
    imports on the way: zarr, the writers) and loads the model."""
    model = repr(str(args.model)) if args.model else "None"
    code = ("from nca_tiles.diffusion.levels import load_synthesis_model\n"
            "import nca_tiles.synthesis.slide_job, nca_tiles.synthesis.sweeps, nca_tiles.synthesis.export_job\n"
            "import nca_tiles.export.ometiff, nca_tiles.export.omezarr, nca_tiles_cli.synthesize, zarr, tifffile, tqdm\n"
            f"load_synthesis_model({model}, {args.device!r})\n")
    seconds, proc = timed_process([sys.executable, "-c", code])
    if proc.returncode:
        raise SystemExit(f"start-up probe failed:\n{proc.stderr}")
    return seconds


def measure_job(args: argparse.Namespace, name: str, job: dict, root: Path) -> dict:
    out = root / f"{name}.ome.tif"
    log(f"{name}: dry run ({job['width']} × {job['height']}, chunk {job['chunk']}, {job['steps']} steps)")
    dry_s, dry = timed_process(synthesize_command(args, job, out, "--dry-run"))
    if dry.returncode:
        raise SystemExit(f"the dry run failed:\n{dry.stdout}\n{dry.stderr}")
    result: dict[str, Any] = {"job": job, "dry_run_s": dry_s, **parse_estimate(dry.stdout), "dry_run_output": dry.stdout}
    log(f"{name}: estimate {result['estimate_s']:.1f} s ({result['low_s']:.1f}–{result['high_s']:.1f} s); real run")
    real_s, real = timed_process(synthesize_command(args, job, out))
    if real.returncode:
        raise SystemExit(f"the run failed:\n{real.stdout}\n{real.stderr}")
    out.unlink()
    ratio = real_s / result["estimate_s"]
    result.update(real_s=real_s, ratio=ratio, within_target=1 / TARGET <= ratio <= TARGET,
                  within_spread=result["low_s"] <= real_s <= result["high_s"])
    log(f"{name}: real {real_s:.1f} s, real ÷ estimate {ratio:.2f}")
    return result


def print_results(results: dict) -> None:
    a = results["settings"]
    print("# nca-tiles: synthesize --dry-run's time estimate vs the real run")
    print("\n".join(header_lines(results["machine"])))
    print(f"load average after: {results['load_average_after']}")
    print(f"model: {a['model'] or 'bundled'}; --compile: {a['compile']}; --threads: {a['threads'] or 'default'}; "
          f"each job: `nca-tiles synthesize ... --dry-run`, then the same command, fresh processes, seed 0, ddim")
    print(f"start-up (fresh process: imports + model load, not in the estimate): {results['startup_s']:.1f} s\n")
    rows = []
    for name, r in results["jobs"].items():
        j = r["job"]
        rows.append([name, f"{j['width']}×{j['height']}", j["chunk"], j["steps"] or "model's", r["threads"], r["estimate_s"],
                     f"{r['low_s']:.1f}–{r['high_s']:.1f}", r["dry_run_s"], r["real_s"], r["ratio"],
                     (r["real_s"] - results["startup_s"]) / r["estimate_s"],
                     "yes" if r["within_target"] else "NO", "yes" if r["within_spread"] else "no"])
    print(format_table(["job", "canvas", "chunk", "steps", "threads", "estimate s", "spread s", "dry run s",
                        "real s", "real ÷ est.", "(real − start-up) ÷ est.", f"within {TARGET}×", "in spread"], rows))
    for name, r in results["jobs"].items():
        print(f"\n{name}: the dry run's time lines ({r['spread']}):")
        print("\n".join(f"  {line}" for line in r["calibration"] if not line.startswith("the job")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model path (default: the bundled model)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", default="default", choices=("default", "on", "off"),
                        help="pass --compile / --no-compile to both commands (default: neither, i.e. auto)")
    parser.add_argument("--threads", type=int, help="pass --threads N to both commands")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs, of {', '.join(JOBS)}")
    parser.add_argument("--dir", type=Path, help="where the slides and work dirs go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="one tiny canvas: checks that the script runs")
    parser.add_argument("--json", type=Path, help="also save the numbers to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    jobs = QUICK_JOBS if args.quick else {name: JOBS[name] for name in args.jobs.split(",")}
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "settings": {"model": str(args.model) if args.model else None, "compile": args.compile,
                     "threads": args.threads, "quick": args.quick, "target": TARGET},
        "jobs": {},
    }
    started = time.perf_counter()
    log("start-up probe")
    results["startup_s"] = startup_seconds(args)
    with tempfile.TemporaryDirectory(prefix="bench-dry-run-", dir=args.dir) as tmp:
        for name, job in jobs.items():
            results["jobs"][name] = measure_job(args, name, job, Path(tmp))
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    log(f"done in {time.perf_counter() - started:.0f} s")
    print_results(results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
