"""The fit() scenario, measured: a project with its own label set learns from 50 annotations.

    .venv/bin/python bench/fit_scenario.py [--train 50] [--val 50] [--steps 200] [--out runs/fit_scenario]

1. A live gunicorn (2 workers, embedded default model) on 127.0.0.1, ``IHP_TRAIN_EVERY=N``.
2. N CCP ``train.txt`` photos arrive as real-shaped ANNOTATION_CREATED webhooks (BrushLabels
   RLE per label, the image as a local file) for a project whose 11 labels are not the
   default's training merge (pants and skirt become one "Bottom", legwear its own label, ...).
   Every webhook must answer within Label Studio's 1 s.
3. The N-th sample starts the fit job by itself; while it runs a client keeps clicking and
   /predict latency is compared with the same client before training (idle).
4. When the job is done, the embedded default and the project's serving model are evaluated
   with the NoC harness on M held-out CCP ``val.txt`` photos in the project's labels.
Prints one JSON line (and writes it to ``--out``/result.json). Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.latency import click_body, start_backend, timed_post  # noqa: E402
from ihp_backend.core.checkpoint import read_checkpoint  # noqa: E402
from ihp_backend.core.inference import Parser  # noqa: E402
from ihp_backend.core.ls_format import interactive_label_config, mask_to_rle  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT  # noqa: E402
from model_training.datasets import ccp  # noqa: E402
from model_training.evaluate import CorePredictor, EvalConfig, evaluate  # noqa: E402

CCP = os.path.join(os.path.dirname(ROOT), "shared", "data", "ccp")
# the project's own label set, built from CCP's ccp12 merge (not the default's ccp17 training merge)
FROM_CCP12 = {"background": "Background", "hair": "Hair", "skin": "Skin", "upper-clothes": "Top",
              "coat": "Outerwear", "dress": "Dress", "pants": "Bottom", "skirt": "Bottom", "legwear": "Legwear",
              "shoes": "Footwear", "bag": "Bag", "accessories": "Accessory"}
LABELS = list(dict.fromkeys(FROM_CCP12.values()))


def label_config() -> str:
    return interactive_label_config(LABELS)


def project_gt(ds, gt12: np.ndarray) -> np.ndarray:
    lut = np.array([LABELS.index(FROM_CCP12[c]) for c in ds.classes], np.int64)
    return lut[gt12]


def webhook(project: int, task: int, ann: int, img_id: str, gt: np.ndarray) -> dict:
    h, w = gt.shape
    result = [{"id": f"r{k}", "from_name": "mask", "to_name": "image", "type": "brushlabels", "origin": "manual",
               "original_width": w, "original_height": h, "image_rotation": 0,
               "value": {"format": "rle", "rle": mask_to_rle(gt == k), "brushlabels": [name]}}
              for k, name in enumerate(LABELS) if k and (gt == k).any()]
    return {"action": "ANNOTATION_CREATED",
            "project": {"id": project, "title": "fit scenario", "label_config": label_config()},
            "task": {"id": task, "data": {"image": f"/data/local-files/?d=images/{img_id}.jpg"}, "project": project},
            "annotation": {"id": ann, "task": task, "project": project, "result": result, "was_cancelled": False,
                           "ground_truth": False, "lead_time": 60.0}}


def click_latencies(url, img_id, seconds, stop_when=None, project=77, tag=0):
    """One annotator clicking on a val photo: single-click /predict requests, one after another."""
    img = f"/data/local-files/?d=images/{img_id}.jpg"
    out, s, t_end, k = [], requests.Session(), time.time() + seconds, 0
    rng = np.random.default_rng(tag)
    while time.time() < t_end and not (stop_when and stop_when()):
        k += 1
        body = click_body(900000 + tag * 1000 + k // 8, img, label_config(), 550, 830, float(rng.uniform(35, 65)),
                          float(rng.uniform(10, 90)), LABELS[1 + k % (len(LABELS) - 1)], f"{project}.1")
        out.append(timed_post(s, url, body))
        time.sleep(0.3)  # an annotator does not click continuously
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--train", type=int, default=50)
    ap.add_argument("--val", type=int, default=50)
    ap.add_argument("--steps", type=int, default=250, help="fine-tuning steps of the fit job (IHP_FIT_STEPS)")
    ap.add_argument("--max-corrections", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "fit_scenario"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    project = 77
    tr, va = ccp(CCP, "train", "ccp12"), ccp(CCP, "val", "ccp12")
    md = tempfile.mkdtemp(prefix="fit-scenario-")
    proc, url = start_backend(a.checkpoint, {"MODEL_DIR": md, "IHP_LOCAL_ROOT": CCP, "IHP_TRAIN_EVERY": str(a.train),
                                             "IHP_FIT_STEPS": str(a.steps), "IHP_TORCH_THREADS": "1"})
    res = {"train_images": a.train, "val_images": a.val, "labels": LABELS, "fit_steps": a.steps}
    try:
        idle = click_latencies(url, va.items[0][0], 30, tag=1)
        hook_s = []
        for i in range(a.train):
            img_id = tr.items[i][0]
            gt = project_gt(tr, tr.load(i)[1])
            body = webhook(project, 1000 + i, 5000 + i, img_id, gt)
            t = time.perf_counter()
            r = requests.post(url + "/webhook", json=body, timeout=5)
            hook_s.append(time.perf_counter() - t)
            assert r.status_code in (200, 201), r.text
        res["webhook_ms_max"] = round(max(hook_s) * 1000, 1)
        res["webhook_ms_p50"] = round(float(np.median(hook_s)) * 1000, 1)

        def job():
            return requests.get(url + "/health", timeout=5).json()["projects"].get(str(project), {}).get("job") or {}
        t0 = time.time()
        while not job() and time.time() - t0 < 60:
            time.sleep(0.5)
        started = time.time()

        def finished():
            j = job()
            return j.get("phase") in ("idle", "failed")
        during = click_latencies(url, va.items[0][0], 3600, stop_when=finished, tag=2)
        while not finished():
            time.sleep(2)
        j = job()
        res["fit_job"] = {k: j.get(k) for k in ("phase", "error")}
        res["fit_job"]["last"] = j.get("last")
        res["fit_wall_s"] = round(time.time() - started, 1)
        res["predict_idle_ms_p50"] = round(float(np.median(idle)) * 1000, 1)
        res["predict_during_fit_ms_p50"] = round(float(np.median(during)) * 1000, 1)
        res["predict_during_fit_ms_p95"] = round(float(np.percentile(during, 95)) * 1000, 1)
        vs = requests.get(url + f"/versions?project={project}", timeout=5).json()
        res["versions"] = [{k: v.get(k) for k in ("version", "promoted")} for v in vs.get("project_versions", [])]
        promoted = [v["version"] for v in vs.get("project_versions", []) if v.get("promoted")]
        if promoted:  # workers load a promoted version in the background: how long until served?
            t_done = time.time()
            while time.time() - t_done < 60:
                served = {requests.get(url + f"/versions?project={project}", timeout=5).json().get("serving")
                          for _ in range(4)}  # both workers answer within a few calls
                if served == {promoted[-1]}:
                    break
                time.sleep(0.5)
            res["switch_s"] = round(time.time() - t_done, 1)
            res["serving"] = sorted(served)
    finally:
        proc.terminate()
        proc.wait(30)
    # held-out evaluation in the project's labels: the embedded default vs the project's model
    import torch
    torch.set_num_threads(2)
    samples = [(va.load(i)[0], project_gt(va, va.load(i)[1])) for i in range(a.val)]
    cfg = EvalConfig(standard=0.85, max_corrections=a.max_corrections, min_area=16)
    models = {"default": read_checkpoint(a.checkpoint)}
    from ihp_backend.registry import Registry
    reg = Registry(md)
    vdir = os.path.join(reg.project_dir(str(project), create=False), "versions")
    cand = sorted(f for f in os.listdir(vdir) if f.endswith(".pt"))
    if cand:
        models["project"] = read_checkpoint(os.path.join(vdir, cand[-1]))
    for name, ck in models.items():
        r = evaluate(CorePredictor(Parser(ck), LABELS), samples, LABELS, cfg)
        res[f"eval_{name}"] = r.summary()
    if "project" in models:
        d, p = res["eval_default"], res["eval_project"]
        res["miou_k0_gain_points"] = round(100 * (p["miou_k0"] - d["miou_k0"]), 1)
        res["noc_mean_change_pct"] = round(100 * (p["noc_mean"] - d["noc_mean"]) / d["noc_mean"], 1)
    line = json.dumps(res)
    open(os.path.join(a.out, "result.json"), "w").write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
