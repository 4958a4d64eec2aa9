"""Per-click latency of the backend on this machine (prints a table and one JSON line).

    .venv/bin/python bench/latency.py [--checkpoint PATH] [--clicks 12] [--repeats 5]

1. bare forward pass at the serving resolution (batch 1), CCP-size photo (550x830);
   (also timed between the requests of 2. and 3., so each ratio compares samples of one
   machine state);
2. the core pipeline in process (cached image -> maps -> forward -> upsample -> argmax ->
   RLE for every class);
3. end to end over HTTP against a live gunicorn (2 workers) on 127.0.0.1: a sequence of
   single-click interactive requests for a CCP photo with the LIP config, and for a 1024x1024
   image with 20 labels; p50 / p95 per request;
4. RLE encoding of all classes of a 1024x1024 parse;
5. peak RSS per worker; throughput with 4 concurrent clients.

    .venv/bin/python bench/latency.py --case 12mp [--tasks 5] [--baseline-root DIR]

is the phone-photo case (issue 29) instead: a CCP photo upscaled 5x (2750 x 4150, 11.4 MP),
12 labels, ten single clicks per task the way Label Studio sends them, one gunicorn worker;
per click index p50 of the request and of every Server-Timing stage, the JSON size per click
(also at CCP size), the first click on a new photo (fetch + decode + parse), the 2nd and the last
click's click sets again at once on fresh tasks of the decoded photo (no history, no previous
prediction: the part of a click's cost that is its answer's) and peak RSS. With
``--baseline-root`` (e.g. a ``git worktree`` of an older commit) a second backend from that tree
answers the same clicks, task by task in turn, so A and B are measured back to back;
``--baseline-env KEY=VALUE`` gives that second backend (this tree by default) a setting.
    .venv/bin/python bench/latency.py --case crowd [--tasks 5]

is the crowd case (issue 31): three CCP photos side by side (1650 x 830), clicks on each
person in turn, one worker, served with ``IHP_ZOOM=1`` (each clicked small person parsed again
on their own region) and ``IHP_ZOOM=0``, task by task in turn; p50 / p95 per click.

    .venv/bin/python bench/latency.py --case batch [--tasks 40]

is "Retrieve predictions" on that many CCP val photos in one request (one worker, no time
budget): seconds per task, and how many tasks fit ``IHP_BATCH_SECONDS``' default of 60 s.
Not a test: absolute numbers drift on shared machines; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.live_backend import start_gunicorn, stop  # noqa: E402
from ihp_backend.core.clicks import network_input, scale_clicks  # noqa: E402
from ihp_backend.core.inference import Parser, network_size, resize_image  # noqa: E402
from ihp_backend.core.ls_format import brush_results, interactive_label_config, label_map_to_rles, parse_label_config  # noqa: E402
from ihp_backend.core.options import PRECISIONS  # noqa: E402
from ihp_backend.core.allocator import tune_malloc  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT, Settings, default_torch_threads, default_workers  # noqa: E402

CCP = os.path.join(os.path.dirname(ROOT), "shared", "data", "ccp")
LIP_CONFIG = open(os.path.join(ROOT, "label_config.xml")).read()


def pct(v, q):
    return float(np.percentile(np.asarray(v) * 1000, q))


def clicks_for(h, w, n, labels, seed=0):
    rng = np.random.default_rng(seed)
    return [(float(rng.uniform(0.2, 0.8) * h), float(rng.uniform(0.3, 0.7) * w), labels[i % len(labels)])
            for i in range(n)]


def ccp_photo():
    p = os.path.join(CCP, "images", "0002.jpg")
    if os.path.exists(p):
        return np.asarray(Image.open(p).convert("RGB"))
    rng = np.random.default_rng(0)
    return (rng.random((830, 550, 3)) * 255).astype(np.uint8)


class ForwardProbe:
    """Times the bare network (input built beforehand, exactly as serving calls it). Called
    between the measured requests, so forward and pipeline samples see the same machine: on a
    shared VM the forward alone drifts by 30% within minutes, which made ratios of separately
    measured medians meaningless."""

    def __init__(self, parser, image):
        self.parser = parser
        self.hw = network_size(image.shape[:2], parser.max_side)
        small = resize_image(image, self.hw)
        self.x = network_input(small, scale_clicks([(400, 270, 1)], image.shape[:2], self.hw),
                               parser.num_slots, use_prev_mask=parser.use_prev_mask)[None]
        self.samples = []
        for _ in range(3):
            parser.forward(self.x)

    def __call__(self) -> float:
        t = time.perf_counter()
        self.parser.forward(self.x)
        dt = time.perf_counter() - t
        self.samples.append(dt)
        return dt


def bench_forward(probe, repeats):
    return [probe() for _ in range(repeats)]


def bench_core(parser, image, n_clicks, repeats, probe=None):
    setup = parse_label_config(LIP_CONFIG)
    mapping = parser.binding.bind(list(setup.labels))
    labels = [lab for lab in setup.labels if lab != "Background"][:8]
    ts = []
    for r in range(repeats):
        cl = clicks_for(*image.shape[:2], n_clicks, labels, r)
        for k in range(1, n_clicks + 1):
            arr = np.array([(y, x, mapping[lab]) for y, x, lab in cl[:k]], float)
            t = time.perf_counter()
            res = parser.parse(image, arr, allowed_slots=sorted({0} | set(arr[:, 2].astype(int))))
            brush_results(res.labels, {v: k_ for k_, v in mapping.items()}, setup, res.confidence)
            ts.append(time.perf_counter() - t)
            if probe:
                probe()
    return ts


def bench_rle(n_classes=20):
    rng = np.random.default_rng(0)
    lab = np.zeros((1024, 1024), np.int64)
    for c in range(1, n_classes):
        y, x = rng.integers(0, 900, 2)
        lab[y:y + 120, x:x + 120] = c
    t = time.perf_counter()
    label_map_to_rles(lab, range(n_classes))  # what serving does (brush_results)
    return time.perf_counter() - t


def status_mb(pid, field: str = "VmHWM"):
    """A memory field of /proc/<pid>/status in MB (VmHWM = peak RSS, VmRSS = current; RssFile =
    the resident pages of mapped files, mostly torch's and the CUDA wheel's shared libraries:
    shared by every worker of the machine and reclaimable, unlike RssAnon)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        return None


