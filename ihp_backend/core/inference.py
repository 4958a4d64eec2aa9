"""Clicks + image -> parse. Pure arrays in and out; no HTTP, no Label Studio."""
from __future__ import annotations

import copy
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import wraps
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import Binding, binding_of, network_of, read_checkpoint
from .clicks import click_map_patches, draw_clicks, network_input, normalise_rgb, scale_clicks
from .edges import load_edge_refiner, refine_edges, work_size
from .network import (LowRankASPP, changed_tiles, conv_of_label_change, conv_of_patches, fold_batchnorm,
                      label_planes_conv, restricted_first_conv, with_low_rank_aspp)
from .refine import label_lut, nearest_resize, paint_clicks, photo_guide, refined_argmax
from .options import PRECISIONS
from .vocabulary import mirrored_channels


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when an x86 CPU computes bfloat16 dot products in hardware (``avx512_bf16`` or
    ``amx_bf16`` flags, the kind measured here). Elsewhere (older x86, ARM, no /proc) oneDNN may
    emulate bfloat16, slower than float32, so ``auto`` stays in float32 there."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def pick_precision(requested: str | None, device: torch.device) -> torch.dtype:
    """Compute type of the network's forward pass: ``float32``, ``bfloat16`` (weights and input
    cast, ``weights_in``), or ``auto``: the bfloat16 candidate on a CPU that has it natively
    (the default model's forward at 544x368 on one avx512_bf16 core: 102 -> 59 ms; CCP val mIoU
    within 0.2 points at every click count), float32 elsewhere. ``Parser`` then keeps the
    candidate only if ``faster_dtype`` finds it faster on this machine."""
    req = (requested or "auto").strip().lower()
    if req not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if req == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
    return torch.bfloat16 if req == "bfloat16" else torch.float32


@contextmanager
def denormals_flushed(enabled: bool = True):
    """Flush denormal floats to zero inside the block, in this thread (the CPU flag is per
    thread), and restore the thread's previous setting after. Trained weights hold many
    denormals (near-silent channels more) and CPU math on them is several-fold slower; flushing
    changes no label. s22500 at 576x384 on one thread: 155 -> 124 ms per forward."""
    was_on = torch.tensor(1e-39).mul(1.0).item() == 0.0
    flushing = enabled and not was_on and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def weights_in(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``net`` with its weights stored in ``dtype`` (a copy; ``net`` itself when float32). Fed a
    ``dtype`` input it computes what autocast computes (each conv in ``dtype``) without casting
    every weight on every call: for the default model at 576x384 the same logits to the last bit,
    2-4% faster on 2 avx512_bf16 cores (``bench/forward.py``, B against A)."""
    return net if dtype == torch.float32 else copy.deepcopy(net).to(dtype)


def faster_dtype(net: torch.nn.Module, x: torch.Tensor, dtypes=(torch.float32, torch.bfloat16),
                 repeats: int = 3, flush_denormals: bool = False) -> torch.dtype:
    """The compute type in which ``net`` (its weights cast by ``weights_in``, as served) runs
    ``x`` faster, timed here: one warm-up forward each, then ``repeats`` interleaved rounds,
    the fastest round per type (a worker starts while others start or serve, and the least
    disturbed round says more of a type's speed than a median of disturbed ones: a probe run
    beside the test suite once picked float32 on a CPU where bfloat16 is 1.5x faster). A CPU
    flag is not enough: two machines reporting the same ``avx512_bf16`` flag measured the
    default's forward at 544x368 102 -> 59 ms and 149 -> 212 ms going from float32 to bfloat16.
    ``flush_denormals`` times what the served forward runs; only the forwards run flushed (numpy
    computed its float limits as zero when it first ran inside the flushed block, and kept them)."""
    times: dict = {d: [] for d in dtypes}
    nets = {d: weights_in(net, d) for d in dtypes}
    inputs = {d: x.to(d) for d in dtypes}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for d in dtypes:
                t0 = time.perf_counter()
                with denormals_flushed(flush_denormals):
                    nets[d](inputs[d], features=True)
                if r:
                    times[d].append(time.perf_counter() - t0)
    return min(dtypes, key=lambda d: min(times[d]))


def read_channels(num_slots: int, clicks: np.ndarray, prev: np.ndarray | None,
                  prev_mask: bool) -> tuple[list[int], list[int]]:
    """The network input channels a forward must read, and those that are all ones: RGB, the maps
    of clicked slots, the previous-prediction planes of the labels ``prev`` holds are read; the map
    of a slot without a click is 1 everywhere (paper Eq. 1 saturated) and the plane of an absent
    label 0 everywhere, so they need no reading (``restricted_first_conv``)."""
    k = num_slots
    clicked = sorted({int(s) for s in np.asarray(clicks).reshape(-1, 3)[:, 2]} & set(range(k)))
    keep = [0, 1, 2] + [3 + s for s in clicked]
    if prev_mask:
        present = []
        if prev is not None:
            counts = np.bincount(np.clip(np.asarray(prev).ravel(), -1, k).astype(np.int64) + 1, minlength=k + 2)
            present = [s for s in range(k) if counts[s + 1]]
        keep += [3 + k + s for s in present]
    ones = [3 + s for s in range(k) if s not in clicked]
    return keep, ones


def network_size(hw: tuple[int, int], max_side: int, multiple: int = 16) -> tuple[int, int]:
    """Size the network sees: longest side <= max_side, both sides multiples of ``multiple``."""
    h, w = hw
    s = min(1.0, max_side / max(h, w))
    nh = max(multiple, int(round(h * s / multiple)) * multiple)
    nw = max(multiple, int(round(w * s / multiple)) * multiple)
    return nh, nw


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W, 3) uint8 resized to ``hw``, bilinear (itself when it is that size)."""
    return resize_images(image, [hw])[0]


def resize_images(image: np.ndarray, sizes) -> list[np.ndarray]:
    """``resize_image`` to each of ``sizes`` from one PIL copy of ``image`` (at 12 MP the copy
    is a 46 MB transient and ~15 ms)."""
    pil = None
    out = []
    for hw in sizes:
        if image.shape[:2] == tuple(hw):
            out.append(image)
            continue
        pil = Image.fromarray(image) if pil is None else pil
        out.append(np.asarray(pil.resize((hw[1], hw[0]), Image.BILINEAR)))
    return out


def _source_coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """First bilinear source index and the weight of the next one, for each output coordinate
    (align_corners=False), as ``F.interpolate`` computes them."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, (src - i0).astype(np.float32)


def upsampled_argmax(logits: torch.Tensor, out_hw: tuple[int, int], values=None) -> np.ndarray:
    """``argmax`` over channels of the bilinearly upsampled CPU ``logits`` (C, h, w) -> (H, W).

    Same answer as ``F.interpolate(...).argmax(0)`` (up to exact ties) at a fraction of the cost:
    a convex combination of logit vectors that share an argmax keeps it, so only output pixels
    whose four low-resolution source pixels disagree are interpolated. ``values`` (length C)
    maps channel indices to the returned labels (uint8 when they fit, else int64).
    """
    c, h, w = logits.shape
    hh, ww = out_hw
    lut = label_lut(c, values)
    arg = logits.permute(1, 2, 0).contiguous().numpy().argmax(axis=2)
    # mixed[y, x]: the 2x2 block of sources at (y, x) (clamped at the border) has several labels
    p = np.pad(arg, ((0, 1), (0, 1)), mode="edge")
    mixed = (p[:-1, :-1] != p[1:, :-1]) | (p[:-1, :-1] != p[:-1, 1:]) | (p[:-1, :-1] != p[1:, 1:])
    y0, wy = _source_coords(hh, h)
    x0, _ = _source_coords(ww, w)
    out = lut[arg][y0][:, x0]  # nearest source: right wherever the block is not mixed
    ii, xs = np.nonzero(mixed[:, x0])  # (source row, output column) pairs in a mixed block
    if len(ii):
        # interpolate along x for every source row (cheap: h rows), then along y for the output
        # rows of each pair at once: rows first[i] .. first[i] + count[i] - 1 have y0 == i
        across = F.interpolate(logits[None], size=(h, ww), mode="bilinear", align_corners=False)[0].numpy()
        first = np.searchsorted(y0, np.arange(h))
        count = np.searchsorted(y0, np.arange(h), side="right") - first
        k = np.arange(count.max())
        rows = np.minimum(first[:, None] + k, hh - 1)[ii]  # (P, kmax)
        valid = (k < count[:, None])[ii]
        top = across[:, ii, xs].T[:, None, :]  # (P, 1, C)
        below = across[:, np.minimum(ii + 1, h - 1), xs].T[:, None, :]
        fy = wy[rows][:, :, None]
        best = (top * (1 - fy) + below * fy).argmax(axis=2)  # (P, kmax)
        out[rows[valid], np.broadcast_to(xs[:, None], valid.shape)[valid]] = lut[best[valid]]
    return out


def person_boxes(network_labels: np.ndarray, clicks_net: np.ndarray, image_hw: tuple[int, int],
                 margin: float = 0.15, min_side: float = 0.25, max_area: float = 0.5) -> list[tuple[int, int, int, int]]:
    """The regions to look closer at (FocalClick / RITM zoom-in, one per clicked person): the
    connected components of the first pass's person pixels (``network_labels`` != 0, at the
    network size) that hold a part click (``clicks_net``: (y, x, slot) at the network size), each
    box grown by ``margin`` of its longer side on every side and to at least ``min_side`` of the
    image's longer side, as (y0, y1, x0, x1) in image pixels. Empty (no zoom) when a box would
    cover more than ``max_area`` of the image: a person that big is already seen at the
    network's resolution."""
    from scipy import ndimage
    comp, _ = ndimage.label(np.asarray(network_labels) != 0)
    h, w = comp.shape
    H, W = image_hw
    sy, sx = H / h, W / w
    c = np.asarray(clicks_net, np.float64).reshape(-1, 3)
    c = c[c[:, 2] != 0]
    ids = sorted({int(comp[min(h - 1, max(0, int(y))), min(w - 1, max(0, int(x)))]) for y, x, _ in c} - {0})
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(comp), start=1):
        if k not in ids or sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start * sy, sl[0].stop * sy, sl[1].start * sx, sl[1].stop * sx
        grow = margin * max(y1 - y0, x1 - x0)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        half_h = max((y1 - y0) / 2 + grow, min_side * max(H, W) / 2)
        half_w = max((x1 - x0) / 2 + grow, min_side * max(H, W) / 2)
        box = (int(max(0, cy - half_h)), int(min(H, cy + half_h + 1)), int(max(0, cx - half_w)), int(min(W, cx + half_w + 1)))
        if (box[1] - box[0]) * (box[3] - box[2]) > max_area * H * W:
            return []
        boxes.append(box)
    return boxes


