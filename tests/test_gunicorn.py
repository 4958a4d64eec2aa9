"""A live gunicorn (2 workers) on 127.0.0.1 answering the payloads a real Label Studio sent."""
import os
import shutil
import sqlite3
import time

import numpy as np
import pytest
import requests

from ihp_backend.core.ls_format import interactive_label_config, rle_to_mask
from ihp_backend.settings import DEFAULT_CHECKPOINT
from bench.live_backend import free_port, stop  # noqa: F401 (used by other test modules)
from bench.live_backend import start_gunicorn as start_live
from tests.conftest import CCP
from tests.test_http import click_body


def start_gunicorn(tmp_path, checkpoint, env_extra):
    """Two workers x one torch thread with their own MODEL_DIR under ``tmp_path``."""
    return start_live(dict({"MODEL_DIR": str(tmp_path / "model_dir"), "IHP_CHECKPOINT": checkpoint,
                            "IHP_THREADS": "2", "IHP_TORCH_THREADS": "1"}, **env_extra), workers=2)


@pytest.fixture()
def live(tmp_path, tiny_checkpoint, image_server):
    proc, url = start_gunicorn(tmp_path, tiny_checkpoint, {"LABEL_STUDIO_URL": image_server["url"],
                                                          "LABEL_STUDIO_API_KEY": "abcdef123456"})
    yield url, tmp_path
    stop(proc)


def test_live_gunicorn_answers_real_payloads_and_shares_history(live, payloads, image_server):
    url, tmp_path = live
    t0 = time.time()
    r = requests.get(url + "/health", timeout=1)
    assert r.status_code == 200 and time.time() - t0 < 1.0
    t0 = time.time()
    r = requests.post(url + "/setup", json=payloads["/setup"]["body"], timeout=3)
    assert r.status_code == 200 and time.time() - t0 < 3.0
    r = requests.post(url + "/predict", json=payloads["/predict"]["body"], timeout=10)
    assert r.status_code == 200 and r.json()["results"] == [[]]  # no clicks, no known names: no prediction
    workers = set()
    seq = [(50, 21, "Hair"), (50, 50, "Face"), (45, 80, "Left-arm"), (5, 5, "Background"),
           (60, 80, "Left-arm"), (52, 25, "Hair")]
    for x, y, lab in seq:
        r = requests.post(url + "/predict", json=click_body(payloads, x, y, lab), timeout=30)
        assert r.status_code == 200, r.text
        workers.add(r.headers["X-IHP-Worker"])
        names = [res["value"]["brushlabels"][0] for res in r.json()["results"][0]["result"]]
        assert set(names) <= {"Hair", "Face", "Left-arm", "Background"}
    # The kernel hands new connections to whichever worker accepts first; with fast answers one
    # worker can take a whole short sequence. Repeat the last click (same label, same spot: a
    # no-op on the shared history) on fresh connections until the other worker has answered.
    for _ in range(200):
        if len(workers) == 2:
            break
        r = requests.post(url + "/predict", json=click_body(payloads, *seq[-1]), timeout=30)
        assert r.status_code == 200, r.text
        workers.add(r.headers["X-IHP-Worker"])
    assert len(workers) == 2, "both workers should have served clicks"
    db = sqlite3.connect(str(tmp_path / "model_dir" / "state.db"))
    (clicks,), = db.execute("SELECT clicks FROM clicks").fetchall()
    assert len(__import__("json").loads(clicks)) == len(seq)
    assert image_server["handler"].seen_headers[-1]["Authorization"] == "Token abcdef123456"
    r = requests.post(url + "/webhook", json=payloads["/webhook_ANNOTATION_UPDATED"]["body"], timeout=1)
    assert r.status_code == 201


@pytest.mark.skipif(not (os.path.exists(DEFAULT_CHECKPOINT) and os.path.isdir(CCP)),
                    reason="needs the embedded default model and ../shared/data/ccp")
