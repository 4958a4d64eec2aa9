#!/usr/bin/env bash
# Set up .venv if needed and start the backend with gunicorn on the embedded default model.
# Settings come from the environment (see README, "Configuration"); gunicorn.conf.py reads
# IHP_BIND / IHP_WORKERS / IHP_THREADS / IHP_TIMEOUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# jemalloc, the server's allocator where installed (IHP_ALLOCATOR=auto; docs/performance.md):
# installed here when run as root on Debian/Ubuntu, else the server runs on glibc's malloc
if [ "${IHP_ALLOCATOR:-auto}" != glibc ] && ! .venv/bin/python -c \
    'import sys; from ihp_backend.core.allocator import jemalloc_library; sys.exit(jemalloc_library() is None)'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[serve] installing libjemalloc2"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 >/dev/null) \
      || echo "[serve] could not install libjemalloc2: serving on glibc's malloc" >&2
  else
    echo "[serve] libjemalloc2 is not installed: serving on glibc's malloc (a worker grows more over many photo sizes)" >&2
  fi
fi
exec .venv/bin/gunicorn 'ihp_backend._wsgi:app' "$@"
