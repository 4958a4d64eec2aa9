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

import os

from .parsing_dataset import (HELEN_CLASSES, HELEN_FLIP, LIP_CLASSES, LIP_FLIP, MERGE_DIR,  # noqa: F401
                              PPP_CLASSES, ParsingDataset, _items, _read_ids, load_merge, merge_lut)


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
