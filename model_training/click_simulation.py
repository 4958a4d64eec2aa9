"""Simulated clicks for training and evaluation (paper Sec. III-D).

All functions take an integer label map (H, W) and a ``numpy.random.Generator`` and return
clicks as (y, x, class) rows; classes are label-map values (slot binding happens later).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

N_CANDIDATES = 5  # N_c, paper Sec. IV-B
D_MARGIN = 10  # d_margin in pixels (3 on Helen)


def boundary_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel of ``mask`` to the nearest pixel outside it.

    The image border counts as outside (padding), so a component touching the border has its
    centre pulled inwards, as an annotator's click would be.
    """
    padded = np.pad(mask, 1, constant_values=False)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def components(labels: np.ndarray, cls: int, min_area: int = 1):
    """Connected components (8-connectivity) of one class, largest first, as boolean masks."""
    comp, n = ndimage.label(labels == cls, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    areas = np.bincount(comp.ravel())[1:]
    order = np.argsort(-areas)
    return [comp == (i + 1) for i in order if areas[i] >= min_area]


def central_click(mask: np.ndarray, rng: np.random.Generator,
                  n_candidates: int = N_CANDIDATES) -> tuple[int, int]:
    """Paper Eq. (4): of ``n_candidates`` random pixels of the component, the one farthest
    from its boundary."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty component")
    pick = rng.choice(len(ys), size=min(n_candidates, len(ys)), replace=False)
    y0, x0 = ys.min(), xs.min()
    box = mask[y0:ys.max() + 1, x0:xs.max() + 1]
    dist = boundary_distance(box)[ys[pick] - y0, xs[pick] - x0]
    best = pick[int(np.argmax(dist))]
    return int(ys[best]), int(xs[best])


def central_clicks(labels: np.ndarray, rng: np.random.Generator, background: int = 0,
                   min_area: int = 1, n_candidates: int = N_CANDIDATES) -> list[tuple[int, int, int]]:
    """One central click on every connected component of every non-background class."""
    out = []
    for cls in np.unique(labels):
        if cls == background or cls < 0:
            continue
        for comp in components(labels, int(cls), min_area):
            y, x = central_click(comp, rng, n_candidates)
            out.append((y, x, int(cls)))
    return out


def background_click(labels: np.ndarray, rng: np.random.Generator, background: int = 0,
                     d_margin: float = D_MARGIN) -> tuple[int, int, int] | None:
    """A background click at least ``d_margin`` pixels from every part (None if impossible)."""
    far = ndimage.distance_transform_edt(labels == background) >= d_margin
    ys, xs = np.nonzero(far & (labels == background))
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    return int(ys[i]), int(xs[i]), int(background)


def random_extra_clicks(labels: np.ndarray, rng: np.random.Generator, max_extra: int = 15,
                        background: int = 0, bg_range: tuple[int, int] = (3, 6),
                        ignore: int = 255) -> list[tuple[int, int, int]]:
    """Random-Sampling: N_r ~ U{1..EC} extra clicks on random pixels, at most ``bg_range``
    of them (and at least bg_range[0] when available) on the background."""
    n_total = int(rng.integers(1, max_extra + 1))
    n_bg = min(n_total, int(rng.integers(bg_range[0], bg_range[1] + 1)))
    valid = labels != ignore
    fg = np.flatnonzero(valid & (labels != background))
    bg = np.flatnonzero(labels == background)
    picks = []
    if len(bg):
        picks += list(rng.choice(bg, size=min(n_bg, len(bg)), replace=False))
    if len(fg):
        picks += list(rng.choice(fg, size=min(n_total - n_bg, len(fg)), replace=False))
    w = labels.shape[1]
    return [(int(p // w), int(p % w), int(labels.flat[p])) for p in picks]


def near_edge_clicks(labels: np.ndarray, rng: np.random.Generator, max_extra: int = 15,
                     d_margin: float = D_MARGIN, ignore: int = 255) -> list[tuple[int, int, int]]:
    """Near-Edge-Sampling, paper Eq. (5): extra clicks inside parts within ``d_margin`` pixels
    of a part boundary (N_r ~ U{1..EC})."""
    n_total = int(rng.integers(1, max_extra + 1))
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    near = ndimage.distance_transform_edt(~edge) <= d_margin
    cand = np.flatnonzero(near & (labels != ignore))
    if len(cand) == 0:
        return []
    picks = rng.choice(cand, size=min(n_total, len(cand)), replace=False)
    w = labels.shape[1]
    return [(int(p // w), int(p % w), int(labels.flat[p])) for p in picks]


def largest_error_region(labels: np.ndarray, pred: np.ndarray, ignore: int = 255) -> np.ndarray | None:
    """Boolean mask of the largest connected wrongly labelled region (None if no error).

    Connectivity is computed per (true class, predicted class) pair, so one region is one
    kind of mistake, the way an annotator sees it.
    """
    wrong = (labels != pred) & (labels != ignore)
    if not wrong.any():
        return None
    key = np.where(wrong, labels.astype(np.int64) * 4096 + pred.astype(np.int64), -1)
    keys, totals = np.unique(key[wrong], return_counts=True)
    best, best_area = None, 0
    for k, total in sorted(zip(keys.tolist(), totals.tolist()), key=lambda kt: -kt[1]):
        if total <= best_area:
            break  # no component of this kind can be larger than the best so far
        comp, n = ndimage.label(key == k)
        if n == 0:
            continue
        areas = np.bincount(comp.ravel())[1:]
        i = int(np.argmax(areas))
        if areas[i] > best_area:
            best_area, best = int(areas[i]), comp == (i + 1)
    return best


def correction_click(labels: np.ndarray, pred: np.ndarray, rng: np.random.Generator | None = None,
                     ignore: int = 255) -> tuple[int, int, int] | None:
    """The evaluation's refinement click: the central point (farthest from the boundary) of
    the largest wrongly labelled region, labelled with the ground-truth class there."""
    region = largest_error_region(labels, pred, ignore)
    if region is None:
        return None
    ys, xs = np.nonzero(region)
    y0, x0 = ys.min(), xs.min()
    d = boundary_distance(region[y0:ys.max() + 1, x0:xs.max() + 1])  # bbox: same result, cheaper
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    y, x = int(y + y0), int(x + x0)
    return y, x, int(labels[y, x])
