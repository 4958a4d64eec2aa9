"""The colour-guided refinement of the coarse class probabilities (ihp_backend/core/refine.py)."""
import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from ihp_backend.core.inference import upsampled_argmax
from ihp_backend.core.refine import guided_coefficients, inverse_3x3, paint_clicks, refined_argmax


def test_inverse_3x3_matches_linalg():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 7, 5, generator=gen)
    m = torch.einsum("ikhw,jkhw->ijhw", x, x) + 0.05 * torch.eye(3)[:, :, None, None]
    ref = torch.linalg.inv(m.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
    assert torch.allclose(inverse_3x3(m), ref, atol=1e-3, rtol=1e-3)


def test_guided_filter_of_a_flat_guide_is_the_box_mean():
    """With a constant guide the colour terms vanish: the filter is a box mean of a box mean."""
    p = torch.softmax(torch.randn(4, 12, 10, generator=torch.Generator().manual_seed(1)), 0)
    guide = torch.full((3, 12, 10), 0.5)
    a, b = guided_coefficients(guide, p, 2, 1e-4)
    box = lambda t: F.avg_pool2d(t[None], 5, stride=1, padding=2, count_include_pad=False)[0]  # noqa: E731
    q = (a * guide[None]).sum(1) + b
    assert torch.allclose(q, box(box(p)), atol=1e-4)


def _photo_and_late_logits(edge_x: int, logit_edge: float, size=(96, 128)):
    """A photo whose left part (x < edge_x) is red and right part blue, and stride-4 logits
    whose class boundary sits at ``logit_edge`` (in logit pixels): a coarse, misplaced answer."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edge_x] = (200, 40, 40)
    img[:, edge_x:] = (30, 50, 190)
    xs = torch.arange(w // 4, dtype=torch.float32) + 0.5
    right = (xs - logit_edge) * 1.5
    logits = torch.stack([-right, right])[:, None, :].expand(2, h // 4, w // 4).contiguous()
    return img, logits


@pytest.mark.parametrize("edge_x,logit_edge", [(50, 15.0), (70, 15.0), (64, 16.0)])
def test_refined_boundary_follows_the_colour_edge(edge_x, logit_edge):
    img, logits = _photo_and_late_logits(edge_x, logit_edge)
    truth = np.zeros(img.shape[:2], np.int64)
    truth[:, edge_x:] = 1
    plain = upsampled_argmax(logits, img.shape[:2])
    refined = refined_argmax(logits, img, img.shape[:2])
    assert (refined != truth).mean() <= (plain != truth).mean()
    assert (refined != truth).mean() < 0.01


def test_refined_argmax_resizes_and_maps_values():
    img, logits = _photo_and_late_logits(50, 12.5)
    small = np.asarray(torch.from_numpy(img)[::2, ::2].contiguous())
    got = refined_argmax(logits, small, (96, 128), values=[3, 7])
    assert got.shape == (96, 128) and got.dtype == np.uint8
    assert set(np.unique(got)) == {3, 7}
    assert (got[:, :48] == 3).all() and (got[:, 52:] == 7).all()
    one = refined_argmax(logits[:1], img, (10, 20), values=[5])
    assert one.shape == (10, 20) and (one == 5).all()


def test_refined_argmax_keeps_unambiguous_answers():
    """Where the network is sure of one class everywhere, no colour edge changes it."""
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    logits = torch.zeros(3, 16, 12)
    logits[1] = 8.0
    assert (refined_argmax(logits, img, (64, 48)) == 1).all()


def test_a_click_claims_the_pixels_of_its_colour_around_it():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = (200, 40, 40)
    img[:, 30:] = (30, 50, 190)
    labels = np.zeros((40, 60), np.uint8)
    paint_clicks(labels, img, [(20, 27, 4)], radius=6)
    yy, xx = np.mgrid[:40, :60]
    disk = (yy - 20) ** 2 + (xx - 27) ** 2 <= 36
    assert (labels[disk & (xx < 30)] == 4).all()  # its colour, within the radius
    assert (labels[~disk | (xx >= 30)] == 0).all()  # nothing across the colour edge or beyond
    paint_clicks(labels, img, [(20, 27, 2), (20, 28, 5), (-3, 100, 1)], radius=3)
    assert labels[20, 27] == 5 and labels[0, 59] == 1  # later clicks win; outside clicks clamp
    assert paint_clicks(labels.copy(), img, [(5, 5, 9)], radius=0)[5, 5] != 9


def test_click_disks_kept_per_photo_paint_what_a_fresh_colour_test_paints():
    """The disks of earlier answers' clicks are kept (``disks``): the same labels, one colour test
    per click and photo."""
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)
    img[:, 35:] //= 4
    clicks = [(20, 30, 3), (60, 40, 7), (89, 0, 2)]
    plain = paint_clicks(np.zeros((90, 70), np.uint8), img, clicks, radius=9.5)
    disks: dict = {}
    kept = paint_clicks(np.zeros((90, 70), np.uint8), img, clicks, radius=9.5, disks=disks)
    assert (kept == plain).all() and len(disks) == 3
    again = paint_clicks(np.zeros((90, 70), np.uint8), img, clicks[:2] + [(10, 10, 1)], radius=9.5, disks=disks)
    assert len(disks) == 4 and (again[plain == 3] == 3).all()


def test_parser_click_disks_follow_the_setting(tiny_checkpoint):
    """Every click's own pixel carries its label with click disks on, whatever the network says."""
    from ihp_backend.core.inference import Parser

    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)
    clicks = np.array([[10, 5, 1], [40, 30, 2], [70, 50, 0], [79, 59, 3]], float)
    on = Parser.from_file(tiny_checkpoint, threads=1, max_side=64)
    off = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, click_radius=0, refine=False)
    got = on.parse(img, clicks, allowed_slots=[0, 1, 2, 3]).labels
    assert [got[int(y), int(x)] for y, x, _ in clicks] == [1, 2, 0, 3]
    plain = off.parse(img, clicks, allowed_slots=[0, 1, 2, 3]).labels
    assert got.shape == plain.shape == (80, 60)
    assert not np.array_equal(got, plain)
    # a click whose slot the label config does not use paints nothing
    none = on.parse(img, clicks[:1], allowed_slots=[0, 2]).labels
    assert set(np.unique(none)) <= {0, 2}


