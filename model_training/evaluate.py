"""Clicks-to-standard evaluation (paper Sec. IV-A) plus RITM-style per-image NoC.

    python -m model_training.evaluate --data ../shared/data/ccp --kind ccp --split val \
        --merge ccp12 --checkpoint ihp_backend/models/default.pt --baseline random-walker \
        --standard 0.85 --max-corrections 20 --out runs/eval_default

Protocol: initial clicks = one central click (best of N_c = 5 candidates by boundary
distance) on every connected component of every non-background class present (components
under ``--min-area`` pixels skipped; ``--background-click`` adds one background click);
then K rounds of one correction click at the central point of the largest wrongly labelled
region, labelled with the ground-truth class there. ``--rgb-only`` starts with no clicks.

Metrics: data-set mIoU (confusion summed over images) after k = 0..K corrections; Add. =
smallest k with mIoU >= standard; Avg. = (all initial clicks + Add. x images) / (sum over
images of the classes present, background included); per-image NoC and failures; per-class
IoU at k = 0 and at Add.; near-edge mIoU and boundary F1 (5 px) at k = 0 and at Add.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ihp_backend.core.allocator import tune_malloc
from ihp_backend.core.label_rules import allowed_slots, fill_channels, prior_channels, zero_click_channels
from ihp_backend.core.options import PRECISIONS, ParserOptions, edge_refiner_path

from . import click_simulation as cs
from .datasets import open_dataset

STANDARDS = {"lip": 0.85, "cihp": 0.80, "ppp": 0.80, "pascal-person-part": 0.80, "helen": 0.75,
             "ccp": 0.85}


# ---------------------------------------------------------------------------------- predictors
class CorePredictor:
    """The network through the serving core (``ihp_backend.core.inference.Parser``) and the serving
    label rules (``ihp_backend.core.label_rules``): the channels that may win are chosen exactly as
    the backend chooses them. ``zero_click``: with no click, the vocabulary head parses the
    known class names (the backend's batch prediction); ``fill_known``: parts nobody clicked
    are filled by meaning (``IHP_FILL_KNOWN``)."""

    def __init__(self, parser, class_names: list[str], ignore_clicks: bool = False, name: str | None = None,
                 zero_click: bool = False, fill_known: bool = False):
        self.parser = parser
        self.class_names = class_names
        self.slot_of = parser.binding.bind(class_names)
        self.slot_lut = np.array([self.slot_of[n] for n in class_names])  # class index -> slot
        # output channel -> class index; the unclaimed channel and unknown channels: background
        self.class_lut = np.zeros(parser.net.cfg.out_channels, np.int64)
        self.class_lut[self.slot_lut] = np.arange(len(class_names))
        self.zero = zero_click_channels(parser.binding, parser.vocab_start, class_names)
        for n, ch in self.zero.items():
            if n in class_names:
                self.class_lut[ch] = class_names.index(n)
        self.ignore_clicks = ignore_clicks
        self.zero_click, self.fill_known = zero_click and bool(self.zero), fill_known and bool(self.zero)
        self.name = name or (parser.model_version + (" (no clicks)" if ignore_clicks else ""))
        self._last_input: tuple = (None, None)  # (photo, its last parse's network_labels)

    def __call__(self, image: np.ndarray, clicks: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
        """``prev``: the previous prediction (class indices) when this call continues the same
        photo's clicks; models with the previous-prediction input are then fed what the backend
        feeds from its cache, the last click parse's ``network_labels`` (a parse without clicks
        by meaning, like the backend's zero-click answer, leaves none)."""
        slots = self.slot_lut[clicks[:, 2].astype(np.int64)] if len(clicks) else np.zeros(0, np.int64)
        c = np.column_stack([clicks[:, :2], slots]) if len(clicks) else np.zeros((0, 3))
        fill = prior = None
        if self.ignore_clicks:
            c = np.zeros((0, 3))
            allowed = sorted(self.slot_of.values())
        elif self.zero_click and not len(c):
            allowed = sorted(self.zero.values())
        else:
            allowed = allowed_slots(self.parser.binding, self.slot_of, slots, self.class_names,
                                    self.parser.unclaimed)
            prior = prior_channels(self.parser.binding, self.parser.vocab_start, self.class_names,
                                   self.slot_of, slots, self.parser.unclaimed) if self.parser.uses_vocabulary_prior else None
            if self.fill_known:
                fill, _ = fill_channels(self.parser.binding, self.parser.vocab_start, self.class_names,
                                        self.slot_of, slots)
        if prev is not None and self._last_input[0] is not image:
            raise RuntimeError("a continued parse must get the same photo array as the one before it")
        prev_input = self._last_input[1] if prev is not None and not self.ignore_clicks else None
        res = self.parser.parse(image, c, allowed_slots=allowed, prev_mask=prev_input, fill=fill,
                                zoom=False if self.ignore_clicks else None, prior=prior)
        by_meaning = self.zero_click and not len(c)  # the backend keeps no input from such a parse
        self._last_input = (image, None if by_meaning else res.network_labels)
        return self.class_lut[res.labels]


class RandomWalkerPredictor:
    """Classical seeded floor: scikit-image's random walker seeded by the clicks (disks of
    ``radius`` px), run at ``max_side`` resolution. Needs no training."""

    name = "random-walker"

    def __init__(self, max_side: int = 192, radius: int = 3, beta: float = 130.0):
        self.max_side, self.radius, self.beta = max_side, radius, beta

    def __call__(self, image: np.ndarray, clicks: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
        from skimage.segmentation import random_walker
        h, w = image.shape[:2]
        if len(clicks) == 0:
            return np.zeros((h, w), np.int64)
        s = min(1.0, self.max_side / max(h, w))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))
        small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR)).astype(np.float64) / 255
        seeds = np.zeros((sh, sw), np.int64)
        yy, xx = np.mgrid[:sh, :sw]
        for y, x, c in clicks:
            sy, sx = (y + 0.5) * sh / h - 0.5, (x + 0.5) * sw / w - 0.5
            seeds[(yy - sy) ** 2 + (xx - sx) ** 2 <= self.radius ** 2] = int(c) + 1
        labels = np.unique(seeds[seeds > 0])
        if len(labels) == 1:
            out = np.full((sh, sw), labels[0] - 1)
        else:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "probability range outside [0, 1]" at tol 1e-2
                out = random_walker(small, seeds, beta=self.beta, mode="cg_j", channel_axis=-1, tol=1e-2) - 1
            out[out < 0] = 0
        return np.asarray(Image.fromarray(out.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int64)


class HTTPPredictor:
    """Black-box: a running backend's /predict, in Label Studio's format. Each image and run
    gets a fresh task id; every request carries the full click set (history replaced)."""

    def __init__(self, url: str, class_names: list[str], timeout: float = 60.0):
        import requests
        self.url, self.class_names, self.timeout = url.rstrip("/"), class_names, timeout
        self.session = requests.Session()
        self.name = f"http:{self.url}"
        from ihp_backend.core.ls_format import interactive_label_config
        self.config = interactive_label_config(class_names)
        self._task, self._image_uri, self._image_id = None, None, None
        self.run = uuid.uuid4().int % 10 ** 9

    def __call__(self, image: np.ndarray, clicks: np.ndarray, prev: np.ndarray | None = None) -> np.ndarray:
        from ihp_backend.core.ls_format import rle_to_mask
        h, w = image.shape[:2]
        if self._image_id is not id(image):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            self._image_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            self._image_id = id(image)
            self._task = uuid.uuid4().int % 10 ** 12
        result = [{"type": "keypointlabels", "from_name": "kp", "to_name": "image",
                   "original_width": w, "original_height": h, "is_positive": True,
                   "value": {"x": x / w * 100, "y": y / h * 100,
                             "keypointlabels": [self.class_names[int(c)]]}} for y, x, c in clicks]
        if len(result) == 1:  # a single keypoint appends: clear first so the set is exact
            self._post([], w, h)
        # no click: a batch prediction (no context), the backend's zero-click parse if any
        r = self._post(result, w, h) if result else self._post(None, w, h)
        out = np.zeros((h, w), np.int64)
        pred = r["results"][0]
        for res in (pred.get("result", []) if isinstance(pred, dict) else []):
            name = res["value"]["brushlabels"][0]
            out[rle_to_mask(res["value"]["rle"], h, w)] = self.class_names.index(name)
        return out

    def _post(self, result, w, h):
        body = {"tasks": [{"id": self._task, "data": {"image": self._image_uri}}],
                "project": f"ihp-eval-{self.run}", "label_config": self.config,
                "params": {"context": None if result is None else {"result": result}}}
        r = self.session.post(self.url + "/predict", json=body, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"backend answered {r.status_code}: {r.text[:300]}")
        return r.json()


# ------------------------------------------------------------------------------------- metrics
def confusion(gt: np.ndarray, pred: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    valid = gt < n
    if mask is not None:
        valid &= mask
    return np.bincount(gt[valid].astype(np.int64) * n + pred[valid].astype(np.int64),
                       minlength=n * n).reshape(n, n)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both ground truth and prediction."""
    tp = np.diag(conf).astype(np.float64)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def miou(conf: np.ndarray) -> float:
    v = iou_per_class(conf)
    return float(np.nanmean(v)) if np.any(~np.isnan(v)) else 1.0


def edges(labels: np.ndarray) -> np.ndarray:
    e = np.zeros(labels.shape, bool)
    e[:-1] |= labels[:-1] != labels[1:]
    e[1:] |= labels[:-1] != labels[1:]
    e[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return e


def boundary_f1_counts(gt: np.ndarray, pred: np.ndarray, tol: int = 5, gt_edges=None, gt_dist=None) -> np.ndarray:
    """(matched predicted boundary px, predicted boundary px, matched gt px, gt boundary px).

    ``gt_edges`` / ``gt_dist`` (edges of gt and the distance to them) may be passed in when the
    same ground truth is scored many times."""
    eg = edges(gt) if gt_edges is None else gt_edges
    dg = ndimage.distance_transform_edt(~eg) if gt_dist is None else gt_dist
    ep = edges(pred)
    dp = ndimage.distance_transform_edt(~ep)
    return np.array([(dg[ep] <= tol).sum(), ep.sum(), (dp[eg] <= tol).sum(), eg.sum()], np.int64)


def f1_from_counts(c: np.ndarray) -> float:
    p = c[0] / c[1] if c[1] else 1.0
    r = c[2] / c[3] if c[3] else 1.0
    return float(2 * p * r / (p + r)) if p + r else 0.0


# ------------------------------------------------------------------------------------ protocol
@dataclass
class EvalConfig:
    standard: float = 0.85
    max_corrections: int = 20
    min_area: int = 0
    background_click: bool = False
    rgb_only: bool = False
    seed: int = 0
    n_candidates: int = cs.N_CANDIDATES
    edge_width: int = 5
    upscale: int = 1  # photos enlarged this many times (bicubic; labels nearest) after the clicks


def side_by_side(samples, n: int):
    """Photos of ``n`` people in one: each group of ``n`` consecutive samples placed side by side
    (resized to the first one's height; labels nearest), a crowd whose people are each ``1/n``
    of the network's width. Incomplete last groups are dropped."""
    from PIL import Image
    group = []
    for image, gt in samples:
        group.append((image, gt))
        if len(group) < n:
            continue
        h = group[0][1].shape[0]
        ims, gts = [], []
        for im, g in group:
            w = max(1, round(g.shape[1] * h / g.shape[0]))
            ims.append(np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)))
            gts.append(np.asarray(Image.fromarray(g.astype(np.uint8)).resize((w, h), Image.NEAREST)))
        yield np.concatenate(ims, 1), np.concatenate(gts, 1)
        group = []


def upscaled(image: np.ndarray, gt: np.ndarray, clicks: np.ndarray, factor: int):
    """A phone-size version of a sample: the photo enlarged ``factor`` times (bicubic), the labels
    by pixel repetition (nearest), and the clicks (chosen on the original) moved to the same
    points (pixel centres aligned)."""
    from PIL import Image
    h, w = gt.shape
    big = np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.BICUBIC))
    c = np.array(clicks, np.float64).reshape(-1, 3)
    c[:, :2] = (c[:, :2] + 0.5) * factor - 0.5
    return big, np.repeat(np.repeat(gt, factor, 0), factor, 1), c


