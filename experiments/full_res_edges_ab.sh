#!/usr/bin/env bash
# Issue 29's edge measurement: the embedded default on CCP val with labels enlarged to the photo's
# size with boundaries placed between network pixels (IHP_FULL_RES_EDGES=1, refine.smooth_resize)
# and by nearest network pixel (=0, the default), on the photos
# enlarged 4x (bicubic; labels nearest; the same central clicks) and at native size, at k = 0. Boundary F1 within 5 px of the labels' edges (at the evaluated size).
#   bash experiments/full_res_edges_ab.sh [checkpoint]   # about 15 min on 2 cores; -> runs/edges_ab/
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/edges_ab}
EV=(.venv/bin/python -m model_training.evaluate --checkpoint "${1:-ihp_backend/models/default.pt}" --precision float32
    --data ../shared/data/ccp --split val --kind ccp --merge ccp12 ${THREADS:+--threads "$THREADS"})
"${EV[@]}" --upscale 4 --max-corrections 0 --full-res-edges --out "$OUT/x4_full_res"
"${EV[@]}" --upscale 4 --max-corrections 0 --out "$OUT/x4_network_res"
"${EV[@]}" --max-corrections 0 --full-res-edges --out "$OUT/native_full_res"
"${EV[@]}" --max-corrections 0 --out "$OUT/native_network_res"
for d in x4_full_res x4_network_res native_full_res native_network_res; do
    .venv/bin/python -c "import json,sys; r=json.load(open('$OUT/$d/summary.json'))['results'][0]; print('$d', 'mIoU@0 %.2f' % (100*r['miou_k0']), 'boundary F1@0 %.2f' % (100*r['edge_f1_k0']), 'curve', [round(100*x,1) for x in r['miou_curve']])"
done
