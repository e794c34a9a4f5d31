"""The whole pipeline through the Python API, on the bundled sample slide:
open a slide -> extract patches -> train -> synthesize -> re-export -> evaluate.

    python examples/api_end_to_end.py                       # a few minutes on a 2-core CPU
    python examples/api_end_to_end.py --train-steps 2 --size 96 --chunk 48 --n 8 --steps 2   # half a minute

A CPU-sized sketch: the tiny preset trained for a few hundred steps gives colour, not tissue (the
paper trains --preset paper for 200 000 steps on a GPU). examples/end_to_end.sh does the same
with the command line; ``nca_tiles.run_demo()`` is ``nca-tiles demo``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import nca_tiles
from nca_tiles.demo import SAMPLE_SLIDE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("nca-tiles-api-example"), help="output folder")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="synthetic slide side, px")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for synthesis and evaluation")
    parser.add_argument("--n", type=int, default=64, help="patches per set for the evaluation")
    args = parser.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    # 1. Any slide format through one reader.
    with nca_tiles.open_slide(SAMPLE_SLIDE) as slide:
        print(f"{SAMPLE_SLIDE.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px at {slide.mpp:.3f} µm/px")

    # 2. Tissue patches at 1 µm/px, split train/val/test.
    patches = nca_tiles.extract_patches([SAMPLE_SLIDE], work / "patches.zarr", target_mpp=1.0, overwrite=True,
                                        progress=False)
    print(f"{patches.n_patches} patches: {patches.split_counts}")

    # 3. Train (fp32 on the CPU); the run directory holds the model, checkpoints and samples.
    config = nca_tiles.TrainConfig(steps=args.train_steps)
    trainer, last = nca_tiles.train(patches.out, work / "run", "tiny", config, torch.device("cpu"),
                                    overwrite=True, progress=False)
    print(f"trained to step {trainer.step}: loss {last.get('loss', float('nan')):.4f}")

    # 4. A region in memory (e.g. for a data loader), and a slide of any size, chunk by chunk; its
    # canvas is kept for step 5.
    region = nca_tiles.generate_region(nca_tiles.load_model(work / "run", device="cpu"), 64, 64, steps=args.steps)
    print(f"a 64 x 64 region in memory: mean RGB {region.reshape(-1, 3).mean(axis=0).round(1).tolist()}")
    model = nca_tiles.load_synthesis_model(work / "run", device="cpu")
    request = nca_tiles.SlideRequest(width=args.size, height=args.size, out=work / "slide.ome.tif", chunk=args.chunk,
                                     steps=args.steps, work_dir=work / "canvas", keep_canvas=True, overwrite=True)
    slide_path = nca_tiles.synthesize_slide(request, model, progress=False)
    print(f"wrote {slide_path}")

    # 5. The kept canvas again, as OME-Zarr.
    exported = nca_tiles.export_canvas(work / "canvas", work / "slide.ome.zarr", overwrite=True,
                                       progress=False)
    print(f"wrote {exported.out} ({exported.format}, {exported.width} x {exported.height} px)")

    # 6. Quality against held-out real patches, and the slide's seam score (1.00 = no seam).
    results = nca_tiles.evaluate_model(work / "run", patches.out, n=args.n, steps=args.steps, device="cpu")
    metrics = results["results"]
    print(f"random-feature FD on {results['n']} patches: real vs real {metrics['floor']['fd_random']:.3f}, "
          f"synthetic {metrics['synthetic']['fd_random']:.3f}, noise {metrics['ceiling']['fd_random']:.3f}")
    seams = nca_tiles.evaluate_slide(slide_path, args.chunk)
    print(f"seam score {seams['score']:.3f}")


if __name__ == "__main__":
    main()
