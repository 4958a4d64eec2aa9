"""Label Studio JSON export (BrushLabels RLE) -> samples, and -> a LIP-layout PNG data set.

    python -m model_training.ls_export --export export.json --images <LS media dir> \
        --label-config label_config.xml --out data/my_project [--val-fraction 0.1]

writes ``TrainVal_images/{train,val}_images/<id>.jpg``,
``TrainVal_parsing_annotations/{train,val}_segmentations/<id>.png`` (one PNG per image, all
classes, pixel = class index in the BrushLabels control's order), ``{train,val}_id.txt`` and
``classes.txt``; ``open_dataset("ls", out_dir, split)`` reads it back.
"""
from __future__ import annotations

import argparse
import json
import os
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image

from ihp_backend.core.ls_format import annotation_to_label_map, parse_label_config

from .parsing_dataset import ParsingDataset, _items, _read_ids


def resolve_image(url: str, images_dir: str | None) -> str:
    """Find the file behind a task's image URL on local disk."""
    p = urlparse(url)
    cands = []
    if p.path.startswith("/data/local-files") and "d" in parse_qs(p.query):
        d = unquote(parse_qs(p.query)["d"][0])
        cands += [d] + ([os.path.join(images_dir, d.lstrip("/"))] if images_dir else [])
    elif not p.scheme:
        cands.append(url)
    if images_dir:
        rel = p.path.split("/data/", 1)[-1] if "/data/" in p.path else p.path.lstrip("/")
        cands += [os.path.join(images_dir, rel), os.path.join(images_dir, os.path.basename(p.path))]
    for c in cands:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"cannot find the image for {url!r} (looked at {cands})")


def export_samples(export: list[dict], label_config: str, images_dir: str | None = None):
    """Yield (task id, image uint8 HxWx3, labels uint8 HxW) per task with a usable annotation.

    The newest non-cancelled annotation of a task is used; class index = position of the
    label in the BrushLabels control (so ``Background`` first gives background = 0).
    """
    setup = parse_label_config(label_config)
    index = {n: i for i, n in enumerate(setup.brush_labels)}
    for task in export:
        anns = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not anns:
            continue
        ann = max(anns, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
        labels = annotation_to_label_map(ann.get("result", []), setup, index)
        if labels is None:
            continue
        path = resolve_image(task["data"][setup.image_key], images_dir)
        image = np.asarray(Image.open(path).convert("RGB"))
        if image.shape[:2] != labels.shape:
            raise ValueError(f"task {task.get('id')}: image is {image.shape[1]}x{image.shape[0]} but the "
                             f"annotation is {labels.shape[1]}x{labels.shape[0]}")
        yield str(task.get("id")), image, labels


def export_to_lip_layout(export: list[dict], label_config: str, out: str, images_dir: str | None = None,
                         val_fraction: float = 0.0, seed: int = 0) -> dict:
    setup = parse_label_config(label_config)
    rng = np.random.default_rng(seed)
    ids = {"train": [], "val": []}
    for tid, image, labels in export_samples(export, label_config, images_dir):
        split = "val" if rng.random() < val_fraction else "train"
        idir = os.path.join(out, "TrainVal_images", f"{split}_images")
        ldir = os.path.join(out, "TrainVal_parsing_annotations", f"{split}_segmentations")
        os.makedirs(idir, exist_ok=True)
        os.makedirs(ldir, exist_ok=True)
        Image.fromarray(image).save(os.path.join(idir, f"{tid}.jpg"), quality=95)
        Image.fromarray(labels).save(os.path.join(ldir, f"{tid}.png"))
        ids[split].append(tid)
    for split, lst in ids.items():
        with open(os.path.join(out, f"{split}_id.txt"), "w") as f:
            f.write("".join(i + "\n" for i in lst))
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("".join(n + "\n" for n in setup.brush_labels))
    return {k: len(v) for k, v in ids.items()}


def export_dataset(root: str, split: str = "train") -> ParsingDataset:
    """Read a data set written by ``export_to_lip_layout``."""
    with open(os.path.join(root, "classes.txt")) as f:
        classes = [ln.strip() for ln in f if ln.strip()]
    ids = _read_ids(os.path.join(root, f"{split}_id.txt"))
    items = _items(ids, os.path.join(root, "TrainVal_images", f"{split}_images"),
                   os.path.join(root, "TrainVal_parsing_annotations", f"{split}_segmentations"))
    from .parsing_dataset import LIP_FLIP
    return ParsingDataset("ls", items, classes, LIP_FLIP)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="Label Studio JSON export file")
    ap.add_argument("--label-config", required=True, help="the project's label config XML file")
    ap.add_argument("--images", default=None, help="directory holding the task images (LS media dir)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.0)
    a = ap.parse_args(argv)
    with open(a.export) as f:
        export = json.load(f)
    with open(a.label_config) as f:
        cfg = f.read()
    print(json.dumps(export_to_lip_layout(export, cfg, a.out, a.images, a.val_fraction)))


if __name__ == "__main__":
    main()
