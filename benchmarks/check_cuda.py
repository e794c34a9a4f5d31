"""The invariants on a CUDA device, which the test suite (CPU only) cannot reach.

Prints one table: tiled ÷ whole synthesis of the bundled model on the GPU at several chunk sizes,
fp32 and bf16 autocast, eager and compiled; the GPU against the CPU; the counter-based noise on the
GPU against the CPU's, bit for bit. "same" is the test suite's criterion (tests/helpers.py,
assert_same_image): at most one grey level apart and 99.9 % of the pixels identical. Exit code 1
if tiled differs from whole or the noise differs from the CPU's.

    python benchmarks/check_cuda.py --json cuda-check.json       # ~1–2 min on an H100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def same(a: np.ndarray, b: np.ndarray) -> tuple[bool, int, float]:
    """(same by the test suite's criterion, max |a - b| in grey levels, fraction of pixels identical)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return bool(diff.max() <= 1 and (diff == 0).mean() >= 0.999), int(diff.max()), float((diff == 0).mean())


def synthesize(model, out: Path, side: int, chunk: int, steps: int) -> np.ndarray:
    import tifffile

    from nca_tiles.synthesis.slide_job import SlideRequest, synthesize_slide

    req = SlideRequest(width=side, height=side - 128, out=out, seed=3, chunk=chunk, steps=steps,
                       compression="none", tile=256)
    synthesize_slide(req, model, progress=False)
    return tifffile.imread(out, level=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=768, help="canvas width (height: side - 128)")
    parser.add_argument("--chunks", default="256", help="chunk sides compared with the whole canvas")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="off,on", help="compile modes to run (on: torch.compile)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try this script out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2

    from nca_tiles.diffusion import compiled, rng
    from nca_tiles.diffusion.levels import load_synthesis_model

    chunks = [int(c) for c in args.chunks.split(",")]
    modes = args.modes.split(",")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# nca-tiles: the invariants on CUDA\n{name}, torch {torch.__version__}, "
          f"bundled model, {args.side} x {args.side - 128} px, {args.steps} steps, seed 3")
    # The hash is integer arithmetic: bit for bit. The normals go through log and cos, whose last
    # bits differ between devices' math libraries (tests/test_rng.py: within 1e-5).
    key = (1, rng.Stream.STEP_NOISE, 2, 10, 20, 256, 256, 3)
    bits_same = bool(torch.equal(rng.hash_grid(*key, device=args.device).cpu(), rng.hash_grid(*key)))
    normal_diff = float((rng.normal(*key, device=args.device).cpu() - rng.normal(*key)).abs().max())
    noise_same = bits_same and normal_diff <= 1e-5
    print(f"counter-based noise, 256² x 3, GPU vs CPU: hash bits {'equal' if bits_same else 'DIFFERENT'}, "
          f"normals max |diff| {normal_diff:.2e} ({'within' if noise_same else 'NOT within'} 1e-5)", flush=True)
    rows, failed = [], not noise_same
    widths = (9, 9, 26, 4, 8, 9, 6)
    header = ("precision", "compile", "comparison", "same", "max diff", "identical", "s")

    def show(row: tuple) -> None:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)), flush=True)

    show(header)
    show(tuple("-" * w for w in widths))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wholes = {}
        for precision in ("fp32", "bf16") if args.device == "cuda" else ("fp32",):
            for mode in modes:
                compiled.set_default_mode(mode)
                compiled.reset()
                model = load_synthesis_model(None, args.device, precision)
                t0 = time.perf_counter()
                whole = synthesize(model, tmp / f"whole-{precision}-{mode}.ome.tif", args.side, args.side, args.steps)
                seconds = time.perf_counter() - t0
                wholes[(precision, mode)] = whole
                rows.append((precision, mode, "whole canvas", "–", "–", "–", f"{seconds:.1f}"))
                show(rows[-1])
                for chunk in chunks:
                    t0 = time.perf_counter()
                    tiled = synthesize(model, tmp / f"t{chunk}-{precision}-{mode}.ome.tif", args.side, chunk, args.steps)
                    ok, worst, frac = same(tiled, whole)
                    failed |= not ok
                    rows.append((precision, mode, f"chunk {chunk} vs whole", "yes" if ok else "NO", worst,
                                 f"{frac:.5f}", f"{time.perf_counter() - t0:.1f}"))
                    show(rows[-1])
            if {"on", "off"} <= set(modes):
                ok, worst, frac = same(wholes[(precision, "on")], wholes[(precision, "off")])
                rows.append((precision, "on vs off", "compiled vs eager, whole", "yes" if ok else "no", worst, f"{frac:.5f}", "–"))
                show(rows[-1])
        compiled.set_default_mode("off")
        compiled.reset()
        cpu = synthesize(load_synthesis_model(None, "cpu", "fp32"), tmp / "cpu.ome.tif", args.side, args.side, args.steps)
        ok, worst, frac = same(wholes[("fp32", modes[0])], cpu)
        rows.append(("fp32", "off", "GPU vs CPU, whole", "yes" if ok else "no", worst, f"{frac:.5f}", "–"))
        show(rows[-1])

    print("(GPU vs CPU and compiled vs eager need not be the same: the invariants are per device and path)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "rows": rows, "hash_bits_same": bits_same,
                                         "normal_max_diff": normal_diff}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
