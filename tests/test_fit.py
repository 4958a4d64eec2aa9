"""fit(): webhooks store samples durably, a background job fine-tunes, a gate promotes."""
import base64
import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from ihp_backend._wsgi import create_app
from ihp_backend.annotations import AnnotationStore
from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.ls_format import interactive_label_config, mask_to_rle
from ihp_backend.model import IHPModel
from ihp_backend.registry import Registry
from ihp_backend.settings import Settings
from model_training.evaluate import EvalResult
from ihp_backend.fit_job import run_once
from model_training.finetune import project_binding, promote
from tests.conftest import ROOT, person_image, png_bytes

NAMES = ["Background", "Head", "Torso", "Legs"]
CONFIG = interactive_label_config(NAMES)


def webhook_body(action, project, task, ann, seed=0, cancelled=False, labels_override=None):
    img, lab = person_image(seed=seed)
    if labels_override is not None:
        lab = labels_override
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    result = [{"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 320,
               "original_height": 240, "value": {"format": "rle", "rle": mask_to_rle(lab == k),
                                                 "brushlabels": [NAMES[k]]}} for k in (1, 2, 3) if (lab == k).any()]
    result.append({"from_name": "kp", "to_name": "image", "type": "keypointlabels", "original_width": 320,
                   "original_height": 240, "value": {"x": 10, "y": 10, "keypointlabels": ["Head"]}})
    return {"action": action, "project": {"id": project, "label_config": CONFIG},
            "task": {"id": task, "data": {"image": uri}},
            "annotation": {"id": ann, "task": task, "result": result, "was_cancelled": cancelled}}, lab


@pytest.fixture()
def app_model(tmp_path, tiny_checkpoint, store_backend):
    """The backend with its annotation store in SQLite and, again, in PostgreSQL."""
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, train_every=1000,
                          database_url=store_backend))
    m.load()
    return create_app(m, load=False).test_client(), m


def test_webhook_stores_decodes_updates_deletes(app_model):
    client, m = app_model
    body, lab = webhook_body("ANNOTATION_CREATED", 5, 11, 101)
    t0 = time.time()
    r = client.post("/webhook", json=body)
    assert r.status_code == 201 and r.get_json()["stored"] and time.time() - t0 < 1.0
    assert m.store.counts()["5"]["samples"] == 1
    m.store.decode_pending()
    (s,) = m.store.samples(5)
    want = np.where(lab == 0, 255, lab)  # not covered by any region -> 255
    assert s["classes"] == NAMES and np.array_equal(s["labels"], want) and s["image"].shape == (240, 320, 3)
    # update replaces that annotation's sample
    lab2 = lab.copy()
    lab2[lab2 == 3] = 2
    body2, _ = webhook_body("ANNOTATION_UPDATED", 5, 11, 101, labels_override=lab2)
    assert client.post("/webhook", json=body2).status_code == 201
    m.store.decode_pending()
    (s,) = m.store.samples(5)
    assert np.array_equal(s["labels"], np.where(lab2 == 0, 255, lab2))
    # cancelled ones are ignored, deleted ones removed
    body3, _ = webhook_body("ANNOTATION_CREATED", 5, 12, 102, cancelled=True)
    assert client.post("/webhook", json=body3).get_json()["stored"] is False
    r = client.post("/webhook", json={"action": "ANNOTATION_DELETED", "project": {"id": 5},
                                      "annotation": {"id": 101, "task": 11}})
    assert r.get_json()["removed"] is True
    assert m.store.samples(5) == []
    h = client.get("/health").get_json()
    assert h["projects"]["5"]["samples"] == 0 if "5" in h["projects"] and "samples" in h["projects"]["5"] else True


def test_broken_rle_is_kept_but_never_trained_on(app_model):
    client, m = app_model
    body, _ = webhook_body("ANNOTATION_CREATED", 6, 1, 1)
    body["annotation"]["result"][0]["value"]["rle"] = [1, 2, 3]
    assert client.post("/webhook", json=body).status_code == 201
    m.store.decode_pending()
    assert m.store.samples(6) == [] and m.store.counts()["6"]["invalid"] == 1


