"""Turn a training checkpoint into a shippable one: no optimizer state, a version, metrics.

    python -m model_training.release --checkpoint runs/ccp_cpu/last.pt \
        --version ihp-ccp-mnv3-v1 --metrics runs/eval_default/summary.json \
        --out ihp_backend/models/default.pt

Several --checkpoint paths of one network are averaged uniformly before release (then BatchNorm
is recalibrated), e.g. the end points of successive fine-tuning stages.
"""
from __future__ import annotations

import argparse
import json
import os

from ihp_backend.core.checkpoint import read_checkpoint, save_checkpoint


def recalibrated_state(ck: dict, batches: int, seed: int = 1234) -> dict:
    """The checkpoint's weights with BatchNorm statistics re-estimated on its training data."""
    from ihp_backend.core.checkpoint import network_of

    from .train import click_dataset, recalibrate_bn
    cfg = ck["training"]["config"]
    net = network_of(ck)
    sds = click_dataset(cfg, net.cfg, seed)
    recalibrate_bn(net, sds, batches=batches, batch_size=cfg.get("batch_size", 8), train_only=cfg.get("train_only"))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def averaged_state(states: list[dict]) -> dict:
    """Uniform average of state dicts of one network (a "model soup" of checkpoints).

    Floating tensors are averaged in float32 and cast back to the first state's dtype; integer
    buffers (BatchNorm's num_batches_tracked) are taken from the first state. Average only
    checkpoints fine-tuned from one another: the weights of unrelated runs do not line up.
    """
    if not states:
        raise ValueError("nothing to average")
    keys = set(states[0])
    for i, st in enumerate(states[1:], 1):
        if set(st) != keys:
            raise ValueError(f"checkpoint {i} has different parameters from checkpoint 0")
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        for i, st in enumerate(states[1:], 1):
            if st[k].shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(st[k].shape)} in checkpoint {i}, "
                                 f"{tuple(v.shape)} in checkpoint 0")
        out[k] = (sum(st[k].float() for st in states) / len(states)).to(v.dtype)
    return out


def stored_state(state_dict: dict, half: bool = True) -> dict:
    """The state dict as a release stores it: float16 halves the file (load_state_dict copies it
    into the float32 network)."""
    return {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state_dict.items()}


def release(src: str | list[str], dst: str, version: str, metrics: dict | None = None,
            recalibrate: int = 0, half: bool = True, extra: dict | None = None) -> dict:
    """``src``: one checkpoint, or several of one network to average (the first gives the
    metadata and training config). Averaging without ``recalibrate`` keeps averaged BatchNorm
    statistics, which rarely match the averaged weights: recalibrate. ``extra`` is merged into
    the ``training`` metadata (the recipe runner's provenance)."""
    srcs = [src] if isinstance(src, str) else list(src)
    ck = read_checkpoint(srcs[0])
    if len(srcs) > 1:
        others = [read_checkpoint(p) for p in srcs[1:]]
        for p, o in zip(srcs[1:], others):
            if o["net"] != ck["net"] or o["binding"] != ck["binding"]:
                raise ValueError(f"{p} is a different network or binding from {srcs[0]}")
        ck["state_dict"] = averaged_state([ck["state_dict"]] + [o["state_dict"] for o in others])
    if recalibrate:
        ck["state_dict"] = recalibrated_state(ck, recalibrate)
    training = {k: v for k, v in ck.get("training", {}).items() if k != "optimizer"}
    training["bn_recalibration_batches"] = recalibrate
    if len(srcs) > 1:
        training["averaged_from"] = [os.path.basename(os.path.dirname(os.path.abspath(p))) + "/"
                                     + os.path.basename(p) for p in srcs]
    if metrics is not None:
        training["metrics"] = metrics
    training["weights_dtype"] = "float16" if half else "float32"
    training.update(extra or {})
    ck = {**ck, "model_version": version, "training": training,
          "state_dict": stored_state(ck["state_dict"], half)}
    save_checkpoint(ck, dst)
    return {"path": dst, "bytes": os.path.getsize(dst), "version": version, "step": training.get("step")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, nargs="+",
                    help="a checkpoint, or several of one network to average uniformly "
                         "(e.g. the end points of successive fine-tuning stages)")
    ap.add_argument("--version", required=True)
    ap.add_argument("--metrics", help="evaluation summary.json to embed")
    ap.add_argument("--recalibrate-bn", type=int, default=16, metavar="BATCHES",
                    help="re-estimate BatchNorm statistics on this many training batches (0: off)")
    ap.add_argument("--float32", action="store_true", help="store float32 weights (default: float16)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    metrics = None
    if a.metrics:
        with open(a.metrics) as f:
            s = json.load(f)
        metrics = {k: v for k, v in s.items() if k != "full"}
    print(json.dumps(release(a.checkpoint, a.out, a.version, metrics, a.recalibrate_bn, not a.float32)))


if __name__ == "__main__":
    main()
