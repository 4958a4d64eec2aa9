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
    outer = (guide[:, None] * guide[None, :]).reshape(9, h, w)
    # every window mean of the first pass in one pooling call: I (3), p (C), I I^T (9), I p (3C)
    means = box_mean(torch.cat([guide, p, outer, (guide[None] * p[:, None]).reshape(3 * c, h, w)]), radius)
    mean_i, mean_p = means[:3], means[3:3 + c]
    cov_i = means[3 + c:12 + c].reshape(3, 3, h, w) - mean_i[:, None] * mean_i[None, :]
    cov_ip = means[12 + c:].reshape(c, 3, h, w) - mean_i[None] * mean_p[:, None]
    a = torch.einsum("klhw,clhw->ckhw", inverse_3x3(cov_i + eps * torch.eye(3)[:, :, None, None]), cov_ip)
    b = mean_p - (a * mean_i[None]).sum(1)
    ab = box_mean(torch.cat([a.reshape(3 * c, h, w), b]), radius)
    return ab[:3 * c].reshape(c, 3, h, w), ab[3 * c:]


def refined_argmax(logits: torch.Tensor, image: np.ndarray, out_hw: tuple[int, int] | None = None,
                   radius: int = 6, eps: float = 1e-4, values=None, full_image: np.ndarray | None = None
                   ) -> np.ndarray:
    """Labels from stride-4 ``logits`` (C, h, w), refined along the colour edges of ``image``.

    The filter is evaluated at ``image``'s size (the network-size copy of the photo); the labels
    are then resized (nearest) to ``out_hw``. With ``full_image`` (the photo at ``out_hw``) the
    pixels of the boundary band (network pixels whose 3x3 neighbourhood holds two labels) are
    decided again against the full-resolution colours (``refine_band``): edges as sharp as the
    photo at the cost of the band only. ``radius`` is in logit pixels; ``values`` maps channels
    to the returned labels.
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
    arg = network_size_argmax(coef, rgb)
    if full_image is not None and out_hw != (hh, ww):
        return refine_band(arg.numpy(), coef, rgb, full_image, lut)
    labels = lut[arg.numpy()]
    if (hh, ww) != out_hw:
        labels = nearest_resize(labels, out_hw)
    return labels


def network_size_argmax(coef: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """argmax over classes of the guided filter's output ``a_k . I + b_k`` at every pixel of the
    network-size photo ``rgb`` (3, hh, ww), the coefficients ``coef`` (C, 4, h, w) of the logit
    grid upsampled bilinearly (the fast guided filter); class by class, cache-sized buffers."""
    c = coef.shape[0]
    hh, ww = rgb.shape[1:]
    best = torch.full((hh, ww), -torch.inf)
    arg = torch.zeros((hh, ww), dtype=torch.uint8 if c < 256 else torch.int64)
    for k in range(c):
        up = F.interpolate(coef[k:k + 1], size=(hh, ww), mode="bilinear", align_corners=False)[0]
        q = torch.addcmul(torch.addcmul(torch.addcmul(up[3], up[0], rgb[0]), up[1], rgb[1]), up[2], rgb[2])
        better = q > best
        best = torch.where(better, q, best)
        arg[better] = k
    return arg


def nearest_resize(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map: output pixel i takes source pixel
    floor((i + 0.5) * n_in / n_out) along each axis (one row gather, then whole rows repeated:
    12 MP in a few ms)."""
    hh, ww = labels.shape
    H, W = out_hw
    if (hh, ww) == (H, W):
        return labels.copy()
    xs = np.minimum(((np.arange(W) + 0.5) * ww / W).astype(np.int64), ww - 1)
    return np.repeat(labels[:, xs], cell_spans(H, hh)[1], axis=0)


def cell_spans(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """First output index and count of output indices of every input cell under
    ``nearest_resize``'s mapping."""
    src = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
    first = np.searchsorted(src, np.arange(n_in))
    return first, np.searchsorted(src, np.arange(n_in), side="right") - first


def boundary_cells(arg: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood (clipped at the border) holds more than one label."""
    p = np.pad(arg, 1, mode="edge")
    h, w = arg.shape
    mixed = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                mixed |= p[dy:dy + h, dx:dx + w] != arg
    return mixed


def refine_band(arg: np.ndarray, coef: torch.Tensor, rgb: torch.Tensor, full_image: np.ndarray,
                lut: np.ndarray) -> np.ndarray:
    """Full-resolution labels from the network-size refined argmax ``arg`` (hh, ww): nearest
    everywhere except in the cells of the boundary band (network pixels whose 3x3 neighbourhood
    holds two labels). There every full-resolution pixel chooses between the cell's best class
    and its runner-up by the guided filter's linear model evaluated with the pixel's own colour
    I, ``a_k . I + b_k`` (He et al. Eq. 14; the coefficients ``coef`` (C, 4, h, w) of the logit
    grid, bilinear at the cell's centre, as the fast guided filter evaluates them on the
    high-resolution guide). ``rgb`` (3, hh, ww) is the network-size photo in [0, 1]. Work is
    proportional to the band, not to the photo."""
    H, W = full_image.shape[:2]
    hh, ww = arg.shape
    out = nearest_resize(lut[arg], (H, W))
    cy, cx = np.nonzero(boundary_cells(arg))
    if not len(cy):
        return out
    c = coef.shape[0]
    # every class's coefficients at the band cells' centres (grid_sample's pixel-centre grid)
    gx = (torch.from_numpy(cx).float() + 0.5) / ww * 2 - 1
    gy = (torch.from_numpy(cy).float() + 0.5) / hh * 2 - 1
    grid = torch.stack([gx, gy], -1)[None, None]
    at = F.grid_sample(coef.reshape(1, c * 4, *coef.shape[2:]).float(), grid, mode="bilinear",
                       align_corners=False)[0, :, 0].reshape(c, 4, -1)  # (C, 4, M)
    colour = rgb[:, torch.from_numpy(cy), torch.from_numpy(cx)]  # (3, M)
    q = (at[:, :3] * colour[None]).sum(1) + at[:, 3]  # (C, M): the scores at network size
    first = torch.from_numpy(arg[cy, cx].astype(np.int64))
    q[first, torch.arange(len(cy))] = -torch.inf
    second = q.argmax(0)
    m = torch.arange(len(cy))
    d = (at[first, :, m] - at[second, :, m]).numpy()  # (M, 4): score(first) - score(second)
    # the cells' full-resolution blocks as (M, kh, kw), offsets clipped into each block (pixels
    # repeated, never outside their own cell)
    r0, nr = cell_spans(H, hh)
    c0, nc = cell_spans(W, ww)
    oy, ox = np.arange(nr.max()), np.arange(nc.max())
    ys = (r0[cy][:, None] + np.minimum(oy[None], nr[cy][:, None] - 1))[:, :, None]
    xs = (c0[cx][:, None] + np.minimum(ox[None], nc[cx][:, None] - 1))[:, None, :]
    flat = (ys * W + xs).ravel()  # (M * kh * kw) pixel indices: flat gathers are 5x faster
    pix = np.take(np.ascontiguousarray(full_image).reshape(-1, 3), flat, axis=0)
    pix = pix.reshape(len(cy), len(oy), len(ox), 3).astype(np.float32) * np.float32(1 / 255)
    keep = np.einsum("mykc,mc->myk", pix, d[:, :3].astype(np.float32)) + d[:, 3, None, None] >= 0
    choice = np.where(keep, lut[first.numpy()][:, None, None], lut[second.numpy()][:, None, None])
    out.reshape(-1)[flat] = choice.ravel()
    return out


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