def result_with(curve):
    return EvalResult("x", 1, ["a"], curve, None, None, 0, 1, [1], 0, [0.0], None, 0, 0, None, None, 0)


def test_gate_promotes_only_if_not_worse():
    assert promote(result_with([0.5, 0.6]), result_with([0.5, 0.6]))
    assert promote(result_with([0.5, 0.6]), result_with([0.6, 0.7]))
    assert not promote(result_with([0.5, 0.6]), result_with([0.4, 0.6]))


def test_project_binding_keeps_parent_slots(tiny_checkpoint):
    parent = read_checkpoint(tiny_checkpoint)
    b, slot_of = project_binding(parent, NAMES)
    assert b.kind == "fixed" and slot_of == {"Background": 0, "Head": 1, "Torso": 2, "Legs": 3}
    assert b.bind(["Torso"]) == {"Torso": 2}


def fill_project(m, client, project, n):
    for i in range(n):
        body, _ = webhook_body("ANNOTATION_CREATED", project, 100 + i, 1000 + i, seed=i)
        assert client.post("/webhook", json=body).status_code == 201


def test_run_once_trains_evaluates_and_records_a_version(app_model, tiny_checkpoint):
    client, m = app_model
    fill_project(m, client, 7, 8)
    statuses = []
    res = run_once(m.settings.model_dir, "7", tiny_checkpoint, steps=4, holdout=0.3, max_corrections=2,
                   standard=0.85, status=statuses.append,
                   overrides={"sample": {"crop": [96, 128], "base_scale": 0.5, "scale_range": [0.9, 1.1],
                                         "binding": "fixed", "strategy": "central", "min_area": 4},
                              "iterative": {"enabled": False}, "batch_size": 2, "input_size": 128},
                   database_url=m.settings.database_url)
    assert res["status"] == "done", res
    vs = m.registry.versions("7")
    assert len(vs) == 1 and vs[0]["version"] == res["version"]
    assert set(vs[0]["metrics"]["gate"]) == {"metric", "parent", "candidate"}
    assert vs[0]["promoted"] == (vs[0]["metrics"]["gate"]["candidate"] >= vs[0]["metrics"]["gate"]["parent"] - 1e-9)
    assert any(s.get("phase") == "training" for s in statuses) and statuses[-1]["phase"] == "evaluating"
    ck = read_checkpoint(os.path.join(m.registry.project_dir("7"), "versions", res["version"] + ".pt"))
    assert ck["binding"] == "fixed" and ck["class_names"][:4] == NAMES
    if vs[0]["promoted"]:
        assert m.registry.serving("7")["version"] == res["version"]
        for _ in range(100):  # the worker switches in the background
            if m.parser_for("7").model_version == res["version"]:
                break
            time.sleep(0.05)
        assert m.parser_for("7").model_version == res["version"]
        # class-aware: batch predictions (no clicks) now return a zero-click parse with a score
        img, _ = person_image()
        uri = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": uri}}], "project": "7.123",
                                          "label_config": CONFIG, "params": {"context": None}})
        pred = r.get_json()["results"][0]
        assert pred["model_version"] == res["version"] and len(pred["result"]) >= 1 and 0 < pred["score"] <= 1


def test_the_gate_runs_parent_and_candidate_as_the_server_serves(app_model, tiny_checkpoint, monkeypatch):
    """run_once's ``options`` (the fit job passes the server's parser options) are how the gate
    runs both networks: a version is promoted on what the backend would serve."""
    import model_training.finetune as finetune
    from ihp_backend.core.options import ParserOptions
    client, m = app_model
    fill_project(m, client, 9, 8)
    built, real = [], finetune.Parser

    def recording(ckpt, **kw):
        built.append(kw)
        return real(ckpt, **kw)
    monkeypatch.setattr(finetune, "Parser", recording)
    served = ParserOptions(click_radius=3.0, zoom=False, aspp_rank=16, threads=1)
    res = run_once(m.settings.model_dir, "9", tiny_checkpoint, steps=2, holdout=0.3, max_corrections=1,
                   standard=0.85, status=lambda st: None,
                   overrides={"sample": {"crop": [96, 128], "base_scale": 0.5, "scale_range": [0.9, 1.1],
                                         "binding": "fixed", "strategy": "central", "min_area": 4},
                              "iterative": {"enabled": False}, "batch_size": 2, "input_size": 128},
                   database_url=m.settings.database_url, options=served)
    assert res["status"] == "done", res
    assert built == [served.parser_kwargs()] * 2  # parent and candidate


