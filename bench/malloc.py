"""Memory allocator settings of a served worker, A/B/C back to back: a live gunicorn (one worker,
as on a 2-core box) per setting, ``IHP_MALLOC_ARENAS`` / ``IHP_MALLOC_KEEP_MB`` (glibc,
``core.allocator``) or jemalloc (``IHP_ALLOCATOR``, scripts/serve.sh), the settings taking turns
``--rounds`` times. Each run sends the bench's clicks one at a time (as Label Studio does) on the
CCP photo and on its 5x enlargement (12 MP), reads the worker's minor page faults
(``/proc/<pid>/stat``) around every request; then one click on each of ``--sizes`` photos of
distinct sizes (every new network input shape leaves oneDNN primitives and freed blocks behind),
the worker's resident size read before and after them, and its peak RSS at the end.
Prints per setting the medians over all clicks after the first two of each task: the request's
``app`` and ``forward`` stages (Server-Timing) and the page faults per click.

    .venv/bin/python bench/malloc.py [--rounds 4] [--clicks 12] [--pause 0] [--sizes 30] [--settings 2,256 jemalloc]

Not a test: absolute numbers drift on shared machines; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import requests
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.latency import (LIP_CONFIG, PHONE_LABELS, ccp_photo, children, click_body, clicks_for, phone_photo,  # noqa: E402
                           server_timing, start_backend, status_mb)
from bench.live_backend import stop  # noqa: E402
from ihp_backend.core.allocator import JEMALLOC_CONF, jemalloc_library  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT  # noqa: E402


def minor_faults(pid: int) -> int:
    """Field 10 (minflt) of /proc/<pid>/stat."""
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])


def setting_env(setting: str) -> dict:
    """``ARENAS,KEEP_MB`` (glibc, tuned by ``core.allocator``) or ``jemalloc[=MALLOC_CONF]`` -> the
    worker's env (``jemalloc`` alone: the backend's ``MALLOC_CONF``; ``jemalloc=``: jemalloc's own defaults)."""
    if setting.startswith("jemalloc"):
        lib = jemalloc_library()
        if lib is None:
            raise SystemExit("no libjemalloc.so.2 here (Debian: apt-get install libjemalloc2)")
        conf = setting.split("=", 1)[1] if "=" in setting else JEMALLOC_CONF
        return {"IHP_ALLOCATOR": "jemalloc", "LD_PRELOAD": lib, "MALLOC_CONF": conf}
    arenas, keep = setting.split(",")
    return {"IHP_ALLOCATOR": "glibc", "IHP_MALLOC_ARENAS": arenas, "IHP_MALLOC_KEEP_MB": keep}


