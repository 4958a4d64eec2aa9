"""Clicks + image -> parse. Pure arrays in and out; no HTTP, no Label Studio."""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import Binding, binding_of, network_of, read_checkpoint
from .clicks import network_input, scale_clicks


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def network_size(hw: tuple[int, int], max_side: int, multiple: int = 16) -> tuple[int, int]:
    """Size the network sees: longest side <= max_side, both sides multiples of ``multiple``."""
    h, w = hw
    s = min(1.0, max_side / max(h, w))
    nh = max(multiple, int(round(h * s / multiple)) * multiple)
    nw = max(multiple, int(round(w * s / multiple)) * multiple)
    return nh, nw


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


@dataclass
class ParseResult:
    labels: np.ndarray  # (H, W) int64 slot index per pixel, at the original image size
    confidence: np.ndarray  # (num_slots,) mean softmax probability over the pixels of each slot
    score: float  # mean winning probability over the image


class Parser:
    """Holds one network and runs it; thread-safe (one forward at a time per Parser)."""

    def __init__(self, ckpt: dict, device: str | None = None, max_side: int | None = None,
                 threads: int | None = None):
        self.ckpt = ckpt
        self.binding: Binding = binding_of(ckpt)
        self.net = network_of(ckpt).eval()
        self.device = pick_device(device)
        self.net.to(self.device)
        self.max_side = int(max_side or ckpt.get("input_size", 512))
        self.mean, self.std = ckpt["mean"], ckpt["std"]
        self.num_slots = self.net.cfg.num_slots
        self.use_prev_mask = self.net.cfg.prev_mask
        self.model_version = ckpt.get("model_version", "unknown")
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(int(threads))
        self._lock = threading.Lock()
        self._resized: OrderedDict[int, tuple] = OrderedDict()  # id(image) -> (weakref, hw, small)

    def _network_image(self, image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """The image resized to network size, cached per image object (the fetcher hands the
        same cached array for every click of a task, so a click costs no resize)."""
        key = id(image)
        with self._lock:
            hit = self._resized.get(key)
            if hit is not None and hit[0]() is image and hit[1] == hw:
                self._resized.move_to_end(key)
                return hit[2]
        small = resize_image(image, hw)
        try:
            ref = weakref.ref(image)
        except TypeError:
            return small
        with self._lock:
            self._resized[key] = (ref, hw, small)
            while len(self._resized) > 16:
                self._resized.popitem(last=False)
        return small

    @classmethod
    def from_file(cls, path: str, **kw) -> "Parser":
        return cls(read_checkpoint(path), **kw)

    def logits(self, image: np.ndarray, clicks, prev_mask: np.ndarray | None = None) -> torch.Tensor:
        """Network logits (num_slots, h, w) at network resolution."""
        hw = network_size(image.shape[:2], self.max_side)
        small = self._network_image(image, hw)
        c = scale_clicks(clicks, image.shape[:2], hw) if len(clicks) else np.zeros((0, 3))
        pm = None
        if self.use_prev_mask and prev_mask is not None:
            pm = np.asarray(Image.fromarray(prev_mask.astype(np.int32)).resize(
                (hw[1], hw[0]), Image.NEAREST))
        x = network_input(small, c, self.num_slots, pm, self.use_prev_mask, self.mean, self.std)
        with self._lock, torch.inference_mode():
            return self.net(x[None].to(self.device))[0].float()

    def parse(self, image: np.ndarray, clicks, allowed_slots=None,
              prev_mask: np.ndarray | None = None) -> ParseResult:
        """Parse ``image`` (H, W, 3 uint8) given clicks (y, x, slot) in its pixel coordinates.

        ``allowed_slots`` restricts the argmax to the slots the label config uses; masks are
        mutually exclusive. Logits are upsampled to the original size before the argmax.
        """
        logits = self.logits(image, clicks, prev_mask)
        slots = np.arange(self.num_slots) if allowed_slots is None else np.asarray(
            sorted(set(int(s) for s in allowed_slots)))
        with torch.inference_mode():
            sub = logits[torch.as_tensor(slots, device=logits.device)]
            # scores at network resolution (cheap); labels from logits upsampled to full size
            best, arg_small = torch.softmax(sub, dim=0).max(dim=0)
            up = F.interpolate(sub[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            labels = torch.as_tensor(slots, device=up.device)[up.argmax(dim=0)].cpu().numpy()
            conf = np.zeros(self.num_slots, np.float32)
            flat = arg_small.flatten()
            sums = torch.zeros(len(slots), device=flat.device).scatter_add_(0, flat, best.flatten())
            counts = torch.bincount(flat, minlength=len(slots)).clamp(min=1)
            conf[slots] = (sums / counts).cpu().numpy()
            score = float(best.mean())
        return ParseResult(labels=labels, confidence=conf, score=score)


def default_threads() -> int:
    """A sensible CPU thread count per worker: the cores divided among gunicorn workers."""
    env = os.environ.get("IHP_TORCH_THREADS")
    if env:
        return max(1, int(env))
    workers = int(os.environ.get("IHP_WORKERS", "2"))
    return max(1, (os.cpu_count() or 2) // max(1, workers))
