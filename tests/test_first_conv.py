"""The served forward reads only the input channels that carry information (the RGB planes, the
maps of clicked slots, the previous-prediction planes of labels present) through a first conv
restricted to them, or keeps the first conv's output across clicks (``FirstConvCache``); it must
compute what the whole input through the whole first conv computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD, network_input, scale_clicks
from ihp_backend.core.clicks import click_map_patches, localization_maps
from ihp_backend.core.inference import FirstConvCache, Parser, network_size, read_channels
from ihp_backend.core.network import (NetConfig, build_network, changed_tiles, conv_of_patches, label_planes_conv,
                                     restricted_first_conv)


def test_restricted_conv_equals_the_whole_conv_on_ones_and_zeros():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(9, 5, 7, stride=2, padding=3, bias=True)
    x = torch.randn(2, 9, 20, 17)
    x[:, [3, 4, 7]] = 1.0  # constant ones (unclicked maps)
    x[:, [5, 8]] = 0.0  # absent labels
    keep, ones = [0, 1, 2, 6], [3, 4, 7]
    small = restricted_first_conv(conv, keep, ones)
    assert small.in_channels == 5
    compact = torch.cat([x[:, keep], torch.ones(2, 1, 20, 17)], dim=1)
    assert torch.allclose(small(compact), conv(x), atol=1e-5)  # the borders' zero padding included
    none = restricted_first_conv(conv, [0, 1, 2, 3, 4, 6, 7], [])
    assert none.in_channels == 7 and torch.allclose(none(x[:, [0, 1, 2, 3, 4, 6, 7]]), conv(x), atol=1e-5)
    with pytest.raises(ValueError, match="dense"):
        restricted_first_conv(torch.nn.Conv2d(4, 4, 3, groups=2), [0], [1])


def test_read_channels():
    clicks = np.array([[5, 5, 2], [9, 1, 0], [3, 3, 2]], float)
    prev = np.array([[-1, 1, 1], [4, 4, 9]])  # 9: the unclaimed channel (>= num_slots) is no plane
    keep, ones = read_channels(6, clicks, prev, prev_mask=True)
    assert keep == [0, 1, 2, 3 + 0, 3 + 2, 9 + 1, 9 + 4]
    assert ones == [3 + 1, 3 + 3, 3 + 4, 3 + 5]
    keep, ones = read_channels(6, np.zeros((0, 3)), None, prev_mask=True)
    assert keep == [0, 1, 2] and ones == [3, 4, 5, 6, 7, 8]
    assert read_channels(6, clicks, prev, prev_mask=False)[0] == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("stride,padding", [(2, 3), (1, 3), (2, 0)])
def test_conv_of_patches_adds_up_to_the_conv_of_the_whole(stride, padding):
    """Patches anywhere (at the borders too, and overlapping in the output) of zero planes: the
    terms placed in an empty output give the conv of the whole planes."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 5, 7, stride=stride, padding=padding, bias=False)
    planes = torch.zeros(4, 30, 23)
    patches = []
    for ch, y0, x0, h, w in [(0, 0, 0, 6, 5), (1, 10, 7, 9, 9), (1, 24, 18, 6, 5), (3, 12, 9, 4, 11), (0, 3, 2, 5, 5)]:
        vals = torch.randn(h, w)
        planes[ch, y0:y0 + h, x0:x0 + w] += vals
        patches.append((ch, y0, x0, vals))
    whole = conv(planes[None])[0]
    out = torch.zeros_like(whole)
    for rows, cols, t in conv_of_patches(conv, patches, tuple(planes.shape[1:])):
        out[:, rows, cols] += t
    assert torch.allclose(out, whole, atol=1e-5)


def test_click_map_patches_merge_a_slots_overlapping_windows():
    """Two clicks of one slot whose windows overlap give one box holding their minimum; a far
    click of that slot and another slot's click give boxes of their own; 1 plus the patches is
    the whole maps (``localization_maps``), also for random clicks near the borders."""
    clicks = np.array([[20, 20, 1], [26, 24, 1], [90, 70, 1], [10, 60, 2]], float)
    patches = click_map_patches(clicks, (100, 80), 3)
    assert [p[0] for p in patches] == [1, 1, 2]
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(v) for v in rng.integers(20, 120, 2))
        n = int(rng.integers(0, 8))
        c = np.c_[rng.uniform(0, h - 1, n), rng.uniform(0, w - 1, n), rng.integers(0, 4, n)] if trial else clicks
        h, w = (100, 80) if not trial else (h, w)
        rebuilt = np.ones((4, h, w), np.float32)
        for s, y0, x0, vals in click_map_patches(c, (h, w), 4):
            assert (rebuilt[s, y0:y0 + vals.shape[0], x0:x0 + vals.shape[1]] == 1).all()  # boxes apart
            rebuilt[s, y0:y0 + vals.shape[0], x0:x0 + vals.shape[1]] += vals
        assert np.allclose(rebuilt, localization_maps(c, (h, w), 4), atol=1e-6)  # (1 + (m - 1)) rounds in float32
    with pytest.raises(ValueError, match="slot"):
        click_map_patches(np.array([[1, 1, 7]], float), (10, 10), 4)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "resnet50"])
