"""Issue 31, a tried and rejected zero-click step: post-hoc logit adjustment of the vocabulary head
(Menon et al., "Long-tail learning via logit adjustment", ICLR 2021: ``f_c(x) - tau * log pi_c``),
``pi_c`` the class's share of the training pixels in the pose-derived LIP-20 labels. Rare classes
(Hat, Glove, Scarf, Skirt, Socks, Jumpsuits) get 0% IoU in the zero-click parse; does dividing out
the prior help the data-set mIoU? Measured on CCP *train* photos (the head is as weak there as on
val: 34% vs 36%, so it is not overfit and train is a fair place to choose), zero-click, no correction.
``--keep-background`` leaves the person / background balance as it is on average (background's
bias log sum_c pi_c^(1 - tau) / sum_c pi_c over the parts).
    .venv/bin/python experiments/vocab_logit_adjustment.py [--limit 100] [--keep-background] [tau ...]
About 1 min per tau on 2 cores. Prints the mIoU per tau; per-class tables go to /tmp/vocab_tau_*.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from ihp_backend.core import inference  # noqa: E402
from ihp_backend.core.vocabulary import VOCABULARY, lookup  # noqa: E402
from model_training import evaluate  # noqa: E402
from model_training.pose_labels import ccp_parts  # noqa: E402

SHARED = os.environ.get('IHP_SHARED_DIR', os.path.join(ROOT, '..', 'shared'))


def lip20_share(root: str, parts: str) -> np.ndarray:
    """Per vocabulary channel, its share of the labelled pixels of CCP train in LIP-20 (0: unused)."""
    from PIL import Image
    ds = ccp_parts(root, parts, 'train', 'lip20')
    counts = np.zeros(256)
    for _, _, lp in ds.items:
        counts += np.bincount(np.asarray(Image.open(lp)).reshape(-1), minlength=256)[:256]
    counts = counts[:len(ds.classes)]
    share = np.zeros(len(VOCABULARY))
    for name, ch in lookup(ds.classes).items():
        share[ch] = counts[ds.classes.index(name)] / counts.sum()
    return share


def bias_of(share: np.ndarray, tau: float, keep_background: bool) -> np.ndarray:
    out = np.zeros_like(share)
    ok = share > 0
    out[ok] = -tau * np.log(share[ok])
    if keep_background:
        part = ok.copy()
        part[0] = False  # vocabulary channel 0 is Background
        out[0] = np.log((share[part] ** (1 - tau)).sum() / share[part].sum())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('taus', nargs='*', type=float, default=[0.0, 0.5, 1.0])
    ap.add_argument('--limit', type=int, default=100)
    ap.add_argument('--keep-background', action='store_true')
    ap.add_argument('--checkpoint', default=os.path.join(ROOT, 'ihp_backend/models/default.pt'))
    a = ap.parse_args()
    share = lip20_share(f'{SHARED}/data/ccp', os.path.join(ROOT, 'data/ccp_parts'))
    original = inference.Parser.logits
    for tau in a.taus:
        bias = None

        def logits(self, *args, **kw):
            nonlocal bias
            out = original(self, *args, **kw)
            if bias is None:
                b = np.zeros(out.shape[0], np.float32)
                b[self.vocab_start:self.vocab_start + len(share)] = bias_of(share, tau, a.keep_background)
                bias = torch.as_tensor(b, device=out.device)[:, None, None]
            return out + bias

        inference.Parser.logits = logits
        out = f'/tmp/vocab_tau_{tau}{"_keepbg" if a.keep_background else ""}'
        evaluate.main(['--checkpoint', a.checkpoint, '--precision', 'float32', '--data', f'{SHARED}/data/ccp',
                       '--split', 'train', '--limit', str(a.limit), '--kind', 'ccp-parts:lip20', '--rgb-only',
                       '--zero-click', '--fill-known', '--max-corrections', '0', '--standard', '0.85',
                       '--threads', '1', '--out', out])
        inference.Parser.logits = original
        with open(f'{out}/results.md') as f:
            print(f'tau {tau}: {f.read().splitlines()[2]}', flush=True)


if __name__ == '__main__':
    main()