def test_nearest_resize_is_the_centre_mapping():
    """Output pixel i takes source floor((i + 0.5) * n_in / n_out), for uint8 and int64 maps:
    ``network_size_argmax`` and ``smooth_resize`` (``cell_spans``) assume this mapping."""
    from ihp_backend.core.refine import cell_spans, nearest_resize
    rng = np.random.default_rng(3)
    for (h, w), (H, W) in [((7, 5), (50, 36)), ((96, 64), (691, 461)), ((10, 10), (10, 10))]:
        lab = (rng.random((h, w)) < 0.1).astype(np.uint8) * rng.integers(1, 5, (h, w)).astype(np.uint8)
        ys = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
        xs = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
        want = lab[ys][:, xs]
        assert (nearest_resize(lab, (H, W)) == want).all()
        assert (nearest_resize(lab.astype(np.int64), (H, W)) == want).all()
        first, count = cell_spans(H, h)
        assert count.sum() == H and (ys[first] == np.arange(h)).all()


def test_smooth_edges_follow_the_photo_closer_than_blocks():
    """A photo whose sharp red/blue edge falls inside network pixels: enlarged network-size
    labels are blocky (off by up to half a cell); with ``smooth_edges`` the boundary is placed
    between network pixels by the interpolated score margins and follows the edge closer."""
    H, W, s = 400, 320, 8  # full size, network size = full / s
    yy, xx = np.mgrid[:H, :W]
    edge = xx + 0.37 * yy > 190.3  # a slanted edge, not on the cell grid
    full = np.where(edge[..., None], [30, 60, 220], [220, 40, 30]).astype(np.uint8)
    small = np.asarray(Image.fromarray(full).resize((W // s, H // s), Image.BILINEAR))
    # stride-4 logits (of the network size) that know the side only roughly
    hl, wl = H // s // 4, W // s // 4
    ly, lx = np.mgrid[:hl, :wl]
    side = (lx + 0.5) * 4 * s + 0.37 * (ly + 0.5) * 4 * s - 190.3
    logits = torch.from_numpy(np.stack([-side, side]).astype(np.float32) / 40)
    coarse = refined_argmax(logits, small, (H, W))
    fine = refined_argmax(logits, small, (H, W), smooth_edges=True)
    truth = edge.astype(np.uint8)
    assert (fine != truth).sum() < 0.3 * (coarse != truth).sum()
    far = np.abs(xx + 0.37 * yy - 190.3) > 4 * s
    assert (fine[far] == coarse[far]).all()
    assert (np.abs(np.diff(fine.astype(int), axis=1)).sum(1) <= 1).all()  # one clean edge per row



def test_box_mean_is_the_clipped_window_mean():
    from ihp_backend.core.refine import box_mean
    x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(4))
    r = 2
    want = torch.empty_like(x)
    for i in range(9):
        for j in range(7):
            want[..., i, j] = x[..., max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].mean((-2, -1))
    assert torch.allclose(box_mean(x, r), want, atol=1e-6)


def _every_pixel_argmax(coef: torch.Tensor, rgb: torch.Tensor) -> np.ndarray:
    """The reference: every class's filter output at every network pixel (coefficients
    upsampled bilinearly), argmax."""
    up = F.interpolate(coef.reshape(1, -1, *coef.shape[2:]), size=rgb.shape[1:], mode="bilinear",
                       align_corners=False)[0].reshape(coef.shape[0], 4, *rgb.shape[1:])
    return ((up[:, :3] * rgb[None]).sum(1) + up[:, 3]).argmax(0).numpy()


def test_band_argmax_is_the_every_pixel_argmax_on_a_real_photo():
    """``network_size_argmax`` compares classes only in the band of mixed logit cells; on a CCP
    photo with 8 classes it agrees with the every-pixel evaluation on >= 99.8% of the pixels and
    exactly in the band."""
    from ihp_backend.core.refine import boundary_cells, network_size_argmax
    path = "../shared/data/ccp/images/0003.jpg"
    try:
        photo = np.asarray(Image.open(path).convert("RGB").resize((384, 576), Image.BILINEAR))
    except FileNotFoundError:
        pytest.skip(f"{path} not found (needs ../shared/data/ccp)")
    gen = torch.Generator().manual_seed(5)
    # smooth logits with several regions: low-frequency noise upsampled to the logit grid
    logits = F.interpolate(torch.randn(1, 8, 9, 6, generator=gen) * 4, size=(144, 96), mode="bilinear")[0]
    rgb = torch.from_numpy(np.array(photo, np.float32)).permute(2, 0, 1) / 255.0
    guide = F.interpolate(rgb[None], size=(144, 96), mode="area")[0]
    a, b = guided_coefficients(guide, torch.softmax(logits, 0), 6, 1e-4)
    coef = torch.cat([a, b[:, None]], 1)
    arg, margin = network_size_argmax(coef, photo, guide)
    want = _every_pixel_argmax(coef, rgb)
    assert arg.shape == want.shape == (576, 384) and (margin >= 0).all()
    assert (arg == want).mean() >= 0.998
    cells = np.argmax(((a * guide[None]).sum(1) + b).numpy(), 0)
    band = boundary_cells(cells)[np.minimum((np.arange(576) + 0.5) / 4, 143).astype(int)][
        :, np.minimum((np.arange(384) + 0.5) / 4, 95).astype(int)]
    assert band.mean() < 0.5 and (arg[band] == want[band]).all()


def test_smooth_resize_places_a_boundary_between_network_pixels():
    """Two labels whose score margins say the boundary lies at 0.3 of the way between two
    network columns: enlarged 8x, the nearest resize puts it on the cell edge, the smooth one
    at the interpolated zero crossing (within one output pixel), and keeps other pixels."""
    from ihp_backend.core.refine import label_lut, nearest_resize, smooth_resize
    arg = np.zeros((6, 10), np.uint8)
    arg[:, 5:] = 1
    margin = np.ones((6, 10), np.float32)
    margin[:, 4], margin[:, 5] = 0.3, 0.7  # d(x) = +0.3 at column 4, -0.7 at column 5
    lut = label_lut(2, [3, 9])
    got = smooth_resize(arg, margin, (48, 80), lut)
    blocky = nearest_resize(lut[arg], (48, 80))
    # network column j's centre is at output x = 8 j + 3.5; zero crossing at 4 + 0.3 -> x = 37.9
    first_nine = (got == 9).argmax(1)
    assert (np.abs(first_nine - 37.9) <= 1).all() and (blocky == 9).argmax(1)[0] == 40
    assert set(np.unique(got)) == {3, 9} and (got[:, :30] == 3).all() and (got[:, 46:] == 9).all()


def test_photo_terms_kept_across_clicks_give_the_same_labels():
    """``refined_argmax`` with the photo's colour terms made once (``photo_guide``, as the Parser
    keeps them per photo) labels exactly as when it computes them itself; terms made for another
    grid or radius are refused."""
    from ihp_backend.core.refine import photo_guide
    img, logits = _photo_and_late_logits(50, 12.5)
    photo = photo_guide(img, tuple(logits.shape[1:]))
    for values in (None, [3, 7]):
        assert (refined_argmax(logits, img, (192, 256), values=values, photo=photo)
                == refined_argmax(logits, img, (192, 256), values=values)).all()
    three = torch.cat([logits, -logits[:1]])
    assert (refined_argmax(three, img, photo=photo) == refined_argmax(three, img)).all()
    with pytest.raises(ValueError):
        refined_argmax(logits, img, photo=photo_guide(img, tuple(logits.shape[1:]), radius=3))
    with pytest.raises(ValueError):
        refined_argmax(logits, img, photo=photo_guide(img, (12, 16)))
