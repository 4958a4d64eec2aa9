"""Train the edge refiner (``ihp_backend.core.edges``) on what a checkpoint serves.

    .venv/bin/python -m model_training.train_edges --checkpoint ihp_backend/models/default.pt \
        --data ../shared/data/ccp --hold-out 60 --steps 3000 --out runs/edges/edge_refiner.pt

1. The checkpoint parses the CCP train photos from index ``--hold-out`` on, as the evaluation's
   paper protocol does (a central click on every part component, as served: ``CorePredictor``),
   at the photo's size; after that parse, one correction click and a second parse (a second,
   different coarse map of the same photo). The first ``--hold-out`` photos are left for
   choosing whether to serve the refiner (``model_training.evaluate --edge-refiner``).
2. Crops around the served boundaries, each at a random scale in ``--scales`` (the refiner runs
   at the photo's size up to ``IHP_EDGE_SIDE``, so it meets photos at 1-1.4x CCP's size): the
   photo, one label's served mask (input) and the true mask of that label (target); binary
   cross-entropy over the pixels within ``band_width`` of a served boundary, the pixels the
   refiner decides at serving. Adam, cosine learning rate; a progress bar; the file is written
   at the end (a few CPU minutes: no resume).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ihp_backend.core.edges import EdgeRefinerNet, boundary_band, save_edge_refiner
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions
from model_training import click_simulation as cs
from model_training.datasets import open_dataset
from model_training.evaluate import CorePredictor


def served_pairs(parser: Parser, ds, indices, seed: int = 0):
    """[(photo, served labels, true labels)], two served maps per photo (central clicks; then
    one correction click more)."""
    pred = CorePredictor(parser, ds.classes)
    n = len(ds.classes)
    out = []
    for idx in tqdm(indices, desc="served parses", dynamic_ncols=True):
        image, gt = ds.load(idx)
        gt = gt.astype(np.int64)
        rng = np.random.default_rng((seed, idx))
        clicks = np.array(cs.central_clicks(np.where(gt < n, gt, 0), rng), np.float64).reshape(-1, 3)
        first = pred(image, clicks)
        out.append((image, first.astype(np.int16), gt.astype(np.int16)))
        c = cs.correction_click(gt, first)
        if c is not None:
            second = pred(image, np.vstack([clicks, np.array([c], np.float64)]), first)
            out.append((image, second.astype(np.int16), gt.astype(np.int16)))
    return out


def sample_batch(pairs, bands, rng, batch: int, size: int, scales, band_width: int):
    """(rgb, mask, target, weight) tensors of ``batch`` crops ``size`` x ``size`` around served
    boundary pixels, each at a random scale."""
    rgbs, masks, targets, weights = [], [], [], []
    while len(rgbs) < batch:
        k = int(rng.integers(len(pairs)))
        image, served, gt = pairs[k]
        ys, xs = bands[k]
        if not len(ys):
            continue
        s = float(rng.uniform(*scales))
        src = int(round(size / s))
        j = int(rng.integers(len(ys)))
        h, w = served.shape
        y0 = int(np.clip(ys[j] - src // 2, 0, max(0, h - src)))
        x0 = int(np.clip(xs[j] - src // 2, 0, max(0, w - src)))
        sv = served[y0:y0 + src, x0:x0 + src]
        if sv.shape != (src, src):
            continue
        labels_here = np.unique(sv)
        if len(labels_here) < 2:
            continue
        v = int(rng.choice(labels_here))
        img = torch.from_numpy(np.ascontiguousarray(image[y0:y0 + src, x0:x0 + src])).permute(2, 0, 1).float()[None]
        img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0] / 255.0 - 0.5
        near = lambda a: F.interpolate(torch.from_numpy(np.ascontiguousarray(a)).float()[None, None],  # noqa: E731
                                       size=(size, size), mode="nearest")[0]
        sv_r = near(sv)
        g = near(gt[y0:y0 + src, x0:x0 + src])
        band = torch.from_numpy(boundary_band(sv_r[0].numpy().astype(np.int64), band_width))[None]
        rgbs.append(img)
        masks.append((sv_r == v).float() * 2 - 1)
        targets.append((g == v).float())
        weights.append((band & (g != 255)).float())
    return torch.stack(rgbs), torch.stack(masks), torch.stack(targets), torch.stack(weights)


def train(pairs, steps: int, batch: int = 24, size: int = 64, scales=(1.0, 1.5), band_width: int = 3,
          lr: float = 2e-3, seed: int = 0, width: int = 24, dilations=(1, 2, 4, 8, 1)
          ) -> tuple[EdgeRefinerNet, list[float]]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = EdgeRefinerNet(width=width, dilations=dilations)
    halo = net.halo
    bands = [np.nonzero(boundary_band(served.astype(np.int64), band_width)) for _, served, _ in pairs]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    bar = tqdm(range(steps), desc="edge refiner", dynamic_ncols=True)
    for _ in bar:
        rgb, mask, target, weight = sample_batch(pairs, bands, rng, batch, size + 2 * halo, scales, band_width)
        logit = net(rgb, mask)[..., halo:-halo, halo:-halo]
        t, wgt = target[..., halo:-halo, halo:-halo], weight[..., halo:-halo, halo:-halo]
        loss = (F.binary_cross_entropy_with_logits(logit, t, reduction="none") * wgt).sum() / wgt.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return net.eval(), losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--kind", default="ccp")
    ap.add_argument("--merge", default="ccp12")
    ap.add_argument("--hold-out", type=int, default=60, help="first N train photos left out (for choosing)")
    ap.add_argument("--limit", type=int, default=None, help="train photos used (after the held-out ones)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dilations", type=int, nargs="+", default=[1, 2, 4, 8, 1])
    ap.add_argument("--cache", default=None,
                    help="an .npz of the served parses: read if it exists, else written (step 1 once)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    ds = open_dataset(a.kind, a.data, "train", a.merge)
    stop = len(ds) if a.limit is None else min(len(ds), a.hold_out + a.limit)
    if a.cache and os.path.exists(a.cache):
        z = np.load(a.cache, allow_pickle=False)
        n = int(z["n"])
        pairs = [(z[f"image_{i}"], z[f"served_{i}"], z[f"gt_{i}"]) for i in range(n)]
    else:
        parser = Parser.from_file(a.checkpoint, **ParserOptions(threads=a.threads).parser_kwargs())
        pairs = served_pairs(parser, ds, range(a.hold_out, stop), a.seed)
        del parser
        if a.cache:
            np.savez(a.cache, n=len(pairs), **{f"{k}_{i}": arr for i, p in enumerate(pairs)
                                              for k, arr in zip(("image", "served", "gt"), p)})
    net, losses = train(pairs, a.steps, a.batch, lr=a.lr, seed=a.seed, width=a.width, dilations=a.dilations)
    meta = {"checkpoint": os.path.basename(a.checkpoint), "data": f"{a.kind}:train[{a.hold_out}:{stop}]",
            "merge": a.merge, "steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "width": a.width, "dilations": a.dilations,
            "served_maps": len(pairs), "loss_first_100": float(np.mean(losses[:100])),
            "loss_last_100": float(np.mean(losses[-100:])), "minutes": round((time.time() - t0) / 60, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_edge_refiner(net, a.out, meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
