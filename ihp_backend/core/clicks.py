"""Click encoding shared by serving and training: clicks -> localization maps (paper Eq. 1).

A click is ``(y, x, slot)`` in pixel coordinates of the array it refers to; ``slot`` is the
network channel of its class (see ``ihp_backend.core.checkpoint.Binding``).
"""
from __future__ import annotations

import numpy as np
import torch

TRUNCATION = 255.0  # paper: T_i[p] = min(255, min_q ||p - q||^2)


def as_click_array(clicks) -> np.ndarray:
    """Normalise clicks to a float (N, 3) array of (y, x, slot)."""
    arr = np.asarray(clicks, dtype=np.float64).reshape(-1, 3)
    return arr


def scale_clicks(clicks: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """Map click pixel coordinates from an image of size src_hw to one of size dst_hw.

    Pixel centres are aligned (the convention of bilinear resizing without corner alignment).
    """
    c = as_click_array(clicks).copy()
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    c[:, 0] = np.clip((c[:, 0] + 0.5) * sy - 0.5, 0, dst_hw[0] - 1)
    c[:, 1] = np.clip((c[:, 1] + 0.5) * sx - 0.5, 0, dst_hw[1] - 1)
    return c


def draw_clicks(maps: np.ndarray, clicks, truncation: float = TRUNCATION) -> list[tuple]:
    """Lower ``maps`` (num_slots, H, W), scaled to [0, 1], to each click's truncated squared
    distance, paper Eq. (1); returns the windows it touched as ``(slot, rows, cols)`` slices.

    Because the map saturates at sqrt(truncation) pixels, each click only touches a small
    window: one vectorised window per click, never a loop over pixels. ``maps`` may be a
    strided view (serving writes straight into the network's channels-last input).
    """
    num_slots, h, w = maps.shape
    c = as_click_array(clicks)
    r = int(np.ceil(np.sqrt(truncation)))
    scale = np.float32(1.0 / truncation)
    touched = []
    for y, x, s in c:
        s = int(s)
        if not 0 <= s < num_slots:
            raise ValueError(f"click slot {s} outside 0..{num_slots - 1}")
        yi, xi = int(round(y)), int(round(x))
        y0, y1 = max(0, yi - r), min(h, yi + r + 1)
        x0, x1 = max(0, xi - r), min(w, xi + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = (np.arange(y0, y1, dtype=np.float32) - np.float32(y))[:, None] ** 2
        xx = (np.arange(x0, x1, dtype=np.float32) - np.float32(x))[None, :] ** 2
        win = maps[s, y0:y1, x0:x1]
        np.minimum(win, (yy + xx) * scale, out=win)  # min(T, d)/T == min(1, d/T)
        touched.append((s, slice(y0, y1), slice(x0, x1)))
    return touched


def click_map_patches(clicks, hw: tuple[int, int], num_slots: int, truncation: float = TRUNCATION
                      ) -> list[tuple[int, int, int, np.ndarray]]:
    """Paper Eq. (1)'s maps as 1 everywhere plus what the clicks change: [(slot, y0, x0, map - 1
    on the box (h, w))], one box per group of a slot's overlapping click windows (a map is a
    minimum over its clicks, not a sum), without drawing the (num_slots, H, W) maps. The same
    values as ``localization_maps`` there (float32)."""
    h, w = hw
    c = as_click_array(clicks)
    r = int(np.ceil(np.sqrt(truncation)))
    groups: dict[int, list[list]] = {}  # slot -> [[y0, y1, x0, x1, click rows]]
    for i, (y, x, s) in enumerate(c):
        s = int(s)
        if not 0 <= s < num_slots:
            raise ValueError(f"click slot {s} outside 0..{num_slots - 1}")
        yi, xi = int(round(y)), int(round(x))
        box = [max(0, yi - r), min(h, yi + r + 1), max(0, xi - r), min(w, xi + r + 1), [i]]
        if box[0] >= box[1] or box[2] >= box[3]:
            continue
        mine = groups.setdefault(s, [])
        merged = True
        while merged:
            merged = False
            for other in mine:
                if box[0] < other[1] and other[0] < box[1] and box[2] < other[3] and other[2] < box[3]:
                    mine.remove(other)
                    box = [min(box[0], other[0]), max(box[1], other[1]), min(box[2], other[2]),
                           max(box[3], other[3]), box[4] + other[4]]
                    merged = True
                    break
        mine.append(box)
    patches = []
    for s in sorted(groups):
        for y0, y1, x0, x1, rows in groups[s]:
            local = np.ones((1, y1 - y0, x1 - x0), np.float32)
            own = c[sorted(rows)] - [y0, x0, s]  # into the box, slot 0 of the local map
            draw_clicks(local, own, truncation)
            patches.append((s, y0, x0, local[0] - np.float32(1.0)))
    return patches


def localization_maps(clicks, hw: tuple[int, int], num_slots: int,
                      truncation: float = TRUNCATION, out: np.ndarray | None = None) -> np.ndarray:
    """Class-aware localization maps, paper Eq. (1).

    ``T_i[p] = min(truncation, min over clicks q of slot i of ||p - q||^2)``; a slot without
    clicks is ``truncation`` everywhere. Returned as float32 (num_slots, H, W) scaled to [0, 1]
    (divided by ``truncation``), so 0 marks a click and 1 means "far from any click".
    ``out`` (float32, (num_slots, H, W)) is filled in place when given.
    """
    h, w = hw
    if out is None:
        out = np.empty((num_slots, h, w), dtype=np.float32)
    out.fill(1.0)
    draw_clicks(out, clicks, truncation)
    return out


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_rgb(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W), mean/std normalised."""
    x = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    x -= np.asarray(mean, np.float32)[:, None, None]
    x /= np.asarray(std, np.float32)[:, None, None]
    return x


def network_input(image: np.ndarray, clicks, num_slots: int, prev_mask: np.ndarray | None = None,
                  use_prev_mask: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  rgb: np.ndarray | None = None, out: np.ndarray | None = None) -> torch.Tensor:
    """Build the (C, H, W) input tensor: RGB, the maps, and optionally the previous prediction.

    ``image`` is already at network resolution and clicks are in its pixel coordinates.
    ``prev_mask`` is an (H, W) array of slot indices (or -1 / None for "no prediction yet").
    ``rgb`` is ``normalise_rgb(image, mean, std)`` when the caller has it cached (it does not
    depend on the clicks). ``out`` (float32, (C, H, W)) is filled in place when given.
    """
    h, w = image.shape[:2]
    n = 3 + num_slots * (2 if use_prev_mask else 1)
    if out is None:
        out = np.empty((n, h, w), np.float32)
    elif out.shape != (n, h, w) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(n, h, w)}, not {out.dtype} {out.shape}")
    out[:3] = normalise_rgb(image, mean, std) if rgb is None else rgb
    localization_maps(clicks, (h, w), num_slots, out=out[3:3 + num_slots])
    if use_prev_mask:
        onehot = out[3 + num_slots:]
        onehot.fill(0.0)
        if prev_mask is not None:
            pm = np.asarray(prev_mask)
            valid = (pm >= 0) & (pm < num_slots)
            ys, xs = np.nonzero(valid)
            onehot[pm[valid], ys, xs] = 1.0
    return torch.from_numpy(out)
