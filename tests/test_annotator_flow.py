"""The annotator's flow over HTTP (issue 27): undo is exact, only clicked labels win, no
Background region, overlapping annotations are resolved before they are stored, and a config
with known names gets a zero-click parse while an unknown one gets no prediction at all."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from ihp_backend._wsgi import create_app
from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD
from ihp_backend.core.ls_format import mask_to_rle, parse_label_config, region_id, resolve_brush_regions, rle_to_mask
from ihp_backend.model import IHPModel
from ihp_backend.core.network import NetConfig, build_network
from ihp_backend.settings import Settings
from ihp_backend.core.vocabulary import VOCABULARY
from tests.test_http import click_body


@pytest.fixture(scope="module")
def parts_checkpoint(tmp_path_factory) -> str:
    """Random weights with every head of the shipped network: previous-prediction input,
    unclaimed channel, vocabulary head (protocol tests only)."""
    torch.manual_seed(1)
    cfg = NetConfig(num_slots=24, aspp_channels=32, decoder_channels=32, low_level_channels=16,
                    prev_mask=True, unclaimed=True, vocab_size=len(VOCABULARY))
    net = build_network(cfg)
    ck = make_checkpoint(net, Binding("shuffled", 24, ["background", "part"], vocabulary=VOCABULARY), 256,
                         IMAGENET_MEAN, IMAGENET_STD, "tiny-parts", {"note": "random weights"})
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_parts.pt")
    save_checkpoint(ck, path)
    return path


@pytest.fixture()
def client(tmp_path, parts_checkpoint, image_server):
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=parts_checkpoint,
                          ls_url=image_server["url"], train_every=1000))
    m.load()
    return create_app(m, load=False).test_client()


def masks_of(pred, h=240, w=320, empty=False) -> dict[str, np.ndarray]:
    """label -> mask of an answer's regions (non-empty ones unless ``empty``)."""
    out = {r["value"]["brushlabels"][0]: rle_to_mask(r["value"]["rle"], h, w) for r in pred["result"]}
    return out if empty else {k: v for k, v in out.items() if v.any()}


def test_undo_gives_exactly_the_masks_before_the_click(client, payloads):
    """Clicks A, B, then Alt-click B: the masks of A, bit for bit (the previous-prediction
    input of A is used again, not B's answer)."""
    client.post("/setup", json=payloads["/setup"]["body"])
    after_a = client.post("/predict", json=click_body(payloads, 50, 21, "Hair")).get_json()["results"][0]
    after_b = client.post("/predict", json=click_body(payloads, 45, 80, "Left-arm")).get_json()["results"][0]
    undone = client.post("/predict", json=click_body(payloads, 45, 80, "Left-arm", positive=False)).get_json()["results"][0]
    a, b, u = masks_of(after_a), masks_of(after_b), masks_of(undone)
    assert set(u) == set(a) and all((u[k] == a[k]).all() for k in a)
    # every region has its label's stable id (accepting again replaces, never stacks), and the
    # undone label comes back empty so that its accepted region is replaced by nothing
    for pred in (after_a, after_b, undone):
        ids = [r["id"] for r in pred["result"]]
        assert ids == [region_id(r["value"]["brushlabels"][0]) for r in pred["result"]] and len(set(ids)) == len(ids)
    emptied = {k for k, v in masks_of(undone, empty=True).items() if not v.any()}
    assert emptied == {"Left-arm"} - set(a)
    assert set(b) != set(a) or any((b[k] != a[k]).any() for k in a)  # B did change the answer
    # and clicking B again gives B's masks again
    again = client.post("/predict", json=click_body(payloads, 45, 80, "Left-arm")).get_json()["results"][0]
    g = masks_of(again)
    assert set(g) == set(b) and all((g[k] == b[k]).all() for k in b)


