"""What the evaluation's correction clicks achieve (issue 31: LIP-20 reaches 84.3% after 20
corrections on CCP val, 85% asked). On CCP *train* photos in the pose-derived LIP-20 labels,
served options, the paper's protocol: for every correction, the size of the error region it
targets, the true and the predicted class there, and the share of that region right after the
click; at the end the per-class IoU at k = 0, 10 and 20.

    PYTHONPATH=. .venv/bin/python experiments/correction_effect.py [--limit 40] [--corrections 20]

Not a test; a diagnostic (no choice on val).
"""
from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from ihp_backend.core.allocator import tune_malloc
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions
from model_training import click_simulation as cs
from model_training.datasets import open_dataset
from model_training.evaluate import CorePredictor, confusion, iou_per_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--corrections", type=int, default=20)
    ap.add_argument("--click-radius", type=float, default=ParserOptions.click_radius)
    a = ap.parse_args()
    tune_malloc(keep_mb=256)
    ds = open_dataset("ccp-parts:lip20", "../shared/data/ccp", "train", None, parts="data/ccp_parts")
    parser = Parser.from_file(a.checkpoint, **ParserOptions(precision="float32", click_radius=a.click_radius).parser_kwargs())
    pred_fn = CorePredictor(parser, ds.classes)
    n, K = len(ds.classes), a.corrections
    conf = np.zeros((K + 1, n, n), np.int64)
    fixed_share, by_pair = [], collections.defaultdict(list)
    for i in range(min(a.limit, len(ds))):
        image, gt = ds.load(i)
        gt = gt.astype(np.int64)
        rng = np.random.default_rng((0, i))
        clicks = np.array(cs.central_clicks(np.where(gt < n, gt, 0), rng, 0, 1, 5), np.float64).reshape(-1, 3)
        pred = pred_fn(image, clicks)
        conf[0] += confusion(gt, pred, n)
        for k in range(1, K + 1):
            region = cs.largest_error_region(gt, pred)
            c = cs.correction_click(gt, pred)
            if c is None:
                conf[k] += confusion(gt, pred, n)
                continue
            was = int(pred[c[0], c[1]])
            clicks = np.vstack([clicks, np.array([c], np.float64)])
            pred = pred_fn(image, clicks, pred)
            share = float((pred[region] == gt[region]).mean())
            fixed_share.append((int(region.sum()), share))
            by_pair[(ds.classes[c[2]], ds.classes[was])].append(share)
            conf[k] += confusion(gt, pred, n)
    iou = {k: iou_per_class(conf[k]) for k in (0, K // 2, K)}
    print("| class | IoU k=0 | k=%d | k=%d |\n|---|---|---|---|" % (K // 2, K))
    for j, name in enumerate(ds.classes):
        print(f"| {name} | " + " | ".join(f"{100 * iou[k][j]:.1f}" for k in iou) + " |")
    print("mIoU", {k: round(100 * float(np.nanmean(v)), 2) for k, v in iou.items()})
    shares = np.array([s for _, s in fixed_share])
    areas = np.array([ar for ar, _ in fixed_share])
    print(f"corrections: {len(shares)}; region fixed share p25 / p50 / p75: "
          f"{np.percentile(shares, 25):.2f} / {np.median(shares):.2f} / {np.percentile(shares, 75):.2f}; "
          f"fixed < 0.5: {(shares < 0.5).mean():.2f} (their regions' median area {np.median(areas[shares < 0.5]) if (shares < 0.5).any() else 0:.0f} px)")
    worst = sorted(((np.mean(v), len(v), k) for k, v in by_pair.items() if len(v) >= 5))[:12]
    print("least fixed (true <- predicted): " + json.dumps([(f"{t} <- {p}", round(m, 2), c) for m, c, (t, p) in worst]))


if __name__ == "__main__":
    main()
