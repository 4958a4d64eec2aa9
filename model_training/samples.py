"""Training samples: augmentation (after CE2P), simulated clicks and slot binding."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

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
    # parse that grows with the clicks: in this share of samples only a random number of the
    # parts present get clicks (1..all, uniform); the others' pixels are the unclaimed target
    p_partial: float = 0.0
    # of those, this share keeps only one or two parts (the first clicks of the progressive
    # protocol; uniform 1..all makes them rare when a photo has ten parts)
    p_few_parts: float = 0.0
    # share of samples whose clicked part classes keep a single click each, on one component
    # (chosen by area), extra clicks dropped: an annotator's first click on a part, as the
    # progressive protocol gives it. The class's other components (the other arm, shoe, coat
    # flap) stay its target, so the network learns to extend one click to the whole part; without
    # it every component above ``min_area`` gets a click and a lone click only ever meant "here".
    p_single_click: float = 0.0
    unclaimed: int | None = None  # the unclaimed output channel (None: the network has none)
    p_no_clicks: float = 0.0  # share of samples with no click at all (the zero-click parse)
    # crowds, small people, partial bodies and camera noise (issue 31); all off by default
    p_composite: float = 0.0  # share of samples that get 1..max_pasted other people pasted in
    max_pasted: int = 2
    pasted_height: tuple[float, float] = (0.3, 0.8)  # pasted person's height / canvas height
    p_partial_body: float = 0.0  # share of samples cut to an upper or lower part of the body
    p_rotate: float = 0.0
    max_rotate: float = 15.0  # degrees
    p_blur: float = 0.0
    p_jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (25, 90)


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


def person_box(labels: np.ndarray, background: int = 0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the labelled person (any label but background / IGNORE)."""
    ys, xs = np.nonzero((labels != background) & (labels != IGNORE))
    if not len(ys):
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def paste_person(canvas: np.ndarray, canvas_labels: np.ndarray, image: np.ndarray,
                 labels: np.ndarray, height: int, top: int, left: int, background: int = 0):
    """Paste the person of (image, labels), scaled to ``height`` pixels, with its top-left
    corner at (top, left) of the canvas (parts may fall outside). The pasted person's pixels
    overwrite image and labels (it stands in front); returns new arrays."""
    box = person_box(labels, background)
    canvas, canvas_labels = canvas.copy(), canvas_labels.copy()
    if box is None or height < 2:
        return canvas, canvas_labels
    t, l, b, r = box
    img, lab = scale_pair(image[t:b, l:r], labels[t:b, l:r], height / (b - t))
    H, W = canvas_labels.shape
    h, w = lab.shape
    y0, x0, y1, x1 = max(0, top), max(0, left), min(H, top + h), min(W, left + w)
    if y1 <= y0 or x1 <= x0:
        return canvas, canvas_labels
    sub_lab = lab[y0 - top:y1 - top, x0 - left:x1 - left]
    person = (sub_lab != background) & (sub_lab != IGNORE)
    canvas[y0:y1, x0:x1][person] = img[y0 - top:y1 - top, x0 - left:x1 - left][person]
    canvas_labels[y0:y1, x0:x1][person] = sub_lab[person]
    return canvas, canvas_labels


def cut_partial_body(image: np.ndarray, labels: np.ndarray, rng, background: int = 0):
    """Keep the upper (2/3 of draws) or lower part of the person's box: upper bodies, legs cut
    off, the way photos frame people."""
    box = person_box(labels, background)
    if box is None:
        return image, labels
    t, _, b, _ = box
    f = float(rng.uniform(0.4, 0.75))
    if rng.random() < 2 / 3:
        cut = t + int(f * (b - t))
        return image[:cut], labels[:cut]
    cut = b - int(f * (b - t))
    return image[cut:], labels[cut:]


def rotate_pair(image: np.ndarray, labels: np.ndarray, degrees: float):
    """Rotate about the centre, same size; uncovered corners: black image, IGNORE labels."""
    img = Image.fromarray(image).rotate(degrees, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    lab = Image.fromarray(labels).rotate(degrees, resample=Image.NEAREST, fillcolor=IGNORE)
    return np.asarray(img), np.asarray(lab)


def camera_noise(image: np.ndarray, cfg: SampleConfig, rng) -> np.ndarray:
    """Gaussian blur and JPEG re-encoding, each with its probability."""
    if rng.random() >= cfg.p_blur and rng.random() >= cfg.p_jpeg:
        return image
    im = Image.fromarray(image)
    if rng.random() < cfg.p_blur:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    if rng.random() < cfg.p_jpeg:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(*cfg.jpeg_quality)))
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(im)