def test_only_clicked_labels_and_no_background_region(client, payloads):
    client.post("/setup", json=payloads["/setup"]["body"])
    for x, y, lab in [(50, 21, "Hair"), (5, 5, "Background")]:
        pred = client.post("/predict", json=click_body(payloads, x, y, lab)).get_json()["results"][0]
        ms = masks_of(pred)
        assert set(ms) <= {"Hair"}
        if ms:
            assert np.sum(list(ms.values()), axis=0).max() <= 1


def test_zero_click_parse_for_known_names(client, payloads):
    """Retrieve predictions with no click: a config of known names (the payload's Background,
    Hair, Face, Left-arm) gets a full parse with a score; Background is not a region."""
    r = client.post("/predict", json=payloads["/predict"]["body"])
    assert r.status_code == 200
    (pred,) = r.get_json()["results"]
    assert isinstance(pred, dict) and 0 <= pred["score"] <= 1
    ms = masks_of(pred)
    assert ms and set(ms) <= {"Hair", "Face", "Left-arm"}
    assert np.sum(list(ms.values()), axis=0).max() <= 1


def test_a_batch_answers_what_fits_its_time_and_leaves_the_rest_for_the_next_retrieve(
        tmp_path, parts_checkpoint, image_server, payloads, caplog):
    """Label Studio sends every task selected for "Retrieve predictions" in one request and
    stores nothing if the answer takes over 100 s (ML_TIMEOUT_PREDICT); it then sends only the
    tasks without this model version's prediction. So a batch answers the tasks it parses
    within IHP_BATCH_SECONDS (the first always) and [] (no prediction) for the rest."""
    body = copy.deepcopy(payloads["/predict"]["body"])
    body["tasks"] = [dict(copy.deepcopy(body["tasks"][0]), id=100 + i) for i in range(3)]
    answers = {}
    for seconds in (1e-9, 0.0):  # the smallest budget; 0 = no limit
        # float32 pinned: "auto" times bfloat16 against float32 at load, and the two models compared
        # here could pick differently on a busy machine
        m = IHPModel(Settings(model_dir=str(tmp_path / f"md{seconds}"), checkpoint=parts_checkpoint,
                              ls_url=image_server["url"], train_every=1000, batch_seconds=seconds,
                              precision="float32"))
        m.load()
        with caplog.at_level("WARNING", logger="ihp_backend"):
            r = create_app(m, load=False).test_client().post("/predict", json=body)
        assert r.status_code == 200
        answers[seconds] = r.get_json()["results"]
    first, *rest = answers[1e-9]
    assert isinstance(first, dict) and first["result"] and rest == [[], []]
    assert "2 left without a prediction" in caplog.text
    assert all(isinstance(a, dict) and a["result"] for a in answers[0.0])
    assert answers[0.0][0]["result"] == first["result"]


def test_unknown_names_get_no_prediction_not_an_empty_one(client, payloads):
    body = copy.deepcopy(payloads["/predict"]["body"])
    for a, b in [("Hair", "Fur"), ("Face", "Snout"), ("Left-arm", "Paw")]:
        body["label_config"] = body["label_config"].replace(f'"{a}"', f'"{b}"')
    j = client.post("/predict", json=body).get_json()
    assert j["results"] == [[]]


def _region(name, mask):
    h, w = mask.shape
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [name]}}


def test_overlapping_regions_resolve_later_wins():
    setup = parse_label_config('<View><Image name="image" value="$image"/>'
                               '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Hair"/>'
                               '<Label value="UpperClothes"/></KeyPointLabels><BrushLabels name="mask" toName="image">'
                               '<Label value="Background"/><Label value="Hair"/><Label value="UpperClothes"/>'
                               '</BrushLabels></View>')
    h, w = 40, 30
    hair1 = np.zeros((h, w), bool); hair1[0:20] = True
    coat = np.zeros((h, w), bool); coat[10:40] = True
    hair2 = np.zeros((h, w), bool); hair2[15:18, 0:5] = True  # a duplicate Hair region, accepted later
    out, stats = resolve_brush_regions([_region("Hair", hair1), _region("UpperClothes", coat),
                                        _region("Hair", hair2)], setup)
    assert stats == {"regions_in": 3, "regions": 2, "overlap_pixels": 10 * w}
    ms = {r["value"]["brushlabels"][0]: rle_to_mask(r["value"]["rle"], h, w) for r in out}
    assert set(ms) == {"Hair", "UpperClothes"}
    assert not (ms["Hair"] & ms["UpperClothes"]).any()
    assert ms["Hair"][:10].all() and ms["UpperClothes"][20:].all()
    assert ms["UpperClothes"][10:15].all()  # the later UpperClothes wins over the first Hair
    assert ms["Hair"][15:18, 0:5].all()  # the later Hair wins over UpperClothes