def paste_into(labels: np.ndarray, crop_labels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``labels`` with ``crop_labels`` put back at ``box`` (y0, y1, x0, x1), in place."""
    y0, y1, x0, x1 = box
    labels[y0:y1, x0:x1] = crop_labels
    return labels


def vocabulary_mass(slots: np.ndarray, logits: torch.Tensor, prior: dict[int, list[int]]):
    """The probability the vocabulary head gives each output channel's classes, (S, h, w) for the
    channels ``slots`` (0 where ``prior`` names none), with the vocabulary softmax spanning the
    union of ``prior``'s classes (the label config's known classes), as in training; and the rows of
    ``slots`` that ``prior`` names. None when ``prior`` names no class. Shared by
    ``with_vocabulary_prior`` and ``with_vocabulary_share``, computed once per parse."""
    vocab = sorted({v for vs in prior.values() for v in vs})
    if not vocab:
        return None
    q = torch.softmax(logits[torch.as_tensor(vocab, device=logits.device)].float(), dim=0)
    pos = {v: i for i, v in enumerate(vocab)}
    slots_list = np.asarray(slots).tolist()
    owner = torch.zeros(len(slots_list), len(vocab), device=q.device)  # channel x class it stands for
    for i, ch in enumerate(slots_list):
        for v in prior.get(ch, ()):
            owner[i, pos[v]] = 1.0
    return torch.einsum("cv,vhw->chw", owner, q), [i for i, ch in enumerate(slots_list) if ch in prior]


def with_vocabulary_prior(sub: torch.Tensor, slots: np.ndarray, logits: torch.Tensor,
                          prior: dict[int, list[int]], weight: float, floor: float = 1e-4,
                          mass=None) -> torch.Tensor:
    """``sub`` (the logits of output channels ``slots``, (S, h, w)) plus ``weight`` times the log of
    the probability the vocabulary head gives each channel's classes: a product of experts,
    ``p(c) ~ p_clicks(c) * p_vocab(classes of c) ** weight``. ``prior`` maps an output channel to
    the vocabulary channels it stands for (a clicked slot: its label's class; the unclaimed
    channel: the known classes nobody clicked); see ``vocabulary_mass`` (``mass``: its answer, if
    already computed). Channels not in ``prior`` are unchanged. Probabilities are floored at
    ``floor`` so that the head alone never vetoes a click."""
    if not weight:
        return sub
    mass = vocabulary_mass(slots, logits, prior) if mass is None else mass
    if mass is None:
        return sub
    m, rows = mass
    out = sub.clone()
    out[rows] += weight * torch.log(m[rows].clamp(min=floor))
    return out


def with_vocabulary_share(sub: torch.Tensor, slots: np.ndarray, logits: torch.Tensor,
                          prior: dict[int, list[int]], unclaimed: int, floor: float = 1e-6,
                          mass=None) -> torch.Tensor:
    """Log-probabilities of output channels ``slots`` where the unclaimed channel's probability
    is shared out by meaning: ``p'(c) = p(c) + p(unclaimed) * q(classes of c)`` for every channel
    of ``prior`` (a clicked slot: its label's class; Background), and the unclaimed channel keeps
    ``p(unclaimed) * q(classes nobody clicked)``; ``q`` is the vocabulary head's softmax over the
    label config's known classes (``vocabulary_mass``; ``mass``: its answer, if already computed).
    The slots follow clicks and cannot tell which label space a click means (a click on a face is
    Face in LIP and Skin in CCP: the arms and legs are a part no click names to them); the head
    knows the label's name and gives those pixels to it."""
    slots_list = np.asarray(slots).tolist()
    if unclaimed not in slots_list or unclaimed not in prior:
        return sub
    mass = vocabulary_mass(slots, logits, prior) if mass is None else mass
    if mass is None:
        return sub
    m, rows = mass
    log_mass = torch.log(m.clamp(min=floor))
    lp = torch.log_softmax(sub.float(), dim=0)
    u = slots_list.index(unclaimed)
    gets = torch.as_tensor([i for i in rows if i != u], dtype=torch.long, device=lp.device)
    out = lp.clone()
    out[gets] = torch.logaddexp(lp[gets], lp[u] + log_mass[gets])
    out[u] = lp[u] + log_mass[u]
    return out


@dataclass
class ParseResult:
    labels: np.ndarray  # (H, W) output channel per pixel (uint8 when they fit), at the image size
    confidence: np.ndarray  # (out_channels,) mean softmax probability over the pixels of each channel
    score: float  # mean winning probability over the image
    timings: dict = field(default_factory=dict)  # seconds: "input", "forward", "upsample"
    network_labels: np.ndarray | None = None  # (h, w) the next click's previous-prediction
    # input: ``labels`` as answered, at the network's size (``previous_prediction``)


def previous_prediction(labels: np.ndarray, hw: tuple[int, int], num_slots: int) -> np.ndarray:
    """The previous-prediction input of the next click on a photo: the answer as served
    (``labels`` at the image size, after the colour refinement, the click disks and the zoom)
    taken at the network size ``hw`` by nearest neighbour (PIL's NEAREST mapping), with every
    pixel whose label is not a slot (the unclaimed output, parts filled by meaning) counted as
    background, slot 0: in training the previous prediction never holds an unclaimed pixel
    (``model_training.train.restricted_argmax``). uint8 when the slots fit."""
    small = nearest_resize(labels, hw)
    out = np.where(small < num_slots, small, 0)
    return out.astype(np.uint8 if num_slots <= 256 else np.int64, copy=False)


def mirror_permutation(cfg, binding: Binding) -> torch.Tensor | None:
    """Output channel order of the network's answer to a mirrored photo, to be read as an answer
    to the photo itself: the vocabulary head's left and right classes swapped
    (``vocabulary.mirrored_channels``); slots follow their clicks, which are mirrored too. None
    when nothing swaps."""
    if not cfg.vocab_size or len(binding.vocabulary) != cfg.vocab_size:
        return None
    perm = list(range(cfg.vocab_start)) + [cfg.vocab_start + c for c in mirrored_channels(binding.vocabulary)]
    perm += list(range(len(perm), cfg.out_channels))
    return None if perm == sorted(perm) else torch.as_tensor(perm)


class _GivenOutput(torch.nn.Module):
    """A first conv whose output is already made (``FirstConvCache``): returns it, whatever
    the input (a fresh tensor per forward: the stem's activation works in place)."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        self.y = y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y


class FirstConvCache:
    """The network's first conv output kept across the clicks on a photo (CPU serving, batch 1).

    The first conv is linear in its input channels, so its output is the sum of three terms:
    RGB with every click map taken as 1 (paper Eq. 1 saturated) plus the bias, the same for all
    clicks on a photo (made once); the previous-prediction planes (``label_planes_conv``),
    updated at each click only in the output blocks whose input window holds a pixel whose
    label changed (``changed_tiles``, ``conv_of_label_change``); and the click windows of the
    maps (``conv_of_patches``, added by the caller). A click so reads neither the photo nor
    the ten planes of a ten-label answer again: the forward no longer grows with the labels
    answered. Recomputed whole when more than ``full_share`` of the blocks (or half that share
    of the pixels) changed, and after ``max_updates`` updates (float rounding does not pile up).
    The terms live in a dict per photo that the caller keeps (the Parser's per-image cache).
    Float32 throughout."""

    def __init__(self, conv: torch.nn.Conv2d, num_slots: int, prev_mask: bool, tile: int = 8,
                 full_share: float = 0.5, max_updates: int = 64):
        w = conv.weight.detach().float()
        k = num_slots
        self.kernel, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if conv.groups != 1 or conv.dilation != (1, 1) or len(set(conv.kernel_size)) != 1 \
                or len(set(conv.stride)) != 1 or len(set(conv.padding)) != 1 or tile * self.stride < self.kernel:
            raise ValueError("FirstConvCache needs a dense square conv, dilation 1, tile * stride >= kernel")
        self.base_weight = torch.cat([w[:, :3], w[:, 3:3 + k].sum(1, keepdim=True)], 1)  # RGB, maps as ones
        self.label_weight = w[:, 3 + k:3 + 2 * k] if prev_mask else None
        self.bias = conv.bias.detach().float() if conv.bias is not None else None
        self.tile, self.full_share, self.max_updates = int(tile), float(full_share), int(max_updates)

    def output(self, state: dict, rgb: np.ndarray, labels: np.ndarray | None) -> torch.Tensor:
        """The first conv's output (O, ho, wo) for the normalised RGB planes ``rgb`` (3, h, w),
        all maps 1 and the one-hot planes of ``labels`` (h, w) int, -1 for no label (None: no
        previous prediction). ``state``: the photo's dict, empty the first time, updated here."""
        e = state
        if "base" not in e:  # the photo's first parse
            planes = torch.from_numpy(np.asarray(rgb, np.float32))
            x = torch.cat([planes, planes.new_ones((1,) + planes.shape[1:])])[None]
            e.update(base=F.conv2d(x, self.base_weight, self.bias, stride=self.stride, padding=self.padding)[0],
                     labels=None, term=None, updates=0)
        if self.label_weight is None:
            return e["base"].clone()
        h, w = rgb.shape[1:]
        new = torch.from_numpy(np.asarray(labels, np.int16)) if labels is not None \
            else torch.full((h, w), -1, dtype=torch.int16)
        if e["term"] is None or e["updates"] >= self.max_updates:
            e["term"], e["updates"] = self._whole(new), 0
        else:
            changed = e["labels"] != new
            share = float(changed.float().mean())
            if share:
                out_hw = tuple(e["term"].shape[1:])
                whole = share > self.full_share / 2 or out_hw[0] % self.tile or out_hw[1] % self.tile
                tiles = None if whole else changed_tiles(changed, out_hw, self.kernel, self.stride, self.padding,
                                                         self.tile)
                if whole or len(tiles) > self.full_share * (out_hw[0] // self.tile) * (out_hw[1] // self.tile):
                    e["term"], e["updates"] = self._whole(new), 0
                else:
                    delta = conv_of_label_change(self.label_weight, e["labels"], new, tiles, self.stride,
                                                 self.padding, self.tile)
                    o, t = delta.shape[1], self.tile
                    blocks = e["term"].view(o, out_hw[0] // t, t, out_hw[1] // t, t)
                    blocks[:, tiles[:, 0], :, tiles[:, 1], :] += delta  # indexed: (N, O, t, t)
                    e["updates"] += 1
        e["labels"] = new
        return e["base"] + e["term"]

    def _whole(self, labels: torch.Tensor) -> torch.Tensor:
        return label_planes_conv(self.label_weight, labels, self.stride, self.padding).contiguous()


class TorchThread:
    """Runs calls on one long-lived thread. On the CPU PyTorch's OpenMP keeps a team of worker
    threads per calling thread, so forwards called from whichever of a server's request threads
    took the request each wake a different team: with 4 request threads the served forward took
    ~85 ms against ~60 ms from one thread (CCP photo, 2 cores; ``bench/latency.py --case 12mp``
    A/B: a CCP-size click 0.72x).
    A call made on the thread itself runs directly (no deadlock on nested calls).

    ``shared()`` is the process's one such thread, which every CPU ``Parser`` uses, for building
    its network too: libgomp counts the OpenMP threads of all teams, and once they outnumber the
    cores it spins only ~100 times before a worker sleeps between two parallel regions. A second
    team (the thread that built the network kept one) left the forward's team idle 13% of the
    time (CPU / wall 1.72 instead of 1.99) and the forward 12-15% slower than on the main thread
    (``bench/forward_thread.py``)."""

    _shared: tuple[int, "TorchThread"] | None = None
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "ihp-torch"):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._ident: int | None = None

    @classmethod
    def shared(cls) -> "TorchThread":
        """The process's torch thread (a new one in a forked child: threads do not survive a fork)."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared[0] != os.getpid():
                cls._shared = (os.getpid(), cls())
            return cls._shared[1]

    def _call(self, fn, args, kwargs):
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)

    def run(self, fn, *args, **kwargs):
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(self._call, fn, args, kwargs).result()


def on_torch_thread(method):
    """A ``Parser`` method run on the Parser's ``TorchThread`` (on the CPU; elsewhere directly)."""
    @wraps(method)
    def run(self, *args, **kwargs):
        if self._torch_thread is None:
            return method(self, *args, **kwargs)
        return self._torch_thread.run(method, self, *args, **kwargs)
    return run


class Parser:
    """Holds one network and runs it; thread-safe (one forward at a time per Parser, every
    forward on one thread: ``TorchThread``)."""

    def __init__(self, ckpt: dict, device: str | None = None, max_side: int | None = None,
                 threads: int | None = None, flip: bool = False, refine: bool = True, full_res_edges: bool = False,
                 click_radius: float = 10.0, precision: str | None = "auto", unclaimed_bias: float = 0.0,
                 zoom: bool = False, vocab_prior: float = 0.0, vocab_share: bool = False,
                 edge_refiner: str | None = None, edge_side: int = 1152, aspp_rank: int = 0):
        self.ckpt = ckpt
        self.binding: Binding = binding_of(ckpt)
        self.device = pick_device(device)
        self._torch_thread = TorchThread.shared() if self.device.type == "cpu" else None
        on_thread = self._torch_thread.run if self._torch_thread is not None else (lambda f, *a: f(*a))
        # built on the torch thread: torch ops run on another thread would give it an OpenMP team
        # of its own (TorchThread); channels-last: measured 57 -> 45 ms (1 thread) and 30 -> 20 ms
        # (2 threads) per forward
        self.net = on_thread(lambda: with_low_rank_aspp(fold_batchnorm(network_of(ckpt).eval()), aspp_rank).to(
            self.device, memory_format=torch.channels_last))
        self.aspp_rank = int(aspp_rank) if isinstance(self.net.aspp, LowRankASPP) else 0  # 0: the exact ASPP
        self.max_side = int(max_side or ckpt.get("input_size", 512))
        self.mean, self.std = ckpt["mean"], ckpt["std"]
        self.num_slots = self.net.cfg.num_slots
        self.unclaimed = self.net.cfg.unclaimed_channel  # "a part no click names" (None: no such output)
        self.vocab_start = self.net.cfg.vocab_start  # first vocabulary channel
        self.unclaimed_bias = float(unclaimed_bias)  # < 0: fewer pixels left unlabelled
        self.zoom = bool(zoom)  # parse's default: look closer at each clicked small person (person_boxes)
        self.vocab_prior = float(vocab_prior)  # weight of the vocabulary head's prior (with_vocabulary_prior)
        self.vocab_share = bool(vocab_share)  # the unclaimed probability shared out by meaning (with_vocabulary_share)
        self.use_prev_mask = self.net.cfg.prev_mask
        self.model_version = ckpt.get("model_version", "unknown")
        self.flip = bool(flip)  # test-time flip: mean of the logits of the input and its mirror
        self.mirror = mirror_permutation(self.net.cfg, self.binding)  # channel order of a mirrored output
        self.mirror = None if self.mirror is None else self.mirror.to(self.device)
        self.refine = bool(refine)  # labels refined along the photo's colour edges (refine.py)
        self.full_res_edges = bool(full_res_edges)  # ... enlarged with boundaries between network pixels
        self.click_radius = float(click_radius)  # each click claims a disk this big (network pixels)
        self.edge_net = load_edge_refiner(edge_refiner) if edge_refiner else None  # core.edges (refine only)
        self.edge_side = int(edge_side)  # ... run at the photo's size up to this longer side
        self.dtype = pick_precision(precision, self.device)  # the forward's compute type (weights_in)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(int(threads))
            on_thread(torch.set_num_threads, int(threads))  # the thread whose team runs the forwards
        if self.dtype != torch.float32 and (precision or "auto").strip().lower() == "auto":
            # auto: keep bfloat16 only if it is faster here, at the serving size (1-3 s once)
            hw = network_size((2 * self.max_side // 3, self.max_side), self.max_side)
            self.dtype = on_thread(lambda: faster_dtype(  # the probe too: filling it is a parallel op
                self.net, torch.zeros((1, self.net.cfg.in_channels) + hw, device=self.device).contiguous(
                    memory_format=torch.channels_last), flush_denormals=self.device.type == "cpu"))
        self._first_conv = self.net.encoder.first_conv()  # float32: restricted_first_conv sums its weights
        self._first_convs: OrderedDict[tuple, torch.nn.Module] = OrderedDict()  # (keep, ones) -> restricted conv
        try:  # the first conv's output kept across clicks (CPU, no test-time flip: the mirrored pass reads x)
            self._stem = FirstConvCache(self._first_conv, self.num_slots, self.use_prev_mask) \
                if self.device.type == "cpu" and not self.flip else None
        except ValueError:
            self._stem = None
        self.net = on_thread(weights_in, self.net, self.dtype)  # the forward's weights, cast once
        if self.edge_net is not None:
            self.edge_net = on_thread(lambda: weights_in(self.edge_net, self.dtype).to(
                self.device, memory_format=torch.channels_last))
        self._lock = threading.Lock()
        self._resized: OrderedDict[tuple, tuple] = OrderedDict()  # (kind, id(image)) -> (weakref, hw, value)
        self._crops: OrderedDict[tuple, tuple] = OrderedDict()  # zoomed crop parse -> (weakref, labels)
        self._stage: tuple[np.ndarray, torch.Tensor] | None = None
        self._drawn: dict = {"rgb": None, "windows": None, "prev": None}  # what the channels-last buffer holds

    @property
    def uses_vocabulary_prior(self) -> bool:
        """Whether a parse wants ``prior`` (``label_rules.prior_channels``): the vocabulary head's
        prior or share is on."""
        return bool(self.vocab_prior or self.vocab_share)

    @property
    def precision(self) -> str:
        """The forward's compute type by name ("float32" or "bfloat16")."""
        return str(self.dtype).removeprefix("torch.")

    def _per_image(self, kind: str, image: np.ndarray, hw: tuple[int, int], make):
        """``make()`` for ``image`` at ``hw``, cached per image object and ``kind`` (the fetcher
        hands the same cached array for every click of a task, so a click redoes no resize)."""
        key = (kind, id(image))
        with self._lock:
            hit = self._resized.get(key)
            if hit is not None and hit[0]() is image and hit[1] == hw:
                self._resized.move_to_end(key)
                return hit[2]
        value = make()
        try:
            ref = weakref.ref(image)
        except TypeError:
            return value
        with self._lock:
            for dead in [k for k, v in self._resized.items() if v[0]() is None]:  # e.g. zoomed crops' entries
                del self._resized[dead]
            self._resized[key] = (ref, hw, value)
            while len(self._resized) > 16:
                self._resized.popitem(last=False)
        return value

    def _network_image(self, image: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The image resized to network size and its normalised RGB planes (``_per_image``)."""
        def make():
            # with the edge refiner, its working copy too, from the same PIL copy (kept for _work_image)
            sizes = [hw] + ([tuple(work_size(image.shape[:2], self.edge_side))] if self.edge_net is not None else [])
            small, *work = resize_images(image, sizes)
            if work and work[0] is not image:
                self._per_image("work", image, sizes[1], lambda: work[0])
            return small, normalise_rgb(small, self.mean, self.std)
        return self._per_image("network", image, hw, make)

    def _work_image(self, image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """``image`` at the edge refiner's working size (the photo itself when it is that size)."""
        if tuple(image.shape[:2]) == tuple(hw):
            return image
        return self._per_image("work", image, tuple(hw), lambda: resize_image(image, hw))

    @classmethod
    def from_file(cls, path: str, **kw) -> "Parser":
        return cls(read_checkpoint(path), **kw)

    def warm_up(self) -> float:
        """One click then two on a synthetic photo at the serving size, landscape then portrait
        (most photos of people; the input buffer kept is the last shape's), the second with the
        first's answer as the previous prediction (with a context head, then the parse without
        clicks, which runs it). The first parse of a process builds the
        compute kernels for its input shape, starts the torch thread's OpenMP team and imports
        what the zoom needs: a worker's first click took 284 ms against 96 ms after this (CCP
        photo, 2 cores). Leaves no trace in later answers (tested). Returns the seconds taken."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        slots = [s for s in range(1, min(3, self.num_slots))] or [0]
        allowed = sorted(set(slots) | {0} | ({self.unclaimed} if self.unclaimed is not None else set()))
        for h, w in ((2 * self.max_side // 3, self.max_side), (self.max_side, 2 * self.max_side // 3)):
            image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            clicks = np.array([(h * (0.3 + 0.3 * i), w / 2, s) for i, s in enumerate(slots)], np.float64)
            first = self.parse(image, clicks[:1], allowed_slots=allowed)
            self.parse(image, clicks, allowed_slots=allowed, prev_mask=first.network_labels)
            if self.net.vocab_context is not None:  # the zero-click parse runs the context head too
                self.logits(image, [])
        return time.perf_counter() - t0

    @on_torch_thread
    def logits(self, image: np.ndarray, clicks, prev_mask: np.ndarray | None = None,
               timings: dict | None = None) -> torch.Tensor:
        """Network logits (num_slots, h/4, w/4) at the decoder's stride 4 of the network size
        (``parse`` upsamples them once, straight to the image size). ``timings`` (a dict) gets
        the seconds spent building the input and in the network."""
        t0 = time.perf_counter()
        hw = network_size(image.shape[:2], self.max_side)
        small, rgb = self._network_image(image, hw)
        stem = self._per_image("first-conv", image, hw, dict) if self._stem is not None else None  # FirstConvCache
        c = scale_clicks(clicks, image.shape[:2], hw) if len(clicks) else np.zeros((0, 3))
        n = 3 + self.num_slots * (2 if self.use_prev_mask else 1)
        with self._lock, torch.inference_mode():
            pm = None
            if self.use_prev_mask and prev_mask is not None:
                pm = prev_mask if prev_mask.shape == tuple(hw) else np.asarray(
                    Image.fromarray(prev_mask.astype(np.int32)).resize((hw[1], hw[0]), Image.NEAREST))
            if stem is not None:  # CPU: no input tensor at all (FirstConvCache)
                prev = None if pm is None else np.where((pm >= 0) & (pm < self.num_slots), pm, -1).astype(np.int16)
                patches = click_map_patches(c, hw, self.num_slots)
                t1 = time.perf_counter()
                out = self._forward_kept(stem, rgb, prev, patches, hw, vocab_context=not len(c))
                if timings is not None:
                    timings["input"] = t1 - t0
                    timings["forward"] = time.perf_counter() - t1
                return out
            if self.device.type != "cpu":
                host, _ = self._staging((1, n) + tuple(hw))
                network_input(small, c, self.num_slots, pm, self.use_prev_mask, self.mean, self.std,
                              rgb=rgb, out=host[0])
                x = torch.from_numpy(host)
            else:
                x = self._redraw_input((1, n) + tuple(hw), rgb, c, pm)
            t1 = time.perf_counter()
            channels = read_channels(self.num_slots, c, pm, self.use_prev_mask)
            # the vocabulary context head serves the parse without clicks only (network.VocabContext)
            out = self._forward_locked(x, channels, vocab_context=not len(c))[0]
            if timings is not None:
                timings["input"] = t1 - t0
                timings["forward"] = time.perf_counter() - t1
            return out

    @on_torch_thread
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a (B, C, h, w) input batch -> stride-4 logits (B, num_slots, h/4, w/4)."""
        with self._lock, torch.inference_mode():
            return self._forward_locked(x)

    def _staging(self, shape: tuple[int, ...]) -> tuple[np.ndarray | None, torch.Tensor]:
        """Input buffers kept across clicks (caller holds the lock): the channels-last tensor the
        network reads and, off the CPU only, the host NCHW array the input is built in (on the
        CPU ``_redraw_input`` writes into the tensor itself). A fresh input per click cost ~5 ms
        of page faults and layout copies."""
        if self._stage is None or tuple(self._stage[1].shape) != tuple(shape):
            self._stage = None  # free the old pair before allocating the new one
            dev = torch.empty(shape, device=self.device).contiguous(memory_format=torch.channels_last)
            host = np.empty(shape, np.float32) if self.device.type != "cpu" else None
            self._stage = (host, dev)
            self._drawn = {"rgb": None, "windows": None, "prev": None}
        return self._stage

    def _redraw_input(self, shape: tuple[int, ...], rgb: np.ndarray, clicks: np.ndarray,
                      prev: np.ndarray | None = None) -> torch.Tensor:
        """The network input written in place into the channels-last buffer (CPU, caller holds
        the lock): the RGB planes only when the image changed; of the maps only the windows the
        previous call's clicks touched (reset to 1) and this call's clicks touch; of the
        previous-prediction planes only the pixels whose label changed since the last call.
        Equal to ``network_input`` (tested); saves the 45 MB fill and layout copy per click
        (about 11 ms at 576 x 384 on 2 cores)."""
        _, dev = self._staging(shape)
        view = dev[0].numpy()  # (C, h, w) view of the channels-last memory
        k = self.num_slots
        maps, state = view[3:3 + k], self._drawn
        if state["rgb"] is not rgb:
            state["rgb"] = None
            view[:3] = rgb
            state["rgb"] = rgb
        windows, state["windows"] = state["windows"], None  # unknown until drawn
        if windows is None:
            maps.fill(1.0)
        else:
            for s, ys, xs in windows:
                maps[s, ys, xs] = 1.0
        state["windows"] = draw_clicks(maps, clicks)
        if self.use_prev_mask:
            onehot = view[3 + k:]
            new = np.full(shape[2:], -1, np.int16)
            if prev is not None:
                pv = np.asarray(prev)
                inside = (pv >= 0) & (pv < k)
                new[inside] = pv[inside]
            old, state["prev"] = state.get("prev"), None  # unknown until drawn
            if old is None:
                onehot.fill(0.0)
                ys, xs = np.nonzero(new >= 0)
                onehot[new[ys, xs], ys, xs] = 1.0
            else:
                ys, xs = np.nonzero(old != new)
                was, now = old[ys, xs], new[ys, xs]
                onehot[was[was >= 0], ys[was >= 0], xs[was >= 0]] = 0.0
                onehot[now[now >= 0], ys[now >= 0], xs[now >= 0]] = 1.0
            state["prev"] = new
        return dev

    def _forward_kept(self, stem: dict, rgb: np.ndarray, prev: np.ndarray | None, patches,
                      hw: tuple[int, int], vocab_context: bool) -> torch.Tensor:
        """A click's forward on the CPU (caller holds the lock), with no input tensor: the first
        conv's output is the photo's and the previous prediction's, kept across clicks in the
        photo's ``stem`` dict (``FirstConvCache``; ``prev`` (h, w) int16 slot labels, -1 for
        none), plus the convs of the clicks' map patches (``click_map_patches``,
        ``conv_of_patches``). Stride-4 logits."""
        y = self._stem.output(stem, rgb, prev)
        maps = [(3 + s, y0, x0, torch.from_numpy(v)) for s, y0, x0, v in patches]
        for rows, cols, t in conv_of_patches(self._first_conv, maps, hw):
            y[:, rows, cols] += t
        first = _GivenOutput(y[None].to(self.dtype, memory_format=torch.channels_last))
        with denormals_flushed(True):
            # an empty input: the network never reads it, its first conv's output is given
            return self.net(y.new_empty((1, 0) + tuple(hw)), features=True, first_conv=first,
                            vocab_context=vocab_context)[0][0].float()

    def _filled(self, sub: torch.Tensor, slots: np.ndarray, logits: torch.Tensor, fill: dict[int, int]):
        """Log-probabilities over ``slots`` without the unclaimed channel plus the ``fill``
        classes, which share the unclaimed channel's probability (see ``parse``); the label
        values of the new channels are ``fill``'s values."""
        lp = torch.log_softmax(sub, dim=0)
        u = int(np.nonzero(slots == self.unclaimed)[0][0])
        chans = sorted(fill)
        lp_fill = torch.log_softmax(logits[torch.as_tensor(chans, device=logits.device)], dim=0) + lp[u]
        keep = [i for i in range(len(slots)) if i != u]
        values = np.concatenate([slots[keep], np.asarray([fill[c] for c in chans])])
        return torch.cat([lp[keep], lp_fill]), values

    def _forward_locked(self, x: torch.Tensor, channels: tuple[list[int], list[int]] | None = None,
                        vocab_context: bool = True) -> torch.Tensor:
        """The network on ``x`` (the path off the CPU, with test-time flip, and of batches; on the CPU
        a click's forward is ``_forward_kept``); with ``channels`` (``read_channels``, on the CPU,
        ``x`` drawn by ``_redraw_input``) it reads only those input channels through the first conv
        restricted to them (``restricted_first_conv``): the default's first conv reads 51 channels
        at the network size, most of them constant (``bench/forward.py``)."""
        _, dev = self._staging(tuple(x.shape))
        if x is not dev:
            self._drawn = {"rgb": None, "windows": None, "prev": None}  # the buffer no longer holds our drawing
            dev.copy_(x)
        first = None
        b, c, h, w = dev.shape
        windows = self._drawn["windows"]  # None unless the buffer holds our drawing
        # above ~20 channels read the restricted path measured no faster here (bench/forward.py)
        if channels is None or self.device.type != "cpu" or len(channels[0]) >= 20 or b != 1 or windows is None:
            x = dev.to(self.dtype)  # the net's weights are in self.dtype (weights_in)
        else:
            keep, ones = channels
            key = (tuple(keep), tuple(ones))
            first = self._first_convs.pop(key, None)  # kept across clicks: the same sets recur
            if first is None:
                first = restricted_first_conv(self._first_conv, keep, ones).to(self.dtype)
            self._first_convs[key] = first
            while len(self._first_convs) > 8:
                self._first_convs.popitem(last=False)
            # channels-last memory seen as (pixels, channels): numpy takes the columns in one pass
            # (torch's channel indexing on this layout took 6-30 ms)
            taken = np.take(dev.permute(0, 2, 3, 1).reshape(-1, c).numpy(), keep, axis=1)
            x = torch.empty((b * h * w, first.in_channels), dtype=self.dtype)
            x[:, :len(keep)] = torch.from_numpy(taken)
            if ones:
                x[:, len(keep)] = 1.0
            x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # channels-last (B, C', h, w)
        with denormals_flushed(self.device.type == "cpu"):
            out = self.net(x, features=True, first_conv=first, vocab_context=vocab_context)[0].float()
            if self.flip:  # flip keeps channels-last
                mirrored = self.net(x.flip(-1), features=True, first_conv=first,
                                    vocab_context=vocab_context)[0].float().flip(-1)
                out = 0.5 * (out + (mirrored if self.mirror is None else mirrored[:, self.mirror]))
        return out

    @on_torch_thread
    def parse(self, image: np.ndarray, clicks, allowed_slots=None,
              prev_mask: np.ndarray | None = None, fill: dict[int, int] | None = None,
              zoom: bool | None = None, prior: dict[int, list[int]] | None = None,
              click_free_fill: bool = True) -> ParseResult:
        """Parse ``image`` (H, W, 3 uint8) given clicks (y, x, slot) in its pixel coordinates.

        ``allowed_slots`` restricts the argmax to these output channels (the slots the label
        config uses, the unclaimed channel, or vocabulary channels for a zero-click parse);
        labels are channel indices and masks are mutually exclusive. ``prev_mask`` is the
        previous answer's ``network_labels`` (or any slot map, resized to the network size).
        ``fill`` ({vocabulary channel: label value}) shares the unclaimed channel's probability
        among those known classes by the vocabulary head's softmax over them,
        ``p(c) = p_slots(unclaimed) * p_vocab(c | fill)``: parts nobody clicked are parsed by
        meaning instead of left unlabelled; with a context head (``NetConfig.vocab_context``)
        ``p_vocab`` is the parse without clicks' (``click_free_vocabulary``: the head that parsed
        the photo before any click keeps parsing its unclicked parts; one more forward on a
        photo's first such click unless its zero-click parse came first), with
        ``click_free_fill=False`` the clicked forward's own vocabulary head. ``prior`` ({output channel: the vocabulary channels
        it stands for}, ``label_rules.prior_channels``) adds the Parser's ``vocab_prior`` times
        the log-probability the vocabulary head gives those classes (``with_vocabulary_prior``):
        a click says which part, the head says what a pixel looks like. With ``refine`` the
        class probabilities are refined along the colour edges of the network-size photo (``refined_argmax``) and, with
        ``full_res_edges``, enlarged with boundaries between network pixels (``smooth_resize``); else the logits
        are upsampled to the original size before the argmax. Then every click claims the
        pixels of its colour within ``click_radius`` network pixels (``paint_clicks``).
        ``zoom`` (None: the Parser's ``zoom``): after this pass, the network runs again on each clicked person's region
        (``person_boxes``) at its own resolution, with the clicks inside it, and those labels are
        pasted over this pass's (small or distant people, crowds). ``network_labels``, the next
        click's previous-prediction input, is the answer as returned, at the network size
        (``previous_prediction``).
        """
        timings: dict = {}
        logits = self.logits(image, clicks, prev_mask, timings)
        t0 = time.perf_counter()
        slots = np.arange(self.vocab_start) if allowed_slots is None else np.asarray(
            sorted(set(int(s) for s in allowed_slots)))
        with torch.inference_mode():
            sub = logits[torch.as_tensor(slots, device=logits.device)]
            if self.unclaimed_bias and self.unclaimed is not None and self.unclaimed in slots:
                sub = sub.clone()
                sub[int(np.nonzero(slots == self.unclaimed)[0][0])] += self.unclaimed_bias
            mass = vocabulary_mass(slots, logits, prior) if prior and self.uses_vocabulary_prior else None
            if mass is not None and self.vocab_prior:
                sub = with_vocabulary_prior(sub, slots, logits, prior, self.vocab_prior, mass=mass)
            if mass is not None and self.vocab_share and self.unclaimed is not None:
                sub = with_vocabulary_share(sub, slots, logits, prior, self.unclaimed, mass=mass)
            if self.net.vocab_context is not None and not len(clicks) and prev_mask is None:
                self.click_free_vocabulary(image, logits)  # kept for the clicks to come
            if fill and self.unclaimed is not None and self.unclaimed in slots:
                meaning = self.click_free_vocabulary(image) if click_free_fill and \
                    self.net.vocab_context is not None else logits
                sub, slots = self._filled(sub, slots, meaning, fill)
            # scores at stride 4 (cheap); labels at the image size
            best, arg_small = torch.softmax(sub, dim=0).max(dim=0)
            hw = network_size(image.shape[:2], self.max_side)
            if self.refine:
                small, _ = self._network_image(image, hw)
                edges = self.edge_net is not None
                work = work_size(image.shape[:2], self.edge_side) if edges else image.shape[:2]
                grid = tuple(sub.shape[1:])  # the photo's colour terms, once for all its clicks
                photo = self._per_image("guide", image, hw, lambda: photo_guide(small, grid))
                labels = refined_argmax(sub.cpu(), small, work, values=slots, smooth_edges=self.full_res_edges,
                                        photo=photo)
                if edges:
                    # the photo's last refinement: tiles whose coarse labels did not change keep its answer
                    memo = self._per_image("edge-memo", image, tuple(work), lambda: [None])
                    labels = refine_edges(labels, self._work_image(image, tuple(work)), self.edge_net, memo=memo)
                    if tuple(work) != image.shape[:2]:
                        labels = nearest_resize(labels, image.shape[:2])
            else:
                labels = upsampled_argmax(sub.cpu(), image.shape[:2], values=slots)
            if self.click_radius > 0 and len(clicks):
                own = np.asarray(clicks, np.float64).reshape(-1, 3)
                own = own[np.isin(own[:, 2].astype(np.int64), slots)]
                scale = max(image.shape[0] / hw[0], image.shape[1] / hw[1])
                disks = self._per_image("disks", image, image.shape[:2], dict)
                paint_clicks(labels, image, own, self.click_radius * scale, disks=disks)
            conf = np.zeros(self.net.cfg.out_channels, np.float32)
            flat = arg_small.flatten()
            sums = torch.zeros(len(slots), device=flat.device).scatter_add_(0, flat, best.flatten())
            counts = torch.bincount(flat, minlength=len(slots)).clamp(min=1)
            conf[slots] = (sums / counts).cpu().numpy()
            score = float(best.mean())
        timings["upsample"] = time.perf_counter() - t0
        res = ParseResult(labels=labels, confidence=conf, score=score, timings=timings)
        if self.zoom if zoom is None else zoom:
            res = self._zoomed(res, image, clicks, allowed_slots, fill, arg_small, values=slots, prior=prior)
        if self.use_prev_mask:
            t0 = time.perf_counter()
            res.network_labels = previous_prediction(res.labels, hw, self.num_slots)
            timings["upsample"] += time.perf_counter() - t0
        return res

    @on_torch_thread
    def click_free_vocabulary(self, image: np.ndarray, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The stride-4 logits of ``image``'s parse without clicks (``logits`` when they are
        those), kept per photo (``_per_image``): a forward the first time otherwise."""
        hw = network_size(image.shape[:2], self.max_side)
        return self._per_image("click-free", image, hw, lambda: logits if logits is not None else self.logits(image, []))

    def _zoomed(self, res: ParseResult, image: np.ndarray, clicks, allowed_slots, fill,
                arg_small: torch.Tensor, values: np.ndarray, prior=None) -> ParseResult:
        """``res`` with each clicked person's region parsed again at the network's resolution
        (``parse``'s ``zoom``)."""
        small = values[arg_small.cpu().numpy()]
        c = np.asarray(clicks, np.float64).reshape(-1, 3)
        scale = np.array([small.shape[0] / image.shape[0], small.shape[1] / image.shape[1], 1.0])
        for box in person_boxes(small, c * scale, image.shape[:2]):
            y0, y1, x0, x1 = box
            inside = (c[:, 0] >= y0) & (c[:, 0] < y1) & (c[:, 1] >= x0) & (c[:, 1] < x1)
            own = c[inside] - [y0, x0, 0]
            # a person whose clicks did not change since the last answer keeps its crop parse (the
            # crop's parse depends on nothing else), so a click costs one zoomed forward, not one per person
            key = (id(image), box, own.tobytes(), tuple(sorted(allowed_slots)) if allowed_slots is not None else None,
                   tuple(sorted(fill.items())) if fill else None,
                   tuple((k, tuple(v)) for k, v in sorted(prior.items())) if prior else None)
            with self._lock:
                hit = self._crops.get(key)
                if hit is not None and hit[0]() is image:
                    self._crops.move_to_end(key)
            if hit is not None and hit[0]() is image:
                labels = hit[1]
            else:
                crop = self.parse(np.ascontiguousarray(image[y0:y1, x0:x1]), own, allowed_slots, None, fill,
                                  zoom=False, prior=prior, click_free_fill=False)
                labels = crop.labels
                for k, v in crop.timings.items():
                    res.timings[k] = res.timings.get(k, 0.0) + v
                try:
                    ref = weakref.ref(image)
                except TypeError:
                    ref = None
                if ref is not None:
                    with self._lock:
                        self._crops[key] = (ref, labels)
                        while len(self._crops) > 8:
                            self._crops.popitem(last=False)
            paste_into(res.labels, labels, box)
        return res