def test_embedded_default_model_parses_a_real_photo(tmp_path, payloads):
    """Clicks on a CCP val photo through gunicorn; masks must overlap the ground truth."""
    from model_training import click_simulation as cs
    from model_training.datasets import ccp
    ds = ccp(CCP, "val", "ccp12")
    img_id = ds.items[0][0]
    root = tmp_path / "files"
    root.mkdir()
    shutil.copy(os.path.join(CCP, "images", img_id + ".jpg"), root / "p.jpg")  # a symlink out of the root is refused
    proc, url = start_gunicorn(tmp_path, DEFAULT_CHECKPOINT, {"IHP_LOCAL_ROOT": str(root)})
    try:
        image, gt = ds.load(0)
        h, w = gt.shape
        names = ds.classes
        cfg = interactive_label_config(names)
        clicks = cs.central_clicks(gt.astype(np.int64), np.random.default_rng(0), min_area=100)
        body = {"tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=p.jpg"}}], "project": "9.1",
                "label_config": cfg, "params": {"context": None}}
        for y, x, c in clicks:  # one click per request, as the frontend sends them
            body["params"]["context"] = {"result": [{
                "type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": w,
                "original_height": h, "is_positive": True,
                "value": {"x": 100 * (x + 0.5) / w, "y": 100 * (y + 0.5) / h, "keypointlabels": [names[c]]}}]}
            r = requests.post(url + "/predict", json=body, timeout=30)
            assert r.status_code == 200, r.text
        pred = np.zeros_like(gt)
        for res in r.json()["results"][0]["result"]:
            pred[rle_to_mask(res["value"]["rle"], h, w)] = names.index(res["value"]["brushlabels"][0])
        ious = []
        for c in sorted(set(c for *_, c in clicks)):
            inter = ((pred == c) & (gt == c)).sum()
            union = ((pred == c) | (gt == c)).sum()
            ious.append(inter / union)
        print(f"real photo mean IoU over clicked classes: {np.mean(ious):.3f}")
        assert np.mean(ious) > 0.3, ious  # measured 0.39 (ihp-ccp-mnv3-s1500), 0.43 (ihp-ccp-mnv3-s3300)
        assert (pred == gt).mean() > 0.8
    finally:
        stop(proc)


def test_http_evaluation_matches_core_evaluation(live, tiny_checkpoint):
    """Black-box evaluation through /predict gives the same parse as the in-process core."""
    from ihp_backend.core.inference import Parser
    from model_training.evaluate import CorePredictor, EvalConfig, HTTPPredictor, evaluate
    from tests.conftest import person_image
    url, _ = live
    classes = ["background", "head", "torso", "legs"]
    samples = [person_image(seed=i) for i in range(2)]
    cfg = EvalConfig(max_corrections=2)
    core = CorePredictor(Parser.from_file(tiny_checkpoint), classes)
    http = HTTPPredictor(url, classes)
    img, gt = samples[0]
    clicks = np.array([[50, 160, 1], [120, 160, 2], [200, 140, 3]], float)
    a, b = core(img, clicks), http(img, clicks)
    assert (a == b).mean() > 0.999
    r_core = evaluate(core, samples, classes, cfg, progress=False)
    r_http = evaluate(http, samples, classes, cfg, progress=False)
    np.testing.assert_allclose(r_core.miou_curve, r_http.miou_curve, atol=0.01)


def test_sigkilled_worker_is_replaced_and_history_survives(live, payloads):
    import signal
    url, tmp_path = live
    pids = set()
    for x, y, lab in [(50, 21, "Hair"), (50, 50, "Face"), (45, 80, "Left-arm")]:
        r = requests.post(url + "/predict", json=click_body(payloads, x, y, lab), timeout=30)
        assert r.status_code == 200
        pids.add(int(r.headers["X-IHP-Worker"]))
    wh = requests.post(url + "/webhook", json=payloads["/webhook_ANNOTATION_CREATED"]["body"], timeout=10)
    assert wh.status_code == 201 and wh.json()["stored"]
    for x, y, lab in [(50, 21, "Hair"), (50, 50, "Face"), (45, 80, "Left-arm")]:  # the webhook cleared task 3
        requests.post(url + "/predict", json=click_body(payloads, x, y, lab), timeout=30)
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.time() + 180
    fresh = set()
    while time.time() < deadline and len(fresh) < 2:
        try:
            r = requests.get(url + "/health", timeout=1)
            if r.json().get("model_loaded"):
                fresh.add(int(r.headers["X-IHP-Worker"]))
        except requests.RequestException:
            pass
        time.sleep(0.1)
    assert victim not in fresh and len(fresh) == 2, fresh
    r = requests.post(url + "/predict", json=click_body(payloads, 5, 5, "Background"), timeout=30)
    assert r.status_code == 200
    db = sqlite3.connect(str(tmp_path / "model_dir" / "state.db"))
    (clicks,), = db.execute("SELECT clicks FROM clicks").fetchall()
    assert len(__import__("json").loads(clicks)) == 4
    samples = sqlite3.connect(str(tmp_path / "model_dir" / "annotations.db")).execute(
        "SELECT COUNT(*) FROM samples").fetchone()[0]
    assert samples == 1


