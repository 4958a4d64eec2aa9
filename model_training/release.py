"""Turn a training checkpoint into a shippable one: no optimizer state, a version, metrics.

    python -m model_training.release --checkpoint runs/ccp_cpu/last.pt \
        --version ihp-ccp-mnv3-v1 --metrics runs/eval_default/summary.json \
        --out ihp_backend/models/default.pt
"""
from __future__ import annotations

import argparse
import json
import os

from ihp_backend.checkpoint import read_checkpoint, save_checkpoint


def release(src: str, dst: str, version: str, metrics: dict | None = None) -> dict:
    ck = read_checkpoint(src)
    training = {k: v for k, v in ck.get("training", {}).items() if k != "optimizer"}
    if metrics is not None:
        training["metrics"] = metrics
    ck = {**ck, "model_version": version, "training": training,
          "state_dict": {k: v.contiguous() for k, v in ck["state_dict"].items()}}
    save_checkpoint(ck, dst)
    return {"path": dst, "bytes": os.path.getsize(dst), "version": version, "step": training.get("step")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--metrics", help="evaluation summary.json to embed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    metrics = None
    if a.metrics:
        with open(a.metrics) as f:
            s = json.load(f)
        metrics = {k: v for k, v in s.items() if k != "full"}
    print(json.dumps(release(a.checkpoint, a.out, a.version, metrics)))


if __name__ == "__main__":
    main()
