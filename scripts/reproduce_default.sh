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
#    (resumes runs/ccp_cpu_stage7/last.pt), releases it (ihp-ccp-mnv3-s19500),
# 8. continues from that release with an eighth poly schedule, lr 1e-3 over 2000 steps, seed 6, at
#    higher resolution: crops 448x320 at 0.65 x scale, trained and served at 544 px (resumes
#    runs/ccp_cpu_stage8_hr/last.pt), releases it (ihp-ccp-mnv3-s21500),
# 9. continues from that release with a ninth poly schedule, lr 1e-3 over 1000 steps, seed 7, at
#    576 px: crops 472x336 at 0.69 x scale (resumes runs/ccp_cpu_stage9_576/last.pt), releases it
#    (ihp-ccp-mnv3-s22500),
# 10. continues from that release with a tenth poly schedule, lr 1e-3 over 700 steps, seed 8, at
#    576 px, with the stride-4 decoder widened 96 -> 192 channels and the low-level projection
#    32 -> 48 (new channels start silent; resumes runs/stage10_wide/last.pt), releases it
#    (ihp-ccp-mnv3-s23200),
# 11. continues from that release with an eleventh poly schedule, lr 6e-4 over 650 steps, seed 9,
#    the same network and size (resumes runs/stage11/last.pt), releases it (ihp-ccp-mnv3-s23850),
# 12. continues from that release with a twelfth poly schedule, lr 6e-4 over 650 steps, seed 10,
#    with the Lovász-softmax loss added (weight 1; resumes runs/stage12L/last.pt), releases it
#    (ihp-ccp-mnv3-s24500),
# 13. continues from that release with a thirteenth schedule, the same as the twelfth with seed 11
#    (resumes runs/stage13L/last.pt), releases it (ihp-ccp-mnv3-s25150),
# 14. continues from that release for 850 steps, seed 14, with clicks closer to the evaluation's
#    initialisation (fewer background, extra and correction clicks; runs/stage15k0), releases it
#    (ihp-ccp-mnv3-s26000), averages it with s25150 (runs/soup2.pt, BatchNorm recalibrated),
#    and trains 300 more steps from that average, lr 3e-4, seed 16 (runs/stage16s), releases it
#    (ihp-ccp-mnv3-s25450),
# 15. repeats that stage from s25450: 750 steps, seed 17, the same evaluation-like clicks
#    (runs/stage17k0, released as ihp-ccp-mnv3-s26200), and averages it with s25450 (BatchNorm
#    recalibrated): the default, runs/default.pt,
# 16. derives body-part labels from MediaPipe keypoints (model_training.pose_labels, its own tool
#    venv data/mediapipe-venv), trains the body-part / unclaimed stage from that model
#    (model_training/configs/parts_unclaimed.yaml, a 1000-step schedule stopped at 850) and releases it:
#    ihp-ccp-parts-mnv3-s27050 (runs/parts_unclaimed/release.pt), then the crowd stage
#    (model_training/configs/parts_crowds.yaml, 400 steps): the default ihp-ccp-crowds-mnv3-s27450,
# 17. evaluates it on val.txt (201 images, ccp12 merge, 85% standard, 20 corrections) next to
#    the random-walker floor. About twenty-five hours on a 2-core CPU: run it in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VERSION=${VERSION:-ihp-ccp-mnv3-s26200-avg}  # the CCP-only model the parts stage starts from
THREADS=${THREADS:-2}  # torch CPU threads of every training run
CONFIG=model_training/configs/ccp_cpu.yaml

# stage OUT VERSION INIT STEPS [--set ...]: a fresh poly schedule (lr 1e-3) from INIT's weights,
# trained into runs/OUT (resumes its last.pt), then released as runs/OUT/release.pt
stage() {
    local out=$1 version=$2 init=$3 steps=$4
    shift 4
    .venv/bin/python -m model_training.train --threads "$THREADS" --config "$CONFIG" --set init_from="$init" \
        --set steps="$steps" --set lr=0.001 "$@" --out "runs/$out"
    .venv/bin/python -m model_training.release --checkpoint "runs/$out/last.pt" --version "$version" \
        --recalibrate-bn 16 --out "runs/$out/release.pt"
}

.venv/bin/python -m model_training.train --threads "$THREADS" --config "$CONFIG"
stage ccp_cpu_cont ihp-ccp-mnv3-s5700 runs/ccp_cpu/last.pt 2400
stage ccp_cpu_stage3 ihp-ccp-mnv3-s8100 runs/ccp_cpu_cont/release.pt 2400 --set seed=1
stage ccp_cpu_stage4 ihp-ccp-mnv3-s11100 runs/ccp_cpu_stage3/release.pt 3000 --set seed=2 \
    --set iterative.enabled=false
