import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model_training.losses import adjacent_pairs, balanced_ce, class_weights, lovasz_softmax, sp_loss


def test_class_weights_equalise_class_totals():
    counts = torch.tensor([[90.0, 10.0, 0.0]])
    w = class_weights(counts)
    # each present class carries the same total weight; absent classes get none
    assert torch.allclose(w[0, 0] * 90, w[0, 1] * 10)
    assert w[0, 2] == 0
    assert torch.allclose((w * counts).sum(), counts.sum())


def test_balanced_ce_is_half_pixel_half_click_weighted():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 10, 10)
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :, :2] = 1  # 20 px of class 1, 80 px of class 0
    clicks = [np.array([[1, 1, 1], [2, 1, 1], [5, 5, 0]], np.float32)]  # class 1: 2 clicks, class 0: 1
    got = balanced_ce(logits, target, clicks)
    ce = F.cross_entropy(logits, target, reduction="none")[0]
    m1 = target[0] == 1
    # pixel term: weight 1/(2*0.8) for class 0, 1/(2*0.2) for class 1
    wp = torch.where(m1, 1 / (2 * 0.2), 1 / (2 * 0.8))
    pix = (ce * wp).sum() / wp.sum()
    # click term: counts+1 -> class 0: 2, class 1: 3; share 2/5 and 3/5
    wc = torch.where(m1, 1 / (2 * 0.6), 1 / (2 * 0.4))
    clk = (ce * wc).sum() / wc.sum()
    assert got.item() == pytest.approx((0.5 * pix + 0.5 * clk).item(), rel=1e-5)


def test_balanced_ce_ignores_255():
    logits = torch.randn(1, 2, 4, 4)
    t = torch.full((1, 4, 4), 255)
    t[0, 0, 0] = 1
    v = balanced_ce(logits, t, [np.zeros((0, 3))])
    assert torch.isfinite(v)


def test_adjacent_pairs():
    t = np.array([[0, 0, 1], [2, 2, 1], [255, 3, 3]])
    p = adjacent_pairs(t)
    assert {(0, 1), (1, 0), (0, 2), (2, 1), (2, 3), (1, 3)} <= p
    assert all(255 not in pair for pair in p)


def _setup(consistent: bool):
    torch.manual_seed(0)
    h = w = 16
    target = torch.zeros(1, h * 4, w * 4, dtype=torch.long)
    target[0, :, 32:] = 1
    feats = torch.zeros(1, 8, h, w)
    feats[0, 0, :, :8] = 1.0
    feats[0, 1, :, 8:] = 1.0
    feats = feats + 0.05 * torch.randn_like(feats)
    if not consistent:  # features shuffled across pixels: no longer agree with the parts
        perm = torch.randperm(h * w)
        feats = feats.view(1, 8, -1)[:, :, perm].view(1, 8, h, w)
    clicks = [np.array([[10, 10, 0], [40, 50, 1], [20, 60, 1]], np.float32)]
    return feats.requires_grad_(True), target, clicks


def test_sp_loss_lower_for_click_consistent_features_and_differentiable():
    f1, t, c = _setup(True)
    f2, _, _ = _setup(False)
    g = torch.Generator().manual_seed(0)
    l1 = sp_loss(f1, t, c, samples_per_pair=64, generator=g)
    l2 = sp_loss(f2, t, c, samples_per_pair=64, generator=g)
    assert l1.item() < l2.item()
    l2.backward()
    assert f2.grad is not None and f2.grad.abs().sum() > 0


def test_sp_loss_zero_without_pairs():
    f = torch.randn(1, 4, 8, 8, requires_grad=True)
    t = torch.zeros(1, 32, 32, dtype=torch.long)
    v = sp_loss(f, t, [np.array([[1, 1, 0]], np.float32)])
    assert v.item() == 0.0
    v.backward()


def _iou_loss(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - mean IoU over the classes present in ``target`` (255 ignored)."""
    keep = target != 255
    ious = []
    for c in np.unique(target[keep]):
        p, t = pred[keep] == c, target[keep] == c
        ious.append((p & t).sum() / (p | t).sum())
    return 1.0 - float(np.mean(ious))


def test_lovasz_softmax_equals_one_minus_iou_on_hard_predictions():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(2, 9, 7))
    target[0, 0, :3] = 255
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, size=target.shape))
    pred[target == 255] = 0
    logits = F.one_hot(torch.as_tensor(pred), 4).permute(0, 3, 1, 2).float() * 60.0  # softmax ~ one-hot
    got = lovasz_softmax(logits, torch.as_tensor(target)).item()
    assert got == pytest.approx(_iou_loss(pred, target), abs=1e-4)
    perfect = F.one_hot(torch.as_tensor(np.where(target == 255, 0, target)), 4).permute(0, 3, 1, 2) * 60.0
    assert lovasz_softmax(perfect.float(), torch.as_tensor(target)).item() == pytest.approx(0.0, abs=1e-4)


def test_lovasz_softmax_gradient_lowers_the_loss():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    before = lovasz_softmax(logits, target)
    before.backward()
    after = lovasz_softmax(logits.detach() - 5.0 * logits.grad, target)
    assert after.item() < before.item()
    assert lovasz_softmax(logits, torch.full((2, 8, 8), 255)).item() == 0.0


def test_lovasz_softmax_on_a_pixel_sample_estimates_the_full_loss():
    torch.manual_seed(1)
    target = torch.randint(0, 5, (4, 64, 64))
    logits = torch.randn(4, 6, 64, 64) + 3.0 * F.one_hot(target, 6).permute(0, 3, 1, 2)
    full = lovasz_softmax(logits, target).item()
    g = torch.Generator().manual_seed(0)
    sampled = lovasz_softmax(logits, target, max_pixels=4096, generator=g).item()
    assert sampled == pytest.approx(full, abs=0.02)
