#!/usr/bin/env bash
# The whole pneumo workflow on the bundled sample, on the CPU: check, look, find an LR, train,
# evaluate on held-out patients, predict, explain, report. Prints where each output lies.
set -euo pipefail
SAMPLE=$(python -c "import pneumo, pathlib; print(pathlib.Path(pneumo.__file__).parent / 'sample_data' / 'chest_xray')")
OUT=${DEMO_OUT:-demo-output}
# DEMO_OPTIONS: extra options for both lr-find and train, e.g. "--image-size 64" for a
# quick try on a busy machine (the default demo is pneumo's defaults: 224 px, 8 epochs).
read -r -a OPTS <<< "${DEMO_OPTIONS:-}"
rm -rf "$OUT" && mkdir -p "$OUT"
start=$(date +%s)
step() { echo; echo "== $* =="; }

step "1. check the data (counts, unreadable files, duplicates, patients across splits)"
pneumo data check "$SAMPLE"

step "2. look at a batch of augmented training images"
pneumo show-batch "$SAMPLE" --out "$OUT/batch.png"

step "3. find a learning rate (LR range test)"
pneumo lr-find "$SAMPLE" --out "$OUT/run/lr_find" ${OPTS[@]+"${OPTS[@]}"}
cat <<'EOT'
The demo trains at pneumo's default max LR 3e-3 all the same: that default was measured best on the
full 5,216-image training set (bench/experiments/recipe.md), while this suggestion comes from one noisy
sweep over the sample's 160 training images. To train at the suggestion: pneumo train DATA --lr VALUE
EOT

step "4. train: body frozen but its last two stages, one-cycle, 8 epochs, patient-level validation split"
pneumo train "$SAMPLE" --out "$OUT/run" ${OPTS[@]+"${OPTS[@]}"}

step "5. evaluate on the sample's held-out test patients (stored in the run folder, so the report shows it)"
pneumo evaluate "$OUT/run/model" "$SAMPLE" --out "$OUT/run/test"

step "6. predict every test film (p_positive is p(PNEUMONIA), compared with the threshold)"
pneumo predict "$OUT/run/model" "$SAMPLE/test" --csv > "$OUT/predictions.csv"
head -n 4 "$OUT/predictions.csv"

step "7. explain a film read right and one read wrong (Grad-CAM)"
mkdir -p "$OUT/run/explain"
python - "$OUT/predictions.csv" "$OUT/run/explain" <<'PY' > "$OUT/examples.txt"
import csv, pathlib, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if not r.get("error")]
for r in rows:
    r["actual"] = pathlib.Path(r["path"]).parent.name
    r["margin"] = abs(float(r["p_positive"]) - float(r["threshold"]))
right = sorted((r for r in rows if r["label"] == r["actual"]), key=lambda r: -r["margin"])
wrong = sorted((r for r in rows if r["label"] != r["actual"]), key=lambda r: -r["margin"])
for verdict, chosen in (("right", right), ("wrong", wrong)):
    if chosen:
        print(verdict, chosen[0]["path"], chosen[0]["actual"], sep="\t")
PY
while IFS=$'\t' read -r verdict image actual; do
    echo "-- read $verdict (the most confident $verdict reading of the test split; actually $actual):"
    pneumo explain "$OUT/run/model" "$image" --out "$OUT/run/explain/$verdict.png" --overwrite
done < "$OUT/examples.txt"
grep -q "^wrong" "$OUT/examples.txt" || echo "-- no test film was read wrong"

step "8. report and top losses"
pneumo interpret "$OUT/run" --out "$OUT/interpret"
pneumo report "$OUT/run" --out "$OUT/report.html"

echo
echo "== outputs =="
cat <<EOT
batch:            $OUT/batch.png
lr finder plot:   $OUT/run/lr_find/lr_find.png
run folder:       $OUT/run (metrics.csv, curves.png, valid_eval.json, checkpoints/last.pt)
model:            $OUT/run/model (model.safetensors + model.json)
evaluation:       $OUT/run/test (evaluation.json, confusion_matrix.png, roc.png, reliability.png)
predictions:      $OUT/predictions.csv
Grad-CAM:         $OUT/run/explain/right.png, $OUT/run/explain/wrong.png
top losses:       $OUT/interpret
report:           $OUT/report.html
serve it:         pneumo serve $OUT/run/model   (then open http://127.0.0.1:8000)
EOT
echo
echo "What the demo model is: $(python -c "import sys; from pneumo.report.about import training_summary; print(training_summary(sys.argv[1])['sentence'])" "$OUT/run/model")"
echo "demo finished in $(( $(date +%s) - start )) s"
