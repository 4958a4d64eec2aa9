"""How much of the 4x boundary F1 the network's pixel grid allows (docs/experiments.md, "The edge
refiner"): the true labels of CCP train photos reduced to the network size (nearest) and enlarged
back to 4x, and the true labels shifted by one and by two photo pixels, each scored against the
true labels at 4x (boundary F1 within 5 px, as ``model_training.evaluate --upscale 4``).

    .venv/bin/python experiments/edge_f1_ceiling.py [--photos 30]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ihp_backend.core.inference import network_size  # noqa: E402
from ihp_backend.core.refine import nearest_resize  # noqa: E402
from model_training.datasets import ccp  # noqa: E402
from model_training.evaluate import boundary_f1_counts, f1_from_counts  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(ROOT), "shared", "data", "ccp"))
    ap.add_argument("--photos", type=int, default=30)
    ap.add_argument("--side", type=int, default=576)
    a = ap.parse_args()
    ds = ccp(a.data, "train", "ccp12")
    counts = {k: np.zeros(4, np.int64) for k in ("network grid", "shifted 1 px", "shifted 2 px")}
    for i in range(a.photos):
        _, gt = ds.load(i)
        gt = gt.astype(np.int32)
        h, w = gt.shape
        big = nearest_resize(gt, (4 * h, 4 * w))
        small = nearest_resize(gt, network_size((h, w), a.side))
        counts["network grid"] += boundary_f1_counts(big, nearest_resize(small, (4 * h, 4 * w)))
        for s in (1, 2):
            counts[f"shifted {s} px"] += boundary_f1_counts(big, nearest_resize(np.roll(gt, s, axis=1), (4 * h, 4 * w)))
    for k, c in counts.items():
        print(f"{k}: boundary F1 at 4x {100 * f1_from_counts(c):.1f}%")


if __name__ == "__main__":
    main()
