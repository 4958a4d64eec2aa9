import numpy as np
import pytest
from scipy import ndimage

from model_training import click_simulation as cs
from model_training.samples import SampleConfig, hflip, simulate_clicks
from model_training.datasets import ParsingDataset, LIP_CLASSES, LIP_FLIP
from tests.conftest import person_image


def test_central_click_inside_component_and_best_of_candidates():
    _, lab = person_image()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        comp = cs.components(lab, 2)[0]
        y, x = cs.central_click(comp, np.random.default_rng(seed))
        assert comp[y, x]
        # replay the candidate draw: the chosen one has the largest boundary distance
        ys, xs = np.nonzero(comp)
        pick = rng.choice(len(ys), size=5, replace=False)
        d = cs.boundary_distance(comp)
        assert d[y, x] == pytest.approx(d[ys[pick], xs[pick]].max())


def test_central_clicks_one_per_component_per_class():
    _, lab = person_image()
    clicks = cs.central_clicks(lab, np.random.default_rng(0))
    # head: 1 component, torso: 1, legs: 2 components of class 3
    assert sorted(c for *_, c in clicks) == [1, 2, 3, 3]
    for y, x, c in clicks:
        assert lab[y, x] == c


def test_min_area_skips_specks():
    lab = np.zeros((50, 50), np.uint8)
    lab[10:30, 10:30] = 1
    lab[40, 40] = 1
    assert len(cs.central_clicks(lab, np.random.default_rng(0))) == 2
    assert len(cs.central_clicks(lab, np.random.default_rng(0), min_area=4)) == 1


def test_background_click_respects_margin():
    _, lab = person_image()
    for seed in range(10):
        y, x, c = cs.background_click(lab, np.random.default_rng(seed), d_margin=10)
        assert c == 0
        dist = ndimage.distance_transform_edt(lab == 0)
        assert dist[y, x] >= 10


@pytest.mark.parametrize("ec", [15, 45, 75])
def test_random_extra_click_counts(ec):
    _, lab = person_image()
    for seed in range(20):
        extra = cs.random_extra_clicks(lab, np.random.default_rng(seed), max_extra=ec, bg_range=(3, 6))
        n_bg = sum(1 for *_, c in extra if c == 0)
        assert 1 <= len(extra) <= ec
        assert n_bg <= 6 and n_bg >= min(3, len(extra))
        for y, x, c in extra:
            assert lab[y, x] == c


