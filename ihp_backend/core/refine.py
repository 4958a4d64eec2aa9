"""Edge-aware refinement of the network's coarse class probabilities with the photo's colours.

The decoder answers at stride 4 of the network size (about 1/8 of a CCP photo's side), so part
boundaries come out blurred. A colour guided filter (He, Sun, Tang, "Guided Image Filtering",
TPAMI 2013, Eq. 14, 19-21) fits, in every window, each class probability as a linear function of
the RGB colour; evaluated on the photo at the network size (about twice the logit grid's
resolution), the boundaries follow its colour edges. The coefficients are computed at the logit
grid and upsampled (the "fast guided filter" of He & Sun, 2015), and the classes are compared
per pixel only in the band where the logit grid's winners change, so the cost is a few small box
filters plus the band; the photo's own terms (its colours' window means and covariance) are the
same for every click and kept per photo (``photo_guide``). Larger photos get the labels enlarged
from the network size, nearest or with the boundary placed between network pixels
(``smooth_resize``). ``paint_clicks`` then makes every click win around itself.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


def label_lut(c: int, values=None) -> np.ndarray:
    """Channel index -> returned label (``values``, default the index), uint8 when they fit."""
    lut = np.arange(c) if values is None else np.asarray(values)
    return lut.astype(np.uint8 if lut.max(initial=0) < 256 and lut.min(initial=0) >= 0 else np.int64)


def _window_sum_1d(x: torch.Tensor, radius: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``x`` over windows of +-``radius`` along ``dim`` (clipped at the ends), from a
    running sum (cost independent of the radius), and the window lengths. The running sum is
    padded with zeros before and its last value after, so both ends of every window are plain
    slices (index_select on a strided view cost 4 ms of the guided filter's 6 at 11 classes)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    run = x.cumsum(dim)
    pad = list(run.shape)
    pad[dim] = radius + 1
    before = run.new_zeros(pad)
    pad[dim] = radius
    after = run.narrow(dim, n - 1, 1).expand(pad)
    padded = torch.cat([before, run, after], dim)
    idx = torch.arange(n)
    lengths = ((idx + radius).clamp(max=n - 1) - (idx - radius).clamp(min=0) + 1).to(x.dtype)
    return padded.narrow(dim, 2 * radius + 1, n) - padded.narrow(dim, 0, n), lengths


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


class PhotoGuide(NamedTuple):
    """What the guided filter needs of the photo alone (He et al. Eq. 19-21's colour terms), the
    same for every click on it: the network-size photo ``image`` (hh, ww, 3) uint8, its mean
    colour per logit cell ``guide`` (3, h, w), the window means of that colour ``mean_i`` and the
    inverse of its regularised window covariance ``inv_cov`` (3, 3, h, w). Kept per photo by the
    Parser: a click then filters only its class planes."""
    image: np.ndarray
    guide: torch.Tensor
    mean_i: torch.Tensor
    inv_cov: torch.Tensor
    radius: int
    eps: float


def colour_statistics(guide: torch.Tensor, radius: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means of the colours ``guide`` (3, h, w) and the inverse of their covariance plus
    ``eps`` (He et al. Eq. 19's ``(Sigma_k + eps U)^-1``): (3, h, w), (3, 3, h, w)."""
    _, h, w = guide.shape
    outer = (guide[:, None] * guide[None, :]).reshape(9, h, w)
    means = box_mean(torch.cat([guide, outer]), radius)
    mean_i = means[:3]
    cov_i = means[3:].reshape(3, 3, h, w) - mean_i[:, None] * mean_i[None, :]
    return mean_i, inverse_3x3(cov_i + eps * torch.eye(3)[:, :, None, None])


def photo_guide(image: np.ndarray, grid_hw: tuple[int, int], radius: int = 6, eps: float = 1e-4) -> PhotoGuide:
    """``PhotoGuide`` of the network-size photo ``image`` (hh, ww, 3) for class planes on the
    ``grid_hw`` logit grid (the photo's mean colour per cell by area averaging). ``radius`` in
    logit pixels, ``eps`` the filter's regulariser."""
    rgb = torch.from_numpy(np.array(image, np.float32, copy=True)).permute(2, 0, 1) / 255.0
    guide = F.interpolate(rgb[None], size=tuple(grid_hw), mode="area")[0]
    return PhotoGuide(np.asarray(image), guide, *colour_statistics(guide, radius, eps), radius, eps)


def class_coefficients(photo: PhotoGuide, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-averaged linear coefficients of the colour guided filter (He et al. Eq. 19-21)
    for the class planes ``p`` (C, h, w) on ``photo``'s logit grid -> ``a`` (C, 3, h, w), ``b``
    (C, h, w) such that the filtered ``p`` at a pixel of colour I is ``sum_k a[:, k] * I[k] + b``.
    """
    c, h, w = p.shape
    guide, mean_i = photo.guide, photo.mean_i
    # the class terms' window means in one pooling call: p (C), I p (3C)
    means = box_mean(torch.cat([p, (guide[None] * p[:, None]).reshape(3 * c, h, w)]), photo.radius)
    mean_p = means[:c]
    cov_ip = means[c:].reshape(c, 3, h, w) - mean_i[None] * mean_p[:, None]
    inv = photo.inv_cov  # a_k = (Sigma + eps U)^-1 cov(I, p_k), He et al. Eq. 19: nine products
    # written out (torch's einsum went through batched matmuls of 3 x 3: 1.5 ms more at 11 classes)
    a = torch.stack([cov_ip[:, 0] * inv[k, 0] + cov_ip[:, 1] * inv[k, 1] + cov_ip[:, 2] * inv[k, 2]
                     for k in range(3)], 1)
    b = mean_p - (a * mean_i[None]).sum(1)
    ab = box_mean(torch.cat([a.reshape(3 * c, h, w), b]), photo.radius)
    return ab[:3 * c].reshape(c, 3, h, w), ab[3 * c:]


def guided_coefficients(guide: torch.Tensor, p: torch.Tensor, radius: int, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_coefficients`` for the cell colours ``guide`` (3, h, w) in [0, 1] and class planes
    ``p`` (C, h, w), the photo's terms computed here (He et al. Eq. 19-21)."""
    photo = PhotoGuide(np.zeros((0, 0, 3), np.uint8), guide, *colour_statistics(guide, radius, eps), radius, eps)
    return class_coefficients(photo, p)


def refined_argmax(logits: torch.Tensor, image: np.ndarray, out_hw: tuple[int, int] | None = None,
                   radius: int = 6, eps: float = 1e-4, values=None, smooth_edges: bool = False,
                   photo: PhotoGuide | None = None) -> np.ndarray:
    """Labels from stride-4 ``logits`` (C, h, w), refined along the colour edges of ``image``.

    The filter is evaluated at ``image``'s size (the network-size copy of the photo,
    ``network_size_argmax``); the labels are then resized to ``out_hw``: nearest (blocks of
    network pixels), or with ``smooth_edges`` by interpolating each boundary pixel's score
    margin between its neighbours (``smooth_resize``: edges placed between network pixels, not
    on their grid). ``radius`` is in logit pixels; ``values`` maps channels to the returned labels.
    ``photo`` (``photo_guide`` of ``image`` on the logits' grid with this radius and eps): the
    photo's terms computed once for all its clicks; computed here when None.
    """
    c, h, w = logits.shape
    hh, ww = image.shape[:2]
    lut = label_lut(c, values)
    out_hw = tuple(out_hw or (hh, ww))
    if c == 1:
        return np.full(out_hw, lut[0], lut.dtype)
    if photo is None:
        photo = photo_guide(image, (h, w), radius, eps)
    elif tuple(photo.guide.shape[1:]) != (h, w) or tuple(photo.image.shape[:2]) != (hh, ww) \
            or (photo.radius, photo.eps) != (radius, eps):
        raise ValueError("photo_guide was made for another grid, photo size, radius or eps")
    a, b = class_coefficients(photo, torch.softmax(logits.float(), dim=0))
    coef = torch.cat([a, b[:, None]], 1)  # (C, 4, h, w): per class, the colour weights and offset
    smooth = smooth_edges and (hh, ww) != out_hw
    arg, margin = network_size_argmax(coef, photo.image, photo.guide, with_margin=smooth)
    if (hh, ww) == out_hw:
        return lut[arg]
    if smooth:
        return smooth_resize(arg, margin, out_hw, lut)
    return nearest_resize(lut[arg], out_hw)


def network_size_argmax(coef: torch.Tensor, image: np.ndarray, guide: torch.Tensor,
                        with_margin: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """argmax over classes of the guided filter's output ``q_k = a_k . I + b_k`` (He et al.
    Eq. 14) on the network-size photo ``image`` (hh, ww, 3) uint8, and (``with_margin``, else None) the
    margin of the winner over the runner-up, both (hh, ww). ``coef`` (C, 4, h, w) are the
    coefficients at the logit grid, ``guide`` (3, h, w) the photo's mean colour there.

    The classes are compared at every network pixel only in the band of logit cells whose 3x3
    neighbourhood holds two winners at the logit grid (coefficients bilinear, as the fast
    guided filter evaluates them); elsewhere a pixel takes its cell's winner and margin. The
    cost is the band's (about a tenth of the pixels), not classes x pixels: 18 -> 9 ms at 11
    classes on a CCP photo; 99.96% of the pixels as the class-by-class evaluation everywhere
    (30 CCP train photos)."""
    c, _, h, w = coef.shape
    hh, ww = image.shape[:2]
    q = torch.addcmul(torch.addcmul(torch.addcmul(coef[:, 3], coef[:, 0], guide[0]), coef[:, 1], guide[1]),
                      coef[:, 2], guide[2])  # (C, h, w): the filter at the logit grid's colours
    top = q.topk(2, dim=0)
    cell_arg = top.indices[0].numpy().astype(np.uint8 if c < 256 else np.int64)
    arg = nearest_resize(cell_arg, (hh, ww))  # each network pixel: its cell's winner ...
    margin = nearest_resize((top.values[0] - top.values[1]).numpy(), (hh, ww)) if with_margin else None
    ys, xs = np.nonzero(nearest_resize(boundary_cells(cell_arg), (hh, ww)))  # ... except in the band
    if len(ys):
        grid = torch.stack([(torch.from_numpy(xs).float() + 0.5) / ww * 2 - 1,
                            (torch.from_numpy(ys).float() + 0.5) / hh * 2 - 1], -1)[None, None]
        at = F.grid_sample(coef.reshape(1, c * 4, h, w), grid, mode="bilinear", padding_mode="border",
                           align_corners=False)[0, :, 0].reshape(c, 4, -1)  # = bilinear upsampling there
        colour = torch.from_numpy(image[ys, xs].T.astype(np.float32)) / 255.0  # (3, P), only the band's
        top = ((at[:, :3] * colour[None]).sum(1) + at[:, 3]).topk(2, dim=0)
        arg[ys, xs] = top.indices[0].numpy()
        if with_margin:
            margin[ys, xs] = (top.values[0] - top.values[1]).numpy()
    return arg, margin


def nearest_resize(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map: output pixel i takes source pixel
    floor((i + 0.5) * n_in / n_out) along each axis (larger: one row gather, then whole rows
    repeated, 12 MP in a few ms; smaller: the source rows, then their columns)."""
    hh, ww = labels.shape
    H, W = out_hw
    if (hh, ww) == (H, W):
        return labels.copy()
    xs = np.minimum(((np.arange(W) + 0.5) * ww / W).astype(np.int64), ww - 1)
    if H <= hh:  # smaller: gather the source rows first (the previous prediction from a 12 MP answer)
        ys = np.minimum(((np.arange(H) + 0.5) * hh / H).astype(np.int64), hh - 1)
        return labels[ys][:, xs]
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


def _bilinear_sources(coords: np.ndarray, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For output indices ``coords`` of an ``n_out`` axis resized from ``n_in``: the two source
    indices and the weight of the second (align_corners=False, clamped at the ends)."""
    src = np.clip((coords + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)


def smooth_resize(arg: np.ndarray, margin: np.ndarray, out_hw: tuple[int, int], lut: np.ndarray
                  ) -> np.ndarray:
    """Labels at ``out_hw`` from network-size labels ``arg`` and their score margins (winner
    minus runner-up, ``network_size_argmax``): nearest everywhere except the blocks of the
    boundary pixels (3x3 neighbourhood with two labels). There an output pixel keeps its
    nearest source's label ``f`` if the bilinear mix of its four sources' signed margins
    (``+margin`` for a source labelled ``f``, ``-margin`` otherwise) is >= 0, else it takes the
    other label with the largest weighted margin: the zero crossing of the interpolated score
    difference, so a boundary runs between network pixels instead of along their grid. Work is
    proportional to the band, not to the photo."""
    H, W = out_hw
    hh, ww = arg.shape
    out = nearest_resize(lut[arg], (H, W))
    cy, cx = np.nonzero(boundary_cells(arg))
    if not len(cy):
        return out
    # the blocks of the boundary pixels as (M, kh, kw), offsets clipped into each block
    r0, nr = cell_spans(H, hh)
    c0, nc = cell_spans(W, ww)
    ys = r0[cy][:, None] + np.minimum(np.arange(nr.max())[None], nr[cy][:, None] - 1)  # (M, kh)
    xs = c0[cx][:, None] + np.minimum(np.arange(nc.max())[None], nc[cx][:, None] - 1)  # (M, kw)
    y0, y1, fy = (v[:, :, None] for v in _bilinear_sources(ys, H, hh))
    x0, x1, fx = (v[:, None, :] for v in _bilinear_sources(xs, W, ww))
    own = arg[cy, cx][:, None, None]
    votes, best_other, best_weight = 0.0, own, np.zeros(1, np.float32)
    for yy, xx, wgt in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x1, (1 - fy) * fx),
                        (y1, x0, fy * (1 - fx)), (y1, x1, fy * fx)):
        lab, m = arg[yy, xx], wgt * margin[yy, xx]
        same = lab == own
        votes = votes + np.where(same, m, -m)
        stronger = ~same & (m > best_weight)
        best_other = np.where(stronger, lab, best_other)
        best_weight = np.where(stronger, m, best_weight)
    choice = np.where(votes >= 0, own, best_other)
    flat = (ys[:, :, None] * W + xs[:, None, :]).ravel()
    out.reshape(-1)[flat] = lut[choice].ravel()
    return out


def click_disk(image: np.ndarray, cy: int, cx: int, radius: float, colour_tol: float = 0.2
               ) -> tuple[slice, slice, np.ndarray]:
    """The pixels a click at (cy, cx) claims (``paint_clicks``): its window's (rows, cols) and the
    mask of the window's pixels within ``radius`` whose colour is within ``colour_tol`` of the
    clicked pixel's."""
    h, w = image.shape[:2]
    r = int(np.ceil(radius))
    ys, xs = slice(max(0, cy - r), min(h, cy + r + 1)), slice(max(0, cx - r), min(w, cx + r + 1))
    yy, xx = np.ogrid[ys, xs]
    near = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
    diff = image[ys, xs].astype(np.float32) - image[cy, cx].astype(np.float32)
    # einsum, not (diff * diff).sum(-1): numpy's reduction over a last axis of 3 was most of
    # a 12 MP click's 0.7 ms per click here
    near &= np.einsum("ijk,ijk->ij", diff, diff) <= (255.0 * colour_tol) ** 2
    return ys, xs, near


def paint_clicks(labels: np.ndarray, image: np.ndarray, clicks, radius: float, colour_tol: float = 0.2,
                 disks: dict | None = None) -> np.ndarray:
    """Each click (y, x, label) claims the pixels within ``radius`` of it whose RGB colour is
    within ``colour_tol`` (Euclidean, channels in [0, 1]) of the clicked pixel's; later clicks
    win. The annotator's click is ground truth where it lands, whatever the network said; the
    colour test keeps the disk off neighbouring parts of another colour. In place; returns labels.
    ``disks``: a dict kept per photo (the caller's), holding each click's disk (``click_disk``)
    so that the clicks of earlier answers cost an assignment, not a colour test (at 12 MP each
    disk is ~150 x 150 pixels: 0.4 ms, ten clicks 4 ms per answer)."""
    h, w = labels.shape
    if int(np.ceil(radius)) <= 0:
        return labels
    for y, x, value in np.asarray(clicks, np.float64).reshape(-1, 3):
        cy, cx = min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)
        key = (cy, cx, float(radius), float(colour_tol))
        disk = disks.get(key) if disks is not None else None
        if disk is None:
            disk = click_disk(image, cy, cx, radius, colour_tol)
            if disks is not None:
                disks[key] = disk
        ys, xs, near = disk
        labels[ys, xs][near] = int(value)
    return labels
