"""Issue 31: can the vocabulary head's zero-click parse be trained on the frozen network's own
features, cached once, instead of through a forward per step?

The served network (``ParserOptions`` as served, float32) is run once per CCP *train* photo (and
its mirror image) with no click; a hook keeps the decoder's features (the vocabulary head's
input, stride 4). A vocabulary branch (``NetConfig.vocab_branch``'s architecture, its output added
to the frozen head's vocabulary logits) is then trained on them for many epochs, against the
derived labels of every label space at once (softmax over each space's names). The last
``--holdout`` train photos are kept out and scored (LIP-20, no click, at stride 4): CCP val is not
read here.

  PYTHONPATH=. .venv/bin/python experiments/vocab_branch_cached.py --epochs 40
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ihp_backend.core.inference import Parser, network_size
from ihp_backend.core.network import IHPNet
from ihp_backend.core.vocabulary import VOCABULARY, lookup, mirrored_channels
from model_training.pose_labels import LABEL_SPACES, ccp_parts
from model_training.train_vocab_context import miou as confusion_miou
from model_training.train_vocab_context import served_parser, space_loss, vocab_target

IGNORE = -1


def decoder_features(parser: Parser, image: np.ndarray) -> np.ndarray:
    """The decoder's stride-4 features (C, h/4, w/4) of ``image`` with no click, as served."""
    got = {}
    hook = parser.net.decoder.register_forward_hook(lambda m, i, o: got.__setitem__("f", o.detach().float()))
    try:
        parser.logits(image, [])
    finally:
        hook.remove()
    return got["f"][0].numpy().astype(np.float16)


def space_channels(classes: list[str]) -> np.ndarray:
    return np.array(sorted(lookup(classes).values()))


def build_cache(checkpoint: str, split: str, threads: int, flip: bool, cache_dir: str):
    """Write ``cache_dir/feats.npy`` (N, C, H4, W4) float16 (a memory map: the features of 600
    photos and their mirrors are ~6 GB) and ``targets.npy`` (N, spaces, H4, W4) int8, padded with
    zeros / -1 to the largest size; entries 2i and 2i + 1 are photo i and its mirror image."""
    parser = served_parser(checkpoint, threads)
    spaces = {s: ccp_parts("../shared/data/ccp", "data/ccp_parts", split, s) for s in LABEL_SPACES}
    mirror = np.asarray(mirrored_channels(), np.int64)
    first = spaces["lip20"]
    copies = 2 if flip else 1
    n = len(first) * copies
    os.makedirs(cache_dir, exist_ok=True)
    sizes = [network_size(Image.open(first.items[i][1]).size[::-1], parser.max_side) for i in range(len(first))]
    h4, w4 = max(h for h, _ in sizes) // 4, max(w for _, w in sizes) // 4
    feats = targets = None
    for i in tqdm(range(len(first)), desc=f"features {split}"):
        image, _ = first.load(i)
        hw = network_size(image.shape[:2], parser.max_side)
        labs = {s: ds.load(i)[1] for s, ds in spaces.items()}
        for k, mirrored in enumerate([False, True][:copies]):
            img = image[:, ::-1].copy() if mirrored else image
            f = decoder_features(parser, img)
            if feats is None:
                feats = np.lib.format.open_memmap(os.path.join(cache_dir, "feats.npy"), "w+", np.float16, (n, f.shape[0], h4, w4))
                targets = np.lib.format.open_memmap(os.path.join(cache_dir, "targets.npy"), "w+", np.int8,
                                                    (n, len(LABEL_SPACES), h4, w4))
                targets[:] = IGNORE
            j = i * copies + k
            feats[j, :, :f.shape[1], :f.shape[2]] = f
            for si, (s, ds) in enumerate(spaces.items()):
                lab = labs[s][:, ::-1].copy() if mirrored else labs[s]
                v = vocab_target(lab, ds.classes, VOCABULARY, hw)
                if mirrored:
                    v = np.where(v >= 0, mirror[np.maximum(v, 0)], IGNORE)
                targets[j, si, :f.shape[1], :f.shape[2]] = v[:f.shape[1], :f.shape[2]]
    feats.flush()
    targets.flush()
    return parser


