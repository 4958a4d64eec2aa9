"""Label Studio formats: label config, KeyPointLabels clicks, BrushLabels RLE. No HTTP here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from xml.etree.ElementTree import ParseError

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException
from label_studio_sdk.label_interface import LabelInterface

MAX_CONFIG_BYTES = 1_000_000


class LabelConfigError(ValueError):
    """The label config cannot drive this backend."""


@dataclass(frozen=True)
class LabelSetup:
    """What the backend needs from a label config."""

    keypoint_from: str  # KeyPointLabels control name
    brush_from: str  # BrushLabels control name
    to_name: str  # the Image object both controls point at
    image_key: str  # task data key of the image ($image -> "image")
    keypoint_labels: tuple[str, ...]
    brush_labels: tuple[str, ...]
    labels: tuple[str, ...] = field(default=())  # union, in config order (binding order)


def interactive_label_config(labels) -> str:
    """The smallest label config the backend serves: a photo, a smart KeyPointLabels for the
    clicks and a BrushLabels for the masks, both over ``labels`` (evaluation, benchmarks and
    tests build their configs here; the repo's ``label_config.xml`` is the one for people)."""
    from xml.sax.saxutils import quoteattr
    labs = "".join(f"<Label value={quoteattr(str(n))}/>" for n in labels)
    return (f'<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image" smart="true">'
            f'{labs}</KeyPointLabels><BrushLabels name="mask" toName="image">{labs}</BrushLabels></View>')


def parse_label_config(xml: str) -> LabelSetup:
    """Find one KeyPointLabels and one BrushLabels control on the same Image.

    The XML is first parsed with defusedxml, so entity expansion (XML bombs) and external
    entities are refused before anything else reads it.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    if len(xml.encode("utf-8", "ignore")) > MAX_CONFIG_BYTES:
        raise LabelConfigError("label config is larger than 1 MB")
    try:
        SafeET.fromstring(xml)
    except (ParseError, DefusedXmlException) as e:
        raise LabelConfigError(f"label config is not valid XML: {e}") from None
    try:
        li = LabelInterface(xml)
    except Exception as e:  # the SDK raises several types for bad configs
        raise LabelConfigError(f"Label Studio could not parse the label config: {e}") from None
    kps = [c for c in li.controls if c.tag == "KeyPointLabels"]
    brs = [c for c in li.controls if c.tag == "BrushLabels"]
    if not kps or not brs:
        raise LabelConfigError("label config needs a KeyPointLabels and a BrushLabels control "
                               "(see label_config.xml in the repository)")
    for kp in kps:
        for br in brs:
            common = set(kp.to_name) & set(br.to_name)
            if common:
                to_name = sorted(common)[0]
                obj = li.get_object(to_name)
                if obj is None or obj.tag != "Image":
                    continue
                image_key = (obj.value or "").lstrip("$")
                kl, bl = tuple(kp.labels), tuple(br.labels)
                union = tuple(dict.fromkeys(bl + kl))
                if not bl:
                    raise LabelConfigError(f"BrushLabels {br.name!r} has no labels")
                return LabelSetup(kp.name, br.name, to_name, image_key, kl, bl, union)
    raise LabelConfigError("the KeyPointLabels and BrushLabels controls must point at the same Image")


@dataclass(frozen=True)
class Click:
    """A click in original-image pixels (x right, y down) with its label name."""

    x: float
    y: float
    label: str
    positive: bool = True


class ClickError(ValueError):
    """A keypoint result that cannot be turned into a click."""


def keypoints_to_clicks(results, setup: LabelSetup | None = None) -> tuple[list[Click], tuple[int, int] | None]:
    """KeyPointLabels results -> clicks in pixels, and the (width, height) they refer to.

    ``value.x/y`` are percentages of the original image; other result types are ignored.
    """
    clicks, size = [], None
    for r in results or []:
        if not isinstance(r, dict) or str(r.get("type", "")).lower() != "keypointlabels":
            continue
        if setup is not None and r.get("from_name") not in (None, setup.keypoint_from):
            continue
        v = r.get("value")
        if not isinstance(v, dict):
            raise ClickError("keypoint result without a 'value' object")
        labels = v.get("keypointlabels") or v.get("labels") or []
        if not labels or not isinstance(labels, list) or not isinstance(labels[0], str):
            raise ClickError("keypoint without a label (value.keypointlabels is empty)")
        try:
            x, y = float(v["x"]), float(v["y"])
            w, h = int(r["original_width"]), int(r["original_height"])
        except (KeyError, TypeError, ValueError):
            raise ClickError("keypoint needs numeric value.x, value.y, original_width and "
                             "original_height") from None
        if not (math.isfinite(x) and math.isfinite(y)) or not (0 <= x <= 100 and 0 <= y <= 100):
            raise ClickError(f"keypoint coordinates must be percentages in 0..100, got x={x}, y={y}")
        if w <= 0 or h <= 0:
            raise ClickError("original_width/original_height must be positive")
        size = (w, h)
        px = min(w - 1.0, x / 100.0 * w)
        py = min(h - 1.0, y / 100.0 * h)
        clicks.append(Click(px, py, labels[0], bool(r.get("is_positive", True))))
    return clicks, size


# Label Studio's brush RLE (the frontend's "rle-pack" layout, as the SDK's converter writes it):
# a 32-bit value count, 5 bits word size - 1, four 4-bit run-length field sizes - 1, then records.
# A record is 1 flag bit (1 = run, 0 = literal block), a 2-bit index into the field sizes, the
# length - 1 in that many bits, then one word (run) or length words (literal block).
_RLE_WORD = 8
_RLE_SIZES = (3, 4, 8, 16)
_RLE_MAX_RUN = 1 << _RLE_SIZES[-1]


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate the low ``widths[i]`` bits of each ``values[i]`` (most significant first).
    Unpacked from 32-bit words when every width fits (the brush records are at most 27 bits:
    half the bytes of 64-bit words, 2.6x faster), else from 64-bit ones."""
    if len(values) == 0:
        return np.zeros(0, np.uint8)
    n = 32 if int(np.max(widths)) <= 32 else 64
    per = np.unpackbits(values.astype(f">u{n // 8}").view(np.uint8).reshape(-1, n // 8), axis=1)  # (N, n)
    keep = np.arange(n)[None, :] >= (n - widths)[:, None]
    return per[keep]


def _runs_to_rle(starts: np.ndarray, n_px: int, on: np.ndarray) -> list[int]:
    """Brush RLE of a binary mask given as runs: pixel ``starts`` (first is 0) of runs whose
    value is ``on`` (bool), over ``n_px`` pixels."""
    n = n_px * 4
    runs = np.diff(np.concatenate((starts, [n_px]))) * 4  # every pixel is 4 equal bytes
    vals = np.where(on, 255, 0)
    # runs longer than the widest field are split into full chunks followed by the remainder
    full = (runs - 1) // _RLE_MAX_RUN
    reps = full + 1
    rec_val = np.repeat(vals, reps)
    rec_len = np.full(int(reps.sum()), _RLE_MAX_RUN, np.int64)
    last = np.cumsum(reps) - 1
    rec_len[last] = runs - full * _RLE_MAX_RUN
    size_idx = np.searchsorted(np.asarray([1 << s for s in _RLE_SIZES]), rec_len)  # first that fits
    field = np.asarray(_RLE_SIZES)[size_idx]
    rec = (((1 << 2 | size_idx) << field | (rec_len - 1)) << _RLE_WORD) | rec_val
    head = ((n << 5 | (_RLE_WORD - 1)) << 16) | sum((s - 1) << (4 * (3 - i)) for i, s in enumerate(_RLE_SIZES))
    bits = np.concatenate((_bits(np.asarray([head]), np.asarray([53])),
                           _bits(rec, 3 + field + _RLE_WORD)))
    bits = np.concatenate((bits, np.zeros(8 - len(bits) % 8, np.uint8)))  # the SDK pads 1..8 bits
    return np.packbits(bits).tolist()


def _runs(flat: np.ndarray) -> np.ndarray:
    """Start index of every run of equal values in a 1-D array (first is 0)."""
    return np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Binary (H, W) mask -> Label Studio brush RLE over the flattened RGBA image (every channel
    0 or 255), vectorised; byte-identical to ``label_studio_sdk.converter.brush.mask2rle``."""
    flat = np.asarray(mask).ravel() > 0
    if flat.size == 0:
        return _runs_to_rle(np.zeros(0, np.int64), 0, np.zeros(0, bool))
    starts = _runs(flat)
    return _runs_to_rle(starts, flat.size, flat[starts])


def label_map_to_rles(labels: np.ndarray, values=None, keep=None) -> dict[int, list[int]]:
    """``{v: mask_to_rle(labels == v)}`` for every ``v`` in ``values`` (default: the values
    present, those for which ``keep(v)`` is true if given), from one pass over the pixels:
    each class's runs are merged from the label map's runs (far fewer than pixels)."""
    flat = np.asarray(labels).ravel()
    starts = _runs(flat)
    run_vals = flat[starts]
    if values is None:
        values = [int(v) for v in np.unique(run_vals) if keep is None or keep(int(v))]
    out = {}
    for v in values:
        on = run_vals == v
        edges = _runs(on)  # runs of the binary sequence = changes of `on` across label-map runs
        out[v] = _runs_to_rle(starts[edges], flat.size, on[edges])
    return out


class _BitReader:
    def __init__(self, data):
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.pos = 0

    def read(self, k: int) -> int:
        if self.pos + k > len(self.bits):
            raise ValueError("RLE ends in the middle of a record")
        chunk = self.bits[self.pos:self.pos + k]
        self.pos += k
        return int(chunk.dot(1 << np.arange(k - 1, -1, -1, dtype=np.int64)))


def rle_values(rle, expected: int | None = None) -> np.ndarray:
    """Decode a Label Studio brush RLE to its flat uint8 values (any valid encoder's output).

    ``expected`` (the image's H*W*4) is checked against the header before anything is allocated.
    """
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a number beyond int64 (9.3e18)
        raise ValueError("RLE must be a list of byte values") from None
    if data.ndim != 1 or data.size < 7 or data.min() < 0 or data.max() > 255:
        raise ValueError("RLE must be a list of at least 7 byte values 0..255")
    r = _BitReader(data.astype(np.uint8))
    num, word = r.read(32), r.read(5) + 1
    if expected is not None and num != expected:
        raise ValueError(f"RLE holds {num} values, expected {expected}")
    sizes = [r.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        run = r.read(1)
        j = min(num, i + 1 + r.read(sizes[r.read(2)]))
        if run:
            out[i:j] = r.read(word)
        else:
            for k in range(i, j):
                out[k] = r.read(word)
        i = j
    return out


def rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> boolean (H, W) mask (alpha channel > 0)."""
    flat = rle_values(rle, expected=height * width * 4)
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def region_id(label: str) -> str:
    """The id of a label's region in every answer: stable, so that accepting a new suggestion in
    Label Studio replaces the accepted region of that label (its frontend keeps the id of an
    area that exists) instead of stacking a second one."""
    key = "".join(ch if ch.isalnum() else "_" for ch in label.lower())
    return f"ihp_{key}"[:64]


def brush_results(labels: np.ndarray, slot_to_label: dict[int, str], setup: LabelSetup,
                  confidence: np.ndarray | None = None, emptied=()) -> list[dict]:
    """One BrushLabels result per predicted slot that the BrushLabels control has, each with
    ``region_id``; ``emptied`` labels (answered before on this task, absent now) come as empty
    regions, so an accepted region of theirs is replaced by nothing."""
    h, w = labels.shape
    allowed = set(setup.brush_labels)
    out = []
    rles = label_map_to_rles(labels, keep=lambda s: slot_to_label.get(s) in allowed) if labels.size else {}
    answered = {slot_to_label[int(s)] for s in rles}
    empty = [lab for lab in dict.fromkeys(emptied) if lab in allowed and lab not in answered]
    if empty:
        blank = mask_to_rle(np.zeros((h, w), bool))
        slot_to_label = {**slot_to_label, **{-1 - i: lab for i, lab in enumerate(empty)}}
        rles = {**rles, **{-1 - i: blank for i in range(len(empty))}}
    for slot in rles:
        name = slot_to_label[int(slot)]
        res = {
            "id": region_id(name),
            "from_name": setup.brush_from,
            "to_name": setup.to_name,
            "type": "brushlabels",
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": rles[slot], "brushlabels": [name]},
        }
        if confidence is not None:
            res["score"] = float(confidence[int(slot)]) if slot >= 0 else 0.0
        out.append(res)
    return out


def validate_results(results: list[dict], setup: LabelSetup) -> None:
    """Refuse anything that is not a BrushLabels result with a label of the config."""
    allowed = set(setup.brush_labels)
    for r in results:
        if r.get("type") != "brushlabels" or r.get("from_name") != setup.brush_from:
            raise AssertionError(f"unexpected result type {r.get('type')!r}")
        names = r["value"]["brushlabels"]
        if len(names) != 1 or names[0] not in allowed:
            raise AssertionError(f"label {names} is not in the BrushLabels control")


def annotation_to_label_map(results, setup: LabelSetup, class_index: dict[str, int],
                            background: int = 0) -> np.ndarray | None:
    """Decode an annotation's BrushLabels regions into one (H, W) class map.

    Later regions win where regions overlap; pixels no region covers are ``background``.
    Returns None when the annotation has no brush region.
    """
    out = None
    for r in results or []:
        if not isinstance(r, dict) or str(r.get("type", "")).lower() != "brushlabels":
            continue
        v = r.get("value")
        if not isinstance(v, dict):
            raise ValueError("brush result without a 'value' object")
        names = v.get("brushlabels") or []
        if v.get("format") != "rle" or not isinstance(names, list) or not names or \
                not isinstance(names[0], str) or names[0] not in class_index:
            continue
        h, w = int(r["original_height"]), int(r["original_width"])
        if out is None:
            out = np.full((h, w), background, np.uint8)
        elif out.shape != (h, w):
            raise ValueError("brush regions of one annotation disagree on the image size")
        out[rle_to_mask(v["rle"], h, w)] = class_index[names[0]]
    return out


def resolve_brush_regions(results, setup: LabelSetup) -> tuple[list[dict], dict]:
    """One clean parse from an annotation's BrushLabels regions: where regions overlap the later
    one wins (the annotation's order, ``annotation_to_label_map``'s rule), and every label keeps
    at most one region. Returns (the brush results, one per label present, in the BrushLabels
    control's order; {"regions_in", "regions", "overlap_pixels"}), overlap_pixels counting the
    pixels that two or more regions of different labels claimed."""
    brush = [r for r in results or [] if isinstance(r, dict) and str(r.get("type", "")).lower() == "brushlabels"]
    index = {n: i + 1 for i, n in enumerate(setup.brush_labels)}  # 0 = no region
    labels = annotation_to_label_map(brush, setup, index, background=0)
    stats = {"regions_in": len(brush), "regions": 0, "overlap_pixels": 0}
    if labels is None:
        return [], stats
    h, w = labels.shape
    claims = np.zeros((h, w), np.uint8)  # how many different labels claimed each pixel (capped)
    for name, i in index.items():
        mask = np.zeros((h, w), bool)
        for r in brush:
            v = r.get("value") or {}
            if (v.get("brushlabels") or [None])[0] == name and v.get("format") == "rle":
                mask |= rle_to_mask(v["rle"], h, w)
        claims += mask & (claims < 255)
    stats["overlap_pixels"] = int((claims >= 2).sum())
    first = brush[0]
    out = []
    for slot, rle in label_map_to_rles(labels, keep=lambda s: s > 0).items():
        out.append({"from_name": first.get("from_name", setup.brush_from), "to_name": first.get("to_name", setup.to_name),
                    "type": "brushlabels", "original_width": int(w), "original_height": int(h),
                    "image_rotation": 0,
                    "value": {"format": "rle", "rle": rle, "brushlabels": [setup.brush_labels[int(slot) - 1]]}})
    stats["regions"] = len(out)
    return out, stats
