#!/usr/bin/env bash
# Reproduce the embedded default model and its model-card numbers (CPU, resumable):
#   bash scripts/reproduce_default.sh
# Runs the staged recipe model_training/configs/default.yaml (every stage into runs/<stage>/,
# finished stages skipped; about twenty-five hours on a 2-core CPU: run it in the background),
# then evaluates the product (scripts/evaluate_default.sh) and the CCP-only model it starts from
# next to the random-walker floor. INSTALL=1 also copies the product to ihp_backend/models/default.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
THREADS=${THREADS:-2}  # torch CPU threads of every training run
RECIPE=model_training/configs/default.yaml
.venv/bin/python -m model_training.recipe "$RECIPE" --threads "$THREADS" \
    ${INSTALL:+--install ihp_backend/models/default.pt}
PRODUCT=$(.venv/bin/python -c "from model_training.recipe import load_recipe, product_path
r = load_recipe('$RECIPE'); print(product_path(r, 'runs', r.product))")
bash scripts/evaluate_default.sh "$PRODUCT"
.venv/bin/python -m model_training.evaluate --data ../shared/data/ccp --kind ccp --split val --merge ccp12 \
    --checkpoint runs/ccp_only/release.pt --baseline random-walker --max-corrections 20 --standard 0.85 \
    --precision float32 --out runs/eval_ccp_only