@dataclass
class EvalResult:
    name: str
    n_images: int
    classes: list[str]
    miou_curve: list[float]
    add: int | None
    avg: float | None
    initial_clicks: int
    classes_present: int
    per_image_noc: list[int]
    never_reached: int
    iou_k0: list[float]
    iou_add: list[float] | None
    edge_miou_k0: float
    edge_f1_k0: float
    edge_miou_add: float | None
    edge_f1_add: float | None
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        noc = np.array(self.per_image_noc)
        return {"name": self.name, "images": self.n_images, "miou_k0": round(self.miou_curve[0], 4),
                "add": self.add, "avg": None if self.avg is None else round(self.avg, 3),
                "initial_clicks": self.initial_clicks, "classes_present": self.classes_present,
                "noc_mean": round(float(noc.mean()), 3), "never_reached": self.never_reached,
                "edge_miou_k0": round(self.edge_miou_k0, 4), "edge_f1_k0": round(self.edge_f1_k0, 4),
                "miou_curve": [round(v, 4) for v in self.miou_curve], "seconds": round(self.seconds, 1)}


def evaluate(predictor, samples, class_names: list[str], cfg: EvalConfig, progress: bool = True) -> EvalResult:
    """Run the protocol over ``samples`` (an iterable of (image, gt) with gt in class indices)."""
    n, K = len(class_names), cfg.max_corrections
    conf = np.zeros((K + 1, n, n), np.int64)
    edge_conf = np.zeros((K + 1, n, n), np.int64)
    bf = np.zeros((K + 1, 4), np.int64)
    init_total, present_total, nocs, n_img = 0, 0, [], 0
    t0 = time.time()
    it = tqdm(samples, desc=f"eval {predictor.name}", disable=not progress, dynamic_ncols=True)
    for idx, (image, gt) in enumerate(it):
        gt = gt.astype(np.int64)
        rng = np.random.default_rng((cfg.seed, idx))
        if cfg.rgb_only:
            clicks = []
        else:
            # no click on ignored pixels (255: e.g. the torso skin LIP-20 has no class for)
            clicks = cs.central_clicks(np.where(gt < n, gt, 0), rng, 0, max(1, cfg.min_area), cfg.n_candidates)
            if cfg.background_click:
                bg = cs.background_click(gt, rng)
                if bg:
                    clicks.append(bg)
        if cfg.upscale > 1:
            image, gt, clicks = upscaled(image, gt, clicks, cfg.upscale)
            clicks = [tuple(c) for c in clicks]
        init_total += len(clicks)
        present_total += len(np.unique(gt[gt < n]))
        gt_edges = edges(gt)
        gt_dist = ndimage.distance_transform_edt(~gt_edges)
        band = gt_dist <= cfg.edge_width
        arr = np.array(clicks, np.float64).reshape(-1, 3)
        pred = predictor(image, arr)
        noc = K + 1
        for k in range(K + 1):
            if k > 0:
                c = cs.correction_click(gt, pred)
                if c is not None:
                    arr = np.vstack([arr, np.array([c], np.float64)])
                    pred = predictor(image, arr, pred)
            cm = confusion(gt, pred, n)
            conf[k] += cm
            edge_conf[k] += confusion(gt, pred, n, band)
            bf[k] += boundary_f1_counts(gt, pred, cfg.edge_width, gt_edges, gt_dist)
            if noc > K and miou(cm) >= cfg.standard:
                noc = k
        nocs.append(noc)
        n_img += 1
    curve = [miou(conf[k]) for k in range(K + 1)]
    add = next((k for k, v in enumerate(curve) if v >= cfg.standard), None)
    avg = None if add is None else (init_total + add * n_img) / max(1, present_total)
    return EvalResult(
        name=predictor.name, n_images=n_img, classes=list(class_names), miou_curve=curve, add=add, avg=avg,
        initial_clicks=init_total, classes_present=present_total, per_image_noc=nocs,
        never_reached=int(sum(1 for v in nocs if v > K)),
        iou_k0=[float(v) for v in iou_per_class(conf[0])],
        iou_add=None if add is None else [float(v) for v in iou_per_class(conf[add])],
        edge_miou_k0=miou(edge_conf[0]), edge_f1_k0=f1_from_counts(bf[0]),
        edge_miou_add=None if add is None else miou(edge_conf[add]),
        edge_f1_add=None if add is None else f1_from_counts(bf[add]),
        seconds=time.time() - t0)


