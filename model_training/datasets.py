"""Human-parsing data sets on disk -> in-memory samples (image uint8 HxWx3, labels uint8 HxW).

Layouts (paths relative to ``--data``):

LIP     TrainVal_images/{train,val}_images/<id>.jpg
        TrainVal_parsing_annotations/{train,val}_segmentations/<id>.png   (0-19)
        train_id.txt / val_id.txt
CIHP    {Training,Validation}/Images/<id>.jpg, .../Category_ids/<id>.png (0-19, LIP classes),
        .../Instance_ids/<id>.png, .../{train,val}_id.txt
PPP     PASCAL-Person-Part: JPEGImages/<id>.jpg, SegmentationPart/<id>.png (0-6),
        {train,val}_id.txt (or train.txt / val.txt)
Helen   images/<id>.jpg, labels/<id>.png (0-10), train.txt / val.txt (11-class release)
CCP     images/<id>.jpg, labels/<id>.png (0-58), classes.txt, train.txt, val.txt
        (+ a merge table JSON: model_training/merges/ccp12.json, ccp17.json)
LSX     a Label Studio JSON export (BrushLabels RLE) + the images it points at
"""
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


def lip(root: str, split: str = "train") -> ParsingDataset:
    ids = _read_ids(os.path.join(root, f"{split}_id.txt"))
    return ParsingDataset("lip", _items(ids, os.path.join(root, "TrainVal_images", f"{split}_images"),
                                        os.path.join(root, "TrainVal_parsing_annotations",
                                                     f"{split}_segmentations")),
                          LIP_CLASSES, LIP_FLIP)


def cihp(root: str, split: str = "train") -> ParsingDataset:
    sub = os.path.join(root, "Training" if split == "train" else "Validation")
    ids = _read_ids(os.path.join(sub, f"{split}_id.txt"), os.path.join(root, f"{split}_id.txt"))
    return ParsingDataset("cihp", _items(ids, os.path.join(sub, "Images"), os.path.join(sub, "Category_ids")),
                          LIP_CLASSES, LIP_FLIP)


def pascal_person_part(root: str, split: str = "train") -> ParsingDataset:
    ids = _read_ids(os.path.join(root, f"{split}_id.txt"), os.path.join(root, f"{split}.txt"))
    return ParsingDataset("ppp", _items(ids, os.path.join(root, "JPEGImages"),
                                        os.path.join(root, "SegmentationPart")), PPP_CLASSES, [])


def helen(root: str, split: str = "train") -> ParsingDataset:
    ids = _read_ids(os.path.join(root, f"{split}.txt"), os.path.join(root, f"{split}_id.txt"))
    return ParsingDataset("helen", _items(ids, os.path.join(root, "images"), os.path.join(root, "labels")),
                          HELEN_CLASSES, HELEN_FLIP)


def ccp(root: str, split: str = "train", merge: str | None = "ccp12") -> ParsingDataset:
    ids = _read_ids(os.path.join(root, f"{split}.txt"))
    with open(os.path.join(root, "classes.txt")) as f:
        source = [ln.strip() for ln in f if ln.strip()]
    ds = ParsingDataset("ccp", _items(ids, os.path.join(root, "images"), os.path.join(root, "labels")), source)
    if merge:
        table = load_merge(merge)
        ds.lut, ds.classes = merge_lut(source, table), list(table["classes"])
    return ds


LOADERS = {"lip": lip, "cihp": cihp, "ppp": pascal_person_part, "pascal-person-part": pascal_person_part,
           "helen": helen, "ccp": ccp}


def folder(root: str, split: str | None = None) -> ParsingDataset:
    """A small folder data set: ``images/<id>.jpg``, ``labels/<id>.png``, ``classes.txt`` (line k
    names class k); every photo, or the ids of ``<split>.txt`` when it exists (the layout of
    ``../shared/data/crossdomain/*``)."""
    with open(os.path.join(root, "classes.txt")) as f:
        classes = [ln.strip() for ln in f if ln.strip()]
    lst = os.path.join(root, f"{split}.txt") if split else ""
    ids = _read_ids(lst) if lst and os.path.exists(lst) else sorted(
        os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, "images")) if n.endswith(".jpg"))
    flips = LIP_FLIP if all(n in classes for n in ("Left-arm", "Right-arm")) else []
    return ParsingDataset(os.path.basename(os.path.normpath(root)),
                          _items(ids, os.path.join(root, "images"), os.path.join(root, "labels")), classes, flips)


def open_dataset(kind: str, root: str, split: str, merge: str | None = None,
                 parts: str = "data/ccp_parts") -> ParsingDataset:
    """``kind``: lip | cihp | ppp | helen | ccp | folder | ls, or ``ccp-parts:<space>`` for a
    label space derived from pose (``model_training.pose_labels``; ``parts`` is its output)."""
    kind = kind.lower()
    if kind.startswith("ccp-parts:"):
        from .pose_labels import ccp_parts
        return ccp_parts(root, parts, split, kind.split(":", 1)[1])
    if kind == "folder":
        return folder(root, split)
    if kind in ("ls", "lsx", "label-studio"):
        from .ls_export import export_dataset
        return export_dataset(root, split=split)
    if kind not in LOADERS:
        raise ValueError(f"unknown data set kind {kind!r}; choose one of {sorted(LOADERS)} or 'ls'")
    if kind == "ccp":
        return ccp(root, split, merge if merge is not None else "ccp12")
    ds = LOADERS[kind](root, split)
    if merge:
        table = load_merge(merge)
        ds.lut, ds.classes = merge_lut(ds.classes, table), list(table["classes"])
    return ds
