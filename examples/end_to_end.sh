#!/usr/bin/env bash
# The whole pipeline on your own slides, with a CPU-sized model:
#   extract patches -> train -> synthesize -> evaluate -> preview.
# Usage: examples/end_to_end.sh SLIDES_DIR [WORK_DIR]
#        STEPS=4 SIZE=512 N=32 examples/end_to_end.sh SLIDES_DIR   # a quick smoke run
# On a 2-core CPU this takes about an hour (mostly training); on a GPU use --preset paper and
# many more --steps (the paper trains 200 000).
set -euo pipefail
slides=${1:?usage: $0 SLIDES_DIR [WORK_DIR]}
work=${2:-nca-tiles-example}
steps=${STEPS:-1000}   # training steps
size=${SIZE:-4096}     # synthetic slide side, px
n=${N:-256}            # patches per set for evaluate
mkdir -p "$work"

# 1. 64 px tissue patches at 1 µm/px (the paper's resolution), split train/val/test.
nca-tiles extract-patches "$slides" --out "$work/patches.zarr" --mpp 1.0 --stride 32 --overwrite
nca-tiles info "$work/patches.zarr"

# 2. Train (Ctrl-C saves a checkpoint; add --resume to continue).
nca-tiles train --patches "$work/patches.zarr" --out "$work/run" --preset small --steps "$steps" --overwrite

# 3. A SIZE × SIZE slide in 256 px chunks: first the plan, then the real thing.
nca-tiles synthesize --model "$work/run" --width "$size" --height "$size" --chunk 256 --out "$work/slide.ome.tif" --dry-run
nca-tiles synthesize --model "$work/run" --width "$size" --height "$size" --chunk 256 --steps 20 --out "$work/slide.ome.tif" --overwrite

# 4. Quality against held-out real patches, and the seam score of the slide.
nca-tiles evaluate --model "$work/run" --patches "$work/patches.zarr" --n "$n" --json "$work/metrics.json"
nca-tiles evaluate --slide "$work/slide.ome.tif" --chunk 256

# 5. A thumbnail, and what the file holds.
nca-tiles preview "$work/slide.ome.tif" --out "$work/thumbnail.png" --overwrite
nca-tiles info "$work/slide.ome.tif"
