#!/usr/bin/env bash
# Issue 26's candidates, trained as the reference's members are (full training folder, 20% patient
# validation, seed 42, bench/reference_model.sh's options) and measured on outside-dev by
# bench/outside.py; bench/rank_outside.py then ranks every record by the rule written before these runs
# (recipe_experiments.OUTSIDE_RULE). Each run takes 6 to 20 minutes on the 2-core CPU.
#   bench/outside_candidates.sh ../shared/data/chest_xray_224/train WORK [NAME ...]
set -euo pipefail
DATA=${1:?usage: bench/outside_candidates.sh DATA WORK [NAME ...]}
WORK=${2:?usage: bench/outside_candidates.sh DATA WORK [NAME ...]}
shift 2
PNEUMO=${PNEUMO:-pneumo}
HERE=$(cd "$(dirname "$0")" && pwd)
RESULTS=${RESULTS:-$HERE/results/outside}
COMMON=(--pretrained imagenet --split patient --valid-pct 0.2 --epochs 8 --lr 3e-3 --batch-size 64
        --mode features --bn-adapt-images 1024 --bn-adapt-batch-size 8
        --class-balance weights --augment-policy radiograph --feature-views 2
        --threshold youden --seed 42)
declare -A OPTIONS=(
  [lite0_stages2]="--arch efficientnet_lite0 --trainable-stages 2"   # the reference's first member
  [lite2_stages2]="--arch efficientnet_lite2 --trainable-stages 2"   # the reference's second member
  [lite0_stages4]="--arch efficientnet_lite0 --trainable-stages 4"   # deeper into the body on cached maps
  [lite1_stages2]="--arch efficientnet_lite1 --trainable-stages 2"   # a third member
  [lite1_stages4]="--arch efficientnet_lite1 --trainable-stages 4"   # a third member, as deep as lite0's
  [lite2_stages4]="--arch efficientnet_lite2 --trainable-stages 4"   # the second member as deep as the first
  [lite0_stages4_consistency4]="--arch efficientnet_lite0 --trainable-stages 4 --consistency 4"  # AugMix's loss on two views
  [lite0_stages4_unfreeze3]="--arch efficientnet_lite0 --trainable-stages 4 --unfreeze-epochs 3"  # then the whole net
  [lite0_stages2_consistency4]="--arch efficientnet_lite0 --trainable-stages 2 --consistency 4"  # at pneumo train's default depth
  [lite0_stages4_consistency4_unfreeze3]="--arch efficientnet_lite0 --trainable-stages 4 --consistency 4 --unfreeze-epochs 3"
  [tutorial]="--arch efficientnet_lite0 --trainable-stages 0 --class-balance none --feature-views 1 --augment-policy standard"
)
for name in "${@:-lite0_stages4}"; do
  if [ ! -f "$WORK/$name/model/model.json" ]; then
    # shellcheck disable=SC2086
    "$PNEUMO" train "$DATA" --out "$WORK/$name" "${COMMON[@]}" ${OPTIONS[$name]}
  fi
  python "$HERE/outside.py" "$WORK/$name/model" --out "$RESULTS/$name" --title "$name" > /dev/null
done
python "$HERE/rank_outside.py" "$RESULTS"
