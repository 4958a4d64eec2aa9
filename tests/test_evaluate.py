"""The NoC evaluation on synthetic label maps where the answer is known."""
import json

import numpy as np
import pytest

from model_training import click_simulation as cs
from model_training.evaluate import EvalConfig, RandomWalkerPredictor, evaluate, iou_per_class, miou, confusion
from tests.conftest import person_image

CLASSES = ["background", "head", "torso", "legs"]


def samples(n=3):
    return [person_image(seed=i) for i in range(n)]


class Perfect:
    name = "perfect"

    def __init__(self, gts):
        self.gts = gts
        self.i = -1
        self.last = None

    def __call__(self, image, clicks, prev=None):
        return self.gts[id(image)]


class Constant:
    name = "constant"

    def __call__(self, image, clicks, prev=None):
        return np.zeros(image.shape[:2], np.int64)


class FillsClicked:
    """Predicts, for every class clicked so far, the whole ground-truth region of that class;
    unclicked classes are background. One click per class is enough for a perfect parse."""

    name = "fills-clicked"

    def __init__(self, gts):
        self.gts = gts
        self.calls = []

    def __call__(self, image, clicks, prev=None):
        gt = self.gts[id(image)]
        self.calls.append(clicks.copy())
        out = np.zeros_like(gt)
        for c in set(int(v) for v in clicks[:, 2]):
            out[gt == c] = c
        return out


def test_perfect_predictor_reaches_standard_with_no_corrections():
    s = samples()
    p = Perfect({id(img): lab.astype(np.int64) for img, lab in s})
    r = evaluate(p, s, CLASSES, EvalConfig(max_corrections=3), progress=False)
    assert r.add == 0 and r.miou_curve[0] == 1.0 and r.never_reached == 0
    assert r.per_image_noc == [0, 0, 0]
    # Avg. by hand: 4 central clicks per image (head, torso, 2 legs), 4 classes present each
    assert r.initial_clicks == 12 and r.classes_present == 12
    assert r.avg == pytest.approx(12 / 12)


def test_predictor_that_ignores_clicks_never_reaches_standard():
    r = evaluate(Constant(), samples(), CLASSES, EvalConfig(max_corrections=4), progress=False)
    assert r.add is None and r.avg is None and r.never_reached == 3
    assert len(set(round(v, 9) for v in r.miou_curve)) == 1


def test_rgb_only_corrections_land_in_largest_error_and_avg_matches_hand():
    s = samples(2)
    p = FillsClicked({id(img): lab.astype(np.int64) for img, lab in s})
    r = evaluate(p, s, CLASSES, EvalConfig(max_corrections=4, rgb_only=True), progress=False)
    # image 1: call 0 no clicks -> all background; correction 1 goes to the largest error (torso,
    # 80x80 = 6400 px > head disk ~2800 px > each leg 70x25)
    first = p.calls[1]
    assert len(first) == 1 and int(first[0, 2]) == 2
    y, x = int(first[0, 0]), int(first[0, 1])
    assert 80 <= y < 160 and 120 <= x < 200
    # torso, head, legs: 3 corrections make each image perfect
    assert r.per_image_noc == [3, 3]
    assert r.add == 3
    assert r.avg == pytest.approx((0 + 3 * 2) / (4 * 2))


def test_miou_from_confusion():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1]])
    cm = confusion(gt, pred, 3)
    iou = iou_per_class(cm)
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and np.isnan(iou[2])
    assert miou(cm) == pytest.approx((0.5 + 2 / 3) / 2)


def test_random_walker_floor_improves_with_clicks():
    s = samples(1)
    r = evaluate(RandomWalkerPredictor(max_side=160), s, CLASSES,
                 EvalConfig(max_corrections=3, background_click=True), progress=False)
    assert r.miou_curve[0] > 0.5
    assert r.miou_curve[-1] >= r.miou_curve[0] - 0.02


class RecordsPrev(Constant):
    def __init__(self):
        self.prevs = []

    def __call__(self, image, clicks, prev=None):
        self.prevs.append(None if prev is None else prev.copy())
        return np.full(image.shape[:2], len(self.prevs) % 2, np.int64)