def test_start_training_spawns_job_and_kill9_loses_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("IHP_FIT_STEPS", "400")
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, train_every=1000))
    m.load()
    client = create_app(m, load=False).test_client()
    fill_project(m, client, 8, 6)
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8, "label_config": CONFIG}})
    assert r.status_code == 201 and r.get_json()["training"] == "started"
    job = m.jobs["8"]
    deadline = time.time() + 120
    while time.time() < deadline:
        st = m.registry.job("8") or {}
        if st.get("phase") == "training" and st.get("step", 0) >= 5:
            break
        assert job.poll() is None, open(os.path.join(m.registry.project_dir("8"), "job.log")).read()[-2000:]
        time.sleep(0.2)
    assert st.get("phase") == "training" and st.get("step", 0) >= 5, st
    assert client.get("/health").get_json()["projects"]["8"]["job"]["phase"] == "training"
    # a second request while it runs does not start a second job
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8, "label_config": CONFIG}})
    assert r.get_json()["training"] == "running"
    os.kill(job.pid, signal.SIGKILL)
    job.wait(10)
    # nothing lost: samples intact, no half-written version, the request is still pending
    assert len(AnnotationStore(os.path.join(m.settings.model_dir, "annotations.db")).samples(8)) == 6
    assert m.registry.serving("8") is None and m.registry.versions("8") == []
    assert m.store.pending("8", 1000) is not None
    assert m.parser_for("8").model_version == "tiny-test"  # still serving the default
    # a restart resumes pending training (short run this time)
    monkeypatch.setenv("IHP_FIT_STEPS", "3")
    m2 = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, train_every=1000))
    m2.load()
    assert "8" in m2.jobs
    m2.jobs["8"].wait(300)
    assert m2.jobs["8"].returncode == 0, open(os.path.join(m.registry.project_dir("8"), "job.log")).read()[-2000:]
    assert len(m2.registry.versions("8")) == 1
    assert m2.store.pending("8", 1000) is None


def test_a_run_waits_out_a_lock_probe(tmp_path):
    """``run_locked`` asks by taking the run lock for a moment. A run starting in that moment
    must wait it out, not end without work (seen in CI: a fit job done in 6 ms, its request
    trained by a second job); two askers that meet must not see a run."""
    import threading
    from ihp_backend.jobs import RUN_LOCK_WAIT, project_run_lock, run_locked
    from ihp_backend.locks import project_lock
    settings, reg = Settings(model_dir=str(tmp_path)), Registry(str(tmp_path))
    path = os.path.join(reg.project_dir("7"), "train.lock")
    held, release = threading.Event(), threading.Event()

    def probe(seconds):
        with project_lock(path) as got:
            assert got
            held.set()
            release.wait(seconds)

    for wait, expect in ((0.0, False), (RUN_LOCK_WAIT, True)):
        held.clear()
        t = threading.Thread(target=probe, args=(0.3,))
        t.start()
        held.wait(5)
        with project_run_lock(settings, reg, "7", wait=wait) as got:
            assert got is expect
        t.join()
    held.clear()
    t = threading.Thread(target=probe, args=(0.012,))  # another asker's moment
    t.start()
    held.wait(5)
    assert not run_locked(settings, reg, "7", tries=50)  # asks again 10 ms apart (margin for a loaded CI)
    t.join()
    held.clear()
    t = threading.Thread(target=probe, args=(5.0,))  # a run
    t.start()
    held.wait(5)
    assert run_locked(settings, reg, "7")
    release.set()
    t.join()
