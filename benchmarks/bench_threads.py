"""Several nca-tiles processes on one machine: K concurrent ``nca-tiles synthesize`` runs, each
with a forced thread count (``--threads 2``: oversubscribed as soon as K × 2 exceeds the cores)
against the default fair share (each process takes its share of the usable cores left by the
others, and rebalances as the others start and end: nca_tiles/runtime/threads.py).

    python benchmarks/bench_threads.py                     # K = 3, 512² canvas, chunk 128, 2 steps: minutes
    python benchmarks/bench_threads.py --processes 2 --size 96 --chunk 48 --steps 1 --repeats 1   # a check in seconds

Each process synthesizes its own slide (seed i) with the bundled model (or ``--model``). The
children run without ``OMP_NUM_THREADS``, which would cap the fair share. Per mode: each
process's wall time, the makespan (first start to last exit), the CPU time of all children
(spinning OpenMP threads show up here), and the thread counts each process claimed while it ran
(read from its claim file, e.g. ``2>1``: it started alone and shrank when the others came).
Repeats alternate the modes; the medians are compared. Numbers taken while something else loads
the machine are disturbed: the header's load average shows it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def usable_cores() -> int:
    from nca_tiles.runtime.threads import usable_cores as cores

    return cores()


def claims_folder() -> Path:
    from nca_tiles.runtime.threads import claims_dir

    return claims_dir()


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # it would cap the fair share
    return env


def synthesize_command(args, out: Path, seed: int, threads: int | None) -> list[str]:
    command = [sys.executable, "-m", "nca_tiles_cli.main", "synthesize", "--width", str(args.size),
               "--height", str(args.size), "--chunk", str(args.chunk), "--steps", str(args.steps),
               "--seed", str(seed), "--out", str(out), "--device", "cpu", "--tile", str(args.tile),
               "--no-progress"]
    if args.model:
        command += ["--model", str(args.model)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command


def run_mode(args, folder: Path, name: str, threads: int | None) -> dict:
    """K concurrent processes; their wall times, the makespan, the children's CPU time, and the
    thread counts each one claimed while it ran."""
    claims = claims_folder()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs, seen, ended = [], [], {}
    for i in range(args.processes):
        out = folder / f"{name}-{i}.ome.tif"
        procs.append(subprocess.Popen(synthesize_command(args, out, i, threads), env=child_env(),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        seen.append([])
    while len(ended) < len(procs):
        for i, proc in enumerate(procs):
            if i in ended:
                continue
            try:
                kind, count = (claims / str(proc.pid)).read_text().split()
                if not seen[i] or seen[i][-1] != int(count):
                    seen[i].append(int(count))
            except (OSError, ValueError):
                pass
            if proc.poll() is not None:
                ended[i] = time.perf_counter() - start
        time.sleep(0.05)
    makespan = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc in procs:
        error = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"a synthesize process failed (exit {proc.returncode}):\n{error}")
    walls = [ended[i] for i in range(len(procs))]
    return {
        "mode": name,
        "threads": threads,
        "walls_s": walls,
        "makespan_s": makespan,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "claimed": [">".join(map(str, counts)) or "?" for counts in seen],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", "-k", type=int, default=3, help="concurrent synthesize processes (default 3)")
    parser.add_argument("--forced-threads", type=int, default=2, help="--threads of the forced mode (default 2)")
    parser.add_argument("--size", type=int, default=512, help="canvas side in px (default 512)")
    parser.add_argument("--chunk", type=int, default=128, help="--chunk (default 128)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (default 2)")
    parser.add_argument("--tile", type=int, default=256, help="OME-TIFF tile (default 256)")
    parser.add_argument("--model", type=Path, default=None, help="model (default: the bundled one)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    forced_name = f"forced --threads {args.forced_threads}"
    modes = [(forced_name, args.forced_threads), ("fair share (default)", None)]
    results: dict[str, list[dict]] = {name: [] for name, _ in modes}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        folder = Path(tmp)
        log("warm-up: one process (imports, file cache) ...")
        subprocess.run(synthesize_command(args, folder / "warmup.ome.tif", 0, 1), env=child_env(), check=True,
                       stdout=subprocess.DEVNULL)
        for repeat in range(args.repeats):
            order = modes if repeat % 2 == 0 else modes[::-1]
            for index, (name, threads) in enumerate(order):
                log(f"run {repeat + 1}/{args.repeats}: {args.processes} × synthesize, {name} ...")
                slug = f"r{repeat}-m{modes.index((name, threads))}"
                results[name].append(run_mode(args, folder, slug, threads))
                for path in folder.glob(f"{slug}-*"):
                    path.unlink()

    lines = [
        "# nca-tiles thread-sharing benchmark",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, host {platform.node()}",
        f"machine: {cores} usable cores, load average {load:.2f} before the runs, python {platform.python_version()}",
        f"job: {args.processes} concurrent `nca-tiles synthesize` ({args.model or 'bundled model'}, {args.size}² canvas, "
        f"chunk {args.chunk}, {args.steps} DDIM step(s), --device cpu), OMP_NUM_THREADS unset in the children, "
        f"{args.repeats} run(s) per mode",
        "",
        f"{'mode':<22}  {'run':>3}  {'threads claimed per process':<28}  {'wall s per process':<24}  "
        f"{'makespan s':>10}  {'CPU s':>7}",
    ]
    for name, _ in modes:
        for i, r in enumerate(results[name]):
            walls = ", ".join(f"{w:.1f}" for w in r["walls_s"])
            lines.append(f"{name:<22}  {i + 1:>3}  {', '.join(r['claimed']):<28}  {walls:<24}  "
                         f"{r['makespan_s']:>10.2f}  {r['cpu_s']:>7.1f}")
    medians = {name: statistics.median(r["makespan_s"] for r in results[name]) for name, _ in modes}
    forced, fair = medians[forced_name], medians["fair share (default)"]
    lines += ["", f"median makespan: {forced_name} {forced:.2f} s, fair share {fair:.2f} s; "
                  f"ratio forced ÷ fair = {forced / fair:.2f} (> 1: the fair share is faster)"]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"cores": cores, "load_average": load, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "median_makespan_s": medians,
                                         "ratio_forced_over_fair": forced / fair}, indent=2) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
