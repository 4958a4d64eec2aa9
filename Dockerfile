# CPU image by default; for CUDA pass a CUDA runtime base with Python 3.11, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
# (the base must provide python3.11 and python3.11-venv; on Ubuntu 22.04 also pass
#   --build-arg JEMALLOC_VERSION=<its libjemalloc2 version: apt-cache policy libjemalloc2>).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_DIR=/data/model_dir \
    IHP_BIND=0.0.0.0:9090 \
    IHP_THREADS=4

# jemalloc: the server's allocator (IHP_ALLOCATOR=auto; a worker that parses many photo sizes grows
# several times less than under glibc: docs/performance.md)
ARG JEMALLOC_VERSION=5.3.0-1
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "libjemalloc2=${JEMALLOC_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 ihp
WORKDIR /app

# the install of scripts/setup_env.sh (pinned set, no pip cache, no triton), runtime files only
COPY requirements.txt requirements-test.txt ./
COPY scripts/setup_env.sh ./scripts/
RUN IHP_REQUIREMENTS=requirements.txt bash scripts/setup_env.sh

COPY --chown=ihp:ihp ihp_backend ./ihp_backend
COPY --chown=ihp:ihp model_training ./model_training
COPY --chown=ihp:ihp gunicorn.conf.py label_config.xml ./

RUN mkdir -p /data/model_dir && chown -R ihp:ihp /data
USER 1000:1000
VOLUME ["/data/model_dir"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2).status == 200 else 1)"]

CMD ["/app/.venv/bin/gunicorn", "ihp_backend._wsgi:app"]