def test_webhook_stores_one_clean_parse(tmp_path, parts_checkpoint, payloads):
    from tests.test_fit import webhook_body
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=parts_checkpoint, train_every=1000))
    m.load()
    c = create_app(m, load=False).test_client()
    body, lab = webhook_body("ANNOTATION_CREATED", 7, 1, 1)
    extra = copy.deepcopy(body["annotation"]["result"][0])  # the first label once more, on top
    body["annotation"]["result"].insert(len(body["annotation"]["result"]) - 1, extra)
    r = c.post("/webhook", json=body).get_json()
    assert r["stored"] and r["regions_in"] == 4 and r["regions"] == 3 and "warning" in r
    m.store.decode_pending()
    (s,) = m.store.samples(7)
    assert np.array_equal(s["labels"], np.where(lab == 0, 255, lab))  # 255: no region (fit: background)


def test_person_boxes_one_box_per_clicked_person():
    """Three people in a row (the first pass's person pixels at the network size): a box around
    each person with a part click, grown, in image pixels; none for the unclicked one or for
    background clicks; no zoom at all when one person fills the photo."""
    from ihp_backend.core.inference import person_boxes
    small = np.zeros((60, 120), np.uint8)
    small[10:50, 5:25] = 3  # person A (a part label)
    small[10:50, 45:65] = 24  # person B (the unclaimed channel: still a person)
    small[20:40, 90:110] = 2  # person C, not clicked
    clicks = np.array([[30, 15, 1], [30, 55, 2], [5, 80, 0]], float)  # A, B, a background click
    boxes = person_boxes(small, clicks, (600, 1200), margin=0.1, min_side=0.0)
    assert len(boxes) == 2
    (ay0, ay1, ax0, ax1), (by0, by1, bx0, bx1) = sorted(boxes, key=lambda b: b[2])
    assert ay0 <= 100 and ay1 >= 500 and ax0 <= 50 and ax1 >= 250 and ax1 < 450  # A grown, not B
    assert bx0 <= 450 and bx1 >= 650 and bx1 < 900  # B, not C
    assert person_boxes(small, clicks[2:], (600, 1200)) == []  # background clicks only
    big = np.ones((60, 120), np.uint8)
    assert person_boxes(big, clicks, (600, 1200)) == []  # the whole photo: no zoom


