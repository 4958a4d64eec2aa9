"""Training samples: augmentation (after CE2P), simulated clicks and slot binding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from . import click_simulation as cs
from .datasets import ParsingDataset

IGNORE = 255


@dataclass
class SampleConfig:
    crop: tuple[int, int] = (473, 473)
    base_scale: float = 1.0  # images are first resized by this factor (CPU recipes: < 1)
    scale_range: tuple[float, float] = (0.5, 1.5)
    flip: bool = True
    jitter: float = 0.2
    strategy: str = "random"  # central | random | near-edge
    max_extra: int = 15  # EC
    bg_range: tuple[int, int] = (3, 6)
    d_margin: float = 10.0
    p_background_click: float = 0.5  # the evaluation gives none at initialisation
    p_extra: float = 0.8  # share of samples that get extra clicks on top of central ones
    min_area: int = 16  # components smaller than this get no central click
    binding: str = "shuffled"  # fixed | shuffled
    num_slots: int = 24
    background: int = 0


def scale_pair(image: np.ndarray, labels: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = labels.shape
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) == (h, w):
        return image, labels
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    lab = np.asarray(Image.fromarray(labels).resize((nw, nh), Image.NEAREST))
    return img, lab


def random_crop(image, labels, crop, rng):
    """Pad (image 0, labels IGNORE) to at least ``crop`` and cut a random window."""
    ch, cw = crop
    h, w = labels.shape
    ph, pw = max(0, ch - h), max(0, cw - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        labels = np.pad(labels, ((0, ph), (0, pw)), constant_values=IGNORE)
        h, w = labels.shape
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    return image[y:y + ch, x:x + cw], labels[y:y + ch, x:x + cw]


def hflip(image: np.ndarray, labels: np.ndarray, flip_lut: np.ndarray):
    """Horizontal flip that swaps left/right classes through ``flip_lut``."""
    return image[:, ::-1].copy(), flip_lut[labels[:, ::-1]]


def photometric(image: np.ndarray, strength: float, rng) -> np.ndarray:
    if strength <= 0:
        return image
    im = Image.fromarray(image)
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enh(im).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return np.asarray(im)


def augment(image, labels, cfg: SampleConfig, flip_lut, rng, prescaled: float = 1.0):
    """Random scale (relative to ``base_scale``; ``prescaled`` = factor already applied),
    crop, flip with left/right swap, photometric jitter."""
    s = cfg.base_scale * float(rng.uniform(*cfg.scale_range)) / prescaled
    image, labels = scale_pair(image, labels, s)
    image, labels = random_crop(image, labels, cfg.crop, rng)
    if cfg.flip and rng.random() < 0.5:
        image, labels = hflip(image, labels, flip_lut)
    return photometric(np.ascontiguousarray(image), cfg.jitter, rng), np.ascontiguousarray(labels)


def simulate_clicks(labels: np.ndarray, cfg: SampleConfig, rng) -> list[tuple[int, int, int]]:
    """Central clicks on every component, maybe a background click, maybe extra clicks."""
    clicks = cs.central_clicks(np.where(labels == IGNORE, cfg.background, labels), rng,
                               cfg.background, cfg.min_area)
    if rng.random() < cfg.p_background_click:
        bg = cs.background_click(np.where(labels == IGNORE, 254, labels), rng, cfg.background,
                                 cfg.d_margin)
        if bg:
            clicks.append(bg)
    if cfg.strategy != "central" and rng.random() < cfg.p_extra:
        if cfg.strategy == "random":
            extra = cs.random_extra_clicks(labels, rng, cfg.max_extra, cfg.background, cfg.bg_range)
            if rng.random() >= cfg.p_background_click:
                extra = [c for c in extra if c[2] != cfg.background]
        elif cfg.strategy == "near-edge":
            extra = cs.near_edge_clicks(labels, rng, cfg.max_extra, cfg.d_margin)
        else:
            raise ValueError(f"unknown click strategy {cfg.strategy!r}")
        clicks += extra
    return clicks


def unclicked_to_ignore(labels: np.ndarray, clicks, background: int = 0) -> np.ndarray:
    """Label-agnostic training: a part class nobody clicked (specks under ``min_area``) cannot
    be named by the network, so its pixels are left out of the loss."""
    clicked = {int(c) for *_, c in clicks} | {background, IGNORE}
    missing = [c for c in np.unique(labels).tolist() if c not in clicked]
    if not missing:
        return labels
    return np.where(np.isin(labels, missing), IGNORE, labels).astype(labels.dtype)


def slot_permutation(classes_present, cfg: SampleConfig, rng, num_classes: int) -> np.ndarray:
    """Class -> slot lookup (256 entries, IGNORE elsewhere).

    fixed: class i -> slot i. shuffled: background -> 0, every other class present -> a random
    distinct slot in 1..num_slots-1 (the loss uses the same permutation).
    """
    lut = np.full(256, IGNORE, np.uint8)
    if cfg.binding == "fixed":
        lut[:num_classes] = np.arange(num_classes)
        return lut
    parts = [int(c) for c in classes_present if c != cfg.background and c != IGNORE]
    if len(parts) > cfg.num_slots - 1:
        raise ValueError(f"{len(parts)} classes in one sample but only {cfg.num_slots - 1} part slots")
    slots = rng.permutation(np.arange(1, cfg.num_slots))[:len(parts)]
    lut[cfg.background] = 0
    for c, s in zip(parts, slots):
        lut[c] = s
    return lut


class ClickSampleDataset(torch.utils.data.Dataset):
    """Yields (normalised-free uint8 image, slot target, clicks in slot space) per sample.

    Images are cached after the ``base_scale`` resize, so epochs after the first cost no decode.
    """

    def __init__(self, ds: ParsingDataset, cfg: SampleConfig, seed: int = 0, cache: bool = True):
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.flip_lut = ds.flip_lut()
        self.cache = {} if cache else None
        self.epoch = 0

    def __len__(self):
        return len(self.ds)

    def _load(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image, labels = self.ds.load(i)
        pre = min(1.0, self.cfg.base_scale * self.cfg.scale_range[1])
        image, labels = scale_pair(image, labels, pre)
        if self.cache is not None:
            self.cache[i] = (image, labels, pre)
        return image, labels, pre

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        image, labels, pre = self._load(i)
        cfg = self.cfg
        image, labels = augment(image, labels, cfg, self.flip_lut, rng, prescaled=pre)
        clicks = simulate_clicks(labels, cfg, rng)
        if cfg.binding == "shuffled":
            labels = unclicked_to_ignore(labels, clicks, cfg.background)
        lut = slot_permutation(np.unique(labels), cfg, rng, len(self.ds.classes))
        target = lut[labels]
        c = np.array([(y, x, lut[k]) for y, x, k in clicks], np.float32).reshape(-1, 3)
        return torch.from_numpy(image.copy()), torch.from_numpy(target.astype(np.int64)), c


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    targets = torch.stack([b[1] for b in batch])
    return images, targets, [b[2] for b in batch]
