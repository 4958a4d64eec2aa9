#!/usr/bin/env bash
# Paired recipe ablations for the default model, sized for a 2-core CPU (resumable):
#   INIT=ihp_backend/models/default.pt STEPS=200 bash experiments/ablate_default.sh [variant ...]
# Every variant continues training from the same weights (INIT) for STEPS steps with the same
# seed, lr (LR, poly decay) and data order; only its --set overrides differ from `base` (the
# recipe as it is, model_training/configs/ccp_cpu.yaml; base-seed2 repeats it with another seed
# to show the run-to-run noise). Each is released and evaluated on
# all 201 CCP val photos (ccp12, central clicks then 5 corrections), and the table of mIoU@k
# is printed and written to runs/ablate/table.md. Training from scratch per variant would be
# the cleaner test but takes hours per run here; this measures which change helps the model
# we ship when training goes on. `prev-mask` adds the previous-prediction input: INIT's first
# conv is widened with zero weights for it (model_training.train's init_from), so it starts
# out computing exactly what INIT does; it is fed during iterative training and evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
INIT=${INIT:-ihp_backend/models/default.pt}
STEPS=${STEPS:-200}
LR=${LR:-0.0003}
OUT=${OUT:-runs/ablate}
export IHP_TORCH_THREADS=${IHP_TORCH_THREADS:-2}
PY=.venv/bin/python

declare -A SETS=(
  [base]=""
  [base-seed2]="--set seed=2"
  [near-edge]="--set sample.strategy=near-edge"
  [no-sp]="--set sp_weight=0"
  [no-iterative]="--set iterative.enabled=false"
  [ec5]="--set sample.max_extra=5"
  [crop320]="--set sample.crop=[320,224]"
  [crop448]="--set sample.crop=[448,320]"
  [prev-mask]="--set net.prev_mask=true"
)
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(base base-seed2 no-iterative near-edge no-sp ec5)

mkdir -p "$OUT"
for v in "${VARIANTS[@]}"; do
  [ -n "${SETS[$v]+x}" ] || { echo "unknown variant $v (known: ${!SETS[*]})" >&2; exit 2; }
  # shellcheck disable=SC2086
  $PY -m model_training.train --threads "$IHP_TORCH_THREADS" --config model_training/configs/ccp_cpu.yaml --set init_from="$INIT" \
      --set steps="$STEPS" --set lr="$LR" --set save_every=50 ${SETS[$v]} --out "$OUT/$v"
  [ -f "$OUT/$v/release.pt" ] || $PY -m model_training.release --checkpoint "$OUT/$v/last.pt" \
      --version "abl-$v" --recalibrate-bn 16 --out "$OUT/$v/release.pt"
  [ -f "$OUT/eval_$v/summary.json" ] || $PY -m model_training.evaluate --data ../shared/data/ccp --kind ccp \
      --split val --merge ccp12 --checkpoint "$OUT/$v/release.pt" --max-corrections 5 --standard 0.85 \
      --threads "$IHP_TORCH_THREADS" --out "$OUT/eval_$v"
done

$PY - "$OUT" "${VARIANTS[@]}" <<'EOF'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
rows = ["| variant | mIoU@0 | @1 | @3 | @5 | edge mIoU@0 | boundary F1@0 |", "|---|---|---|---|---|---|---|"]
for n in names:
    p = os.path.join(out, f"eval_{n}", "summary.json")
    if not os.path.exists(p):
        continue
    r = json.load(open(p))["results"][0]
    c = r["miou_curve"]
    rows.append(f"| {n} | " + " | ".join(f"{100 * c[k]:.1f}%" for k in (0, 1, 3, 5))
                + f" | {100 * r['edge_miou_k0']:.1f}% | {100 * r['edge_f1_k0']:.1f}% |")
open(os.path.join(out, "table.md"), "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