def augment(image, labels, cfg: SampleConfig, flip_lut, rng, prescaled: float = 1.0):
    """Random scale (relative to ``base_scale``; ``prescaled`` = factor already applied),
    partial-body cut, rotation, crop, flip with left/right swap, photometric jitter, blur and
    JPEG noise."""
    if cfg.p_partial_body and rng.random() < cfg.p_partial_body:
        image, labels = cut_partial_body(image, labels, rng, cfg.background)
    s = cfg.base_scale * float(rng.uniform(*cfg.scale_range)) / prescaled
    image, labels = scale_pair(image, labels, s)
    if cfg.p_rotate and rng.random() < cfg.p_rotate:
        image, labels = rotate_pair(image, labels, float(rng.uniform(-cfg.max_rotate, cfg.max_rotate)))
    image, labels = random_crop(image, labels, cfg.crop, rng)
    if cfg.flip and rng.random() < 0.5:
        image, labels = hflip(image, labels, flip_lut)
    image = photometric(np.ascontiguousarray(image), cfg.jitter, rng)
    return camera_noise(image, cfg, rng), np.ascontiguousarray(labels)


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


def leave_parts_unclicked(clicks, rng, background: int = 0, p_few: float = 0.0) -> list:
    """Keep the clicks of a random number (1..all, uniform; with probability ``p_few`` 1 or 2)
    of the clicked part classes, in a random choice, and the background clicks: the annotator
    who has clicked only some parts so far (progressive protocol)."""
    parts = sorted({int(c) for *_, c in clicks} - {background})
    if len(parts) <= 1:
        return list(clicks)
    most = min(2, len(parts)) if p_few and rng.random() < p_few else len(parts)
    keep = set(rng.permutation(parts)[:int(rng.integers(1, most + 1))].tolist())
    return [c for c in clicks if int(c[2]) == background or int(c[2]) in keep]


def one_click_per_part(labels: np.ndarray, clicks, rng, background: int = 0, min_area: int = 16) -> list:
    """For every part class that has clicks, one central click on one of its components
    (probability proportional to area, so mostly the largest) instead of all of them; the
    background clicks stay."""
    out = [c for c in clicks if int(c[2]) == background]
    for cls in sorted({int(c[2]) for c in clicks} - {background}):
        comps = cs.components(labels, cls, min_area)
        if not comps:
            out += [c for c in clicks if int(c[2]) == cls][:1]
            continue
        areas = np.array([m.sum() for m in comps], np.float64)
        comp = comps[int(rng.choice(len(comps), p=areas / areas.sum()))]
        out.append((*cs.central_click(comp, rng), cls))
    return out


UNCLAIMED_CLASS = 253  # label value marking "a part with no click" before slot binding


def unclicked_to_unclaimed(labels: np.ndarray, clicks, background: int = 0) -> np.ndarray:
    """Pixels of part classes that have no click become ``UNCLAIMED_CLASS`` (the network's
    unclaimed output: there is a part here that no click names)."""
    clicked = {int(c) for *_, c in clicks} | {background, IGNORE}
    missing = [c for c in np.unique(labels).tolist() if c not in clicked]
    if not missing:
        return labels
    return np.where(np.isin(labels, missing), UNCLAIMED_CLASS, labels).astype(labels.dtype)


def slot_permutation(classes_present, cfg: SampleConfig, rng, num_classes: int) -> np.ndarray:
    """Class -> slot lookup (256 entries, IGNORE elsewhere).

    fixed: class i -> slot i. shuffled: background -> 0, every other class present -> a random
    distinct slot in 1..num_slots-1 (the loss uses the same permutation).
    """
    lut = np.full(256, IGNORE, np.uint8)
    if cfg.binding == "fixed":
        lut[:num_classes] = np.arange(num_classes)
        return lut
    parts = [int(c) for c in classes_present if c not in (cfg.background, IGNORE, UNCLAIMED_CLASS)]
    if len(parts) > cfg.num_slots - 1:
        raise ValueError(f"{len(parts)} classes in one sample but only {cfg.num_slots - 1} part slots")
    slots = rng.permutation(np.arange(1, cfg.num_slots))[:len(parts)]
    lut[cfg.background] = 0
    for c, s in zip(parts, slots):
        lut[c] = s
    if cfg.unclaimed is not None:
        lut[UNCLAIMED_CLASS] = cfg.unclaimed
    return lut


