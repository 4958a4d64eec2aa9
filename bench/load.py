"""Load and fault run: N clients send interactive clicks to a live gunicorn (2 workers), or to
several replicas that share one Redis (``--replicas 2``: one worker each, clicks of a task
alternate between them, as behind a round-robin proxy).

    .venv/bin/python bench/load.py [--clients 10] [--seconds 120] [--kill-worker]
    .venv/bin/python bench/load.py --replicas 2 --clients 20 --seconds 120

Each client loops over fresh tasks of a CCP photo, sending single-click /predict requests as
Label Studio does. Reports requests, errors, p50/p95 latency and the workers' RSS at the start,
every 10 s and at the end (growth in the second half shows whether it is bounded), and with ``--kill-worker`` SIGKILLs one worker mid-run and checks
that gunicorn replaced it and that click histories survived. Traffic goes to 127.0.0.1 only;
the run stops by itself.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.latency import ROOT, ccp_photo, children, click_body, start_backend, status_mb  # noqa: E402
from bench.live_backend import free_port, start_redis, stop as stop_backend, stop_redis  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--kill-worker", action="store_true")
    ap.add_argument("--replicas", type=int, default=1,
                    help="backend replicas sharing one Redis (redis-server on loopback), one worker each")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    photo = ccp_photo()
    Image.fromarray(photo).save(os.path.join(tmp, "photo.jpg"), quality=95)
    md = os.path.join(tmp, "md")
    env = {"MODEL_DIR": md, "IHP_LOCAL_ROOT": tmp}
    redis_proc = None
    if a.replicas > 1:
        port = free_port()
        redis_proc = start_redis(tmp, port)
        env.update({"IHP_REDIS_URL": f"redis://127.0.0.1:{port}/0", "IHP_PRECISION": "float32"})
        backends = [start_backend(a.checkpoint, env, workers=1, threads=4) for _ in range(a.replicas)]
    else:
        backends = [start_backend(a.checkpoint, env, threads=4)]
    proc, url = backends[0]
    urls = [u for _, u in backends]
    h, w = photo.shape[:2]
    labels = ["Hair", "Face", "UpperClothes", "Pants", "Left-arm", "Right-arm", "Left-shoe", "Right-shoe"]
    cfg = open(os.path.join(ROOT, "label_config.xml")).read()
    lat, errors, sent = [], [], [0]
    per_replica: dict[str, list] = {u: [] for u in urls}
    lock = threading.Lock()
    try:
        rss_start = {p: status_mb(p, "VmRSS") for p in children(proc.pid)}
        stop = time.time() + a.seconds

        def client(i):
            s = requests.Session()
            rng = np.random.default_rng(i)
            task = 0
            while time.time() < stop:
                task += 1
                for k in range(6):
                    if time.time() >= stop:
                        return
                    body = click_body(i * 100000 + task, "/data/local-files/?d=photo.jpg", cfg, w, h,
                                      float(rng.uniform(30, 70)), float(rng.uniform(10, 90)),
                                      labels[k % len(labels)], "load.1")
                    t = time.perf_counter()
                    target = urls[(task * 6 + k) % len(urls)]  # a task's clicks alternate replicas
                    try:
                        r = s.post(target + "/predict", json=body, timeout=30)
                        ok = r.status_code == 200
                        err = None if ok else f"{r.status_code} {r.text[:100]}"
                    except requests.RequestException as e:
                        err = f"{type(e).__name__}"
                    with lock:
                        sent[0] += 1
                        lat.append(time.perf_counter() - t)
                        per_replica[target].append(lat[-1])
                        if err:
                            errors.append(err)

        timeline = []  # (seconds since start, largest worker RSS in MB), every 10 s

        def sample_rss():
            t0 = time.time()
            while time.time() < stop:
                rss = [status_mb(p, "VmRSS") for p in children(proc.pid)]
                timeline.append((round(time.time() - t0), round(max([r for r in rss if r] or [0]), 1)))
                time.sleep(10)

        th = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        th.append(threading.Thread(target=sample_rss))
        [t.start() for t in th]
        killed = None
        if a.kill_worker:
            time.sleep(a.seconds / 3)
            killed = children(proc.pid)[0]
            os.kill(killed, signal.SIGKILL)
        [t.join() for t in th]
        workers_end = children(proc.pid)
        rss_end = {p: status_mb(p, "VmRSS") for p in workers_end}
        histories = None
        if redis_proc is None:
            db = sqlite3.connect(os.path.join(md, "state.db"))
            histories = db.execute("SELECT COUNT(*) FROM clicks").fetchone()[0]
        identical = same_masks_on_every_replica(urls, cfg, w, h) if len(urls) > 1 else None
    finally:
        for p, _ in backends:
            stop_backend(p)
        if redis_proc is not None:
            stop_redis(redis_proc)
    res = {"clients": a.clients, "seconds": a.seconds, "requests": sent[0], "errors": len(errors),
           "error_samples": errors[:5], "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
           "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1),
           "throughput_req_s": round(sent[0] / a.seconds, 2),
           "rss_mb_start": [round(v, 1) for v in rss_start.values() if v],
           "rss_mb_end": [round(v, 1) for v in rss_end.values() if v],
           "rss_timeline_max_worker_mb": timeline,
           "rss_growth_second_half_mb": round(max(v for _, v in timeline[len(timeline) // 2:])
                                              - timeline[len(timeline) // 2][1], 1) if len(timeline) > 1 else None,
           "killed_worker": killed, "workers_at_end": len(workers_end), "task_histories_stored": histories,
           "replicas": len(urls),
           "per_replica": [{"requests": len(v), "p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
                            "p95_ms": round(float(np.percentile(v, 95)) * 1000, 1)} for v in per_replica.values() if v],
           "identical_masks_whichever_replica": identical}
    print(json.dumps(res))


def same_masks_on_every_replica(urls, cfg, w, h, n_clicks: int = 6) -> bool:
    """One click sequence on a task sent to the first replica only, and on another task
    alternating over all: the answers must be identical, click by click."""
    labels = ["Hair", "UpperClothes", "Pants", "Face", "Left-arm", "Hair"]
    rng = np.random.default_rng(123)
    pts = [(float(rng.uniform(30, 70)), float(rng.uniform(10, 90))) for _ in range(n_clicks)]
    answers = []
    # task ids no load client uses (clients use i * 100000 + n), in a project of their own
    for task, route in ((10**9 + 1, [urls[0]] * n_clicks), (10**9 + 2, [urls[i % len(urls)] for i in range(n_clicks)])):
        seq = []
        for (x, y), lab, u in zip(pts, labels, route):
            body = click_body(task, "/data/local-files/?d=photo.jpg", cfg, w, h, x, y, lab, "identity.1")
            r = requests.post(u + "/predict", json=body, timeout=30)
            r.raise_for_status()
            seq.append([(x["value"].get("brushlabels"), x["value"].get("rle")) for x in r.json()["results"][0]["result"]
                        if x.get("type") == "brushlabels"])
        answers.append(seq)
    return answers[0] == answers[1]


if __name__ == "__main__":
    main()
