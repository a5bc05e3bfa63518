#!/usr/bin/env bash
# The reference model, from a training folder to a model folder, in one command:
#   bench/reference_model.sh ../shared/data/chest_xray_224/train OUT
#   pneumo evaluate OUT/model path/to/test --json
# The recipe is the winner on outside-dev (bench/results/outside/ranking.md, ranked by
# recipe_experiments.OUTSIDE_RULE, written before the runs; outside-dev is a patient-level half of
# Kaggle's official test split, never trained or validated on): two runs of ImageNet EfficientNet-Lite0
# on one patient-level validation split (20%, seed 42), their calibrated probabilities averaged, the
# threshold chosen by THRESHOLD (bench/outside_thresholds.py's winner) on their averaged validation
# predictions only. Both train the body's last FOUR stages with the head on two cached views per image
# (the radiograph augmentation: random resized crops, gamma, contrast, brightness, blur or sharpening,
# noise, JPEG quality 30-95), BatchNorm re-estimated on training images in batches of 8, loss weights
# against the 3:1 class imbalance, one-cycle over 8 epochs at 3e-3. Member 1 adds AugMix's
# Jensen-Shannon consistency between two views of each film (--consistency 4: outside-dev AUC 0.974
# against 0.954 without); member 2 then fine-tunes the whole network for 3 epochs (--unfreeze-epochs 3:
# 0.965). Session 17's reference (Lite0 4 stages + Lite2 2 stages, sensitivity:0.95) read outside-dev
# at AUC 0.953, specificity 0.720; 1f7a985's at 0.944, 0.568.
# Options are spelt out so that the script keeps its meaning if defaults change. About 60 minutes on an
# idle 2-core CPU (member 2's fine-tuning is most of it).
set -euo pipefail
DATA=${1:?usage: bench/reference_model.sh DATA OUT}
OUT=${2:?usage: bench/reference_model.sh DATA OUT}
PNEUMO=${PNEUMO:-pneumo}
THRESHOLD=${THRESHOLD:-sensitivity:0.90}
COMMON=(--arch efficientnet_lite0 --trainable-stages 4 --pretrained imagenet --split patient
        --valid-pct 0.2 --epochs 8 --lr 3e-3 --batch-size 64 --mode features --bn-adapt-images 1024
        --bn-adapt-batch-size 8 --class-balance weights --augment-policy radiograph --feature-views 2
        --threshold "$THRESHOLD" --seed 42 --no-export)
"$PNEUMO" train "$DATA" --out "$OUT/consistency" --consistency 4 "${COMMON[@]}"
"$PNEUMO" train "$DATA" --out "$OUT/fine_tuned" --unfreeze-epochs 3 "${COMMON[@]}"
"$PNEUMO" ensemble "$OUT/consistency" "$OUT/fine_tuned" --out "$OUT" --threshold "$THRESHOLD"
echo "model folder: $OUT/model"
