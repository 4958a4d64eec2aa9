"""Bad input -> a clear 4xx JSON error, never a 5xx; images only from where they may come."""
import base64
import copy
import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ihp_backend._wsgi import create_app
from ihp_backend.images import FetchSettings, ImageFetcher, ImageFetchError, decode_image
from ihp_backend.model import IHPModel
from ihp_backend.settings import Settings
from tests.conftest import person_image, png_bytes
from tests.test_http import click_body


class Hostile(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        p = self.path
        if p == "/slow.png":
            time.sleep(3)
        if p == "/redirect-out":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        if p == "/notimage.png":
            body = b"<html>hello</html>"
        elif p == "/truncated.png":
            body = png_bytes(person_image()[0])[:400]
        elif p == "/huge.bin":
            body = b"\0" * (3 * 1024 * 1024)
        elif p in ("/ok.png", "/slow.png"):
            body = png_bytes(person_image()[0])
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:
            pass

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def hostile_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.handle_error = lambda request, address: None  # clients hanging up on purpose
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def fetcher(ls_url="", **kw):
    s = FetchSettings(ls_url=ls_url, read_timeout=1.0, connect_timeout=1.0, max_bytes=2 * 1024 * 1024, **kw)
    return ImageFetcher(s)


@pytest.mark.parametrize("path,needle", [
    ("/notimage.png", "not an image"), ("/truncated.png", "truncated"), ("/missing.png", "HTTP 404"),
    ("/slow.png", "timed out"), ("/huge.bin", "bytes"), ("/redirect-out", "forbidden address"),
])
def test_bad_image_urls(hostile_server, path, needle):
    f = fetcher(ls_url=hostile_server)
    f.s.allowed_hosts = ("169.254.169.254",)
    with pytest.raises(ImageFetchError, match=needle):
        f.get(path)


def test_good_image_and_cache(hostile_server):
    f = fetcher(ls_url=hostile_server)
    a = f.get("/ok.png")
    assert a.shape == (240, 320, 3) and f.get("/ok.png") is a


@pytest.mark.parametrize("url,needle", [
    ("file:///etc/passwd", "scheme 'file'"), ("ftp://example.com/a.png", "scheme 'ftp'"),
    ("http://example.com/a.png", "neither the Label Studio host"),
    ("/data/local-files/?d=../../etc/passwd", "escapes IHP_LOCAL_ROOT"),
    ("/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", "escapes IHP_LOCAL_ROOT"),
])
def test_refused_sources(tmp_path, url, needle):
    f = fetcher(ls_url="http://127.0.0.1:1", local_root=str(tmp_path))
    with pytest.raises(ImageFetchError, match=needle):
        f.fetch_bytes(url)


def test_metadata_address_refused_even_when_allowed():
    f = fetcher(allowed_hosts=("169.254.169.254",))
    with pytest.raises(ImageFetchError, match="forbidden address"):
        f.fetch_bytes("http://169.254.169.254/latest/meta-data/")


def test_private_host_needs_allowlist():
    f = fetcher(ls_url="http://ls.example:8080")
    with pytest.raises(ImageFetchError, match="neither"):
        f.fetch_bytes("http://10.0.0.5/x.png")


def test_decompression_bomb_refused_before_decoding():
    im = Image.new("1", (10000, 8000))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    with pytest.raises(ImageFetchError, match="80000000 pixels"):
        decode_image(buf.getvalue(), max_pixels=40_000_000)


def test_local_files_inside_root(tmp_path):
    img, _ = person_image()
    (tmp_path / "sub").mkdir()
    Image.fromarray(img).save(tmp_path / "sub" / "p.png")
    f = fetcher(local_root=str(tmp_path))
    assert f.get("/data/local-files/?d=sub/p.png").shape == (240, 320, 3)


def test_data_uri():
    img, _ = person_image()
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    assert fetcher().get(uri).shape == (240, 320, 3)


@pytest.fixture()
def client(tmp_path, tiny_checkpoint, image_server):
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, ls_url=image_server["url"],
                          max_clicks=500))
    m.load()
    return create_app(m, load=False).test_client()


def test_request_matrix(client, payloads):
    ok = click_body(payloads, 50, 50, "Hair")
    cases = []
    b = copy.deepcopy(ok); b["tasks"] = "nope"; cases.append((b, 400))
    b = copy.deepcopy(ok); b["tasks"] = [7]; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"] = []; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"]["context"] = "x"; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"]["context"] = {"result": "x"}; cases.append((b, 400))
    b = copy.deepcopy(ok); b["label_config"] = "<View><Image name='i' value='$i'/></View>"; cases.append((b, 400))
    b = copy.deepcopy(ok); del b["params"]["context"]["result"][0]["original_width"]; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"]["context"]["result"][0]["value"]["x"] = 150; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"]["context"]["result"][0]["value"]["y"] = -3; cases.append((b, 400))
    b = copy.deepcopy(ok); b["params"]["context"]["result"] *= 1000; cases.append((b, 400))
    b = copy.deepcopy(ok); b["tasks"][0]["data"]["image"] = "file:///etc/passwd"; cases.append((b, 422))
    for body, status in cases:
        r = client.post("/predict", json=body)
        assert r.status_code == status, (body, r.get_json())
        assert isinstance(r.get_json()["error"], str) and r.get_json()["error"]
    r = client.post("/predict", data=b"\xff\xfe", content_type="application/json")
    assert r.status_code == 400
    r = client.post("/webhook", json={"no": "action"})
    assert r.status_code == 400
    r = client.post("/predict", data=b"x" * (21 * 1024 * 1024), content_type="application/json")
    assert r.status_code == 413 and "error" in r.get_json()
    assert client.get("/nope").status_code == 404
    assert client.post("/predict", json=ok).status_code == 200  # still serving


