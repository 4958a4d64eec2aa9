#!/usr/bin/env bash
# Reproduce the embedded default model and its model-card numbers (CPU, resumable):
#   STOP_AT=<step> bash scripts/reproduce_default.sh
# 1. trains the CPU recipe on ../shared/data/ccp train.txt (resumes runs/ccp_cpu/last.pt),
# 2. releases it (no optimizer state, BatchNorm statistics re-estimated on 16 batches),
# 3. evaluates it on val.txt (201 images, ccp12 merge, 85% standard, 20 corrections) next to
#    the random-walker floor. Hours on a 2-core CPU: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
STOP_AT=${STOP_AT:-}  # empty: train to the scheduled end (3300 steps)
VERSION=${VERSION:-ihp-ccp-mnv3-s${STOP_AT:-3300}}
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    ${STOP_AT:+--set stop_at=$STOP_AT}
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu/last.pt --version "$VERSION" \
    --recalibrate-bn 16 --out runs/ccp_cpu/release.pt
.venv/bin/python -m model_training.evaluate --data ../shared/data/ccp --kind ccp --split val --merge ccp12 \
    --checkpoint runs/ccp_cpu/release.pt --baseline random-walker --max-corrections 20 --standard 0.85 \
    --out runs/eval_default
