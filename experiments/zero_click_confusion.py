"""Issue 31: what the zero-click parse confuses. The served zero-click parse (LIP-20, no click) of
the first ``--limit`` CCP train photos (the 63 the context heads were chosen on), as a confusion
matrix: left/right swaps of arms, legs and shoes, then each class's three most frequent answers.

    PYTHONPATH=. .venv/bin/python experiments/zero_click_confusion.py [--limit 63] [--checkpoint PATH]

About 40 s on 2 cores.
"""
import argparse
import os

import numpy as np

from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions
from model_training.evaluate import CorePredictor, confusion, iou_per_class, miou
from model_training.pose_labels import ccp_parts

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.environ.get("IHP_SHARED_DIR", os.path.join(ROOT, "..", "shared"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=63)
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "ihp_backend/models/default.pt"))
    a = ap.parse_args()
    ds = ccp_parts(f"{SHARED}/data/ccp", os.path.join(ROOT, "data/ccp_parts"), "train", "lip20")
    parser = Parser.from_file(a.checkpoint, **ParserOptions(precision="float32").parser_kwargs())
    zero = CorePredictor(parser, ds.classes, zero_click=True)
    names, n = ds.classes, len(ds.classes)
    conf = np.zeros((n, n), np.int64)
    for i in range(min(a.limit, len(ds))):
        img, gt = ds.load(i)
        conf += confusion(gt, zero(img, np.zeros((0, 3))), n)
    print(f"mIoU {100 * miou(conf):.2f}%")
    for left, right in (("Left-arm", "Right-arm"), ("Left-leg", "Right-leg"), ("Left-shoe", "Right-shoe")):
        i, j = names.index(left), names.index(right)
        print(f"{left}: {conf[i, j] / max(1, conf[i].sum()):.2f} named {right}; "
              f"{right}: {conf[j, i] / max(1, conf[j].sum()):.2f} named {left}")
    iou, total = iou_per_class(conf), conf.sum(1)
    for k in np.argsort(-total):
        if total[k]:
            top = np.argsort(-conf[k])[:3]
            print(f"{names[k]:12s} IoU {iou[k]:.2f} ->", ", ".join(f"{names[t]} {conf[k, t] / total[k]:.2f}" for t in top))


if __name__ == "__main__":
    main()
