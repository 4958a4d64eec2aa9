"""Issue 31: is the zero-click parse limited by the 540 photos its context head learns from, or by
the frozen features it reads? The head's LIP-20 mIoU at the decoder's stride 4 (no click, from the
feature cache of ``model_training.train_vocab_context``) on the train photos kept out of its
training (the first 63) and on 100 photos it trained on (photos 100-199). A head that parses its
own training photos little better than unseen ones is held back by what the features say.

    PYTHONPATH=. .venv/bin/python experiments/context_head_fit.py CKPT [CKPT ...]

Checkpoints without copied backbone blocks only (the cache holds the backbone's output).
Seconds per checkpoint.
"""
import argparse
import os

import numpy as np
import torch

from ihp_backend.core.checkpoint import network_of, read_checkpoint
from ihp_backend.core.vocabulary import lookup
from model_training.pose_labels import LABEL_SPACES
from model_training.train_vocab_context import held_out_miou, space_classes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--cache", default="runs/vocab_context/cache-ihp-ccp-focusb-mnv3-s27950")
    a = ap.parse_args()
    high = np.load(os.path.join(a.cache, "high.npy"), mmap_mode="r")
    vocab = np.load(os.path.join(a.cache, "vocab.npy"), mmap_mode="r")
    targets = np.load(os.path.join(a.cache, "targets.npy"), mmap_mode="r")
    lip = LABEL_SPACES.index("lip20")
    sets = {"kept out (train 0-62)": np.arange(0, 126, 2), "trained on (train 100-199)": np.arange(200, 400, 2)}
    for path in a.checkpoints:
        ckpt = read_checkpoint(path)
        if ckpt["net"].get("vocab_context_blocks"):
            raise SystemExit(f"{path}: a head with copied blocks reads other features than the cache's")
        head = network_of(ckpt).vocab_context
        chans = np.array(sorted(lookup(space_classes("lip20"), tuple(ckpt["vocabulary"])).values()))
        for name, idx in sets.items():
            m, _ = held_out_miou(head, torch.from_numpy(high[idx].astype(np.float32)),
                                 torch.from_numpy(vocab[idx].astype(np.float32)),
                                 torch.from_numpy(targets[idx, lip].astype(np.int64)), chans)
            print(f"{ckpt['model_version']}: {name}: LIP-20 mIoU {100 * m:.1f}%")


if __name__ == "__main__":
    main()