def test_zoomed_parse_pastes_each_persons_crop_parse_over_the_first_pass(parts_checkpoint):
    """With zoom, each clicked person's region is parsed again at the network's resolution and
    pasted over the first pass: inside every box the answer is the crop's own parse, outside it
    the first pass's; the previous-prediction memory is the pasted answer at the network size
    (``previous_prediction``), as the user sees it. (The first pass of
    these random weights is replaced by one that sees the two people, so that there are boxes.)"""
    from ihp_backend.core.inference import Parser, person_boxes
    from tests.conftest import person_image
    img, _ = person_image()
    canvas = np.full((960, 1280, 3), 120, np.uint8)
    people = [(600, 840, 800, 1120), (100, 340, 100, 420)]
    for y0, y1, x0, x1 in people:
        canvas[y0:y1, x0:x1] = img
    clicks = np.array([[650, 960, 1], [720, 960, 2], [150, 260, 1], [800, 940, 3]], float)
    p = Parser.from_file(parts_checkpoint)
    network_logits = p.logits

    crops = []

    def first_pass_sees_the_people(image, clicks, prev_mask=None, timings=None):
        out = network_logits(image, clicks, prev_mask, timings)
        if image.shape[:2] != canvas.shape[:2]:
            crops.append(image.shape)
            return out  # a crop: the network itself
        out = torch.full_like(out, -10.0)
        out[0] = 10.0
        h, w = out.shape[-2:]
        for y0, y1, x0, x1 in people:
            out[1, y0 * h // 960:y1 * h // 960, x0 * w // 1280:x1 * w // 1280] = 20.0
        return out

    p.logits = first_pass_sees_the_people
    allowed = [0, 1, 2, 3, p.unclaimed]
    plain = p.parse(canvas, clicks, allowed_slots=allowed)
    zoomed = p.parse(canvas, clicks, allowed_slots=allowed, zoom=True)
    from ihp_backend.core.inference import network_size, previous_prediction
    hw = network_size(canvas.shape[:2], p.max_side)
    assert np.array_equal(zoomed.network_labels, previous_prediction(zoomed.labels, hw, p.num_slots))
    assert np.array_equal(plain.network_labels, previous_prediction(plain.labels, hw, p.num_slots))
    small = np.zeros(p.logits(canvas, clicks).shape[-2:], np.uint8)
    h, w = small.shape
    for y0, y1, x0, x1 in people:
        small[y0 * h // 960:y1 * h // 960, x0 * w // 1280:x1 * w // 1280] = 1
    boxes = person_boxes(small, clicks * [h / 960, w / 1280, 1], canvas.shape[:2])
    assert len(boxes) == 2
    covered = np.zeros(canvas.shape[:2], bool)
    for y0, y1, x0, x1 in boxes:
        inside = (clicks[:, 0] >= y0) & (clicks[:, 0] < y1) & (clicks[:, 1] >= x0) & (clicks[:, 1] < x1)
        assert inside.sum() in (1, 3)
        crop = p.parse(np.ascontiguousarray(canvas[y0:y1, x0:x1]), clicks[inside] - [y0, x0, 0], allowed_slots=allowed)
        assert (zoomed.labels[y0:y1, x0:x1] == crop.labels).all()
        covered[y0:y1, x0:x1] = True
    assert (zoomed.labels[~covered] == plain.labels[~covered]).all()
    assert not np.array_equal(zoomed.labels, plain.labels)
    # the next click, on one person: only that person's crop is parsed again, the other's is reused
    crops.clear()
    more = np.vstack([clicks, [[700, 1000, 2]]])
    again = p.parse(canvas, more, allowed_slots=allowed, zoom=True)
    assert len(crops) == 1
    fresh = Parser.from_file(parts_checkpoint)
    fresh.logits = first_pass_sees_the_people
    assert np.array_equal(again.labels, fresh.parse(canvas, more, allowed_slots=allowed, zoom=True).labels)


def test_vocabulary_prior_is_served_for_known_names_only(tmp_path, parts_checkpoint, image_server, payloads, monkeypatch):
    """IHP_VOCAB_PRIOR reaches the served parse: with known names a heavy prior changes the
    answer to the same clicks; with names the head does not know there is no prior to add."""
    unknown = [("Hair", "Fur"), ("Face", "Snout"), ("Left-arm", "Paw")]

    def renamed(body):
        body = copy.deepcopy(body)
        for a, b in unknown:
            body["label_config"] = body["label_config"].replace(f'"{a}"', f'"{b}"')
            for r in body["params"]["context"]["result"]:
                r["value"]["keypointlabels"] = [b if v == a else v for v in r["value"]["keypointlabels"]]
                r["value"]["labels"] = [b if v == a else v for v in r["value"]["labels"]]
        return body

    def answers(weight, rename=False):
        monkeypatch.setenv("IHP_VOCAB_PRIOR", str(weight))
        assert Settings.from_env().parser_options().vocab_prior == weight
        m = IHPModel(Settings(model_dir=str(tmp_path / f"md{weight}{rename}"), checkpoint=parts_checkpoint,
                              ls_url=image_server["url"], train_every=1000, vocab_prior=weight))
        m.load()
        c = create_app(m, load=False).test_client()
        out = []
        for x, y, lab in [(50, 21, "Hair"), (45, 80, "Left-arm")]:
            body = click_body(payloads, x, y, lab)
            res = c.post("/predict", json=renamed(body) if rename else body)
            assert res.status_code == 200, res.get_data(as_text=True)
            out.append(masks_of(res.get_json()["results"][0]))
        assert any(out)
        return out

    def same(a, b):
        return all(set(x) == set(y) and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))

    assert not same(answers(0.0), answers(50.0))
    assert same(answers(0.0, rename=True), answers(50.0, rename=True))


def test_vocabulary_share_is_served_for_known_names_only(tmp_path, parts_checkpoint, image_server, payloads, monkeypatch):
    """IHP_VOCAB_SHARE reaches the served parse through the settings: with known names the
    clicked labels gain pixels the unclaimed channel held (names the head does not know get no
    prior channels at all: test_vocab_prior)."""
    def answers(share):
        """The masks answered to the second of two clicks (Hair, then Left-arm)."""
        monkeypatch.setenv("IHP_VOCAB_SHARE", str(share))
        settings = Settings.from_env()
        assert settings.parser_options().vocab_share == bool(share)
        m = IHPModel(dataclasses.replace(settings, model_dir=str(tmp_path / f"md{share}"),
                                         checkpoint=parts_checkpoint, ls_url=image_server["url"], train_every=1000))
        m.load()
        c = create_app(m, load=False).test_client()
        for x, y, lab in [(50, 21, "Hair"), (45, 80, "Left-arm")]:
            res = c.post("/predict", json=click_body(payloads, x, y, lab))
            assert res.status_code == 200, res.get_data(as_text=True)
        return masks_of(res.get_json()["results"][0])

    off, on = answers(0), answers(1)
    assert set(off) == set(on) and any(on[k].sum() > off[k].sum() for k in on)


def test_fill_known_answers_unclicked_parts_with_the_zero_click_parse(tmp_path, parts_checkpoint, image_server,
                                                                     payloads):
    """``IHP_FILL_KNOWN=1`` with a context head: a click's answer gives the parts nobody clicked the
    labels of the parse without clicks (here a head that sees Face everywhere), whether or not
    "Retrieve predictions" came first; the clicked label keeps its pixels."""
    from ihp_backend.core.checkpoint import read_checkpoint
    from ihp_backend.core.network import VocabContext
    from ihp_backend.core.vocabulary import lookup
    from model_training.train_vocab_context import with_head
    head = VocabContext(960, 8, len(VOCABULARY))
    with torch.no_grad():
        head.out.bias[lookup(["Face"])["Face"]] = 100.0
    path = str(tmp_path / "ctx.pt")
    save_checkpoint(with_head(read_checkpoint(parts_checkpoint), head.eval(), 8, "tiny-ctx", {}), path)
    answers = []
    for retrieve_first in (True, False):
        m = IHPModel(Settings(model_dir=str(tmp_path / f"md{retrieve_first}"), checkpoint=path, ls_url=image_server["url"],
                              train_every=1000, fill_known=True, unclaimed_bias=20.0))
        m.load()
        c = create_app(m, load=False).test_client()
        c.post("/setup", json=payloads["/setup"]["body"])
        if retrieve_first:
            zero = masks_of(c.post("/predict", json=payloads["/predict"]["body"]).get_json()["results"][0])
            assert set(zero) == {"Face"}
        answers.append(masks_of(c.post("/predict", json=click_body(payloads, 50, 21, "Hair")).get_json()["results"][0]))
    first, alone = answers
    assert set(first) == {"Hair", "Face"} and first["Face"].mean() > 0.5 and first["Hair"].any()
    assert set(alone) == set(first) and all((alone[k] == first[k]).all() for k in first)
