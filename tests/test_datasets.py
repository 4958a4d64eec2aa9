"""Each loader reads a fixture written in its documented on-disk layout."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ihp_backend.core.ls_format import mask_to_rle
from model_training import datasets as D
from model_training.ls_export import export_dataset, export_samples, export_to_lip_layout
from tests.conftest import CCP, person_image


def write_pair(img_path, lab_path, img, lab):
    os.makedirs(os.path.dirname(img_path), exist_ok=True)
    os.makedirs(os.path.dirname(lab_path), exist_ok=True)
    Image.fromarray(img).save(img_path, quality=98)
    Image.fromarray(lab).save(lab_path)


def fixture(maxlabel, seed):
    img, lab = person_image(seed=seed)
    return img, (lab * (maxlabel // 3)).astype(np.uint8)


def check(ds, n, maxlabel):
    assert len(ds) == n
    img, lab = ds.load(0)
    assert img.shape == (240, 320, 3) and img.dtype == np.uint8
    assert lab.shape == (240, 320) and lab.max() <= maxlabel and lab.max() > 0


def test_lip_layout(tmp_path):
    r = str(tmp_path)
    for split in ("train", "val"):
        ids = [f"{split}{i}" for i in range(2)]
        for i in ids:
            write_pair(f"{r}/TrainVal_images/{split}_images/{i}.jpg",
                       f"{r}/TrainVal_parsing_annotations/{split}_segmentations/{i}.png", *fixture(19, 0))
        open(f"{r}/{split}_id.txt", "w").write("\n".join(ids))
    check(D.lip(r, "train"), 2, 19)
    check(D.open_dataset("lip", r, "val"), 2, 19)
    assert D.lip(r).classes[14] == "Left-arm"


def test_cihp_layout(tmp_path):
    r = str(tmp_path)
    for split, sub in (("train", "Training"), ("val", "Validation")):
        for i in ("0001", "0002", "0003"):
            img, lab = fixture(19, 1)
            write_pair(f"{r}/{sub}/Images/{i}.jpg", f"{r}/{sub}/Category_ids/{i}.png", img, lab)
            os.makedirs(f"{r}/{sub}/Instance_ids", exist_ok=True)
            Image.fromarray((lab > 0).astype(np.uint8)).save(f"{r}/{sub}/Instance_ids/{i}.png")
        open(f"{r}/{sub}/{split}_id.txt", "w").write("0001\n0002\n0003\n")
    check(D.cihp(r, "train"), 3, 19)
    check(D.cihp(r, "val"), 3, 19)


def test_pascal_person_part_layout(tmp_path):
    r = str(tmp_path)
    for i in ("2008_000001", "2008_000002"):
        write_pair(f"{r}/JPEGImages/{i}.jpg", f"{r}/SegmentationPart/{i}.png", *fixture(6, 2))
    open(f"{r}/train_id.txt", "w").write("2008_000001\n2008_000002\n")
    ds = D.pascal_person_part(r, "train")
    check(ds, 2, 6)
    assert len(ds.classes) == 7


def test_helen_layout_and_flip_pairs(tmp_path):
    r = str(tmp_path)
    write_pair(f"{r}/images/a.jpg", f"{r}/labels/a.png", *fixture(10, 3))
    open(f"{r}/train.txt", "w").write("a\n")
    ds = D.helen(r, "train")
    check(ds, 1, 10)
    lut = ds.flip_lut()
    assert lut[2] == 3 and lut[4] == 5 and lut[6] == 6


def test_missing_file_is_a_clear_error(tmp_path):
    open(tmp_path / "train.txt", "w").write("x\n")
    with pytest.raises(FileNotFoundError, match="sample 'x'"):
        D.helen(str(tmp_path), "train")


@pytest.mark.skipif(not os.path.isdir(CCP), reason="../shared/data/ccp not present")
def test_ccp_real_data_with_merge():
    ds = D.ccp(CCP, "val", "ccp12")
    assert len(ds) == 201 and ds.classes[0] == "background" and len(ds.classes) == 12
    img, lab = ds.load(0)
    assert img.shape[:2] == lab.shape and lab.max() < 12
    full = D.ccp(CCP, "val", None)
    assert len(full.classes) == 59


def test_ls_export_round_trips_to_the_same_label_map(tmp_path):
    cfg = ('<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
           '<Label value="Background"/><Label value="Head"/><Label value="Torso"/><Label value="Legs"/>'
           '</KeyPointLabels><BrushLabels name="mask" toName="image"><Label value="Background"/>'
           '<Label value="Head"/><Label value="Torso"/><Label value="Legs"/></BrushLabels></View>')
    img, lab = person_image()
    os.makedirs(tmp_path / "media" / "upload" / "1")
    Image.fromarray(img).save(tmp_path / "media" / "upload" / "1" / "p.png")
    names = ["Background", "Head", "Torso", "Legs"]
    result = [{"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": 320,
               "original_height": 240, "value": {"format": "rle", "rle": mask_to_rle(lab == k),
                                                 "brushlabels": [names[k]]}} for k in (1, 2, 3)]
    export = [{"id": 7, "data": {"image": "/data/upload/1/p.png"},
               "annotations": [{"id": 1, "result": result, "was_cancelled": False}]},
              {"id": 8, "data": {"image": "/data/upload/1/p.png"},
               "annotations": [{"id": 2, "result": result, "was_cancelled": True}]}]
    (tid, im, got), = list(export_samples(export, cfg, str(tmp_path / "media")))
    assert tid == "7" and np.array_equal(got, lab) and np.array_equal(im, img)
    counts = export_to_lip_layout(export, cfg, str(tmp_path / "out"), str(tmp_path / "media"))
    assert counts == {"train": 1, "val": 0}
    ds = export_dataset(str(tmp_path / "out"), "train")
    assert ds.classes == names
    _, lab2 = ds.load(0)
    assert np.array_equal(lab2, lab)
    ds2 = D.open_dataset("ls", str(tmp_path / "out"), "train")
    assert len(ds2) == 1