def evaluate_progressive(predictor, samples, class_names: list[str], max_parts: int = 8, seed: int = 0,
                         n_candidates: int = cs.N_CANDIDATES, progress: bool = True) -> dict:
    """Progressive protocol (beside the paper's): the parts present are clicked one at a time
    in a random order, one central click each (on the part's largest component). After the
    j-th click the data-set mIoU is taken over background and the parts clicked so far, with
    the pixels of parts not clicked yet counted as background, so any label on them is an
    error. Also the clicked part's own IoU after the first click (mean over images)."""
    n = len(class_names)
    conf = np.zeros((max_parts, n, n), np.int64)
    images = np.zeros(max_parts, np.int64)
    first_iou, first_by_class = [], {}
    it = tqdm(samples, desc=f"progressive {predictor.name}", disable=not progress, dynamic_ncols=True)
    for idx, (image, gt) in enumerate(it):
        gt = gt.astype(np.int64)
        rng = np.random.default_rng((seed, idx, 7))
        parts = [int(c) for c in np.unique(gt) if 0 < c < n]
        order = [parts[i] for i in rng.permutation(len(parts))][:max_parts]
        clicks, prev = [], None
        for j, cls in enumerate(order):
            comp = cs.components(gt, cls)[0]
            clicks.append((*cs.central_click(comp, rng, n_candidates), cls))
            pred = predictor(image, np.array(clicks, np.float64), prev)
            prev = pred
            clicked = set(order[:j + 1])
            gt_j = np.where(np.isin(gt, list(clicked)) | (gt >= n), gt, 0)
            conf[j] += confusion(gt_j, pred, n)
            images[j] += 1
            if j == 0:
                inter = np.logical_and(pred == cls, gt == cls).sum()
                union = np.logical_or(pred == cls, gt == cls).sum()
                first_iou.append(inter / max(1, union))
                first_by_class.setdefault(class_names[cls], []).append(first_iou[-1])
    curve = []
    for j in range(max_parts):
        if images[j] == 0:
            break
        cm = conf[j]
        present = [c for c in range(n) if cm[c].sum() + cm[:, c].sum() > 0]
        iou = iou_per_class(cm)
        curve.append(float(np.mean([iou[c] for c in present])))
    return {"name": predictor.name, "protocol": "progressive", "miou_after_part": [round(v, 4) for v in curve],
            "images_with_part": images[:len(curve)].tolist(),
            "first_click_part_iou": round(float(np.mean(first_iou)), 4) if first_iou else None,
            "first_click_part_iou_by_class": {k: [round(float(np.mean(v)), 4), len(v)]
                                              for k, v in sorted(first_by_class.items())}}


