"""A learned step that moves label boundaries onto the photo's edges at a working resolution
above the network's (issue 29): a small class-agnostic CNN reads the photo and one class's
coarse mask around its boundary and says, per pixel, whether the pixel belongs to that class.
Every class present near a boundary is asked; each band pixel takes the class that claims it
most. Pixels away from boundaries keep their coarse label, so the cost is the band's.

Data layout: ``labels`` (H, W) integer label map, ``rgb`` (H, W, 3) uint8, same size. The
refiner's weights and config travel in one small file (``save_edge_refiner``)."""
from __future__ import annotations

from dataclasses import dataclass

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

    def inner_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` on ``x`` = cat(rgb, mask) (N, 4, h, w), only where the receptive field lies
        inside: (N, h - 2 halo, w - 2 halo), equal to ``forward(...)[:, 0, halo:-halo, halo:-halo]``.
        Unpadded convs: no work on the border pixels a tile's answer never reads (a third of
        the MACs of a 16 px tile)."""
        h = x
        for m in self.body:
            h = F.conv2d(h, m.weight, m.bias, dilation=m.dilation) if isinstance(m, nn.Conv2d) else torch.relu_(h)
        r = self.halo
        return F.conv2d(h, self.head.weight, self.head.bias)[:, 0] + self.skip * x[:, 3, r:x.shape[2] - r, r:x.shape[3] - r]


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


def _spread(a: np.ndarray, axis: int, lo: int, hi: int, n: int) -> np.ndarray:
    """``out[k] = a[k + lo .. k + hi].any()`` along ``axis`` for ``k < n`` (bool; indices outside ``a``
    count as False), by ``hi - lo`` shifted ORs."""
    a = np.moveaxis(a, axis, 0)
    shifted = np.zeros((n + hi - lo,) + a.shape[1:], bool)  # shifted[i] = a[i + lo]
    s0, s1 = max(0, -lo), min(len(shifted), a.shape[0] - lo)
    shifted[s0:s1] = a[s0 + lo:s1 + lo]
    out = shifted[:n].copy()
    for d in range(1, hi - lo + 1):
        out |= shifted[d:d + n]
    return np.moveaxis(out, 0, axis)


def boundary_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels within ``width`` (Chebyshev) of a pixel with another label, (H, W) bool: the
    (2 width + 1)^2 window (clipped at the border) holds two labels, i.e. two neighbours in it
    differ. The label changes between horizontal and vertical neighbours, spread over the windows
    that hold both pixels (shifted ORs, about 2 ms on a CCP photo; a window max != min filter
    costs 3 in uint8, 8 in int16)."""
    lab = np.asarray(labels)
    h, w = lab.shape
    r = int(width)
    out = np.zeros((h, w), bool)
    if r < 1:
        return out
    if w > 1:  # a change between x and x + 1 is inside the windows of columns x + 1 - r .. x + r
        out |= _spread(_spread(lab[:, 1:] != lab[:, :-1], 0, -r, r, h), 1, -r, r - 1, w)
    if h > 1:
        out |= _spread(_spread(lab[1:] != lab[:-1], 1, -r, r, w), 0, -r, r - 1, h)
    return out


def band_tiles(band: np.ndarray, tile: int) -> np.ndarray:
    """(y, x) top-left corners of the ``tile`` x ``tile`` tiles holding band pixels."""
    h, w = band.shape
    th, tw = -(-h // tile), -(-w // tile)
    padded = np.zeros((th * tile, tw * tile), bool)
    padded[:h, :w] = band
    hit = padded.reshape(th, tile, tw, tile).any(axis=(1, 3))
    ty, tx = np.nonzero(hit)
    return np.stack([ty * tile, tx * tile], 1)


@dataclass(frozen=True)
class EdgeMemo:
    """What one ``refine_edges`` call answered, for the next call on the same photo and net:
    the coarse labels as padded for the tiles' crops, and the refined labels (``refine_edges``'s
    ``memo``)."""
    padded: np.ndarray
    refined: np.ndarray
    tile: int
    band_width: int


def refine_edges(labels: np.ndarray, rgb: np.ndarray, net: EdgeRefinerNet, band_width: int = 3,
                 tile: int = 16, batch: int = 256, memo: list | None = None) -> np.ndarray:
    """``labels`` with the pixels within ``band_width`` of a boundary re-decided by ``net``: in
    each tile holding such pixels, every label present within ``band_width`` of the tile is
    scored by the net on its own mask (with the net's context around the tile), and a band pixel
    takes the label with the highest logit. Returns a new array; everything outside the band is
    ``labels``'. The net runs in its weights' type, channels-last, unpadded (``inner_logits``):
    the answer does not depend on ``tile`` (16 px tiles cost least: 24.2 -> 15.9 ms on the bench's
    CCP photo against 32 px padded ones).

    ``memo``: a one-item list holding the ``EdgeMemo`` of an earlier call on the same ``rgb`` with
    the same net (or None), replaced by this call's. A tile whose crop of coarse labels (the tile,
    the net's context and the band's) equals that call's takes that call's answer, which is what
    the net would say again: a click changes the coarse labels in part of the photo, so the
    refiner's cost follows what changed, not how many boundaries the photo has."""
    h, w = labels.shape
    band = boundary_band(labels, band_width)
    corners = band_tiles(band, tile)
    out = labels.copy()
    r = net.halo
    size = tile + 2 * r
    pad_lab = np.pad(labels, ((r, r + tile), (r, r + tile)), mode="edge")
    earlier = memo[0] if memo else None
    if memo is not None:
        memo[0] = None
    if not len(corners):
        if memo is not None:
            memo[0] = EdgeMemo(pad_lab, out, tile, band_width)
        return out
    th, tw = -(-h // tile), -(-w // tile)
    grid = np.zeros((th, tw, tile, tile), labels.dtype)
    ys, xs = corners[:, 0], corners[:, 1]
    if earlier is not None and earlier.padded.shape == pad_lab.shape and earlier.padded.dtype == pad_lab.dtype \
            and (earlier.tile, earlier.band_width) == (tile, band_width) and band_width <= r:
        # tiles whose crop is the earlier call's take its answer (the crop holds the band's reach too)
        windows = np.lib.stride_tricks.sliding_window_view
        same = (windows(pad_lab, (size, size))[ys, xs] == windows(earlier.padded, (size, size))[ys, xs]).all(axis=(1, 2))
        if same.any():
            old = np.zeros((th * tile, tw * tile), labels.dtype)
            old[:h, :w] = earlier.refined
            old = old.reshape(th, tile, tw, tile).transpose(0, 2, 1, 3)
            grid[ys[same] // tile, xs[same] // tile] = old[ys[same] // tile, xs[same] // tile]
            ys, xs = ys[~same], xs[~same]
    if len(ys):
        grid[ys // tile, xs // tile] = _refined_tiles(pad_lab, rgb, net, ys, xs, tile, band_width, batch)
    np.copyto(out, grid.transpose(0, 2, 1, 3).reshape(th * tile, tw * tile)[:h, :w], where=band)
    if memo is not None:
        memo[0] = EdgeMemo(pad_lab, out, tile, band_width)
    return out


def _refined_tiles(pad_lab: np.ndarray, rgb: np.ndarray, net: EdgeRefinerNet, ys: np.ndarray, xs: np.ndarray,
                   tile: int, band_width: int, batch: int) -> np.ndarray:
    """``refine_edges``'s answer on the tiles at corners (``ys``, ``xs``): (T, tile, tile) labels,
    each pixel the label present within ``band_width`` of the tile that the net scores highest."""
    r = net.halo
    size = tile + 2 * r
    pad_rgb = np.pad(rgb, ((r, r + tile), (r, r + tile), (0, 0)), mode="edge")
    # every band tile with the net's context around it: (T, size, size) and (T, 3, size, size)
    crops = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(pad_lab, (size, size))[ys, xs])
    rgbs = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(pad_rgb, (size, size), axis=(0, 1))[ys, xs])
    # the labels within band_width of each tile: one job (tile, label) each
    near = max(0, r - band_width)
    values, inv = np.unique(crops[:, near:size - near, near:size - near].reshape(len(ys), -1), return_inverse=True)
    present = np.zeros((len(ys), len(values)), bool)
    present[np.arange(len(ys))[:, None], inv.reshape(len(ys), -1)] = True
    job_tile, job_value = np.nonzero(present)  # grouped by tile
    # a job's rank among its tile's labels: the jobs of one rank touch distinct tiles, so each
    # rank's logits update a running best per tile pixel without collisions (a dense labels x
    # tiles x pixels score array was 26 MB of peak memory at 1152 px)
    first = np.searchsorted(job_tile, job_tile)
    rank = np.arange(len(job_tile)) - first
    order = np.argsort(rank, kind="stable")
    dtype, device = next(net.parameters()).dtype, next(net.parameters()).device
    top = torch.full((len(ys), tile, tile), float("-inf"))
    arg = torch.zeros((len(ys), tile, tile), dtype=torch.long)
    with torch.inference_mode():
        crops_t = torch.from_numpy(crops).to(device)
        values_t = torch.from_numpy(values).to(device)
        bounds = np.flatnonzero(np.diff(rank[order])) + 1  # batches never straddle two ranks
        for part in np.split(order, bounds):
            for s in range(0, len(part), batch):
                jobs = part[s:s + batch]
                jt, jv = torch.from_numpy(job_tile[jobs]), torch.from_numpy(job_value[jobs])
                rgb_in = torch.from_numpy(rgbs[job_tile[jobs]]).to(device).to(dtype) / 255.0 - 0.5
                mask = (crops_t[jt.to(device)] == values_t[jv.to(device)][:, None, None]).to(dtype)[:, None] * 2 - 1
                x = torch.cat([rgb_in, mask], 1)
                # batches padded to a multiple of 32 jobs: every new input shape leaves oneDNN
                # primitives and their buffers behind (300 distinct batch sizes: +174 MB of RSS;
                # padded to 16: +37 MB), so a worker's memory would grow with each click's job count
                n = len(jobs)
                x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, -(-n // 32) * 32 - n)).contiguous(memory_format=torch.channels_last)
                logit = net.inner_logits(x)[:n].float().cpu()
                held = top[jt]
                better = logit > held
                top[jt] = torch.where(better, logit, held)
                arg[jt] = torch.where(better, jv[:, None, None], arg[jt])
    return values[arg.numpy()].astype(pad_lab.dtype, copy=False)
