"""A learned step that moves label boundaries onto the photo's edges at a working resolution
above the network's (issue 29): a small class-agnostic CNN reads the photo and one class's
coarse mask around its boundary and says, per pixel, whether the pixel belongs to that class.
Every class present near a boundary is asked; each band pixel takes the class that claims it
most. Pixels away from boundaries keep their coarse label, so the cost is the band's.

Data layout: ``labels`` (H, W) integer label map, ``rgb`` (H, W, 3) uint8, same size. The
refiner's weights and config travel in one small file (``save_edge_refiner``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EDGE_FORMAT = "ihp-edge-refiner-1"


class EdgeRefinerNet(nn.Module):
    """RGB (3, centred on 0) + a class's coarse mask (1, as +-1) -> that class's logit per pixel.
    Dilated 3x3 convs (receptive field ``1 + 2 * sum(dilations)`` px); the output is the coarse
    mask times ``skip`` plus a learned correction, so an untrained refiner keeps the coarse mask."""

    def __init__(self, width: int = 24, dilations=(1, 2, 4, 8, 1), skip: float = 2.0):
        super().__init__()
        self.cfg = {"width": int(width), "dilations": [int(d) for d in dilations], "skip": float(skip)}
        layers, c = [], 4
        for d in dilations:
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip = float(skip)

    @property
    def halo(self) -> int:
        """Pixels of context each output pixel reads on every side."""
        return sum(self.cfg["dilations"])

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``rgb`` (N, 3, h, w) in [-0.5, 0.5], ``mask`` (N, 1, h, w) in {-1, 1} -> (N, 1, h, w) logits."""
        return self.head(self.body(torch.cat([rgb, mask], 1))) + self.skip * mask


def save_edge_refiner(net: EdgeRefinerNet, path: str, meta: dict | None = None) -> None:
    torch.save({"format": EDGE_FORMAT, "config": net.cfg, "state_dict": net.state_dict(), "meta": meta or {}}, path)


def load_edge_refiner(path: str) -> EdgeRefinerNet:
    """The refiner stored by ``save_edge_refiner``; raises ValueError on anything else."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != EDGE_FORMAT:
        raise ValueError(f"{path} is not an edge refiner ({EDGE_FORMAT})")
    net = EdgeRefinerNet(**ck["config"])
    net.load_state_dict(ck["state_dict"])
    return net.eval()


def work_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """The refiner's working size: ``hw`` itself when its longer side is at most ``side``, else
    scaled down to that longer side."""
    h, w = int(hw[0]), int(hw[1])
    if max(h, w) <= side:
        return h, w
    s = side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` (Chebyshev) of a pixel with another label, (H, W) bool (the window's
    largest and smallest label differ; separable filters, 6 ms on a CCP photo)."""
    from scipy import ndimage
    lab = np.asarray(labels)
    lab = lab.astype(np.int16) if lab.size and -32768 <= lab.min() and lab.max() < 32768 else lab
    k = 2 * int(width) + 1
    return ndimage.maximum_filter(lab, k, mode="nearest") != ndimage.minimum_filter(lab, k, mode="nearest")


def band_tiles(band: np.ndarray, tile: int) -> np.ndarray:
    """(y, x) top-left corners of the ``tile`` x ``tile`` tiles holding band pixels."""
    h, w = band.shape
    th, tw = -(-h // tile), -(-w // tile)
    padded = np.zeros((th * tile, tw * tile), bool)
    padded[:h, :w] = band
    hit = padded.reshape(th, tile, tw, tile).any(axis=(1, 3))
    ty, tx = np.nonzero(hit)
    return np.stack([ty * tile, tx * tile], 1)


def refine_edges(labels: np.ndarray, rgb: np.ndarray, net: EdgeRefinerNet, band_width: int = 3,
                 tile: int = 32, batch: int = 128) -> np.ndarray:
    """``labels`` with the pixels within ``band_width`` of a boundary re-decided by ``net``: in
    each tile holding such pixels, every label present within ``band_width`` of the tile is
    scored by the net on its own mask (with the net's context around the tile), and a band pixel
    takes the label with the highest logit. Returns a new array; everything outside the band is
    ``labels``'. The net runs in its weights' type, channels-last."""
    h, w = labels.shape
    band = boundary_band(labels, band_width)
    corners = band_tiles(band, tile)
    out = labels.copy()
    if not len(corners):
        return out
    r = net.halo
    pad_lab = np.pad(labels, ((r, r + tile), (r, r + tile)), mode="edge")
    pad_rgb = np.pad(rgb, ((r, r + tile), (r, r + tile), (0, 0)), mode="edge")
    size = tile + 2 * r
    near = max(0, r - band_width)  # offset of the tile grown by band_width inside the padded crop
    jobs = []  # (tile index, label)
    for i, (y, x) in enumerate(corners):
        for v in np.unique(pad_lab[y + near:y + size - near, x + near:x + size - near]):
            jobs.append((i, int(v)))
    dtype, device = next(net.parameters()).dtype, next(net.parameters()).device
    best = np.full((len(corners), tile, tile), -np.inf, np.float32)
    best_label = np.zeros((len(corners), tile, tile), labels.dtype)
    with torch.inference_mode():
        for s in range(0, len(jobs), batch):
            part = jobs[s:s + batch]
            idx = np.array([i for i, _ in part])
            ys, xs = corners[idx, 0], corners[idx, 1]
            rgb_in = np.stack([pad_rgb[y:y + size, x:x + size] for y, x in zip(ys, xs)])
            mask_in = np.stack([pad_lab[y:y + size, x:x + size] == v for (y, x), (_, v) in zip(zip(ys, xs), part)])
            x_rgb = torch.from_numpy(rgb_in).to(device).permute(0, 3, 1, 2).to(dtype) / 255.0 - 0.5
            x_mask = torch.from_numpy(mask_in).to(device)[:, None].to(dtype) * 2 - 1
            logit = net(x_rgb.contiguous(memory_format=torch.channels_last),
                        x_mask.contiguous(memory_format=torch.channels_last))
            logit = logit[:, 0, r:r + tile, r:r + tile].float().cpu().numpy()
            for k, (i, v) in enumerate(part):
                better = logit[k] > best[i]
                best[i][better] = logit[k][better]
                best_label[i][better] = v
    for i, (y, x) in enumerate(corners):
        hh, ww = min(tile, h - y), min(tile, w - x)
        sel = band[y:y + hh, x:x + ww]
        out[y:y + hh, x:x + ww][sel] = best_label[i, :hh, :ww][sel]
    return out
