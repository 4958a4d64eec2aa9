"""How much mIoU the network's output grid alone can cost: the ground truth itself, as one-hot
class planes, area-downsampled to the decoder's grid (stride 4 of the serving size by default),
bilinearly upsampled back to the photo and arg-maxed. A perfect network at that grid scores this.

    .venv/bin/python experiments/grid_ceiling.py --data ../shared/data/ccp --kind ccp --split val \
        --merge ccp12 --sides 416 544 576 --strides 4 2 --every 2

Prints one line per (side, stride): data-set mIoU and per-class IoU.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ihp_backend.core.inference import network_size  # noqa: E402
from model_training.datasets import open_dataset  # noqa: E402
from model_training.evaluate import confusion, iou_per_class, miou  # noqa: E402


def grid_roundtrip(label: np.ndarray, num_classes: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """``label`` (H, W) class indices -> the labels a perfect network at ``grid_hw`` yields."""
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[label]).permute(2, 0, 1)[None]
    small = F.interpolate(onehot, size=grid_hw, mode="area")
    up = F.interpolate(small, size=label.shape, mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--kind", default="ccp")
    ap.add_argument("--split", default="val")
    ap.add_argument("--merge", default=None)
    ap.add_argument("--sides", type=int, nargs="+", default=[416, 544])
    ap.add_argument("--strides", type=int, nargs="+", default=[4])
    ap.add_argument("--every", type=int, default=1, help="use every n-th image")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = open_dataset(a.kind, a.data, a.split, a.merge)
    n_cls = len(ds.classes)
    labels = [ds.load(i)[1] for i in range(0, len(ds), a.every)]
    for side in a.sides:
        for stride in a.strides:
            conf = np.zeros((n_cls, n_cls), np.int64)
            for lab in labels:
                h, w = network_size(lab.shape, side)
                conf += confusion(lab, grid_roundtrip(lab, n_cls, (h // stride, w // stride)), n_cls)
            iou = iou_per_class(conf)
            per_class = ", ".join(f"{n} {v:.1%}" for n, v in zip(ds.classes, iou) if not np.isnan(v))
            print(f"side {side} stride {stride}: mIoU {miou(conf):.1%} over {len(labels)} images "
                  f"({per_class})")


if __name__ == "__main__":
    main()