def children(pid):
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except OSError:
        return []


def start_backend(checkpoint: str, env_extra: dict, workers: int = 2, threads: int = 2, root: str = ROOT):
    """gunicorn on a free 127.0.0.1 port; returns (process, url) once every worker has the model."""
    return start_gunicorn(dict({"IHP_CHECKPOINT": checkpoint, "IHP_THREADS": str(threads)}, **env_extra),
                          workers=workers, cwd=root)


def keypoint(w, h, x_pct, y_pct, label) -> dict:
    """A KeyPointLabels result as Label Studio sends it in a /predict context."""
    return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": w,
            "original_height": h, "is_positive": True, "value": {"x": x_pct, "y": y_pct, "keypointlabels": [label]}}


def click_body(task, image_ref, label_config, w, h, x_pct, y_pct, label, project, keypoints=None) -> dict:
    """One interactive /predict body as Label Studio sends it: the newest keypoint only (or
    ``keypoints``, several at once)."""
    return {"tasks": [{"id": task, "data": {"image": image_ref}}], "project": project, "label_config": label_config,
            "params": {"context": {"result": keypoints or [keypoint(w, h, x_pct, y_pct, label)]}}}


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: forward;dur=45.1, ...`` -> {"forward": 0.0451, ...} (seconds)."""
    out = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur) / 1000
    return out


def timed_post(session, url, body, stages: list | None = None) -> float:
    """POST /predict; seconds taken (raises on an HTTP error). The backend's own stage times
    (its Server-Timing header) are appended to ``stages`` when given."""
    t = time.perf_counter()
    r = session.post(url + "/predict", json=body, timeout=60)
    dt = time.perf_counter() - t
    r.raise_for_status()
    if stages is not None:
        stages.append(server_timing(r.headers.get("Server-Timing", "")))
    return dt


def http_sequence(url, image_ref, w, h, labels, n_clicks, task, project="bench.1", probe=None, stages=None):
    """Times of a sequence of single-click requests; ``probe`` (if any) runs after each."""
    cfg = LIP_CONFIG if len(labels) == 20 and labels[0] == "Background" and "Hat" in labels else interactive_label_config(labels)
    cl = clicks_for(h, w, n_clicks, [lab for lab in labels if lab != "Background"], task)
    s = requests.Session()
    out = []
    for y, x, lab in cl:
        out.append(timed_post(s, url, click_body(task, image_ref, cfg, w, h, 100 * x / w, 100 * y / h, lab, project),
                              stages))
        if probe:
            probe()
    return out


PHONE_LABELS = ["Hair", "Face", "UpperClothes", "Coat", "Pants", "Skirt", "Left-arm", "Right-arm",
                "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"]


def phone_photo(photo: np.ndarray, factor: int = 5) -> np.ndarray:
    """The CCP photo upscaled ``factor`` times (bicubic): a phone-size photo of the same scene."""
    h, w = photo.shape[:2]
    return np.asarray(Image.fromarray(photo).resize((w * factor, h * factor), Image.BICUBIC))


def phone_sequence(url, ref, w, h, task, n_clicks, project="bench.12mp"):
    """Ten single-click requests on one task: [(seconds, stages, response bytes)] per click."""
    cl = clicks_for(h, w, n_clicks, PHONE_LABELS, task)
    cfg = LIP_CONFIG
    s = requests.Session()
    out = []
    for y, x, lab in cl:
        t = time.perf_counter()
        r = s.post(url + "/predict", json=click_body(task, ref, cfg, w, h, 100 * x / w, 100 * y / h, lab, project),
                   timeout=120)
        dt = time.perf_counter() - t
        r.raise_for_status()
        out.append((dt, server_timing(r.headers.get("Server-Timing", "")), len(r.content)))
    return out


def clicks_at_once(url, ref, w, h, seed, n_clicks, task, project="bench.12mp"):
    """The first ``n_clicks`` clicks of ``phone_sequence``'s task ``seed`` in one request on a new
    task ``task`` (the photo already decoded): what that answer costs without any click history
    or previous prediction. (seconds, stages, response bytes)."""
    keypoints = [keypoint(w, h, 100 * x / w, 100 * y / h, lab) for y, x, lab in clicks_for(h, w, n_clicks, PHONE_LABELS, seed)]
    body = click_body(task, ref, LIP_CONFIG, w, h, None, None, None, project, keypoints=keypoints)
    t = time.perf_counter()
    r = requests.post(url + "/predict", json=body, timeout=120)
    dt = time.perf_counter() - t
    r.raise_for_status()
    return dt, server_timing(r.headers.get("Server-Timing", "")), len(r.content)


def phone_case(a):
    """Issue 29's measurement; prints a table per backend and one JSON line."""
    photo = ccp_photo()
    big = phone_photo(photo)
    tmp = tempfile.mkdtemp()
    Image.fromarray(photo).save(os.path.join(tmp, "photo.jpg"), quality=95)
    Image.fromarray(big).save(os.path.join(tmp, "phone.jpg"), quality=92)
    roots = {"this tree": ROOT}
    if a.baseline_root or a.baseline_env:
        roots["baseline"] = os.path.abspath(a.baseline_root or ROOT)
    backends = {}
    try:
        for name, root in roots.items():
            env = {"MODEL_DIR": os.path.join(tmp, "md_" + name[:4]), "IHP_LOCAL_ROOT": tmp,
                   "IHP_TORCH_THREADS": str(a.threads), "IHP_PRECISION": a.precision}
            if name == "baseline":
                env.update(kv.split("=", 1) for kv in a.baseline_env)
            backends[name] = start_backend(a.checkpoint, env, workers=1, root=root)
        h, w = big.shape[:2]
        per = {n: {"clicks": [], "first": [], "ccp": [], "once_2": [], "once_n": []} for n in backends}
        for t in range(a.tasks):
            for name, (_, url) in backends.items():
                # a new photo each task (a copy under a new name): the first click fetches and decodes
                ref = f"phone_{t}.jpg"
                if not os.path.exists(os.path.join(tmp, ref)):
                    os.link(os.path.join(tmp, "phone.jpg"), os.path.join(tmp, ref))
                seq = phone_sequence(url, f"/data/local-files/?d={ref}", w, h, 1000 + t, a.clicks)
                per[name]["first"].append(seq[0])
                per[name]["clicks"].append(seq[1:])
                # the 2nd and the last click's click sets again, each at once on a fresh task of this photo
                for key, n in (("once_2", 2), ("once_n", a.clicks)):
                    per[name][key].append(clicks_at_once(url, f"/data/local-files/?d={ref}", w, h, 1000 + t, n,
                                                         (5000 if n == 2 else 6000) + t))
                per[name]["ccp"].extend(phone_sequence(url, "/data/local-files/?d=photo.jpg", photo.shape[1],
                                                       photo.shape[0], 2000 + t, a.clicks))
        out = {"photo": f"{w}x{h}", "megapixels": round(w * h / 1e6, 1), "tasks": a.tasks, "clicks_per_task": a.clicks}
        for name, (proc, _) in backends.items():
            r = per[name]
            later = [c for seq in r["clicks"] for c in seq]
            stages = sorted({k for c in later for k in c[1]})
            by_index = {i + 2: round(pct([seq[i][0] for seq in r["clicks"]], 50), 1) for i in range(a.clicks - 1)}
            ccp_later = [c for i, c in enumerate(r["ccp"]) if i % a.clicks]
            res = {
                "clicks_2_to_n_ms_p50": round(pct([c[0] for c in later], 50), 1),
                "clicks_2_to_n_ms_p95": round(pct([c[0] for c in later], 95), 1),
                "ms_p50_by_click": by_index,
                "stages_ms_p50": {k: round(pct([c[1].get(k, 0.0) for c in later], 50), 1) for k in stages},
                # where the growth from the 2nd to the last click goes
                "stages_ms_p50_2nd_click": {k: round(pct([seq[0][1].get(k, 0.0) for seq in r["clicks"]], 50), 1)
                                            for k in stages},
                "stages_ms_p50_last_click": {k: round(pct([seq[-1][1].get(k, 0.0) for seq in r["clicks"]], 50), 1)
                                             for k in stages},
                # the same click sets at once on fresh tasks: if the last click's growth over the 2nd
                # is here too, it is the answer's (more labels), not the task's click history
                "at_once_2_clicks_ms_p50": round(pct([c[0] for c in r["once_2"]], 50), 1),
                "at_once_all_clicks_ms_p50": round(pct([c[0] for c in r["once_n"]], 50), 1),
                "at_once_2_clicks_stages_ms_p50": {k: round(pct([c[1].get(k, 0.0) for c in r["once_2"]], 50), 1)
                                                   for k in stages},
                "at_once_all_clicks_stages_ms_p50": {k: round(pct([c[1].get(k, 0.0) for c in r["once_n"]], 50), 1)
                                                     for k in stages},
                "first_click_ms_p50": round(pct([f[0] for f in r["first"]], 50), 1),
                "first_click_stages_ms_p50": {k: round(pct([f[1].get(k, 0.0) for f in r["first"]], 50), 1)
                                              for k in sorted({k for f in r["first"] for k in f[1]})},
                "json_kb_per_click_p50": round(float(np.median([c[2] for c in later])) / 1024, 1),
                "json_kb_per_click_max": round(max(c[2] for c in later) / 1024, 1),
                "ccp_clicks_2_to_n_ms_p50": round(pct([c[0] for c in ccp_later], 50), 1),
                "ccp_json_kb_per_click_p50": round(float(np.median([c[2] for c in ccp_later])) / 1024, 1),
                "ccp_stages_ms_p50": {k: round(pct([c[1].get(k, 0.0) for c in ccp_later], 50), 1)
                                      for k in sorted({k for c in ccp_later for k in c[1]})},
                "peak_rss_mb_per_worker": [round(m, 1) for m in (status_mb(p) for p in children(proc.pid)) if m],
                "file_backed_rss_mb_per_worker": [round(m, 1) for m in (status_mb(p, "RssFile")
                                                                        for p in children(proc.pid)) if m],
            }
            out[name] = res
            print(f"## {name} ({roots[name]})\n| click | p50 ms |\n|---|---|", file=sys.stderr)
            for i, v in by_index.items():
                print(f"| {i} | {v} |", file=sys.stderr)
            print(f"clicks 2-{a.clicks}: p50 {res['clicks_2_to_n_ms_p50']} ms, p95 {res['clicks_2_to_n_ms_p95']} ms; "
                  f"stages p50 {res['stages_ms_p50']} (2nd click {res['stages_ms_p50_2nd_click']}, "
                  f"last {res['stages_ms_p50_last_click']}); the 2nd / last click's clicks at once on a fresh task "
                  f"{res['at_once_2_clicks_ms_p50']} / {res['at_once_all_clicks_ms_p50']} ms; first click {res['first_click_ms_p50']} ms "
                  f"{res['first_click_stages_ms_p50']}; JSON {res['json_kb_per_click_p50']} KB per click "
                  f"(max {res['json_kb_per_click_max']}); CCP photo clicks 2-{a.clicks} p50 "
                  f"{res['ccp_clicks_2_to_n_ms_p50']} ms {res['ccp_stages_ms_p50']}, JSON {res['ccp_json_kb_per_click_p50']} KB; "
                  f"peak RSS {res['peak_rss_mb_per_worker']} MB (of it mapped files, shared by all workers: "
                  f"{res['file_backed_rss_mb_per_worker']} MB)", file=sys.stderr)
        print(json.dumps(out))
    finally:
        for proc, _ in backends.values():
            stop(proc)