def test_served_logits_are_those_of_the_whole_input(tmp_path, backbone):
    """A click sequence with previous predictions, through ``Parser.logits`` (restricted first
    conv, in-place input) against ``Parser.forward`` on the freshly built full input."""
    torch.manual_seed(3)
    cfg = NetConfig(num_slots=8, backbone=backbone, aspp_channels=16, decoder_channels=16, low_level_channels=8,
                    prev_mask=True, unclaimed=True)
    ck = make_checkpoint(build_network(cfg).eval(), Binding("shuffled", 8, ["background", "part"]), 64,
                         IMAGENET_MEAN, IMAGENET_STD, "tiny-prev", {"note": "random weights"})
    path = str(tmp_path / "tiny_prev.pt")
    save_checkpoint(ck, path)
    parser = Parser.from_file(path, threads=1, max_side=64, precision="float32")
    rng = np.random.default_rng(4)
    img = rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)
    hw = network_size(img.shape[:2], parser.max_side)
    small, rgb = parser._network_image(img, hw)
    prev = None
    for clicks in ([(10, 10, 1)], [(10, 10, 1), (50, 30, 5)], [(50, 30, 5), (70, 50, 0)], []):
        arr = np.asarray(clicks, float).reshape(-1, 3)
        got = parser.logits(img, arr, prev)
        c = scale_clicks(arr, img.shape[:2], hw) if len(arr) else np.zeros((0, 3))
        ref = parser.forward(network_input(small, c, 8, prev, True, parser.mean, parser.std, rgb=rgb)[None])[0]
        assert torch.allclose(got, ref, atol=1e-4), float((got - ref).abs().max())
        prev = parser.parse(img, arr).network_labels
        assert prev is not None and 0 < len(np.unique(prev)) < 8  # some planes present, some absent


def _whole_first_conv(conv, rgb, labels, k):
    """The first conv of the full input: RGB, every map 1, one-hot planes of ``labels`` (-1: none)."""
    h, w = labels.shape
    onehot = (torch.from_numpy(labels)[None] == torch.arange(k)[:, None, None]).float()
    x = torch.cat([torch.from_numpy(rgb), torch.ones(k, h, w), onehot])[None]
    return conv(x)[0]


def test_changed_tiles_cover_every_output_a_change_reaches():
    """Outputs of a 7x7 stride-2 conv that differ when some input pixels change all lie in the
    blocks ``changed_tiles`` returns, and a block is returned only if one of its outputs sees a
    change (pixels at the borders included)."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        changed = torch.zeros(64, 48, dtype=torch.bool)
        for y, x in rng.integers(0, [64, 48], (rng.integers(1, 6), 2)):
            changed[y, x] = True
        tiles = changed_tiles(changed, (32, 24), 7, 2, 3, 8)
        reach = torch.nn.functional.conv2d(changed[None, None].float(), torch.ones(1, 1, 7, 7), stride=2, padding=3)[0, 0] > 0
        marked = torch.zeros(4, 3, dtype=torch.bool)
        marked[tiles[:, 0], tiles[:, 1]] = True
        assert (marked.repeat_interleave(8, 0).repeat_interleave(8, 1) | ~reach).all()
        assert torch.equal(marked, reach.reshape(4, 8, 3, 8).any(3).any(1))


def test_first_conv_cache_equals_the_whole_conv_click_after_click():
    """A sequence of previous predictions (none, a parse, small local edits, a label vanishing,
    a large change, back to none, another photo) through ``FirstConvCache``: each output equals
    the whole input's first conv, and the small edits were added block by block."""
    torch.manual_seed(1)
    k = 6
    conv = torch.nn.Conv2d(3 + 2 * k, 16, 7, stride=2, padding=3, bias=True)
    cache = FirstConvCache(conv, k, prev_mask=True)
    rng = np.random.default_rng(2)
    rgb = rng.normal(size=(3, 64, 48)).astype(np.float32)
    labels = np.full((64, 48), -1, np.int16)
    labels[10:50, 8:40] = 1
    labels[20:26, 20:28] = 3
    edit1 = labels.copy()
    edit1[40:46, 0:6] = 4  # a corner block, at the border
    edit2 = edit1.copy()
    edit2[edit2 == 3] = 1  # a label vanishes
    edit3 = edit2.copy()
    edit3[60:64, 44:48] = 5
    big = rng.integers(-1, k, (64, 48)).astype(np.int16)
    steps = [None, labels, edit1, edit2, edit3, big, edit3, None]
    updates, photo = [], {}
    for step in steps:
        got = cache.output(photo, rgb, step)
        want = _whole_first_conv(conv, rgb, np.full((64, 48), -1, np.int16) if step is None else step, k)
        assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
        updates.append(photo["updates"])
    assert updates[2:5] == [1, 2, 3]  # local edits: added block by block
    assert updates[5] == 0  # most blocks changed: recomputed whole
    other = rng.normal(size=(3, 64, 48)).astype(np.float32)  # another photo: its own terms
    assert torch.allclose(cache.output({}, other, edit1), _whole_first_conv(conv, other, edit1, k), atol=1e-4)
    assert torch.allclose(cache.output(photo, rgb, edit1), _whole_first_conv(conv, rgb, edit1, k), atol=1e-4)
    assert torch.allclose(label_planes_conv(conv.weight[:, 3 + k:].detach(), torch.from_numpy(edit1), 2, 3),
                          _whole_first_conv(conv, rgb, edit1, k) - photo["base"], atol=1e-4)
