"""The in-memory data set type and the label sets it is used with (no data set layout here:
``datasets`` reads layouts; ``ls_export`` and ``pose_labels`` build on this module only)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

LIP_CLASSES = ["Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat",
               "Socks", "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm",
               "Left-leg", "Right-leg", "Left-shoe", "Right-shoe"]
LIP_FLIP = [("Left-arm", "Right-arm"), ("Left-leg", "Right-leg"), ("Left-shoe", "Right-shoe")]
PPP_CLASSES = ["background", "head", "torso", "upper-arms", "lower-arms", "upper-legs", "lower-legs"]
HELEN_CLASSES = ["background", "face skin", "l-brow", "r-brow", "l-eye", "r-eye", "nose",
                 "upper lip", "inner mouth", "lower lip", "hair"]
HELEN_FLIP = [("l-brow", "r-brow"), ("l-eye", "r-eye")]
MERGE_DIR = os.path.join(os.path.dirname(__file__), "merges")


@dataclass
class ParsingDataset:
    """A list of (image path, label path) with class names and left/right pairs."""

    name: str
    items: list[tuple[str, str, str]]  # (id, image path, label path)
    classes: list[str]
    flip_pairs: list[tuple[str, str]] = field(default_factory=list)
    lut: np.ndarray | None = None  # optional source-label -> class lookup (merge table)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        _, ip, lp = self.items[i]
        image = np.asarray(Image.open(ip).convert("RGB"))
        labels = np.asarray(Image.open(lp))
        if labels.ndim == 3:
            labels = labels[..., 0]
        if self.lut is not None:
            labels = self.lut[labels]
        return image, labels.astype(np.uint8)

    def flip_lut(self) -> np.ndarray:
        """Label lookup that swaps left/right classes (for horizontal flips)."""
        lut = np.arange(256, dtype=np.uint8)
        idx = {n: i for i, n in enumerate(self.classes)}
        for a, b in self.flip_pairs:
            if a in idx and b in idx:
                lut[idx[a]], lut[idx[b]] = idx[b], idx[a]
        return lut


def _read_ids(*candidates: str) -> list[str]:
    for p in candidates:
        if os.path.exists(p):
            with open(p) as f:
                return [ln.strip().split()[0] for ln in f if ln.strip()]
    raise FileNotFoundError(f"none of the list files exist: {candidates}")


def _items(ids, img_dir, lab_dir, img_ext=".jpg", lab_ext=".png"):
    out = []
    for i in ids:
        ip, lp = os.path.join(img_dir, i + img_ext), os.path.join(lab_dir, i + lab_ext)
        if not os.path.exists(ip) or not os.path.exists(lp):
            raise FileNotFoundError(f"sample {i!r}: missing {ip if not os.path.exists(ip) else lp}")
        out.append((i, ip, lp))
    return out


def load_merge(path_or_name: str) -> dict:
    """A merge table: {"classes": [target names], "map": {source name: target name}}."""
    p = path_or_name if os.path.exists(path_or_name) else os.path.join(MERGE_DIR, path_or_name + ".json")
    with open(p) as f:
        return json.load(f)


def merge_lut(source_classes: list[str], merge: dict) -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    tgt = {n: i for i, n in enumerate(merge["classes"])}
    for i, n in enumerate(source_classes):
        if n not in merge["map"]:
            raise KeyError(f"merge table has no entry for source class {n!r}")
        lut[i] = tgt[merge["map"][n]]
    return lut
