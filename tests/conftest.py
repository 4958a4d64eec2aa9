"""Shared fixtures: a small random checkpoint, a local image server, the observed LS payloads."""
from __future__ import annotations

import http.server
import io
import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD
from ihp_backend.core.network import NetConfig, build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
CCP = os.path.join(SHARED, "data", "ccp")
PAYLOADS = os.path.join(SHARED, "label-studio", "observed_payloads.json")

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def payloads() -> dict:
    if not os.path.exists(PAYLOADS):
        pytest.skip(f"observed payloads not found at {PAYLOADS}")
    with open(PAYLOADS) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised (untrained) shuffled-binding model: for protocol tests only."""
    torch.manual_seed(0)
    cfg = NetConfig(num_slots=24, aspp_channels=32, decoder_channels=32, low_level_channels=16)
    net = build_network(cfg)
    ck = make_checkpoint(net, Binding("shuffled", 24, ["background", "part"]), 256,
                         IMAGENET_MEAN, IMAGENET_STD, "tiny-test", {"note": "random weights"})
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pt")
    save_checkpoint(ck, path)
    return path


def person_image(h=240, w=320, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 'person': background, a head (class 1), a torso (2), legs (3)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 40 + 100).astype(np.uint8)
    lab = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    lab[((yy - 50) ** 2 + (xx - 160) ** 2) < 30 ** 2] = 1
    lab[80:160, 120:200] = 2
    lab[160:230, 130:155] = 3
    lab[160:230, 165:190] = 3
    colours = np.array([[110, 120, 130], [230, 190, 160], [200, 30, 30], [30, 30, 160]], np.uint8)
    img = np.where(lab[..., None] > 0, colours[lab], img)
    return img, lab


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    seen_headers: list = []

    def do_GET(self):  # noqa: N802
        type(self).seen_headers.append(dict(self.headers))
        body = self.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="session")
def image_server():
    """A stand-in for Label Studio's /data/upload file serving on 127.0.0.1."""
    img, _ = person_image()
    handler = type("H", (_Handler,), {"files": {"/data/upload/3/c825e704-p.png": png_bytes(img)},
                                      "seen_headers": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield {"url": f"http://127.0.0.1:{srv.server_address[1]}", "handler": handler}
    srv.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (tests.services.Postgres), stopped by PID."""
    from tests.services import PG_BIN, Postgres
    from tests.test_gunicorn import free_port
    if PG_BIN is None:
        pytest.skip("PostgreSQL not installed (.ci/run installs Debian's postgresql)")
    pg = Postgres(free_port()).start()
    yield pg
    pg.stop()


@pytest.fixture()
def database_url(request, postgres_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    import uuid

    import psycopg
    name = "t_" + uuid.uuid4().hex[:12]
    admin = postgres_server.url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request):
    """The annotation store's two implementations: '' (SQLite in MODEL_DIR) or a PostgreSQL URL."""
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("database_url")