def test_near_edge_clicks_are_near_boundaries():
    _, lab = person_image()
    e = np.zeros(lab.shape, bool)
    e[:-1] |= lab[:-1] != lab[1:]
    e[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    dist = ndimage.distance_transform_edt(~e)
    for seed in range(10):
        extra = cs.near_edge_clicks(lab, np.random.default_rng(seed), max_extra=15, d_margin=10)
        assert 1 <= len(extra) <= 15
        for y, x, c in extra:
            assert dist[y, x] <= 11 and lab[y, x] == c


def test_strategies_in_sample_config():
    _, lab = person_image()
    central = simulate_clicks(lab, SampleConfig(strategy="central", p_background_click=0), np.random.default_rng(0))
    assert len(central) == 4
    many = simulate_clicks(lab, SampleConfig(strategy="random", p_extra=1, p_background_click=1, max_extra=15),
                           np.random.default_rng(1))
    assert 4 + 1 + 1 <= len(many) <= 4 + 1 + 15


def test_flip_swaps_left_and_right_classes():
    ds = ParsingDataset("lip", [], LIP_CLASSES, LIP_FLIP)
    lut = ds.flip_lut()
    la, ra = LIP_CLASSES.index("Left-arm"), LIP_CLASSES.index("Right-arm")
    ls_, rs = LIP_CLASSES.index("Left-shoe"), LIP_CLASSES.index("Right-shoe")
    lab = np.zeros((4, 6), np.uint8)
    lab[:, :2] = la
    lab[:, 4:] = ls_
    img = np.zeros((4, 6, 3), np.uint8)
    img[:, 0] = 255
    fi, fl = hflip(img, lab, lut)
    assert (fl[:, 4:] == ra).all() and (fl[:, :2] == rs).all()
    assert (fi[:, 5] == 255).all()
    assert lut[LIP_CLASSES.index("Hair")] == LIP_CLASSES.index("Hair")


def test_correction_click_lands_in_largest_error_region():
    gt = np.zeros((60, 60), np.int64)
    gt[5:15, 5:15] = 1  # 100 px error when predicted as background
    gt[20:50, 20:50] = 2  # 900 px error
    pred = np.zeros_like(gt)
    pred[5:15, 5:15] = 1
    pred[20:50, 20:50] = 0
    pred[20:50, 20:25] = 2  # leave 30x25 wrong
    y, x, c = cs.correction_click(gt, pred)
    assert c == 2 and 20 <= y < 50 and 25 <= x < 50
    # central: the farthest point from the region boundary
    region = (gt != pred)
    region[5:15, 5:15] = False
    d = cs.boundary_distance(region)
    assert d[y, x] == d.max() and abs(x - 37) <= 1
    assert cs.correction_click(gt, gt) is None


def test_unclicked_parts_are_ignored_for_label_agnostic_training():
    from model_training.samples import IGNORE, unclicked_to_ignore
    lab = np.zeros((40, 40), np.uint8)
    lab[5:30, 5:30] = 1
    lab[35, 35] = 2  # a speck without a click
    out = unclicked_to_ignore(lab, [(10, 10, 1)])
    assert out[35, 35] == IGNORE and out[10, 10] == 1 and out[0, 0] == 0


def test_leave_parts_unclicked_keeps_background_and_whole_parts():
    from model_training.samples import leave_parts_unclicked
    clicks = [(1, 1, 0)] + [(y, y, k) for k in range(1, 11) for y in (k, k + 20)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        kept = leave_parts_unclicked(clicks, rng)
        parts = {k for *_, k in kept} - {0}
        assert (1, 1, 0) in kept and 1 <= len(parts) <= 10
        assert all(sum(1 for *_, k in kept if k == p) == 2 for p in parts)  # a part keeps all its clicks


def test_few_parts_share_is_one_or_two_parts():
    from model_training.samples import leave_parts_unclicked
    clicks = [(k, k, k) for k in range(1, 11)]
    rng = np.random.default_rng(1)
    counts = [len(leave_parts_unclicked(clicks, rng, p_few=1.0)) for _ in range(200)]
    assert set(counts) == {1, 2}
    counts = [len(leave_parts_unclicked(clicks, rng, p_few=0.0)) for _ in range(400)]
    assert max(counts) == 10 and np.mean([c <= 2 for c in counts]) < 0.35


def test_one_click_per_part_keeps_one_click_per_class_inside_one_component_chosen_by_area():
    from model_training.samples import one_click_per_part
    lab = np.zeros((80, 80), np.uint8)
    lab[5:45, 5:45] = 3  # a large component of class 3 ...
    lab[58:68, 58:68] = 3  # ... and a small one (the other shoe)
    lab[50:70, 5:25] = 5
    clicks = [(20, 20, 3), (62, 62, 3), (30, 30, 3), (60, 10, 5), (75, 75, 0)]
    rng = np.random.default_rng(3)
    picks = []
    for _ in range(100):
        out = one_click_per_part(lab, clicks, rng)
        assert (75, 75, 0) in out  # background clicks stay
        assert sorted(k for *_, k in out) == [0, 3, 5]  # one click per part class
        (y, x, _), = [c for c in out if c[2] == 3]
        assert lab[y, x] == 3
        picks.append(y < 50)
    assert 0.85 < np.mean(picks) < 1.0  # by area: mostly the large component, sometimes the small