stage ccp_cpu_stage5 ihp-ccp-mnv3-s14100 runs/ccp_cpu_stage4/release.pt 3000 --set seed=3 --set net.prev_mask=true
stage ccp_cpu_stage6 ihp-ccp-mnv3-s17100 runs/ccp_cpu_stage5/release.pt 3000 --set seed=4 --set net.prev_mask=true
stage ccp_cpu_stage7 ihp-ccp-mnv3-s19500 runs/ccp_cpu_stage6/release.pt 2400 --set seed=5 --set net.prev_mask=true
stage ccp_cpu_stage8_hr ihp-ccp-mnv3-s21500 runs/ccp_cpu_stage7/release.pt 2000 --set seed=6 --set net.prev_mask=true \
    --set sample.base_scale=0.65 --set "sample.crop=[448,320]" --set input_size=544
stage ccp_cpu_stage9_576 ihp-ccp-mnv3-s22500 runs/ccp_cpu_stage8_hr/release.pt 1000 --set seed=7 --set net.prev_mask=true \
    --set sample.base_scale=0.69 --set "sample.crop=[472,336]" --set input_size=576
# stages 10-17: 576 px, the widened decoder, the previous-prediction input; from stage 12 on, Lovász;
# stages 15 and 17: clicks closer to the evaluation's initialisation
AT576=(--set net.prev_mask=true --set sample.base_scale=0.69 --set "sample.crop=[472,336]" --set input_size=576
       --set net.decoder_channels=192 --set net.low_level_channels=48)
LOVASZ=(--set lovasz_weight=1.0)
K0CLICKS=(--set sample.p_background_click=0.25 --set sample.p_extra=0.4 --set iterative.p=0.3)
stage stage10_wide ihp-ccp-mnv3-s23200 runs/ccp_cpu_stage9_576/release.pt 700 --set seed=8 "${AT576[@]}"
stage stage11 ihp-ccp-mnv3-s23850 runs/stage10_wide/release.pt 650 --set seed=9 --set lr=0.0006 "${AT576[@]}"
stage stage12L ihp-ccp-mnv3-s24500 runs/stage11/release.pt 650 --set seed=10 --set lr=0.0006 "${AT576[@]}" "${LOVASZ[@]}"
stage stage13L ihp-ccp-mnv3-s25150 runs/stage12L/release.pt 650 --set seed=11 --set lr=0.0006 "${AT576[@]}" "${LOVASZ[@]}"
stage stage15k0 ihp-ccp-mnv3-s26000 runs/stage13L/release.pt 850 --set seed=14 --set lr=0.0006 "${AT576[@]}" "${LOVASZ[@]}" "${K0CLICKS[@]}"
.venv/bin/python -m model_training.release --checkpoint runs/stage13L/release.pt runs/stage15k0/release.pt \
    --version soup-s25150-s26000 --recalibrate-bn 16 --out runs/soup2.pt
stage stage16s ihp-ccp-mnv3-s25450 runs/soup2.pt 300 --set seed=16 --set lr=0.0003 "${AT576[@]}" "${LOVASZ[@]}"
stage stage17k0 ihp-ccp-mnv3-s26200 runs/stage16s/release.pt 750 --set seed=17 --set lr=0.0006 "${AT576[@]}" "${LOVASZ[@]}" "${K0CLICKS[@]}"
.venv/bin/python -m model_training.release --checkpoint runs/stage16s/release.pt runs/stage17k0/release.pt \
    --version "$VERSION" --recalibrate-bn 16 --out runs/default.pt
# the body-part / unclaimed stage (its config's init_from names the embedded CCP-only default;
# point it at runs/default.pt)
.venv/bin/python -m model_training.pose_labels --data ../shared/data/ccp --out data/ccp_parts --setup-tool-venv
.venv/bin/python -m model_training.train --threads "$THREADS" --config model_training/configs/parts_unclaimed.yaml \
    --set init_from=runs/default.pt
.venv/bin/python -m model_training.release --checkpoint runs/parts_unclaimed/last.pt \
    --version ihp-ccp-parts-mnv3-s27050 --recalibrate-bn 16 --out runs/parts_unclaimed/release.pt
# the crowd stage from the body-part stage's end point (runs/parts_unclaimed/last.pt): the
# default, ihp-ccp-crowds-mnv3-s27450 = the average of its step-300 and step-400 snapshots
.venv/bin/python -m model_training.train --threads "$THREADS" --config model_training/configs/parts_crowds.yaml
.venv/bin/python -m model_training.release --checkpoint runs/parts_crowds/step_000300.pt runs/parts_crowds/step_000400.pt \
    --version ihp-ccp-crowds-mnv3-s27450 --recalibrate-bn 16 --out runs/parts_crowds/release.pt
bash scripts/evaluate_default.sh runs/parts_crowds/release.pt
.venv/bin/python -m model_training.evaluate --data ../shared/data/ccp --kind ccp --split val --merge ccp12 \
    --checkpoint runs/default.pt --baseline random-walker --max-corrections 20 --standard 0.85 --precision float32 \
    --out runs/eval_default
