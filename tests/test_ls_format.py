import json
import os

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ihp_backend.core.ls_format import (ClickError, LabelConfigError, annotation_to_label_map, brush_results,
                                   keypoints_to_clicks, label_map_to_rles, mask_to_rle, parse_label_config, rle_to_mask,
                                   validate_results)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIP_CONFIG = open(os.path.join(ROOT, "label_config.xml")).read()


def test_repo_label_config_has_lip_classes_with_distinct_colours():
    s = parse_label_config(LIP_CONFIG)
    assert len(s.brush_labels) == 20 and s.brush_labels[0] == "Background"
    assert "Left-arm" in s.keypoint_labels and s.image_key == "image"
    import re
    colours = re.findall(r'background="(#[0-9a-f]{6})"', LIP_CONFIG)
    assert len(set(colours)) == 20


def test_observed_setup_config(payloads):
    s = parse_label_config(payloads["/setup"]["body"]["schema"])
    assert (s.keypoint_from, s.brush_from, s.to_name) == ("kp", "mask", "image")
    assert s.labels == ("Background", "Hair", "Face", "Left-arm")


@pytest.mark.parametrize("xml", [
    "", "<View>", "<View><Image name='i' value='$i'/></View>",
    '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><View>&b;</View>',
    "<View><Image name='i' value='$i'/><KeyPointLabels name='k' toName='i'><Label value='A'/>"
    "</KeyPointLabels></View>",
])
def test_bad_label_configs_raise(xml):
    with pytest.raises(LabelConfigError):
        parse_label_config(xml)


def test_keypoint_from_real_frontend_click(payloads):
    ctx = payloads["/predict_context_from_real_LSF_frontend_click"]
    clicks, size = keypoints_to_clicks(ctx["result"])
    assert size == (320, 240)
    (c,) = clicks
    assert c.label == "Hair" and c.positive
    assert c.x == pytest.approx(26.217228464419474 * 3.2)
    assert c.y == pytest.approx(30.9404910528506 * 2.4)


def test_keypoints_ignore_other_types_and_reject_bad_values():
    assert keypoints_to_clicks([{"type": "brushlabels", "value": {}}]) == ([], None)
    base = {"type": "keypointlabels", "original_width": 10, "original_height": 10,
            "value": {"x": 5, "y": 5, "keypointlabels": ["A"]}}
    for bad in ({"x": float("nan")}, {"x": -1}, {"y": 101}, {"keypointlabels": []}):
        r = json.loads(json.dumps(base))
        r["value"].update(bad)
        with pytest.raises(ClickError):
            keypoints_to_clicks([r])
    r = dict(base)
    r.pop("original_width")
    with pytest.raises(ClickError):
        keypoints_to_clicks([r])


def test_rle_round_trip_with_sdk_decoder():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 51)) > 0.6
    rle = mask_to_rle(mask)
    flat = np.asarray(decode_rle(rle)).reshape(37, 51, 4)
    assert np.array_equal(flat[..., 3] > 0, mask)
    assert np.array_equal(rle_to_mask(rle, 37, 51), mask)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 51), (300, 400), (1024, 1024)])
@pytest.mark.parametrize("kind", ["noise", "disc", "empty", "full"])
def test_vectorised_rle_is_byte_identical_to_the_sdk(shape, kind):
    """Our encoder replaces the SDK's per-run Python loop; Label Studio must read the same bytes
    (1024x1024 full = 4M values: runs split into 65536-value chunks)."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = {"noise": rng.random(shape) > 0.5, "empty": np.zeros(shape, bool), "full": np.ones(shape, bool),
            "disc": (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2 < (shape[0] / 3) ** 2}[kind]
    if kind == "noise" and shape[0] > 400:
        mask = mask[:64]
    rle = mask_to_rle(mask)
    assert rle == mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(rle_to_mask(rle, *mask.shape), mask)


def test_rles_of_a_label_map_equal_one_mask_at_a_time():
    rng = np.random.default_rng(2)
    lab = np.repeat(np.repeat(rng.integers(0, 6, (30, 40)), 7, axis=0), 5, axis=1)
    lab[:3] = 9  # a class only in the first rows; 7 and 8 are absent
    got = label_map_to_rles(lab, [0, 3, 7, 9])
    for v in (0, 3, 7, 9):
        assert got[v] == mask_to_rle(lab == v) == mask2rle((lab == v).astype(np.uint8) * 255)


def test_rle_decoder_reads_literal_blocks_and_rejects_wrong_sizes():
    # hand-built: 4 values as one literal block (flag 0, size index 0, length-1 = 3) + padding
    bits = f"{4:032b}" + f"{7:05b}" + "0010" + "0011" + "0111" + "1111" + "0" + "00" + "011"
    bits += "".join(f"{v:08b}" for v in (0, 0, 0, 255))
    bits += "0" * (8 - len(bits) % 8)
    rle = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert rle_to_mask(rle, 1, 1).tolist() == [[True]]
    with pytest.raises(ValueError):
        rle_to_mask(rle, 2, 2)  # header says 4 values: refused before allocating anything
    with pytest.raises(ValueError):
        rle_to_mask(rle[:8], 1, 1)  # truncated
    with pytest.raises(ValueError):
        rle_to_mask([1, 2, "x"], 1, 1)
    with pytest.raises(ValueError):  # beyond int64 (found by the fuzz test): refused, not a 500
        rle_to_mask(rle[:3] + [9.223372036854776e+18] + rle[4:], 1, 1)


def test_brush_results_one_region_per_class_and_validated(payloads):
    s = parse_label_config(payloads["/setup"]["body"]["schema"])
    lab = np.zeros((20, 30), np.int64)
    lab[2:8, 3:9] = 5
    lab[10:15, 10:20] = 7
    res = brush_results(lab, {0: "Background", 5: "Hair", 7: "Face"}, s)
    assert sorted(r["value"]["brushlabels"][0] for r in res) == ["Background", "Face", "Hair"]
    validate_results(res, s)
    for r in res:
        m = rle_to_mask(r["value"]["rle"], 20, 30)
        assert r["from_name"] == "mask" and r["to_name"] == "image" and r["value"]["format"] == "rle"
        assert (r["original_width"], r["original_height"]) == (30, 20)
        name = r["value"]["brushlabels"][0]
        want = {"Background": 0, "Hair": 5, "Face": 7}[name]
        assert np.array_equal(m, lab == want)
    bad = [dict(res[0], value=dict(res[0]["value"], brushlabels=["Nope"]))]
    with pytest.raises(AssertionError):
        validate_results(bad, s)


def test_annotation_from_observed_webhook_decodes(payloads):
    body = payloads["/webhook_ANNOTATION_CREATED"]["body"]
    s = parse_label_config(body["project"]["label_config"])
    m = annotation_to_label_map(body["annotation"]["result"], s, {n: i for i, n in enumerate(s.brush_labels)})
    assert m.shape == (240, 320)
    assert set(np.unique(m).tolist()) <= {0, 3} and (m == 3).any()
