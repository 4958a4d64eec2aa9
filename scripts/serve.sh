#!/usr/bin/env bash
# Set up .venv if needed and start the backend with gunicorn on the embedded default model.
# Settings come from the environment (see README, "Configuration"); gunicorn.conf.py reads
# IHP_BIND / IHP_WORKERS / IHP_THREADS / IHP_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/gunicorn 'ihp_backend._wsgi:app' "$@"
