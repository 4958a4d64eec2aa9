#!/usr/bin/env bash
# Create .venv in the repo root and install the pinned requirements (idempotent: skipped when
# the requirement files have not changed since the last successful install).
#
# Disk: torch 2.14.1 for x86_64 is a CUDA build; with its NVIDIA libraries the venv is about
# 5.4 GB. To keep that down (a CI machine once ran out of disk here) pip keeps no download
# cache, and the packages in IHP_SKIP_PACKAGES (default: triton, the 0.9 GB GPU compiler that
# only torch.compile uses; nothing here calls it) are left out: pip resolves the full pinned
# set first, then installs exactly that set minus those packages with --no-deps.
# IHP_SKIP_PACKAGES="" installs everything. IHP_REQUIREMENTS names the requirement files
# (default: runtime and test; the Dockerfile installs the runtime ones only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SKIP=${IHP_SKIP_PACKAGES-triton}
read -r -a REQS <<< "${IHP_REQUIREMENTS:-requirements.txt requirements-test.txt}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.ihp-requirements.sha
want=$( (cat "${REQS[@]}"; echo "skip=$SKIP") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (torch takes a minute or two; free disk: $(df -h . | awk 'NR==2 {print $4}'))"
  pip=(.venv/bin/python -m pip --no-cache-dir)
  "${pip[@]}" install -q --upgrade pip
  report=$(mktemp) && lock=$(mktemp)
  trap 'rm -f "$report" "$lock"' EXIT
  req_args=() && for r in "${REQS[@]}"; do req_args+=(-r "$r"); done
  "${pip[@]}" install -q --dry-run --ignore-installed --report "$report" "${req_args[@]}"
  .venv/bin/python - "$report" "$SKIP" > "$lock" <<'EOF'
import json, re, sys
skip = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[2].split()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if re.sub(r"[-_.]+", "-", meta["name"]).lower() not in skip:
        print(f"{meta['name']}=={meta['version']}")
EOF
  "${pip[@]}" install -q --no-deps -r "$lock"
  echo "$want" > "$stamp"
  echo "[setup] done: .venv is $(du -sh .venv | cut -f1)"
fi
