#!/usr/bin/env bash
# The GPU checks and benchmarks the README lists, in one call on a machine with a CUDA GPU (a
# lent one has ~15 minutes; each step has its own time limit, so one slow step cannot eat the rest).
# Results (text and JSON) go to $OUT (default gpu-results/).
#
# Where the Python packages nca-tiles needs are missing and nothing can be downloaded, carry
# wheels in .whl/ (README "On a GPU"): they are installed to /tmp/site first. Without
# imagecodecs (26 MB) the synthesis benchmark exports OME-Zarr instead of JPEG OME-TIFF. The
# wheels (for the lent machines' Python 3.12; .whl/ is not in git), fetched on a machine online:
#   pip download zarr numcodecs donfig google-crc32c dask partd locket click tqdm pillow pyyaml \
#       msgpack fsspec packaging typing_extensions certifi --no-deps -d .whl --python-version 3.12 \
#       --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
missing=()  # only the wheels of packages the machine lacks: /tmp/site comes before its own site-packages
for wheel in .whl/*.whl; do
    [[ -e $wheel ]] || continue
    name=$(basename "$wheel" | cut -d- -f1)
    case $name in pillow) module=PIL ;; pyyaml) module=yaml ;; *) module=$name ;; esac
    python3 -c "import $module" 2>/dev/null || missing+=("$wheel")
done
if (( ${#missing[@]} )); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${missing[@]}" \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# The command-line package is the checkout's cli/ folder (pyproject maps it to nca_tiles_cli).
mkdir -p /tmp/cli && ln -sfn "$PWD/cli" /tmp/cli/nca_tiles_cli && export PYTHONPATH=$PYTHONPATH:/tmp/cli
format=ome-tiff
python3 -c "import imagecodecs" 2>/dev/null || format=ome-zarr

only=${1:-machine,presets,check_cuda,synthesis,compile}  # which steps, comma-separated (train: only when named)
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output to $OUT/NAME.txt too
    local name=$1 limit=$2; shift 2
    [[ ",$only," == *",$name,"* ]] || return 0
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

step machine 20 bash -c 'nvidia-smi -L; nproc; python3 -c "import torch; print(\"torch\", torch.__version__, torch.version.cuda)"'
step presets 90 python3 benchmarks/bench_presets.py --device cuda --presets tiny,small,paper --json "$OUT/presets.json"
step check_cuda 120 python3 benchmarks/check_cuda.py --json "$OUT/check_cuda.json"
step synthesis 150 python3 benchmarks/bench_synthesis.py --device cuda --preset paper --canvas 4096 --chunks 1024,2048 \
    --rss-sizes 4096,8192 --rss-chunk 1024 --format "$format" --sections 1,2,3,4 --json "$OUT/synthesis.json"
step compile 120 python3 benchmarks/bench_compile.py --device cuda --preset paper --size 1024 --json "$OUT/compile.json"

# train (only when named): the fine level widened to $TRAIN_PRESET (default wide) from the bundled
# one and trained on the GPU for $TRAIN_MINUTES (default 8): the realism bottleneck on a CPU
# (README "On a GPU"; TRAIN_DEVICE=cpu tries the step here). Needs the fine level's patch store:
# carry runs/patches/mpp-1.zarr. The run comes back in $OUT/fine-gpu (checkpoint, model/, metrics);
# `nca-tiles train ... --resume` goes on from it on any machine.
minutes=${TRAIN_MINUTES:-8}
step train $((minutes * 60 + 90)) python3 -m nca_tiles_cli.main train --patches runs/patches/mpp-1.zarr \
    --out "$OUT/fine-gpu" --preset "${TRAIN_PRESET:-wide}" --init-from nca_tiles/data/models/default/level-2 \
    --balance-slides --max-timestep 200 --relay-factor 4 --batch-size "${TRAIN_BATCH:-16}" --steps 200000 \
    --val-every 1000 --sample-every 5000 --checkpoint-every 500 --device "${TRAIN_DEVICE:-cuda}" --precision fp32 --no-compile \
    --seed 0 --no-progress --time-limit "${minutes}m"
