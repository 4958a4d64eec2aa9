"""The edge refiner's band bookkeeping (``ihp_backend.core.edges``) on arrays."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ihp_backend.core.edges import (EdgeRefinerNet, boundary_band, load_edge_refiner, refine_edges,
                                    save_edge_refiner, work_size)


def two_labels(h=70, w=90, split=41):
    labels = np.full((h, w), 3, np.int64)
    labels[:, split:] = 7
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, :split] = (200, 30, 30)
    rgb[:, split:] = (30, 30, 200)
    return labels, rgb


def test_band_is_the_pixels_near_another_label():
    labels, _ = two_labels()
    band = boundary_band(labels, 3)
    cols = np.nonzero(band.any(0))[0]
    assert cols.tolist() == list(range(41 - 3, 41 + 3)) and band[:, 38:44].all()


def test_an_untrained_refiner_keeps_the_labels():
    labels, rgb = two_labels()
    labels[20:30, 10:20] = 5  # a third label, a junction-free island
    out = refine_edges(labels, rgb, EdgeRefinerNet(width=8), tile=16)
    np.testing.assert_array_equal(out, labels)


class Contrary(EdgeRefinerNet):
    """Claims every pixel for the labels that do not hold it."""

    def forward(self, rgb, mask):
        return -mask

    def inner_logits(self, x):
        r = self.halo
        return -x[:, 3, r:x.shape[2] - r, r:x.shape[3] - r]


def test_only_band_pixels_are_redecided_whatever_the_tiling():
    labels, rgb = two_labels()
    want = labels.copy()
    band = boundary_band(labels, 3)
    want[band & (labels == 3)] = 7
    want[band & (labels == 7)] = 3
    for tile in (8, 16, 32, 64):
        np.testing.assert_array_equal(refine_edges(labels, rgb, Contrary(width=4), tile=tile), want)


def test_saved_refiner_loads_with_its_config(tmp_path):
    net = EdgeRefinerNet(width=8, dilations=(1, 2))
    torch.nn.init.normal_(net.head.weight)
    path = str(tmp_path / "edges.pt")
    save_edge_refiner(net, path, {"note": "test"})
    back = load_edge_refiner(path)
    x, m = torch.rand(1, 3, 20, 20) - 0.5, torch.ones(1, 1, 20, 20)
    assert back.halo == 3
    torch.testing.assert_close(back(x, m), net(x, m))
    torch.save({"format": "other"}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError):
        load_edge_refiner(str(tmp_path / "bad.pt"))


def test_work_size_caps_the_longer_side_only():
    assert work_size((830, 550), 1152) == (830, 550)
    assert work_size((3320, 2200), 1152) == (1152, 763)


def test_parser_with_an_untrained_refiner_serves_what_it_served(tiny_checkpoint, tmp_path):
    """The plumbing: working size, cached working photo, the refiner cast like the network."""
    from ihp_backend.core.inference import Parser
    from tests.conftest import person_image
    path = str(tmp_path / "edges.pt")
    save_edge_refiner(EdgeRefinerNet(width=8, dilations=(1, 2)), path)
    image, _ = person_image()
    clicks = np.array([[50.0, 160.0, 1], [120.0, 160.0, 2]])
    plain = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    for side in (1152, 100):  # the photo's size; a smaller working size, enlarged after
        edged = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32",
                                 edge_refiner=path, edge_side=side)
        a = plain.parse(image, clicks, zoom=False).labels
        b = edged.parse(image, clicks, zoom=False).labels
        if side >= max(image.shape[:2]):
            np.testing.assert_array_equal(a, b)
        else:  # labels decided at 100 px and enlarged: the same parse, coarser
            assert b.shape == a.shape and (a == b).mean() > 0.9


def test_the_shipped_refiner_is_served_by_default_and_one_setting_turns_it_off(monkeypatch, tmp_path):
    from ihp_backend.settings import SHIPPED_EDGE_REFINER, Settings
    monkeypatch.setenv("IHP_EDGE_REFINER", "1")
    assert Settings.from_env().parser_options().edge_refiner == SHIPPED_EDGE_REFINER
    assert load_edge_refiner(SHIPPED_EDGE_REFINER).halo == 3
    monkeypatch.setenv("IHP_EDGE_REFINER", "0")
    assert Settings.from_env().edge_refiner is None
    monkeypatch.setenv("IHP_EDGE_REFINER", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit):
        Settings.from_env()
    monkeypatch.delenv("IHP_EDGE_REFINER")
    assert Settings.from_env().edge_refiner == SHIPPED_EDGE_REFINER  # on by default
    # the evaluator reads its --edge-refiner with the same rule (default: the shipped one)
    from ihp_backend.core.options import edge_refiner_path
    assert edge_refiner_path("") == SHIPPED_EDGE_REFINER and edge_refiner_path("off") is None
    with pytest.raises(ValueError):
        edge_refiner_path(str(tmp_path / "missing.pt"))


def test_band_equals_the_window_definition_on_random_maps():
    """``boundary_band`` is exactly "the clipped (2w+1)^2 window holds two labels"."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    for _ in range(150):
        h, w = rng.integers(1, 40, 2)
        labels = rng.integers(0, 4, (h, w))
        if rng.random() < 0.6:  # blocky regions, as served labels are
            labels = np.kron(rng.integers(0, 4, (h // 5 + 1, w // 5 + 1)), np.ones((5, 5), int))[:h, :w]
        for width in (0, 1, 3, 6):
            k = 2 * width + 1
            want = ndimage.maximum_filter(labels, k, mode="nearest") != ndimage.minimum_filter(labels, k, mode="nearest")
            np.testing.assert_array_equal(boundary_band(labels, width), want)


def test_unpadded_tile_logits_equal_the_padded_forward():
    net = EdgeRefinerNet(width=6, dilations=(1, 2))
    torch.nn.init.normal_(net.head.weight)
    rgb, mask = torch.rand(3, 3, 22, 22) - 0.5, torch.randint(0, 2, (3, 1, 22, 22)).float() * 2 - 1
    r = net.halo
    torch.testing.assert_close(net.inner_logits(torch.cat([rgb, mask], 1)), net(rgb, mask)[:, 0, r:-r, r:-r])


def test_the_refiner_sees_few_batch_shapes():
    """Every new conv input shape leaves oneDNN primitives and buffers behind: the refiner's
    batches come in multiples of 32 jobs whatever a click's job count, and the padding changes
    no label."""
    shapes = []

    class Recording(EdgeRefinerNet):
        def inner_logits(self, x):
            shapes.append(tuple(x.shape))
            return super().inner_logits(x)

    net = Recording(width=4, dilations=(1, 2))
    torch.nn.init.normal_(net.head.weight)
    rng = np.random.default_rng(1)
    for size in (23, 37, 61):
        labels = np.kron(rng.integers(0, 5, (size // 4 + 1, size // 4 + 1)), np.ones((4, 4), int))[:size, :size]
        rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out = refine_edges(labels, rgb, net, tile=8, batch=64)
        band = boundary_band(labels, 3)
        np.testing.assert_array_equal(out[~band], labels[~band])
    assert shapes and all(s[0] % 32 == 0 and s[0] <= 64 for s in shapes)
    assert len({s[0] for s in shapes}) <= 2


def test_a_memo_of_the_last_refinement_gives_the_same_labels_and_skips_unchanged_tiles():
    """``memo``: after a local change of the coarse labels (a click), only the tiles whose crop
    changed are refined again, and the answer is the one without the memo, pixel for pixel."""
    refined = []

    class Counting(EdgeRefinerNet):
        def inner_logits(self, x):
            refined.append(x.shape[0])
            return super().inner_logits(x)

    net = Counting(width=6, dilations=(1, 2))
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.5)
    rng = np.random.default_rng(3)
    labels = np.kron(rng.integers(0, 4, (24, 30)), np.ones((5, 5), np.int64))[:117, :143]
    rgb = rng.integers(0, 256, (117, 143, 3), dtype=np.uint8)
    memo = [None]
    first = refine_edges(labels, rgb, net, tile=16, memo=memo)
    np.testing.assert_array_equal(first, refine_edges(labels, rgb, net, tile=16))
    clicked = labels.copy()
    clicked[40:62, 50:70] = 9  # one part changed, the rest as before
    refined.clear()
    again = refine_edges(clicked, rgb, net, tile=16, memo=memo)
    with_memo = sum(refined)
    refined.clear()
    np.testing.assert_array_equal(again, refine_edges(clicked, rgb, net, tile=16))
    assert 0 < with_memo < sum(refined) / 2  # the changed tiles' jobs only (each rank padded to 32)
    assert memo[0].refined is again
    unchanged = refine_edges(clicked, rgb, net, tile=16, memo=memo)
    np.testing.assert_array_equal(unchanged, again)
    other = refine_edges(clicked[:100], rgb[:100], net, tile=16, memo=memo)  # another size: no reuse
    np.testing.assert_array_equal(other, refine_edges(clicked[:100], rgb[:100], net, tile=16))
