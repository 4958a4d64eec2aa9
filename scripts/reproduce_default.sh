#!/usr/bin/env bash
# Reproduce the embedded default model and its model-card numbers (CPU, resumable):
#   bash scripts/reproduce_default.sh
# 1. trains the CPU recipe on ../shared/data/ccp train.txt for 3300 steps (resumes
#    runs/ccp_cpu/last.pt),
# 2. continues from those weights with a second poly schedule, lr 1e-3 over 2400 steps (fresh
#    optimizer; resumes runs/ccp_cpu_cont/last.pt) and releases it (no optimizer state,
#    BatchNorm statistics re-estimated on 16 batches, float16 weights: ihp-ccp-mnv3-s5700),
# 3. continues from that release with a third poly schedule, lr 1e-3 over 2400 steps and a new
#    sampling seed (fresh crops and clicks; resumes runs/ccp_cpu_stage3/last.pt), releases it
#    (ihp-ccp-mnv3-s8100),
# 4. continues from that release with a fourth poly schedule, lr 1e-3 over 3000 steps, seed 2
#    and the iterative correction rounds off (resumes runs/ccp_cpu_stage4/last.pt), releases it
#    (ihp-ccp-mnv3-s11100),
# 5. continues from that release with a fifth poly schedule, lr 1e-3 over 3000 steps, seed 3,
#    the previous-prediction input added (first conv widened by zero-initialised channels) and the
#    iterative rounds back on, which feed it (resumes runs/ccp_cpu_stage5/last.pt), releases it
#    (ihp-ccp-mnv3-s14100),
# 6. continues from that release with a sixth poly schedule, lr 1e-3 over 3000 steps, seed 4
#    (resumes runs/ccp_cpu_stage6/last.pt), releases it (ihp-ccp-mnv3-s17100),
# 7. continues from that release with a seventh poly schedule, lr 1e-3 over 2400 steps, seed 5
#    (resumes runs/ccp_cpu_stage7/last.pt), releases it,
# 8. evaluates it on val.txt (201 images, ccp12 merge, 85% standard, 20 corrections) next to
#    the random-walker floor. About fourteen hours on a 2-core CPU: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VERSION=${VERSION:-ihp-ccp-mnv3-s19500}
export IHP_TORCH_THREADS=${IHP_TORCH_THREADS:-2}
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu/last.pt --set steps=2400 --set lr=0.001 --out runs/ccp_cpu_cont
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_cont/last.pt --version ihp-ccp-mnv3-s5700 \
    --recalibrate-bn 16 --out runs/ccp_cpu_cont/release.pt
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu_cont/release.pt --set steps=2400 --set lr=0.001 --set seed=1 \
    --out runs/ccp_cpu_stage3
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_stage3/last.pt --version ihp-ccp-mnv3-s8100 \
    --recalibrate-bn 16 --out runs/ccp_cpu_stage3/release.pt
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu_stage3/release.pt --set steps=3000 --set lr=0.001 --set seed=2 \
    --set iterative.enabled=false --out runs/ccp_cpu_stage4
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_stage4/last.pt --version ihp-ccp-mnv3-s11100 \
    --recalibrate-bn 16 --out runs/ccp_cpu_stage4/release.pt
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu_stage4/release.pt --set steps=3000 --set lr=0.001 --set seed=3 \
    --set net.prev_mask=true --out runs/ccp_cpu_stage5
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_stage5/last.pt --version ihp-ccp-mnv3-s14100 \
    --recalibrate-bn 16 --out runs/ccp_cpu_stage5/release.pt
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu_stage5/release.pt --set steps=3000 --set lr=0.001 --set seed=4 \
    --set net.prev_mask=true --out runs/ccp_cpu_stage6
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_stage6/last.pt --version ihp-ccp-mnv3-s17100 \
    --recalibrate-bn 16 --out runs/ccp_cpu_stage6/release.pt
.venv/bin/python -m model_training.train --config model_training/configs/ccp_cpu.yaml \
    --set init_from=runs/ccp_cpu_stage6/release.pt --set steps=2400 --set lr=0.001 --set seed=5 \
    --set net.prev_mask=true --out runs/ccp_cpu_stage7
.venv/bin/python -m model_training.release --checkpoint runs/ccp_cpu_stage7/last.pt --version "$VERSION" \
    --recalibrate-bn 16 --out runs/ccp_cpu_stage7/release.pt
.venv/bin/python -m model_training.evaluate --data ../shared/data/ccp --kind ccp --split val --merge ccp12 \
    --checkpoint runs/ccp_cpu_stage7/release.pt --baseline random-walker --max-corrections 20 --standard 0.85 \
    --out runs/eval_default