def crowd_case(a):
    """Three people side by side, zoom on and off back to back; prints a table and one JSON line."""
    from model_training.evaluate import side_by_side
    paths = [os.path.join(CCP, "images", f"{i:04d}.jpg") for i in (2, 3, 4)]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths if os.path.exists(p)]
    if len(photos) < 3:
        photos = [ccp_photo()] * 3
    crowd, _ = next(side_by_side([(p, np.zeros(p.shape[:2], np.uint8)) for p in photos], 3))
    h, w = crowd.shape[:2]
    tmp = tempfile.mkdtemp()
    Image.fromarray(crowd).save(os.path.join(tmp, "crowd.jpg"), quality=95)
    backends = {}
    try:
        for zoom in ("1", "0"):
            backends[zoom] = start_backend(a.checkpoint, {"MODEL_DIR": os.path.join(tmp, "md" + zoom),
                                                          "IHP_LOCAL_ROOT": tmp, "IHP_ZOOM": zoom,
                                                          "IHP_TORCH_THREADS": str(a.threads),
                                                          "IHP_PRECISION": a.precision}, workers=1)
        times = {z: [] for z in backends}
        rng = np.random.default_rng(0)
        for t in range(a.tasks):
            # clicks on the three people in turn (each person's middle third), labels cycling
            cl = [(float(rng.uniform(0.2, 0.8) * h), float((k % 3 + rng.uniform(0.35, 0.65)) * w / 3),
                   PHONE_LABELS[k % len(PHONE_LABELS)]) for k in range(a.clicks)]
            for z, (_, url) in backends.items():
                s = requests.Session()
                for i, (y, x, lab) in enumerate(cl):
                    dt = timed_post(s, url, click_body(3000 + t, "/data/local-files/?d=crowd.jpg", LIP_CONFIG, w, h,
                                                       100 * x / w, 100 * y / h, lab, "bench.crowd"))
                    if i:  # the first click also fetches the photo
                        times[z].append(dt)
        out = {"photo": f"{w}x{h}", "tasks": a.tasks, "clicks_per_task": a.clicks}
        print("| served with | clicks 2-n p50 ms | p95 ms |\n|---|---|---|", file=sys.stderr)
        for z, v in times.items():
            out[f"zoom_{z}"] = {"ms_p50": round(pct(v, 50), 1), "ms_p95": round(pct(v, 95), 1)}
            print(f"| IHP_ZOOM={z} | {out[f'zoom_{z}']['ms_p50']} | {out[f'zoom_{z}']['ms_p95']} |", file=sys.stderr)
        print(json.dumps(out))
    finally:
        for proc, _ in backends.values():
            stop(proc)


