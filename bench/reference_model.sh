#!/usr/bin/env bash
# The model reported for issue 5, from a training folder to a model folder, in one command:
#   bench/reference_model.sh ../shared/data/chest_xray_224/train OUT
#   pneumo evaluate OUT/model path/to/test --json
# The recipe is the best of the candidates bench/recipe_experiments.py has measured so far
# (bench/experiments/recipe.json: "balanced" over "base"; the augmented-views, larger-backbone and
# fine-tuning candidates are still to run): ImageNet EfficientNet-Lite0, patient-level validation
# split (20%), loss weights against the 3:1 class imbalance, the one-cycle head phase, temperature and
# a Youden threshold fitted on validation only. With a GPU the body is also fine-tuned
# (FINETUNE_EPOCHS, default 3 there; unmeasured so far).
set -euo pipefail
DATA=${1:?usage: bench/reference_model.sh DATA OUT}
OUT=${2:?usage: bench/reference_model.sh DATA OUT}
PNEUMO=${PNEUMO:-pneumo}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    EXTRA=(--unfreeze --unfreeze-epochs "${FINETUNE_EPOCHS:-3}")
else
    EXTRA=()
fi
"$PNEUMO" train "$DATA" --out "$OUT" --arch efficientnet_lite0 --pretrained imagenet --split patient \
    --valid-pct 0.2 --epochs 8 --lr 3e-3 --class-balance weights --threshold youden \
    --seed 42 "${EXTRA[@]}"
echo "model folder: $OUT/model"
