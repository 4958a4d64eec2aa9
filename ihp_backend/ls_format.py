"""Label Studio formats: label config, KeyPointLabels clicks, BrushLabels RLE. No HTTP here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from xml.etree.ElementTree import ParseError

import numpy as np
from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException
from label_studio_sdk.converter import brush
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


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Binary (H, W) mask -> Label Studio brush RLE over the flattened RGBA image."""
    return brush.mask2rle((mask > 0).astype(np.uint8) * 255)


def rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> boolean (H, W) mask (alpha channel > 0)."""
    flat = np.asarray(brush.decode_rle(rle))
    if flat.size != height * width * 4:
        raise ValueError(f"RLE decodes to {flat.size} values, expected {height}x{width}x4")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def brush_results(labels: np.ndarray, slot_to_label: dict[int, str], setup: LabelSetup,
                  confidence: np.ndarray | None = None) -> list[dict]:
    """One BrushLabels result per predicted slot that the BrushLabels control has."""
    h, w = labels.shape
    allowed = set(setup.brush_labels)
    out = []
    present = np.unique(labels)
    for slot in present.tolist():
        name = slot_to_label.get(int(slot))
        if name is None or name not in allowed:
            continue
        res = {
            "from_name": setup.brush_from,
            "to_name": setup.to_name,
            "type": "brushlabels",
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {"format": "rle", "rle": mask_to_rle(labels == slot), "brushlabels": [name]},
        }
        if confidence is not None:
            res["score"] = float(confidence[int(slot)])
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
