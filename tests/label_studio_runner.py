"""A real Label Studio 1.23.2 on 127.0.0.1 for the end-to-end tests.

Installed once into its own virtualenv (``$IHP_E2E_CACHE``, default ``~/.cache/ihp-e2e``;
about 2 minutes and 1 GB the first time), started with a throwaway data directory and the
settings Label Studio needs to talk to a backend on loopback (see ../shared/label-studio), and
stopped by PID (its whole process group).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import requests

from tests.test_gunicorn import free_port

VERSION = "1.23.2"
# what label-studio 1.23.2 leaves open and a later release broke: sentry-sdk 3.0 rejects the
# option send_default_pii that Label Studio passes at start ("Unknown option"), so it exits
PINS = ("sentry-sdk>=2.16,<3",)
TOKEN = "ihp-e2e-token-0123456789"
USER, PASSWORD = "e2e@example.com", "e2e-password-123"
# variables Label Studio would read as its own settings: never inherited from our environment
_LS_OWN = ("LABEL_STUDIO_HOST", "LABEL_STUDIO_PORT", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
           "USERNAME", "PASSWORD", "HOST", "PORT")


def cache_dir() -> str:
    return os.environ.get("IHP_E2E_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ihp-e2e"))


def ensure_installed(log=print) -> str:
    """Path of the ``label-studio`` executable, installing it on first use."""
    venv = os.path.join(cache_dir(), f"ls-{VERSION}")
    exe = os.path.join(venv, "bin", "label-studio")
    marker = os.path.join(venv, ".installed")
    wanted = " ".join((f"label-studio=={VERSION}",) + PINS)
    if os.path.exists(marker) and os.path.exists(exe) and open(marker).read().strip() == wanted:
        return exe
    log(f"installing {wanted} into {venv} (first run only, about 2 minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "-q", "--disable-pip-version-check", *wanted.split()], check=True)
    with open(marker, "w") as f:
        f.write(wanted)
    return exe


@dataclass
class LabelStudio:
    url: str
    token: str
    proc: subprocess.Popen
    log_path: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return open(self.log_path, errors="replace").read()[-n:]
        except OSError:
            return ""


def start(data_dir: str, files_root: str, timeout: float = 300) -> LabelStudio:
    """Start Label Studio on a free loopback port; returns once ``/health`` answers."""
    exe = ensure_installed()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _LS_OWN}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=data_dir,
        LABEL_STUDIO_USERNAME=USER,
        LABEL_STUDIO_PASSWORD=PASSWORD,
        LABEL_STUDIO_USER_TOKEN=TOKEN,
        LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false",
        LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=files_root,
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="false",
        DJANGO_DB="sqlite",
    )
    log_path = os.path.join(data_dir, "label-studio.log")
    os.makedirs(data_dir, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
                                 "--enable-legacy-api-token"], cwd=data_dir, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    ls = LabelStudio(f"http://127.0.0.1:{port}", TOKEN, proc, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("Label Studio exited:\n" + ls.log_tail())
        try:
            if requests.get(ls.url + "/health", timeout=2).status_code == 200:
                return ls
        except requests.RequestException:
            pass
        time.sleep(1)
    ls.stop()
    raise RuntimeError(f"Label Studio did not answer /health within {timeout:.0f} s:\n" + ls.log_tail())