def vocabulary_lut(classes: list[str], vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(class index -> vocabulary channel lookup of 256 entries, IGNORE for names the vocabulary
    does not know; bool mask of the vocabulary channels this label space uses)."""
    from ihp_backend.core.vocabulary import lookup
    known = lookup(classes, vocabulary)
    lut = np.full(256, IGNORE, np.uint8)
    used = np.zeros(len(vocabulary), bool)
    for i, name in enumerate(classes):
        if name in known:
            lut[i] = known[name]
            used[known[name]] = True
    return lut, used


class ClickSampleDataset(torch.utils.data.Dataset):
    """Yields (uint8 image, slot target, clicks in slot space, vocabulary target, vocabulary
    channels of the sample's label space) per sample; the last two are None without a
    vocabulary.

    ``spaces`` (optional): several label spaces of the same photos (``[(dataset, weight)]``,
    e.g. CCP's classes and the pose-derived LIP-20 / PPP parts); each sample draws one by weight.
    Images are cached after the ``base_scale`` resize, so epochs after the first cost no decode.
    """

    def __init__(self, ds: ParsingDataset, cfg: SampleConfig, seed: int = 0, cache: bool = True,
                 spaces: list[tuple[ParsingDataset, float]] | None = None, vocabulary=None):
        self.ds, self.cfg, self.seed = ds, cfg, seed
        self.spaces = spaces or [(ds, 1.0)]
        w = np.array([max(0.0, float(x)) for _, x in self.spaces])
        self.space_p = w / w.sum()
        if any(len(s) != len(ds) for s, _ in self.spaces):
            raise ValueError("every label space must hold the same photos")
        self.flip_luts = [s.flip_lut() for s, _ in self.spaces]
        self.flip_lut = self.flip_luts[0]
        self.vocabulary = vocabulary
        self.vocab_luts = [vocabulary_lut(s.classes, vocabulary) for s, _ in self.spaces] if vocabulary else None
        self.cache = {} if cache else None
        self.epoch = 0

    def __len__(self):
        return len(self.ds)

    def _load(self, i, space: int = 0):
        key = (space, i)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        ds = self.spaces[space][0]
        image, labels = ds.load(i)
        pre = min(1.0, self.cfg.base_scale * self.cfg.scale_range[1])
        image, labels = scale_pair(image, labels, pre)
        if self.cache is not None:
            hit = self.cache.get((0, i)) if space else None
            if hit is not None and hit[0].shape == image.shape:
                image = hit[0]  # one copy of each photo whatever the label space
            self.cache[key] = (image, labels, pre)
        return image, labels, pre

    def _crowd(self, image, labels, i, space, rng):
        """Paste 1..max_pasted other photos' people (same label space) into this one, each at a
        random height and place: crowds, people far from the camera, occlusion."""
        H, W = labels.shape
        for _ in range(int(rng.integers(1, self.cfg.max_pasted + 1))):
            j = int(rng.integers(len(self.ds)))
            if j == i:
                continue
            img, lab, _ = self._load(j, space)
            h = int(H * rng.uniform(*self.cfg.pasted_height))
            box = person_box(lab, self.cfg.background)
            if box is None:
                continue
            w = int(h * (box[3] - box[1]) / max(1, box[2] - box[0]))
            top = int(rng.integers(-h // 4, max(1 - h // 4, H - h + h // 4)))
            left = int(rng.integers(-w // 4, max(1 - w // 4, W - w + w // 4)))
            image, labels = paste_person(image, labels, img, lab, h, top, left, self.cfg.background)
        return image, labels

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        space = int(rng.choice(len(self.spaces), p=self.space_p)) if len(self.spaces) > 1 else 0
        image, labels, pre = self._load(i, space)
        cfg = self.cfg
        if cfg.p_composite and rng.random() < cfg.p_composite:
            image, labels = self._crowd(image, labels, i, space, rng)
        image, labels = augment(image, labels, cfg, self.flip_luts[space], rng, prescaled=pre)
        vocab_target = used = None
        if self.vocab_luts is not None:
            vlut, used = self.vocab_luts[space]
            vocab_target = torch.from_numpy(vlut[labels].astype(np.int64))
            used = torch.from_numpy(used)
        clicks = simulate_clicks(labels, cfg, rng)
        if cfg.unclaimed is not None and cfg.p_partial > 0 and rng.random() < cfg.p_partial:
            clicks = leave_parts_unclicked(clicks, rng, cfg.background, cfg.p_few_parts)
        if cfg.p_single_click and rng.random() < cfg.p_single_click:
            clicks = one_click_per_part(labels, clicks, rng, cfg.background, cfg.min_area)
        if cfg.unclaimed is not None and cfg.p_no_clicks > 0 and rng.random() < cfg.p_no_clicks:
            clicks = []
        if cfg.binding == "shuffled":
            labels = unclicked_to_unclaimed(labels, clicks, cfg.background) if cfg.unclaimed is not None \
                else unclicked_to_ignore(labels, clicks, cfg.background)
        lut = slot_permutation(np.unique(labels), cfg, rng, len(self.ds.classes))
        target = lut[labels]
        c = np.array([(y, x, lut[k]) for y, x, k in clicks], np.float32).reshape(-1, 3)
        return (torch.from_numpy(image.copy()), torch.from_numpy(target.astype(np.int64)), c,
                vocab_target, used)


def collate(batch):
    """-> images, slot targets, clicks, vocabulary targets (or None), used vocabulary channels."""
    images = torch.stack([b[0] for b in batch])
    targets = torch.stack([b[1] for b in batch])
    clicks = [b[2] for b in batch]
    if batch[0][3] is None:
        return images, targets, clicks, None, None
    return images, targets, clicks, torch.stack([b[3] for b in batch]), torch.stack([b[4] for b in batch])