def one_run(setting: str, tmp: str, photos: dict, sized: list, clicks: int, task: int, checkpoint: str,
            pause: float = 0.0) -> dict:
    proc, url = start_backend(checkpoint, dict({"MODEL_DIR": os.path.join(tmp, f"md{task}"), "IHP_LOCAL_ROOT": tmp},
                                               **setting_env(setting)), workers=1)
    out = {}
    try:
        pid = children(proc.pid)[0]
        s = requests.Session()
        for name, (ref, (h, w)) in photos.items():
            rows = []
            for i, (y, x, lab) in enumerate(clicks_for(h, w, clicks, PHONE_LABELS, task)):
                time.sleep(pause)
                f0 = minor_faults(pid)
                r = s.post(url + "/predict", json=click_body(task, f"/data/local-files/?d={ref}", LIP_CONFIG, w, h,
                                                             100 * x / w, 100 * y / h, lab, "bench.malloc"), timeout=120)
                r.raise_for_status()
                st = server_timing(r.headers.get("Server-Timing", ""))
                if i >= 2:  # the first click fetches and decodes, the second still warms buffers
                    rows.append((1000 * st["app"], 1000 * st["forward"], minor_faults(pid) - f0))
            out[name] = rows
        before = status_mb(pid, "VmRSS")
        for i, (ref, (h, w)) in enumerate(sized):
            r = s.post(url + "/predict", json=click_body(task, f"/data/local-files/?d={ref}", LIP_CONFIG, w, h,
                                                         50, 45, PHONE_LABELS[i % len(PHONE_LABELS)], "bench.malloc"),
                       timeout=120)
            r.raise_for_status()
        out["sizes_growth_mb"] = status_mb(pid, "VmRSS") - before
        out["peak_rss_mb"] = status_mb(pid)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clicks", type=int, default=12)
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds between clicks (an annotator's pace: an allocator may give pages back meanwhile)")
    ap.add_argument("--sizes", type=int, default=30, help="photos of distinct sizes, one click each, after the clicks")
    ap.add_argument("--settings", nargs="+", default=["2,256", "jemalloc"],
                    help="ARENAS,KEEP_MB pairs for glibc (2,0: glibc's thresholds with the arena cap) or jemalloc "
                         "(the backend's MALLOC_CONF, core.allocator.JEMALLOC_CONF), jemalloc=CONF (another MALLOC_CONF)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    photo = ccp_photo()
    big = phone_photo(photo)
    Image.fromarray(photo).save(os.path.join(tmp, "photo.jpg"), quality=95)
    Image.fromarray(big).save(os.path.join(tmp, "phone.jpg"), quality=92)
    photos = {"ccp": ("photo.jpg", photo.shape[:2]), "12mp": ("phone.jpg", big.shape[:2])}
    rng = np.random.default_rng(0)
    sized = []
    for i in range(a.sizes):  # distinct sizes and aspect ratios, so distinct network input shapes
        h, w = 500 + 16 * int(rng.integers(0, 60)), 350 + 16 * int(rng.integers(0, 50))
        Image.fromarray(photo).resize((w, h), Image.BILINEAR).save(os.path.join(tmp, f"size{i}.jpg"), quality=90)
        sized.append((f"size{i}.jpg", (h, w)))
    runs: dict[str, list[dict]] = {s: [] for s in a.settings}
    task = 0
    for r in range(a.rounds):
        order = a.settings if r % 2 == 0 else a.settings[::-1]
        for setting in order:
            task += 1
            runs[setting].append(one_run(setting, tmp, photos, sized, a.clicks, task, a.checkpoint, a.pause))
            print(f"round {r + 1} {setting}: peak RSS {runs[setting][-1]['peak_rss_mb']:.0f} MB, "
                  f"{a.sizes} photo sizes +{runs[setting][-1]['sizes_growth_mb']:.0f} MB", file=sys.stderr)
    summary = {}
    print("| allocator setting | case | app p50 ms | forward p50 ms | faults per click p50 / max | peak RSS MB "
          "| RSS growth over the photo sizes MB |\n|---|---|---|---|---|---|---|", file=sys.stderr)
    for setting, rs in runs.items():
        summary[setting] = {"peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in rs), 1),
                            "sizes_growth_mb": round(statistics.median(x["sizes_growth_mb"] for x in rs), 1)}
        for name in photos:
            rows = [row for x in rs for row in x[name]]
            summary[setting][name] = {"app_ms_p50": round(statistics.median(v[0] for v in rows), 1),
                                      "forward_ms_p50": round(statistics.median(v[1] for v in rows), 1),
                                      "faults_per_click_p50": int(statistics.median(v[2] for v in rows)),
                                      "faults_per_click_max": int(max(v[2] for v in rows)), "clicks": len(rows)}
            m = summary[setting][name]
            print(f"| {setting} | {name} | {m['app_ms_p50']} | {m['forward_ms_p50']} | {m['faults_per_click_p50']} / "
                  f"{m['faults_per_click_max']} | {summary[setting]['peak_rss_mb']} | {summary[setting]['sizes_growth_mb']} |",
                  file=sys.stderr)
    print(json.dumps({"rounds": a.rounds, "clicks_per_task": a.clicks, "pause_s": a.pause, "photo_sizes": a.sizes, "by_setting": summary}))


if __name__ == "__main__":
    main()