class Branch(torch.nn.Module):
    """The frozen head's vocabulary rows plus a trainable branch (``IHPNet.vocab_branch``)."""

    def __init__(self, net: IHPNet, width: int):
        super().__init__()
        from ihp_backend.core.network import _separable
        cfg = net.cfg
        v = cfg.vocab_start
        self.register_buffer("w", net.classifier.weight[v:v + cfg.vocab_size, :, 0, 0].detach().float().clone())
        self.register_buffer("b", net.classifier.bias[v:v + cfg.vocab_size].detach().float().clone())
        self.branch = torch.nn.Sequential(_separable(cfg.decoder_channels, width), _separable(width, width),
                                          torch.nn.Conv2d(width, cfg.vocab_size, 1))
        torch.nn.init.zeros_(self.branch[-1].weight)
        torch.nn.init.zeros_(self.branch[-1].bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.einsum("kc,bchw->bkhw", self.w, f) + self.b[:, None, None] + self.branch(f)


def score(model, feats, targets, channels, batch: int = 16) -> tuple[float, np.ndarray]:
    """Dataset-level LIP-20 mIoU at stride 4 (argmax over the space's channels, no click)."""
    inv = np.full(64, -1)
    inv[channels] = np.arange(len(channels))
    preds, gts = [], []
    with torch.no_grad():
        for j in range(0, len(feats), batch):
            lg = model(torch.from_numpy(np.asarray(feats[j:j + batch], np.float32)))
            p = lg[:, torch.as_tensor(channels)].argmax(1).numpy()
            g = np.asarray(targets[j:j + batch], np.int64)
            gi = np.where(g >= 0, inv[np.maximum(g, 0)], -1)
            keep = gi >= 0
            preds.append(p[keep])
            gts.append(gi[keep])
    return confusion_miou(np.concatenate(preds), np.concatenate(gts), len(channels))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--holdout", type=int, default=63)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--balance", type=float, default=0.0, help="class weight = (pixel share)^-balance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop", type=int, nargs=2, default=(96, 64), help="random crop of the stride-4 maps")
    ap.add_argument("--cache", default="runs/vocab_cache")
    ap.add_argument("--out", default="runs/vocab_cache/branch.pt")
    a = ap.parse_args()
    torch.manual_seed(0)
    if os.path.exists(os.path.join(a.cache, "targets.npy")):
        parser = served_parser(a.checkpoint, a.threads)
    else:
        parser = build_cache(a.checkpoint, "train", a.threads, flip=True, cache_dir=a.cache)
    feats = np.load(os.path.join(a.cache, "feats.npy"), mmap_mode="r")
    targets = np.load(os.path.join(a.cache, "targets.npy"), mmap_mode="r")
    torch.set_num_threads(a.threads)
    n_train = len(feats) - 2 * a.holdout  # two entries (photo, mirror) per photo
    ho_f, ho_t = feats[n_train::2], targets[n_train::2, LABEL_SPACES.index("lip20")]  # held out, not mirrored
    from model_training.pose_labels import SPACE_CLASSES, load_merge
    classes = {s: list(SPACE_CLASSES.get(s) or load_merge("ccp12")["classes"]) for s in LABEL_SPACES}
    chans = {s: torch.as_tensor(space_channels(classes[s])) for s in LABEL_SPACES}
    weights = {}
    for si, s in enumerate(LABEL_SPACES):
        t = np.asarray(targets[:n_train, si]).astype(np.int64)
        counts = np.bincount(t[t >= 0], minlength=len(VOCABULARY))
        share = counts[chans[s].numpy()] / counts.sum()
        weights[s] = None
        if a.balance:
            w = torch.as_tensor(np.maximum(share, 1e-4) ** -a.balance, dtype=torch.float32)
            weights[s] = w / (w * torch.as_tensor(share, dtype=torch.float32)).sum()
    model = Branch(parser.net, a.width).to(memory_format=torch.channels_last)
    base, base_iou = score(model, ho_f, ho_t, chans["lip20"].numpy())
    print(f"held-out LIP-20 mIoU (stride 4, no click), frozen head: {base:.4f}", flush=True)
    opt = torch.optim.AdamW(model.branch.parameters(), lr=a.lr, weight_decay=1e-4)
    steps = a.epochs * (n_train // a.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for ep in range(a.epochs):
        model.train()
        order = rng.permutation(n_train)
        tot, nb = 0.0, 0
        for j in range(0, n_train - a.batch + 1, a.batch):
            b = np.sort(order[j:j + a.batch])
            ch, cw = a.crop
            y0 = int(rng.integers(0, feats.shape[2] - ch + 1))
            x0 = int(rng.integers(0, feats.shape[3] - cw + 1))
            f = torch.from_numpy(np.asarray(feats[b, :, y0:y0 + ch, x0:x0 + cw], np.float32)
                                 ).contiguous(memory_format=torch.channels_last)
            tb = torch.from_numpy(np.asarray(targets[b, :, y0:y0 + ch, x0:x0 + cw], np.int64))
            lg = model(f)
            loss = sum(space_loss(lg, tb[:, si], chans[s], weights[s]) for si, s in enumerate(LABEL_SPACES))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot, nb = tot + loss.item(), nb + 1
        model.eval()
        m, iou = score(model, ho_f, ho_t, chans["lip20"].numpy())
        print(f"epoch {ep + 1}: loss {tot / max(1, nb):.3f} held-out LIP-20 mIoU {m:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    print("per class:", " ".join(f"{VOCABULARY[c]}={x:.2f}" for c, x in zip(chans["lip20"].tolist(), iou)))
    torch.save({"branch": model.branch.state_dict(), "width": a.width, "args": vars(a)}, a.out)


if __name__ == "__main__":
    main()
