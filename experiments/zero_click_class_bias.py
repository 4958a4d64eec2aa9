"""Issue 31: per-class offsets on the context head's zero-click logits, fitted to the data-set
mIoU (coordinate ascent over a grid per class), judged by two-fold cross-validation on the train
photos the head never trained on (the first ``--holdout``, with their mirror images in the same
fold). Unlike the logit adjustment tried before (one tau times log prior), every class gets its
own offset, chosen for mIoU. Works at the decoder's stride 4 from the feature cache of
``model_training.train_vocab_context`` (no forward): seconds per fit.

    PYTHONPATH=. .venv/bin/python experiments/zero_click_class_bias.py [--checkpoint ...]
"""
import argparse
import os

import numpy as np
import torch

from ihp_backend.core.checkpoint import network_of, read_checkpoint
from ihp_backend.core.vocabulary import lookup
from model_training.pose_labels import LABEL_SPACES
from model_training.train_vocab_context import space_classes

GRID = np.arange(-2.0, 2.01, 0.25)


def confusion(scores: np.ndarray, gt: np.ndarray, bias: np.ndarray, n: int) -> np.ndarray:
    pred = (scores + bias[:, None]).argmax(0)
    return np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)


def miou(conf: np.ndarray) -> float:
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    return float((inter / np.maximum(union, 1))[union > 0].mean())


def fit_bias(scores: np.ndarray, gt: np.ndarray, n: int, rounds: int = 3) -> np.ndarray:
    """Offsets (n,) maximising the data-set mIoU of argmax(scores + offsets); class 0 fixed at 0."""
    bias = np.zeros(n)
    best = miou(confusion(scores, gt, bias, n))
    for _ in range(rounds):
        changed = False
        for c in range(1, n):
            for v in GRID:
                trial = bias.copy()
                trial[c] = v
                m = miou(confusion(scores, gt, trial, n))
                if m > best + 1e-6:
                    best, bias, changed = m, trial, True
        if not changed:
            break
    return bias


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--cache", default="runs/vocab_context/cache-ihp-ccp-focusb-mnv3-s27950")
    ap.add_argument("--holdout", type=int, default=63)
    a = ap.parse_args()
    ckpt = read_checkpoint(a.checkpoint)
    net = network_of(ckpt).eval()
    head = net.vocab_context
    classes = space_classes("lip20")
    chans = np.array(sorted(lookup(classes, tuple(ckpt["vocabulary"])).values()))
    inv = np.full(64, -1)
    inv[chans] = np.arange(len(chans))
    n = len(chans)
    high = np.load(os.path.join(a.cache, "high.npy"), mmap_mode="r")
    vocab = np.load(os.path.join(a.cache, "vocab.npy"), mmap_mode="r")
    targets = np.load(os.path.join(a.cache, "targets.npy"), mmap_mode="r")
    lip = LABEL_SPACES.index("lip20")
    per_photo = []
    with torch.no_grad():
        for j in range(2 * a.holdout):
            lg = head.added_to(torch.from_numpy(vocab[j:j + 1].astype(np.float32)),
                               torch.from_numpy(high[j:j + 1].astype(np.float32)))[0, torch.as_tensor(chans)]
            t = targets[j, lip].astype(np.int64)
            g = np.where(t >= 0, inv[np.clip(t, 0, 63)], -1)
            keep = g >= 0
            per_photo.append((torch.log_softmax(lg, 0).numpy()[:, keep], g[keep]))
    folds = [np.arange(a.holdout) % 2 == f for f in range(2)]

    def pooled(photos):
        idx = [2 * i + k for i in np.nonzero(photos)[0] for k in range(2)]
        return np.concatenate([per_photo[j][0] for j in idx], 1), np.concatenate([per_photo[j][1] for j in idx])

    for f in range(2):
        s_fit, g_fit = pooled(folds[f])
        s_out, g_out = pooled(folds[1 - f])
        bias = fit_bias(s_fit, g_fit, n)
        print(f"fold {f}: fit on {folds[f].sum()} photos: in {miou(confusion(s_fit, g_fit, np.zeros(n), n)):.4f} -> "
              f"{miou(confusion(s_fit, g_fit, bias, n)):.4f}; out {miou(confusion(s_out, g_out, np.zeros(n), n)):.4f}"
              f" -> {miou(confusion(s_out, g_out, bias, n)):.4f}")
        print("  ", {classes[k] if k < len(classes) else k: round(float(b), 2) for k, b in enumerate(bias) if b})
    s_all, g_all = pooled(np.ones(a.holdout, bool))
    bias = fit_bias(s_all, g_all, n)
    print(f"all {a.holdout}: {miou(confusion(s_all, g_all, np.zeros(n), n)):.4f} -> "
          f"{miou(confusion(s_all, g_all, bias, n)):.4f}")


if __name__ == "__main__":
    main()