def test_optional_auth_protects_everything_but_health(tmp_path, tiny_checkpoint, monkeypatch, payloads):
    monkeypatch.setenv("IHP_BASIC_AUTH_USER", "ls")
    monkeypatch.setenv("IHP_BASIC_AUTH_PASS", "s3cret-pass")
    monkeypatch.setenv("IHP_AUTH_TOKEN", "tok-123456")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md"))
    monkeypatch.setenv("IHP_CHECKPOINT", tiny_checkpoint)
    m = IHPModel(Settings.from_env())  # the auth settings come from the environment, as served
    m.load()
    c = create_app(m, load=False).test_client()
    assert c.get("/health").status_code == 200
    body = payloads["/setup"]["body"]
    r = c.post("/setup", json=body)
    assert r.status_code == 401 and "s3cret" not in r.get_data(as_text=True)
    assert c.post("/setup", json=body, headers={"Authorization": "Basic " + base64.b64encode(
        b"ls:wrong").decode()}).status_code == 401
    assert c.post("/setup", json=body, headers={"Authorization": "Basic " + base64.b64encode(
        b"ls:s3cret-pass").decode()}).status_code == 200
    assert c.post("/setup", json=body, headers={"Authorization": "Bearer tok-123456"}).status_code == 200
    assert c.get("/metrics").status_code == 401
    health = c.get("/health").get_data(as_text=True)
    assert "s3cret" not in health and "tok-123456" not in health and "EXAMPLE_TOKEN" not in health


def test_unwritable_model_dir_serves_read_only(tmp_path, tiny_checkpoint, image_server, payloads):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    m = IHPModel(Settings(model_dir=str(blocker / "md"), checkpoint=tiny_checkpoint, ls_url=image_server["url"]))
    m.load()
    c = create_app(m, load=False).test_client()
    h = c.get("/health").get_json()
    assert h["model_loaded"] and "cannot be written" in h["state_error"]
    for x, y, lab in [(50, 21, "Hair"), (50, 50, "Face")]:
        r = c.post("/predict", json=click_body(payloads, x, y, lab))
        assert r.status_code == 200
    assert len(m.history.get("3", 3)) == 2  # history kept in memory
    r = c.post("/webhook", json=payloads["/webhook_ANNOTATION_CREATED"]["body"])
    assert r.status_code == 507 and "cannot be written" in r.get_json()["error"]


def test_disk_full_mid_run_keeps_serving(tmp_path, tiny_checkpoint, image_server, payloads):
    import sqlite3
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, ls_url=image_server["url"]))
    m.load()
    c = create_app(m, load=False).test_client()

    def full(*a, **k):
        raise sqlite3.OperationalError("database or disk is full")

    m.history.apply = full
    m.store.put = full
    assert c.post("/predict", json=click_body(payloads, 50, 21, "Hair")).status_code == 200
    r = c.post("/webhook", json=payloads["/webhook_ANNOTATION_CREATED"]["body"])
    assert r.status_code == 507 and "disk is full" in r.get_json()["error"]
    assert "disk is full" in c.get("/health").get_json()["state_error"]


def test_secrets_never_in_logs_or_responses(tmp_path, tiny_checkpoint, image_server, payloads, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, ls_url=image_server["url"],
                          api_key="SECRET-KEY-4242"))
    m.load()
    c = create_app(m, load=False).test_client()
    texts = [c.post("/setup", json=payloads["/setup"]["body"]).get_data(as_text=True),
             c.post("/predict", json=click_body(payloads, 50, 21, "Hair")).get_data(as_text=True),
             c.get("/health").get_data(as_text=True), c.get("/metrics").get_data(as_text=True),
             c.get("/versions").get_data(as_text=True), repr(m.settings)]
    b = click_body(payloads, 50, 21, "Hair")
    b["tasks"][0]["data"]["image"] = "/data/upload/none.png"
    b["tasks"][0]["id"] = 4242
    texts.append(c.post("/predict", json=b).get_data(as_text=True))
    assert image_server["handler"].seen_headers[-1]["Authorization"] == "Token SECRET-KEY-4242"
    for t in texts + [caplog.text]:
        assert "SECRET-KEY-4242" not in t


def test_decoded_photo_cache_is_bounded_in_bytes(tmp_path):
    """Phone photos are 34 MB each decoded: the cache keeps what fits in its bytes (the newest
    always), not 16 of them; a photo evicted is fetched and decoded again when asked."""
    for i in range(4):
        Image.fromarray(np.full((400, 500, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    one = 400 * 500 * 3
    f = ImageFetcher(FetchSettings(local_root=str(tmp_path)), cache_bytes=2 * one)
    urls = [f"/data/local-files/?d=p{i}.png" for i in range(4)]
    got = [f.get(u) for u in urls]
    assert list(f._cache) == urls[2:] and sum(a.nbytes for a in f._cache.values()) <= 2 * one
    assert f.get(urls[3]) is got[3]  # cached: the same array
    again = f.get(urls[0])
    assert again is not got[0] and np.array_equal(again, got[0]) and list(f._cache) == [urls[3], urls[0]]
    tiny = ImageFetcher(FetchSettings(local_root=str(tmp_path)), cache_bytes=1)
    assert tiny.get(urls[1]) is tiny.get(urls[1])  # the newest stays even above the bound
    assert Settings.from_env().image_cache_mb == 128
