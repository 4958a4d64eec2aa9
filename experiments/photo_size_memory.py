"""How a process's memory grows with the number of distinct photo sizes it parses (docs/performance.md,
"Memory that grew with every click's shapes"): one click on each of ``--photos`` random photos of
random sizes (multiples of 16), RSS growth printed every 10; with ``--no-photo-cache`` the
Parser's per-photo caches are emptied after every parse, so what remains is the allocator's and
oneDNN's (every new conv input shape builds primitives, kept in a cache of
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` entries, 1024 by default). Then (``--steady``) the served
parse of the bench's CCP photo and of three of them side by side (zoom crops), repeated: the
median ms per click, to see whether a smaller primitive cache costs time.

    ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 PYTHONPATH=. .venv/bin/python experiments/photo_size_memory.py [--no-photo-cache] [--steady]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bench.latency import ccp_photo, status_mb
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions
from ihp_backend.settings import DEFAULT_CHECKPOINT


def rss_mb() -> float:
    return status_mb(os.getpid(), "VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--no-photo-cache", action="store_true")
    ap.add_argument("--steady", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(2)
    cap = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default")
    parser = Parser.from_file(DEFAULT_CHECKPOINT, **ParserOptions().parser_kwargs())
    rng = np.random.default_rng(0)
    if a.steady:
        img = ccp_photo()
        for name, im in (("CCP photo", img), ("three people", np.concatenate([img, img[:, ::-1], img], 1))):
            h, w = im.shape[:2]
            clicks = np.array([(rng.uniform(.3, .7) * h, rng.uniform(.1, .9) * w, i % 4) for i in range(6)])
            times, prev = [], None
            for k in range(12):
                t = time.perf_counter()
                res = parser.parse(im, clicks[:1 + k % 6], allowed_slots=[0, 1, 2, 3, parser.unclaimed], prev_mask=prev)
                times.append(time.perf_counter() - t)
                prev = res.network_labels
            print(f"capacity {cap}, {name}: {1000 * np.median(times[2:]):.1f} ms per click (median of 10)")
        return
    first = (rng.random((830, 550, 3)) * 255).astype(np.uint8)
    for _ in range(3):
        parser.parse(first, np.array([[400.0, 275.0, 0]]), allowed_slots=[0, parser.unclaimed])
    start = rss_mb()
    for i in range(1, a.photos + 1):
        h, w = 300 + 16 * int(rng.integers(0, 40)), 200 + 16 * int(rng.integers(0, 30))
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        parser.parse(img, np.array([[h / 2, w / 2, 0]]), allowed_slots=[0, parser.unclaimed])
        if a.no_photo_cache:
            parser._resized.clear()
            parser._crops.clear()
        if i % 10 == 0:
            print(f"capacity {cap}: after {i} photo sizes RSS +{rss_mb() - start:.1f} MB")


if __name__ == "__main__":
    main()
