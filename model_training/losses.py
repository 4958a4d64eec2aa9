"""Training losses of the paper (Sec. III-C): balanced cross-entropy and the SP-loss.

Targets are slot maps (B, H, W) with ``ignore_index`` for unlabelled pixels; clicks are
per-sample (K, 3) arrays of (y, x, slot) in input-pixel coordinates.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255


def class_weights(counts: torch.Tensor, max_weight: float = 20.0) -> torch.Tensor:
    """Inverse-frequency weights per (sample, slot) from counts (B, S).

    ``w_c = 1 / (K * f_c)`` with ``f_c`` the class's share of the sample's total and ``K`` the
    number of classes present, so every present class carries the same total weight; absent
    classes get 0; weights are clipped at ``max_weight``.
    """
    present = counts > 0
    k = present.sum(dim=1, keepdim=True).clamp(min=1)
    frac = counts / counts.sum(dim=1, keepdim=True).clamp(min=1e-12)
    w = torch.where(present, 1.0 / (k * frac.clamp(min=1e-12)), torch.zeros_like(frac))
    return w.clamp(max=max_weight)


def _weighted_ce(ce: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor:
    b = torch.arange(target.shape[0], device=target.device)[:, None, None].expand_as(target)
    pw = w[b, target.clamp(max=w.shape[1] - 1)] * valid
    return (ce * pw).sum() / pw.sum().clamp(min=1e-12)


def balanced_ce(logits: torch.Tensor, target: torch.Tensor, clicks: list[np.ndarray],
                ignore_index: int = IGNORE) -> torch.Tensor:
    """Balanced CE = 0.5 x pixel-frequency-weighted CE + 0.5 x click-frequency-weighted CE.

    Pixel term: each class present in a sample is weighted by the inverse of its pixel share
    (``class_weights`` over pixel counts). Click term: the same over the clicks each class
    received (+1 smoothing, so a class nobody clicked, typically background at initialisation,
    is weighted highest rather than dropped): classes with few clicks count more.
    """
    b, s = logits.shape[:2]
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, safe, reduction="none")
    idx = (torch.arange(b, device=target.device)[:, None, None] * s + safe)[valid]
    pix = torch.bincount(idx, minlength=b * s).view(b, s).float()
    w_pix = class_weights(pix)
    ncl = torch.zeros(b, s, device=logits.device)
    for i, c in enumerate(clicks):
        if len(c):
            sl = torch.as_tensor(np.asarray(c)[:, 2].astype(np.int64), device=logits.device)
            ncl[i].index_add_(0, sl, torch.ones(len(sl), device=logits.device))
    w_click = class_weights((ncl + 1.0) * (pix > 0))
    return 0.5 * _weighted_ce(ce, safe, valid, w_pix) + 0.5 * _weighted_ce(ce, safe, valid, w_click)


def adjacent_pairs(target: np.ndarray, ignore_index: int = IGNORE) -> set[tuple[int, int]]:
    """Ordered pairs (m, n) of classes that touch (4-neighbourhood) in a label map."""
    pairs = set()
    for a, b in ((target[:-1], target[1:]), (target[:, :-1], target[:, 1:])):
        m = (a != b) & (a != ignore_index) & (b != ignore_index)
        for x, y in set(zip(a[m].tolist(), b[m].tolist())):
            pairs.add((x, y))
            pairs.add((y, x))
    return pairs


def sp_loss(features: torch.Tensor, target: torch.Tensor, clicks: list[np.ndarray],
            margin: float = 1.5, samples_per_pair: int = 4, generator: torch.Generator | None = None,
            ignore_index: int = IGNORE) -> torch.Tensor:
    """Semantic-perceiving loss, paper Eq. (2), in a well-defined reading.

    For every pair of adjacent parts (m, n) of a sample (adjacency from the ground truth) whose
    classes both have clicks: take random pixels x of part m and the mean click features c_m,
    c_n (features sampled at the clicks on the stride-4 map). With similarities mapped into
    (0, 1] as ``s = (1 + cos) / 2``,

        L = max(0, log d_g + log s(x, c_n) - log s(x, c_m)),   d_g = margin = 1.5,

    i.e. a hinge on log similarities asking the positive similarity to be at least d_g times
    the negative one. (The printed equation mixes min/max and takes the log of a cosine that
    can be negative; this reading keeps its intent and is finite and differentiable.)
    Averaged over all sampled (pixel, pair) terms; 0 when no pair qualifies.
    """
    bsz, _, fh, fw = features.shape
    th, tw = target.shape[-2:]
    small = F.interpolate(target[:, None].float(), size=(fh, fw), mode="nearest")[:, 0].long()
    terms = []
    log_margin = math.log(margin)
    for i in range(bsz):
        c = np.asarray(clicks[i]).reshape(-1, 3)
        if len(c) < 2:
            continue
        fy = np.clip((c[:, 0] * fh / th).astype(np.int64), 0, fh - 1)
        fx = np.clip((c[:, 1] * fw / tw).astype(np.int64), 0, fw - 1)
        slots = c[:, 2].astype(np.int64)
        feat = F.normalize(features[i], dim=0)  # (D, fh, fw)
        centres = {}
        for s in np.unique(slots):
            sel = slots == s
            v = feat[:, torch.as_tensor(fy[sel]), torch.as_tensor(fx[sel])].mean(dim=1)
            centres[int(s)] = F.normalize(v, dim=0)
        tgt = small[i].cpu().numpy()
        for m, n in adjacent_pairs(tgt, ignore_index):
            if m not in centres or n not in centres:
                continue
            ys, xs = np.nonzero(tgt == m)
            pick = torch.randint(len(ys), (samples_per_pair,), generator=generator)
            fxs = feat[:, torch.as_tensor(ys)[pick], torch.as_tensor(xs)[pick]]  # (D, k)
            s_pos = (1 + (centres[m][:, None] * fxs).sum(0)) / 2
            s_neg = (1 + (centres[n][:, None] * fxs).sum(0)) / 2
            terms.append(F.relu(log_margin + torch.log(s_neg.clamp(min=1e-6))
                                - torch.log(s_pos.clamp(min=1e-6))))
    if not terms:
        return features.sum() * 0.0
    return torch.cat(terms).mean()


def lovasz_jaccard_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Jaccard loss along a sorted error order (Berman et al. 2018, Eq. 8).

    ``fg_sorted`` is the 0/1 ground truth of one class, ordered by decreasing error. Entry i is
    how much the Jaccard loss grows when the i-th worst pixel joins the mistakes.
    """
    gts = fg_sorted.sum()
    inter = gts - fg_sorted.cumsum(0)
    union = gts + (1.0 - fg_sorted).cumsum(0)
    jac = 1.0 - inter / union.clamp(min=1e-12)
    return torch.cat([jac[:1], jac[1:] - jac[:-1]])


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE,
                   max_pixels: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Lovász-softmax loss: the convex surrogate of (1 - IoU), averaged over the classes present.

    Computed over the whole batch, so it follows the data-set IoU the evaluation reports (not a
    per-image IoU). On one-hot probabilities it equals 1 - IoU exactly. ``max_pixels`` draws that
    many labelled pixels uniformly instead (IoU is a ratio of counts, so a uniform sample keeps
    it; the sorts dominate the cost: full 472x336 crops x 8 take seconds on a CPU).
    """
    per_image = logits.shape[2] * logits.shape[3]
    t = target.reshape(-1)
    idx = torch.nonzero(t != ignore_index).squeeze(1)
    if max_pixels is not None and idx.numel() > max_pixels:
        pick = torch.randperm(idx.numel(), generator=generator, device="cpu")[:max_pixels]
        idx = idx[pick.to(idx.device)]
    t = t[idx]
    # (n, S) rows gathered straight from (B, S, H*W): no channels-last copy of the whole batch
    prob = logits.flatten(2)[idx // per_image, :, idx % per_image].float().softmax(1)
    losses = []
    for c in torch.unique(t).tolist():
        fg = (t == c).float()
        err = (fg - prob[:, c]).abs()
        err_sorted, order = torch.sort(err, descending=True)
        losses.append(torch.dot(err_sorted, lovasz_jaccard_grad(fg[order])))
    if not losses:
        return logits.sum() * 0.0
    return torch.stack(losses).mean()
