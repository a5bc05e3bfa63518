#!/usr/bin/env bash
# Issue 4 on a GPU: pneumo against fastai 2.8.12, the tutorial's recipe (lr_find, then
# fit_one_cycle(8, 3e-3) with the body frozen) on all 5,216 images of chest_xray_224/train,
# random 80/20 split, on one CUDA GPU. Prints one JSON object and keeps it in $OUT (or bench/).
# Expected under 5 minutes on an H100 (fastai alone took ~40 s to fit and ~71 s for lr_find).
#
#   bash bench/run_speed_gpu.sh                      # extra arguments go to bench/speed.py
#   DATA=/path/to/train bash bench/run_speed_gpu.sh --split patient
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/chest_xray_224/train}
OUT_DIR=${OUT:-bench}

if ! "$PY" -c "import fastai" 2>/dev/null; then  # the bench extra; works offline from local wheels
    "$PY" -m pip install -q -e ".[bench]" || { echo "fastai missing: pip install -e '.[bench]'" >&2; exit 1; }
fi
"$PY" - <<'EOF' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible to PyTorch: this script is the GPU benchmark (bench/speed.py runs on the CPU)")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
EOF
[ -d "$DATA" ] || { echo "no data at $DATA: set DATA=/path/to/chest_xray_224/train" >&2; exit 1; }

mkdir -p "$OUT_DIR"
timeout 295 "$PY" bench/speed.py --device cuda --data "$DATA" --epochs 8 --image-size 224 --split random \
    --lr-find-iters 100 "$@" > "$OUT_DIR/speed_gpu.json"
cat "$OUT_DIR/speed_gpu.json"