# ------------------------------------------------------------------------------------- reports
def markdown_table(results: list[EvalResult], standard: float) -> str:
    lines = [f"| model | images | mIoU@0 | mIoU@5 | mIoU@20 | Add. (to {standard:.0%}) | Avg. clicks/class "
             "| per-image NoC (mean) | never reached | edge mIoU@0 | edge F1@0 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.miou_curve
        pick = lambda k: f"{c[min(k, len(c) - 1)]:.1%}"  # noqa: E731
        lines.append(f"| {r.name} | {r.n_images} | {pick(0)} | {pick(5)} | {pick(20)} | "
                     f"{r.add if r.add is not None else '> ' + str(len(c) - 1)} | "
                     f"{'-' if r.avg is None else f'{r.avg:.2f}'} | {np.mean(r.per_image_noc):.2f} | "
                     f"{r.never_reached} | {r.edge_miou_k0:.1%} | {r.edge_f1_k0:.1%} |")
    lines += ["", "Per-class IoU at k = 0 (and at Add. where reached):", "",
              "| class | " + " | ".join(r.name for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for i, cname in enumerate(results[0].classes):
        cells = []
        for r in results:
            a = r.iou_k0[i]
            b = r.iou_add[i] if r.iou_add else None
            cells.append(("-" if np.isnan(a) else f"{a:.1%}") + ("" if b is None or np.isnan(b) else f" / {b:.1%}"))
        lines.append(f"| {cname} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[EvalResult], standard: float, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(range(len(r.miou_curve)), [100 * v for v in r.miou_curve], marker="o", ms=3, label=r.name)
    ax.axhline(100 * standard, ls="--", c="gray", lw=1)
    ax.set_xlabel("correction clicks (after central clicks)"); ax.set_ylabel("data-set mIoU (%)")
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout()
    p = os.path.join(out_dir, "miou_vs_clicks.png"); fig.savefig(p, dpi=100); plt.close(fig); paths.append(p)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(results[0].classes)), 4))
    wdt = 0.8 / len(results)
    for j, r in enumerate(results):
        ax.bar(np.arange(len(r.classes)) + j * wdt, [0 if np.isnan(v) else 100 * v for v in r.iou_k0],
               width=wdt, label=r.name)
    ax.set_xticks(np.arange(len(results[0].classes)) + 0.4 - wdt / 2)
    ax.set_xticklabels(results[0].classes, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU at k = 0 (%)"); ax.legend(fontsize=8); fig.tight_layout()
    p = os.path.join(out_dir, "per_class_iou.png"); fig.savefig(p, dpi=100); plt.close(fig); paths.append(p)
    return paths


def main(argv=None):
    tune_malloc()  # freed memory kept, as in a served worker (core.allocator)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="data set root")
    ap.add_argument("--kind", default="ccp",
                    help="lip | cihp | ppp | helen | ccp | folder | ls | ccp-parts:<lip20|cihp20|ppp|ccp12>")
    ap.add_argument("--parts", default="data/ccp_parts", help="model_training.pose_labels output (ccp-parts)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--merge", default=None, help="merge table name or path (CCP default: ccp12)")
    ap.add_argument("--checkpoint", action="append", default=[], help="checkpoint(s) to evaluate")
    ap.add_argument("--backend-url", action="append", default=[], help="running backend(s), HTTP mode")
    ap.add_argument("--baseline", action="append", default=[], choices=["random-walker", "no-clicks"],
                    help="add baselines: random-walker floor; network with empty click maps")
    ap.add_argument("--rw-max-side", type=int, default=128, help="random-walker working resolution")
    ap.add_argument("--standard", type=float, default=None, help="parsing standard (mIoU, 0-1)")
    ap.add_argument("--max-corrections", type=int, default=20)
    ap.add_argument("--min-area", type=int, default=0, help="skip components smaller than this (px)")
    ap.add_argument("--background-click", action="store_true", help="add one background click at init")
    ap.add_argument("--rgb-only", action="store_true", help="no central clicks: corrections only (Fig. 7)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    ap.add_argument("--max-side", type=int, default=None, help="serving resolution override")
    ap.add_argument("--flip", action="store_true", help="test-time flip (the backend's IHP_FLIP=1)")
    ap.add_argument("--full-res-edges", action="store_true",
                    help="labels enlarged with boundaries between network pixels (the backend's IHP_FULL_RES_EDGES=1)")
    ap.add_argument("--no-refine", action="store_true",
                    help="plain upsampled argmax, no colour-guided refinement (the backend's IHP_REFINE=0)")
    ap.add_argument("--click-radius", type=float, default=10.0,
                    help="each click claims its colour within this many network pixels "
                         "(the backend's IHP_CLICK_RADIUS; 0: off)")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="the forward's compute type (the backend's IHP_PRECISION; auto: on a CPU "
                         "with native bfloat16, whichever of the two is faster, timed at load; "
                         "else float32)")
    ap.add_argument("--protocol", default="paper", choices=["paper", "progressive"],
                    help="paper: central clicks on every part, then corrections; progressive: parts "
                         "clicked one at a time, mIoU over the parts clicked so far")
    ap.add_argument("--zero-click", action="store_true",
                    help="start from the parse with no click (the vocabulary head; needs --rgb-only "
                         "to start with no clicks), as the backend's batch prediction")
    ap.add_argument("--fill-known", action="store_true",
                    help="parts nobody clicked are filled by meaning (the backend's IHP_FILL_KNOWN=1)")
    ap.add_argument("--unclaimed-bias", type=float, default=0.0,
                    help="added to the unclaimed channel's logit (the backend's IHP_UNCLAIMED_BIAS)")
    ap.add_argument("--vocab-share", type=int, choices=(0, 1), default=int(ParserOptions.vocab_share),
                    help="1: the unclaimed channel's probability goes to the clicked label the vocabulary head "
                         "sees there (the backend's IHP_VOCAB_SHARE)")
    ap.add_argument("--vocab-prior", type=float, default=ParserOptions.vocab_prior,
                    help="weight of the vocabulary head's prior on clicked known names (the backend's "
                         "IHP_VOCAB_PRIOR; 0: clicks alone)")
    ap.add_argument("--no-zoom", action="store_true",
                    help="never parse a clicked small person again on its own region (the backend's IHP_ZOOM=0)")
    ap.add_argument("--upscale", type=int, default=1,
                    help="enlarge every photo N times (bicubic; labels nearest; the same clicks): "
                         "phone-size photos with known labels, for full-resolution boundary F1")
    ap.add_argument("--side-by-side", type=int, default=1, metavar="N",
                    help="photos of N people: N consecutive samples side by side in one image")
    ap.add_argument("--edge-refiner", default="",
                    help="a trained edge refiner (model_training.train_edges; the backend's IHP_EDGE_REFINER): "
                         "default the shipped one, as served; 0: none")
    ap.add_argument("--edge-side", type=int, default=ParserOptions.edge_side,
                    help="the edge refiner's working size, longer side (IHP_EDGE_SIDE)")
    ap.add_argument("--aspp-rank", type=int, default=ParserOptions.aspp_rank,
                    help="the ASPP's branches read one shared projection of this rank, made at load "
                         "(the backend's IHP_ASPP_RANK; 0: the exact ASPP)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--include", action="append", default=[],
                    help="summary.json of an earlier run whose results join the table and plots")
    ap.add_argument("--out", default="runs/eval")
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = open_dataset(a.kind, a.data, a.split, a.merge, parts=a.parts)
    standard = a.standard if a.standard is not None else STANDARDS.get(a.kind.lower(), 0.85)
    cfg = EvalConfig(standard=standard, max_corrections=a.max_corrections, min_area=a.min_area,
                     background_click=a.background_click, rgb_only=a.rgb_only, seed=a.seed,
                     upscale=a.upscale)
    n = len(ds) if a.limit is None else min(a.limit, len(ds))
    predictors = []
    from ihp_backend.core.inference import Parser
    for ck in a.checkpoint:
        opts = ParserOptions(max_side=a.max_side, flip=a.flip, refine=not a.no_refine,
                             full_res_edges=a.full_res_edges, click_radius=a.click_radius, precision=a.precision, threads=a.threads,
                             unclaimed_bias=a.unclaimed_bias, zoom=not a.no_zoom, vocab_prior=a.vocab_prior,
                             vocab_share=bool(a.vocab_share), edge_refiner=edge_refiner_path(a.edge_refiner),
                             edge_side=a.edge_side, aspp_rank=a.aspp_rank)
        parser = Parser.from_file(ck, **opts.parser_kwargs())
        predictors.append(CorePredictor(parser, ds.classes, name=f"{parser.model_version}",
                                        zero_click=a.zero_click, fill_known=a.fill_known))
        if "no-clicks" in a.baseline:
            predictors.append(CorePredictor(parser, ds.classes, ignore_clicks=True))
    for url in a.backend_url:
        predictors.append(HTTPPredictor(url, ds.classes))
    if "random-walker" in a.baseline:
        predictors.append(RandomWalkerPredictor(max_side=a.rw_max_side))
    if not predictors and not a.include:
        ap.error("give at least one --checkpoint, --backend-url, --baseline or --include")
    os.makedirs(a.out, exist_ok=True)
    if a.protocol == "progressive":
        out = [evaluate_progressive(p, (ds.load(i) for i in range(n)), ds.classes, seed=a.seed) for p in predictors]
        with open(os.path.join(a.out, "progressive.json"), "w") as f:
            json.dump({"data": f"{a.kind}:{a.split}", "merge": a.merge, "results": out}, f, indent=1)
        print(json.dumps(out))
        return
    results = []
    for p in predictors:
        samples = (ds.load(i) for i in range(n))
        if a.side_by_side > 1:
            samples = side_by_side(samples, a.side_by_side)
        results.append(evaluate(p, samples, ds.classes, cfg))
    for path in a.include:
        with open(path) as f:
            results += [EvalResult(**r) for r in json.load(f)["full"]]
    summary = {"data": f"{a.kind}:{a.split}", "merge": a.merge, "standard": standard,
               "max_corrections": a.max_corrections, "min_area": a.min_area, "rgb_only": a.rgb_only,
               "results": [r.summary() for r in results]}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({**summary, "full": [r.__dict__ for r in results]}, f, indent=1, default=float)
    table = markdown_table(results, standard)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table)
    plot(results, standard, a.out)
    print(table, file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
