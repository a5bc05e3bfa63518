#!/usr/bin/env bash
# The command behind docs/compare/: does transfer learning pay? efficientnet_lite0 pretrained (ImageNet,
# frozen body, CPU features mode) vs from scratch (whole network), on the 224 px Kaggle training split.
#
# CPU design: both arms at 96 px (from scratch runs the whole network every step; at 224 px lite0 trains at
# ~7 img/s here, so full size is infeasible), fractions 2/5/10/25% of the training patients, 2 seeds,
# 8 epochs: ~35-45 min on a shared 2-core machine. One torch thread: with other jobs on the machine, two
# threads ran 2.5-4.5x slower than one. Resumable: after a kill, run the same command again.
# Prints summary.json (design, table, targets, answer) at the end; copies the figures, table and report
# into docs/compare/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/work/shared/data/chest_xray_224/train}
OUT=${OUT:-runs/compare-cpu}
DOCS=${DOCS:-docs/compare}
PNEUMO=${PNEUMO:-.venv/bin/pneumo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$PNEUMO" compare "$DATA" --arch efficientnet_lite0 --fractions 0.02,0.05,0.1,0.25 --seeds 2 --epochs 8 \
    --image-size 96 --device cpu --out "$OUT" "$@" >&2
mkdir -p "$DOCS"
cp "$OUT"/report.md "$OUT"/time_to_target.csv "$OUT"/summary.json "$OUT"/error_vs_*.png "$DOCS"/
cat "$OUT/summary.json"