def batch_case(a):
    """'Retrieve predictions' as Label Studio sends it: ``--tasks`` CCP val photos (each a file of
    its own, so each is fetched and decoded) in one /predict with no context and the LIP config,
    to one worker; prints seconds per task and how many tasks fit IHP_BATCH_SECONDS' default."""
    ids = [line.split()[0] for line in open(os.path.join(CCP, "val.txt")) if line.strip()][:a.tasks]
    tmp = tempfile.mkdtemp()
    for i in ids:
        os.link(os.path.join(CCP, "images", i + ".jpg"), os.path.join(tmp, i + ".jpg"))
    proc, url = start_backend(a.checkpoint, {"MODEL_DIR": os.path.join(tmp, "md"), "IHP_LOCAL_ROOT": tmp,
                                             "IHP_BATCH_SECONDS": "0"}, workers=1)
    try:
        body = {"tasks": [{"id": k + 1, "data": {"image": f"/data/local-files/?d={i}.jpg"}} for k, i in enumerate(ids)],
                "project": "bench.batch", "label_config": LIP_CONFIG, "params": {"context": None}}
        t0 = time.perf_counter()
        r = requests.post(url + "/predict", json=body, timeout=3600)
        seconds = time.perf_counter() - t0
        r.raise_for_status()
        answered = sum(1 for x in r.json()["results"] if x)
        per = seconds / len(ids)
        budget = Settings().batch_seconds
        out = {"tasks": len(ids), "answered": answered, "seconds": round(seconds, 1),
               "seconds_per_task": round(per, 3), "tasks_within_default_budget": int(budget / per)}
        print(f"'Retrieve predictions' on {len(ids)} CCP photos: {seconds:.1f} s, {per * 1000:.0f} ms per task; "
              f"about {out['tasks_within_default_budget']} tasks per {budget:g} s (IHP_BATCH_SECONDS)", file=sys.stderr)
        print(json.dumps(out))
    finally:
        stop(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("ccp", "12mp", "crowd", "batch"), default="ccp",
                    help="ccp: the CCP-size measurements; 12mp: the phone-photo case (one worker); "
                         "crowd: three people in one photo, zoom on and off (one worker); batch: "
                         "'Retrieve predictions' on --tasks photos in one request (one worker)")
    ap.add_argument("--tasks", type=int, default=5, help="12mp: tasks (photos) per backend")
    ap.add_argument("--baseline-root", help="12mp: a second source tree to serve the same clicks (A/B)")
    ap.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                    help="12mp: the second backend (this tree unless --baseline-root) with this setting, "
                         "e.g. IHP_ASPP_RANK=0 (repeatable)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--clicks", type=int, default=None, help="clicks per task (default 12; 12mp: 10)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None,
                    help="gunicorn workers (default: the backend's, IHP_WORKERS or cores / 4)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per worker, also used in process (default: IHP_TORCH_THREADS or cores / workers)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the forward's compute type, in process and in the backend (IHP_PRECISION)")
    a = ap.parse_args()
    s = Settings.from_env()
    tune_malloc(s.malloc_arenas, s.malloc_keep_mb)  # the in-process numbers run as a served worker does
    if a.case == "12mp":  # the setting: one worker with all cores, ten clicks per task
        a.workers, a.clicks = 1, a.clicks or 10
        a.threads = a.threads or default_torch_threads(1)
        return phone_case(a)
    if a.case == "crowd":
        a.workers, a.clicks = 1, a.clicks or 10
        a.threads = a.threads or default_torch_threads(1)
        return crowd_case(a)
    if a.case == "batch":
        return batch_case(a)
    a.clicks = a.clicks or 12
    a.workers = a.workers or default_workers()
    a.threads = a.threads or default_torch_threads(a.workers)
    torch.set_num_threads(a.threads)  # the in-process numbers use what one worker uses
    parser = Parser.from_file(a.checkpoint, precision=a.precision)
    photo = ccp_photo()
    probe = ForwardProbe(parser, photo)
    hw = probe.hw
    fwd = bench_forward(probe, 20)
    core_probe = ForwardProbe(parser, photo)
    core = bench_core(parser, photo, a.clicks, a.repeats, probe=core_probe)
    rle_s = bench_rle()

    tmp = tempfile.mkdtemp()
    Image.fromarray(photo).save(os.path.join(tmp, "photo.jpg"), quality=95)
    big = np.asarray(Image.fromarray(photo).resize((1024, 1024)))
    Image.fromarray(big).save(os.path.join(tmp, "big.jpg"), quality=95)
    proc, url = start_backend(a.checkpoint, {"MODEL_DIR": os.path.join(tmp, "md"), "IHP_LOCAL_ROOT": tmp,
                                             "IHP_TORCH_THREADS": str(a.threads),
                                             "IHP_PRECISION": a.precision}, workers=a.workers)
    try:
        lip = list(parse_label_config(LIP_CONFIG).labels)
        h, w = photo.shape[:2]
        http_sequence(url, "/data/local-files/?d=photo.jpg", w, h, lip, 2, 999)  # warm both caches
        http_probe = ForwardProbe(parser, photo)
        stages = []
        e2e = sum((http_sequence(url, "/data/local-files/?d=photo.jpg", w, h, lip, a.clicks, t, probe=http_probe,
                                 stages=stages) for t in range(a.repeats)), [])
        e2e_big = sum((http_sequence(url, "/data/local-files/?d=big.jpg", 1024, 1024, lip, a.clicks, 100 + t)
                       for t in range(a.repeats)), [])
        # throughput: 4 concurrent clients
        done = []
        t0 = time.perf_counter()

        def client(i):
            done.extend(http_sequence(url, "/data/local-files/?d=photo.jpg", w, h, lip, a.clicks, 200 + i))

        th = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        [t.start() for t in th]
        [t.join() for t in th]
        thr = len(done) / (time.perf_counter() - t0)
        rss = [status_mb(p) for p in children(proc.pid)]
    finally:
        stop(proc)
    fm = pct(fwd + core_probe.samples + http_probe.samples, 50)
    res = {
        "checkpoint": os.path.relpath(a.checkpoint, ROOT), "model_version": parser.model_version,
        "serving_hw": list(hw), "precision": parser.precision,
        "workers": a.workers, "torch_threads_per_worker": a.threads,
        "forward_ms_p50": round(fm, 1), "core_ms_p50": round(pct(core, 50), 1),
        "http_ccp_ms_p50": round(pct(e2e, 50), 1), "http_ccp_ms_p95": round(pct(e2e, 95), 1),
        "http_1024_20labels_ms_p50": round(pct(e2e_big, 50), 1),
        "http_1024_20labels_ms_p95": round(pct(e2e_big, 95), 1),
        "rle_1024_20classes_ms": round(rle_s * 1000, 1),
        # each ratio over the forward samples taken between its own requests (same machine state)
        "ratio_core_over_forward": round(pct(core, 50) / pct(core_probe.samples, 50), 2),
        "ratio_http_over_forward": round(pct(e2e, 50) / pct(http_probe.samples, 50), 2),
        # the same, paired within each request: its wall time over the forward the worker ran for it
        "ratio_http_over_worker_forward": round(float(np.median([e / st["forward"] for e, st in zip(e2e, stages)])), 2),
        "worker_stages_ms_p50": {k: round(pct([st.get(k, 0.0) for st in stages], 50), 1) for k in stages[0]},
        "forward_ms_p50_between_core": round(pct(core_probe.samples, 50), 1),
        "forward_ms_p50_between_http": round(pct(http_probe.samples, 50), 1),
        "peak_rss_mb_per_worker": [round(r, 1) for r in rss if r],
        "throughput_req_per_s_4_clients": round(thr, 2),
    }
    rows = [("bare forward (batch 1, %dx%d), all samples" % tuple(hw), res["forward_ms_p50"], None),
            ("core pipeline, CCP photo", res["core_ms_p50"], None),
            ("HTTP, CCP photo, LIP config", res["http_ccp_ms_p50"], res["http_ccp_ms_p95"]),
            ("HTTP, 1024x1024, 20 labels", res["http_1024_20labels_ms_p50"], res["http_1024_20labels_ms_p95"]),
            ("RLE, 1024x1024, 20 classes (total)", res["rle_1024_20classes_ms"], None)]
    print("| measurement | p50 ms | p95 ms |\n|---|---|---|", file=sys.stderr)
    for name, p50, p95 in rows:
        print(f"| {name} | {p50} | {'' if p95 is None else p95} |", file=sys.stderr)
    print(f"ratios (forward timed between the requests: {res['forward_ms_p50_between_core']} ms between core calls, "
          f"{res['forward_ms_p50_between_http']} ms between HTTP calls): "
          f"core/forward {res['ratio_core_over_forward']}, http/forward {res['ratio_http_over_forward']}, "
          f"http/(the worker's forward in the same request) {res['ratio_http_over_worker_forward']}; "
          f"worker stages p50 ms {res['worker_stages_ms_p50']}; "
          f"peak RSS per worker {res['peak_rss_mb_per_worker']} MB; "
          f"throughput {res['throughput_req_per_s_4_clients']} req/s", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
