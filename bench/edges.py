"""What the edge refiner costs per click, in process: ``Parser.parse`` on the bench's CCP photo and
on its 5x enlargement (11 MP), five clicks, with and without ``--edge-refiner``, interleaved in
random order; medians (ms). Not a test: compare the two columns of one run.

    .venv/bin/python bench/edges.py [--edge-refiner ihp_backend/models/edge_refiner.pt] [--rounds 8]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.latency import ccp_photo, phone_photo  # noqa: E402
from ihp_backend.core.inference import Parser  # noqa: E402
from ihp_backend.core.options import ParserOptions  # noqa: E402
from ihp_backend.settings import DEFAULT_CHECKPOINT, SHIPPED_EDGE_REFINER  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--edge-refiner", default=SHIPPED_EDGE_REFINER)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    opts = ParserOptions(threads=a.threads).parser_kwargs()
    parsers = {"without": Parser.from_file(a.checkpoint, **opts),
               "with": Parser.from_file(a.checkpoint, **dict(opts, edge_refiner=a.edge_refiner))}
    for p in parsers.values():
        p.warm_up()
    for name, image in (("CCP size", ccp_photo()), ("12 MP", phone_photo(ccp_photo()))):
        h, w = image.shape[:2]
        rng = np.random.default_rng(0)
        clicks = np.array([(rng.uniform(.2 * h, .8 * h), rng.uniform(.3 * w, .7 * w), 1 + i % 5) for i in range(5)])
        times = {k: [] for k in parsers}
        for r in range(a.rounds + 1):
            for k in random.sample(list(parsers), len(parsers)):
                p = parsers[k]
                t = time.perf_counter()
                p.parse(image, clicks, allowed_slots=[0, 1, 2, 3, 4, 5, p.unclaimed])
                if r:
                    times[k].append((time.perf_counter() - t) * 1000)
        print(f"{name} ({w}x{h}): " + ", ".join(f"{k} refiner {np.median(v):.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
    main()