def test_correction_calls_receive_the_previous_prediction():
    p = RecordsPrev()
    evaluate(p, samples(1), CLASSES, EvalConfig(max_corrections=2), progress=False)
    assert p.prevs[0] is None  # the first answer has nothing before it
    assert len(p.prevs) == 3
    for i in (1, 2):  # call i sees what call i - 1 returned
        assert np.all(p.prevs[i] == i % 2)


def test_core_predictor_feeds_what_the_backend_feeds(monkeypatch, tmp_path):
    """A continued parse gets the last click parse's ``network_labels``, the array the backend
    keeps per task and feeds the next click (``ihp_backend.model``), not the evaluation's own
    copy of the answer; a model without the previous-prediction input gets nothing; a parse
    without clicks by meaning leaves nothing, as the backend's zero-click answer does."""
    import torch
    from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
    from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD
    from ihp_backend.core.inference import Parser
    from ihp_backend.core.network import NetConfig, build_network
    from model_training.evaluate import CorePredictor
    img, lab = person_image()
    for use_prev in (False, True):
        torch.manual_seed(0)
        net = build_network(NetConfig(num_slots=8, aspp_channels=16, decoder_channels=16,
                                      low_level_channels=8, prev_mask=use_prev))
        path = str(tmp_path / f"m{use_prev}.pt")
        save_checkpoint(make_checkpoint(net, Binding("shuffled", 8, ["background", "part"]), 128,
                                        IMAGENET_MEAN, IMAGENET_STD, "t", {}), path)
        parser = Parser.from_file(path)
        seen, answers, real = [], [], parser.parse

        def spy(image, clicks, allowed_slots=None, prev_mask=None, **kw):
            seen.append(prev_mask)
            answers.append(real(image, clicks, allowed_slots=allowed_slots, prev_mask=prev_mask, **kw))
            return answers[-1]

        monkeypatch.setattr(parser, "parse", spy)
        core = CorePredictor(parser, CLASSES)
        first = core(img, np.array([[50.0, 160.0, 1.0]]))
        assert first.shape == lab.shape and seen[-1] is None
        core(img, np.array([[50.0, 160.0, 1.0], [20.0, 20.0, 0.0]]), first)
        if use_prev:
            assert seen[-1] is answers[0].network_labels and seen[-1].shape == (96, 128)
        else:
            assert seen[-1] is None and answers[0].network_labels is None
        with pytest.raises(RuntimeError):
            core(img.copy(), np.array([[50.0, 160.0, 1.0]]), first)


def test_previous_prediction_is_the_answer_at_the_network_size():
    """The next click's input is the answer as served, resized like PIL's NEAREST; the unclaimed
    output and labels by meaning (not slots) count as background."""
    from PIL import Image
    from ihp_backend.core.inference import previous_prediction
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 8, (830, 550)).astype(np.uint8)
    got = previous_prediction(labels, (576, 384), 8)
    want = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((384, 576), Image.NEAREST))
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    labels[:100] = 24  # the unclaimed channel of a 24-slot network
    labels[100:200] = 40  # a vocabulary channel (IHP_FILL_KNOWN)
    got = previous_prediction(labels, (415, 275), 24)
    small = np.asarray(Image.fromarray(labels.astype(np.int32)).resize((275, 415), Image.NEAREST))
    assert np.array_equal(got, np.where(small < 24, small, 0)) and (got[:40] == 0).all()


def test_side_by_side_and_upscaled_samples():
    """The crowd and phone-size evaluation samples: people side by side at one height; photos
    enlarged with the labels repeated and the clicks moved to the same points."""
    from model_training.evaluate import side_by_side, upscaled
    samples = [(np.full((10, 6 + i, 3), i, np.uint8), np.full((10, 6 + i), i, np.uint8)) for i in range(7)]
    out = list(side_by_side(iter(samples), 3))
    assert len(out) == 2 and out[0][0].shape == (10, 6 + 7 + 8, 3)
    assert np.array_equal(np.unique(out[1][1]), [3, 4, 5]) and (out[1][1][:, :9] == 3).all()
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20
    gt = np.array([[0, 1], [2, 3]], np.uint8)
    big, big_gt, c = upscaled(img, gt, [(1, 0, 2)], 4)
    assert big.shape == (8, 8, 3) and big_gt.shape == (8, 8)
    y, x, k = c[0]
    assert big_gt[int(round(y)), int(round(x))] == gt[1, 0] == k
