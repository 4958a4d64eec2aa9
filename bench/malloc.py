"""glibc malloc settings of a served worker, A/B/C back to back: a live gunicorn (one worker, as
on a 2-core box) per setting, ``IHP_MALLOC_ARENAS`` / ``IHP_MALLOC_KEEP_MB`` (``core.allocator``),
the settings taking turns ``--rounds`` times. Each run sends the bench's clicks one at a time
(as Label Studio does) on the CCP photo and on its 5x enlargement (12 MP), reads the worker's
minor page faults (``/proc/<pid>/stat``) around every request and its peak RSS at the end.
Prints per setting the medians over all clicks after the first two of each task: the request's
``app`` and ``forward`` stages (Server-Timing) and the page faults per click.

    .venv/bin/python bench/malloc.py [--rounds 4] [--clicks 12] [--settings 2,0 1,256 2,256]

Not a test: absolute numbers drift on shared machines; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import requests
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.latency import (LIP_CONFIG, PHONE_LABELS, ccp_photo, children, click_body, clicks_for, phone_photo,  # noqa: E402
                           server_timing, start_backend, status_mb)
from bench.live_backend import stop  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT  # noqa: E402


def minor_faults(pid: int) -> int:
    """Field 10 (minflt) of /proc/<pid>/stat."""
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])


def one_run(setting: str, tmp: str, photos: dict, clicks: int, task: int, checkpoint: str) -> dict:
    arenas, keep = setting.split(",")
    proc, url = start_backend(checkpoint, {"MODEL_DIR": os.path.join(tmp, f"md{task}"), "IHP_LOCAL_ROOT": tmp,
                                           "IHP_MALLOC_ARENAS": arenas, "IHP_MALLOC_KEEP_MB": keep}, workers=1)
    out = {}
    try:
        pid = children(proc.pid)[0]
        s = requests.Session()
        for name, (ref, (h, w)) in photos.items():
            rows = []
            for i, (y, x, lab) in enumerate(clicks_for(h, w, clicks, PHONE_LABELS, task)):
                f0 = minor_faults(pid)
                r = s.post(url + "/predict", json=click_body(task, f"/data/local-files/?d={ref}", LIP_CONFIG, w, h,
                                                             100 * x / w, 100 * y / h, lab, "bench.malloc"), timeout=120)
                r.raise_for_status()
                st = server_timing(r.headers.get("Server-Timing", ""))
                if i >= 2:  # the first click fetches and decodes, the second still warms buffers
                    rows.append((1000 * st["app"], 1000 * st["forward"], minor_faults(pid) - f0))
            out[name] = rows
        out["peak_rss_mb"] = status_mb(pid)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clicks", type=int, default=12)
    ap.add_argument("--settings", nargs="+", default=["2,0", "1,256", "2,256"],
                    help="ARENAS,KEEP_MB pairs (2,0: glibc's thresholds with the arena cap, as before)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    photo = ccp_photo()
    big = phone_photo(photo)
    Image.fromarray(photo).save(os.path.join(tmp, "photo.jpg"), quality=95)
    Image.fromarray(big).save(os.path.join(tmp, "phone.jpg"), quality=92)
    photos = {"ccp": ("photo.jpg", photo.shape[:2]), "12mp": ("phone.jpg", big.shape[:2])}
    runs: dict[str, list[dict]] = {s: [] for s in a.settings}
    task = 0
    for r in range(a.rounds):
        order = a.settings if r % 2 == 0 else a.settings[::-1]
        for setting in order:
            task += 1
            runs[setting].append(one_run(setting, tmp, photos, a.clicks, task, a.checkpoint))
            print(f"round {r + 1} {setting}: peak RSS {runs[setting][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    summary = {}
    print("| IHP_MALLOC_ARENAS,KEEP_MB | case | app p50 ms | forward p50 ms | faults per click p50 / max | peak RSS MB |\n"
          "|---|---|---|---|---|---|", file=sys.stderr)
    for setting, rs in runs.items():
        summary[setting] = {"peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in rs), 1)}
        for name in photos:
            rows = [row for x in rs for row in x[name]]
            summary[setting][name] = {"app_ms_p50": round(statistics.median(v[0] for v in rows), 1),
                                      "forward_ms_p50": round(statistics.median(v[1] for v in rows), 1),
                                      "faults_per_click_p50": int(statistics.median(v[2] for v in rows)),
                                      "faults_per_click_max": int(max(v[2] for v in rows)), "clicks": len(rows)}
            m = summary[setting][name]
            print(f"| {setting} | {name} | {m['app_ms_p50']} | {m['forward_ms_p50']} | {m['faults_per_click_p50']} / "
                  f"{m['faults_per_click_max']} | {summary[setting]['peak_rss_mb']} |", file=sys.stderr)
    print(json.dumps({"rounds": a.rounds, "clicks_per_task": a.clicks, "by_setting": summary}))


if __name__ == "__main__":
    main()
