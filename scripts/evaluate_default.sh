#!/usr/bin/env bash
# Every number of the README's results table and the model card, for one checkpoint (default: the
# embedded one), into runs/eval_default/: CCP val in its 12 classes (the paper's protocol, the
# progressive one, and three people side by side in one photo), CCP val in the pose-derived LIP-20 labels (clicks; and with no click), and the
# few real LIP / CIHP / PASCAL-Person-Part samples. Then prints the table:
#   bash scripts/evaluate_default.sh [checkpoint]
# About 35-45 minutes on a 2-core CPU. Needs data/ccp_parts (python -m model_training.pose_labels).
set -euo pipefail
cd "$(dirname "$0")/.."
CK=${1:-ihp_backend/models/default.pt}
OUT=${OUT:-runs/eval_default}
# EVAL_ARGS: more evaluate flags for every run (a serving option under test, e.g. "--vocab-share 0")
EV=(.venv/bin/python -m model_training.evaluate --checkpoint "$CK" --precision float32 ${THREADS:+--threads "$THREADS"} ${EVAL_ARGS:-})
CCP=(--data ../shared/data/ccp --split val)
"${EV[@]}" "${CCP[@]}" --kind ccp --merge ccp12 --max-corrections 10 --standard 0.85 --out "$OUT/ccp12"
"${EV[@]}" "${CCP[@]}" --kind ccp --merge ccp12 --protocol progressive --out "$OUT/ccp12_progressive"
"${EV[@]}" "${CCP[@]}" --kind ccp --merge ccp12 --side-by-side 3 --max-corrections 5 --standard 0.85 \
    --out "$OUT/ccp12_three_people"
"${EV[@]}" "${CCP[@]}" --kind ccp-parts:lip20 --max-corrections 20 --standard 0.85 --out "$OUT/lip20"
"${EV[@]}" "${CCP[@]}" --kind ccp-parts:lip20 --rgb-only --zero-click --fill-known --max-corrections 5 \
    --standard 0.85 --out "$OUT/lip20_zero_click"
for s in lip cihp pascal_person_part; do
    "${EV[@]}" --data "../shared/data/crossdomain/$s" --kind folder --split none --max-corrections 20 \
        --standard 0.80 --out "$OUT/crossdomain_$s"
done
.venv/bin/python bench/results_table.py "$OUT"
