#!/usr/bin/env bash
# The whole pneumo workflow on the bundled sample, on the CPU: check, look, find an LR, train,
# evaluate on held-out patients, predict, explain, report. Prints where each output lies.
set -euo pipefail
SAMPLE=$(python -c "import pneumo, pathlib; print(pathlib.Path(pneumo.__file__).parent / 'sample_data' / 'chest_xray')")
OUT=${DEMO_OUT:-demo-output}
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* =="; }

step "1. check the data (counts, unreadable files, duplicates, patients across splits)"
pneumo data check "$SAMPLE"

step "2. look at a batch of augmented training images"
pneumo show-batch "$SAMPLE" --out "$OUT/batch.png"

step "3. find a learning rate (LR range test)"
pneumo lr-find "$SAMPLE" --out "$OUT/lr_find"

step "4. train: body frozen but its last two stages, one-cycle, 8 epochs, patient-level validation split"
pneumo train "$SAMPLE" --out "$OUT/run"

step "5. evaluate on the sample's held-out test patients"
pneumo evaluate "$OUT/run/model" "$SAMPLE" --out "$OUT/evaluation"

step "6. predict single files"
pneumo predict "$OUT/run/model" "$SAMPLE/test/NORMAL" --csv > "$OUT/predictions.csv"
head -n 4 "$OUT/predictions.csv"

step "7. explain one prediction (Grad-CAM)"
pneumo explain "$OUT/run/model" "$(ls "$SAMPLE"/test/PNEUMONIA/*.jpeg | head -n 1)" --out "$OUT/heat.png"

step "8. report and top losses"
pneumo interpret "$OUT/run" --out "$OUT/interpret"
pneumo report "$OUT/run" --out "$OUT/report.html"

echo
echo "== outputs =="
cat <<EOT
batch:            $OUT/batch.png
lr finder plot:   $OUT/lr_find/lr_find.png
run folder:       $OUT/run (metrics.csv, curves.png, valid_eval.json, checkpoints/)
model:            $OUT/run/model (model.safetensors + model.json)
evaluation:       $OUT/evaluation (evaluation.json, confusion_matrix.png, roc.png, reliability.png)
predictions:      $OUT/predictions.csv
Grad-CAM:         $OUT/heat.png
top losses:       $OUT/interpret
report:           $OUT/report.html
serve it:         pneumo serve $OUT/run/model   (then open http://127.0.0.1:8000)
EOT
echo "demo finished in $(( $(date +%s) - start )) s"