def test_allocator_choice_preloads_jemalloc_once(tmp_path, monkeypatch):
    """IHP_ALLOCATOR: auto takes jemalloc when installed, glibc never re-executes, an explicit
    jemalloc without the library is a clear error, and an environment that already preloads it
    is left alone (gunicorn.conf.py re-executes the master at most once)."""
    from ihp_backend.core import allocator
    from ihp_backend.core.allocator import env_with_allocator
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = {"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"}
    got = env_with_allocator("auto", env, library=str(lib))
    assert got["LD_PRELOAD"] == f"{lib} /x/libother.so" and got["PATH"] == "/bin" and env["LD_PRELOAD"] == "/x/libother.so"
    assert got["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert env_with_allocator("auto", dict(env, MALLOC_CONF="narenas:1"), library=str(lib))["MALLOC_CONF"] == "narenas:1"
    assert env_with_allocator("jemalloc", got) is None  # already preloaded: no second exec
    assert env_with_allocator("glibc", env, library=str(lib)) is None
    missing = ("/nonexistent/libjemalloc.so.2",)
    assert allocator.jemalloc_library(missing) is None
    with pytest.raises(ValueError, match="IHP_ALLOCATOR"):
        env_with_allocator("tcmalloc", env)
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)  # a machine without libjemalloc2
    assert env_with_allocator("auto", env) is None  # glibc, tuned in post_fork
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
        env_with_allocator("jemalloc", env)


def needs_jemalloc():
    from ihp_backend.core.allocator import jemalloc_library
    return pytest.mark.skipif(jemalloc_library() is None and not os.environ.get("CI"),
                              reason="no libjemalloc.so.2 (apt-get install libjemalloc2; .ci/run installs it)")


@pytest.mark.skipif(not os.path.exists(DEFAULT_CHECKPOINT) or not os.path.exists("/proc/self/stat"),
                    reason="needs the embedded default model and Linux's /proc")
@pytest.mark.parametrize("allocator", ["glibc", pytest.param("jemalloc", marks=needs_jemalloc())])
def test_a_served_worker_reuses_freed_memory_across_clicks(tmp_path, allocator):
    """With glibc's own thresholds a worker's forward faulted ~10,000 fresh pages in on most
    clicks (its thread's arena handed the freed activations back each time: ~12% of the
    forward; bench/malloc.py); gunicorn's post_fork now keeps them (IHP_MALLOC_KEEP_MB). With
    jemalloc (IHP_ALLOCATOR, the default where installed) the worker really runs on it and keeps
    its freed pages between clicks as well."""
    from PIL import Image
    from bench.latency import LIP_CONFIG, PHONE_LABELS, children, click_body, clicks_for
    from bench.malloc import minor_faults
    from tests.conftest import person_image
    img, _ = person_image()
    photo = np.asarray(Image.fromarray(img).resize((550, 830)))
    root = tmp_path / "files"
    root.mkdir()
    Image.fromarray(photo).save(root / "p.jpg", quality=95)
    proc, url = start_live({"MODEL_DIR": str(tmp_path / "model_dir"), "IHP_LOCAL_ROOT": str(root),
                            "IHP_ALLOCATOR": allocator}, workers=1)
    try:
        pid = children(proc.pid)[0]
        assert ("libjemalloc" in open(f"/proc/{pid}/maps").read()) == (allocator == "jemalloc")
        faults = []
        s = requests.Session()
        for y, x, lab in clicks_for(830, 550, 10, PHONE_LABELS, 1):
            f0 = minor_faults(pid)
            r = s.post(url + "/predict", json=click_body(1, "/data/local-files/?d=p.jpg", LIP_CONFIG, 550, 830,
                                                         100 * x / 550, 100 * y / 830, lab, "t.malloc"), timeout=60)
            assert r.status_code == 200, r.text
            faults.append(minor_faults(pid) - f0)
        # a click after the first two (fetch, first buffers): 73 faults at the median here, 10,126 before
        assert np.median(faults[2:]) < 2000, faults
    finally:
        stop(proc)
