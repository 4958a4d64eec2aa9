"""Edge-aware refinement of the network's coarse class probabilities with the photo's colours.

The decoder answers at stride 4 of the network size (about 1/8 of a CCP photo's side), so part
boundaries come out blurred. A colour guided filter (He, Sun, Tang, "Guided Image Filtering",
TPAMI 2013, Eq. 14, 19-21) fits, in every window, each class probability as a linear function of
the RGB colour; evaluated on the photo at the network size (about twice the logit grid's
resolution), the boundaries follow its colour edges. The coefficients are computed at the logit
grid and upsampled (the "fast guided filter" of He & Sun, 2015), so the cost is a few small box
filters plus one pass per class at the network size. ``paint_clicks`` then makes every click win
around itself.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def label_lut(c: int, values=None) -> np.ndarray:
    """Channel index -> returned label (``values``, default the index), uint8 when they fit."""
    lut = np.arange(c) if values is None else np.asarray(values)
    return lut.astype(np.uint8 if lut.max(initial=0) < 256 and lut.min(initial=0) >= 0 else np.int64)


def _window_sum_1d(x: torch.Tensor, radius: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``x`` over windows of +-``radius`` along ``dim`` (clipped at the ends), from a
    running sum (cost independent of the radius), and the window lengths."""
    n = x.shape[dim]
    c = F.pad(x.cumsum(dim).movedim(dim, -1), (1, 0)).movedim(-1, dim)
    idx = torch.arange(n)
    hi, lo = (idx + radius).clamp(max=n - 1) + 1, (idx - radius).clamp(min=0)
    return c.index_select(dim, hi) - c.index_select(dim, lo), (hi - lo).to(x.dtype)


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the (2r+1)^2 window around each pixel of (..., h, w), windows clipped at the border."""
    rows, n_rows = _window_sum_1d(x, radius, -2)
    both, n_cols = _window_sum_1d(rows, radius, -1)
    return both / (n_rows[:, None] * n_cols[None, :])


def inverse_3x3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of every symmetric 3x3 matrix of ``m`` (3, 3, h, w), by cofactors (elementwise:
    far cheaper than a batched solve for thousands of tiny systems)."""
    a, b, c, d, e, f = m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2]
    i00, i01, i02 = d * f - e * e, c * e - b * f, b * e - c * d
    i11, i12, i22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * i00 + b * i01 + c * i02
    inv = torch.stack([i00, i01, i02, i01, i11, i12, i02, i12, i22]).reshape(3, 3, *a.shape)
    return inv / det


def guided_coefficients(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-averaged linear coefficients of the colour guided filter (He et al. Eq. 19-21).

    ``guide`` (3, h, w) in [0, 1], ``p`` (C, h, w) -> ``a`` (C, 3, h, w), ``b`` (C, h, w) such
    that the filtered ``p`` at a pixel of colour I is ``sum_k a[:, k] * I[k] + b``.
    """
    c, h, w = p.shape
    mean_i = box_mean(guide[None], radius)[0]  # (3, h, w)
    mean_p = box_mean(p[None], radius)[0]  # (C, h, w)
    outer = (guide[:, None] * guide[None, :]).reshape(1, 9, h, w)
    cov_i = box_mean(outer, radius)[0].reshape(3, 3, h, w) - mean_i[:, None] * mean_i[None, :]
    cov_ip = box_mean((guide[None] * p[:, None]).reshape(1, 3 * c, h, w), radius)[0].reshape(c, 3, h, w)
    cov_ip = cov_ip - mean_i[None] * mean_p[:, None]
    a = torch.einsum("klhw,clhw->ckhw", inverse_3x3(cov_i + eps * torch.eye(3)[:, :, None, None]), cov_ip)
    b = mean_p - (a * mean_i[None]).sum(1)
    mean_a = box_mean(a.reshape(1, 3 * c, h, w), radius)[0].reshape(c, 3, h, w)
    return mean_a, box_mean(b[None], radius)[0]


def refined_argmax(logits: torch.Tensor, image: np.ndarray, out_hw: tuple[int, int] | None = None,
                   radius: int = 6, eps: float = 1e-4, values=None) -> np.ndarray:
    """Labels from stride-4 ``logits`` (C, h, w), refined along the colour edges of ``image``.

    The filter is evaluated at ``image``'s size (the network-size copy of the photo is cheap and
    nearly as good as the full one); the labels are then resized (nearest) to ``out_hw``.
    ``radius`` is in logit pixels; ``values`` maps channels to the returned labels.
    """
    c, h, w = logits.shape
    hh, ww = image.shape[:2]
    lut = label_lut(c, values)
    out_hw = tuple(out_hw or (hh, ww))
    if c == 1:
        return np.full(out_hw, lut[0], lut.dtype)
    rgb = torch.from_numpy(np.array(image, np.float32, copy=True)).permute(2, 0, 1) / 255.0
    guide = F.interpolate(rgb[None], size=(h, w), mode="area")[0]
    a, b = guided_coefficients(guide, torch.softmax(logits.float(), dim=0), radius, eps)
    coef = torch.cat([a, b[:, None]], 1)  # (C, 4, h, w): per class, the colour weights and offset
    best = torch.full((hh, ww), -torch.inf)
    arg = torch.zeros((hh, ww), dtype=torch.uint8 if c < 256 else torch.int64)
    for k in range(c):  # class by class (cache-sized buffers), keeping the running argmax
        up = F.interpolate(coef[k:k + 1], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        q = torch.addcmul(torch.addcmul(torch.addcmul(up[3], up[0], rgb[0]), up[1], rgb[1]), up[2], rgb[2])
        better = q > best
        best = torch.where(better, q, best)
        arg[better] = k
    labels = lut[arg.numpy()]
    if (hh, ww) != out_hw:
        ys = np.minimum(((np.arange(out_hw[0]) + 0.5) * hh / out_hw[0]).astype(np.int64), hh - 1)
        xs = np.minimum(((np.arange(out_hw[1]) + 0.5) * ww / out_hw[1]).astype(np.int64), ww - 1)
        labels = labels[ys][:, xs]
    return labels


def paint_clicks(labels: np.ndarray, image: np.ndarray, clicks, radius: float, colour_tol: float = 0.2
                 ) -> np.ndarray:
    """Each click (y, x, label) claims the pixels within ``radius`` of it whose RGB colour is
    within ``colour_tol`` (Euclidean, channels in [0, 1]) of the clicked pixel's; later clicks
    win. The annotator's click is ground truth where it lands, whatever the network said; the
    colour test keeps the disk off neighbouring parts of another colour. In place; returns labels.
    """
    h, w = labels.shape
    r = int(np.ceil(radius))
    if r <= 0:
        return labels
    for y, x, value in np.asarray(clicks, np.float64).reshape(-1, 3):
        cy, cx = min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)
        ys, xs = slice(max(0, cy - r), min(h, cy + r + 1)), slice(max(0, cx - r), min(w, cx + r + 1))
        yy, xx = np.ogrid[ys, xs]
        near = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
        diff = image[ys, xs].astype(np.float32) - image[cy, cx].astype(np.float32)
        near &= (diff * diff).sum(-1) <= (255.0 * colour_tol) ** 2
        labels[ys, xs][near] = int(value)
    return labels
