"""A live gunicorn on a free 127.0.0.1 port, and a redis-server beside it, for the tests and the
benchmarks (one launcher each)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS = shutil.which("redis-server")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_gunicorn(env_extra: dict, workers: int, cwd: str = ROOT, timeout: float = 180.0):
    """gunicorn with ``env_extra`` on top of this environment; returns (process, url) once every
    worker has its model loaded (or at least one by ``timeout``). Raises with the log's tail if
    none comes up. The log goes to a temporary file (``proc.log_path``), never to a pipe that
    could fill up."""
    port = free_port()
    env = dict(os.environ)
    env.update({"IHP_BIND": f"127.0.0.1:{port}", "IHP_WORKERS": str(workers), "IHP_ACCESS_LOG": ""})
    env.update(env_extra)
    log = tempfile.NamedTemporaryFile("w+", prefix="gunicorn-", suffix=".log", delete=False)
    gun = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    proc = subprocess.Popen([gun, "ihp_backend._wsgi:app"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    loaded: set = set()
    while time.time() < deadline and len(loaded) < workers and proc.poll() is None:
        try:
            r = requests.get(url + "/health", timeout=1)
            if r.json().get("model_loaded"):
                loaded.add(r.headers.get("X-IHP-Worker"))
        except requests.RequestException:
            pass
        time.sleep(0.1)
    if not loaded:
        proc.kill()
        proc.wait(10)
        raise AssertionError("gunicorn did not come up:\n" + open(log.name).read()[-3000:])
    return proc, url


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start_redis(tmp_path, port: int) -> subprocess.Popen:
    """redis-server on 127.0.0.1:``port``, no persistence, its directory under ``tmp_path``."""
    d = os.path.join(str(tmp_path), f"redis_{port}")
    os.makedirs(d, exist_ok=True)
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    r = redis.Redis(port=port, socket_connect_timeout=0.5)
    for _ in range(100):
        try:
            if r.ping():
                return proc
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("redis-server did not start")


def stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)
