import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ihp_backend.core.clicks import localization_maps, network_input, scale_clicks
from tests.conftest import ROOT


def brute_force_maps(clicks, hw, num_slots, trunc=255.0):
    h, w = hw
    out = np.full((num_slots, h, w), trunc)
    for s in range(num_slots):
        pts = [(y, x) for y, x, c in clicks if int(c) == s]
        for py in range(h):
            for px in range(w):
                for y, x in pts:
                    out[s, py, px] = min(out[s, py, px], (py - y) ** 2 + (px - x) ** 2)
    return np.minimum(out, trunc) / trunc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maps_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    hw = (37, 53)
    clicks = [(rng.uniform(-2, 38), rng.uniform(-2, 54), rng.integers(0, 4)) for _ in range(7)]
    got = localization_maps(clicks, hw, 5)
    want = brute_force_maps(clicks, hw, 5)
    assert got.shape == (5, 37, 53) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_slot_without_clicks_is_all_ones_and_click_is_zero():
    m = localization_maps([(10, 12, 1)], (40, 40), 3)
    assert np.all(m[0] == 1) and np.all(m[2] == 1)
    assert m[1, 10, 12] == 0
    assert m[1, 10, 12 + 16] == 1  # 16^2 = 256 > 255: truncated
    assert m[1, 10, 12 + 15] == pytest.approx(225 / 255)


def test_bad_slot_rejected():
    with pytest.raises(ValueError):
        localization_maps([(1, 1, 7)], (8, 8), 3)


def test_scale_clicks_aligns_pixel_centres():
    c = scale_clicks([(0, 0, 1), (99, 199, 2)], (100, 200), (50, 100))
    np.testing.assert_allclose(c[:, :2], [[0, 0], [49, 99]])
    assert list(c[:, 2]) == [1, 2]


def test_network_input_channels():
    img = np.zeros((32, 48, 3), np.uint8)
    x = network_input(img, [(3, 4, 2)], 6)
    assert tuple(x.shape) == (3 + 6, 32, 48)
    x2 = network_input(img, [(3, 4, 2)], 6, prev_mask=np.full((32, 48), 2), use_prev_mask=True)
    assert tuple(x2.shape) == (3 + 12, 32, 48)
    assert float(x2[3 + 6 + 2].min()) == 1.0


@pytest.mark.parametrize("c,h,w,hh,ww", [(20, 104, 68, 832, 550), (5, 30, 40, 61, 83), (3, 10, 10, 10, 10),
                                         (4, 40, 30, 20, 15), (3, 1, 1, 5, 5), (9, 104, 68, 830, 550),
                                         (4, 9, 7, 100, 3), (6, 50, 50, 1024, 1024)])
def test_upsampled_argmax_equals_interpolate_then_argmax(c, h, w, hh, ww):
    """Serving interpolates only where the low-res labels change; the answer must not change."""
    import torch.nn.functional as F

    from ihp_backend.core.inference import upsampled_argmax
    gen = torch.Generator().manual_seed(c * h)
    smooth = F.interpolate(torch.randn(1, c, max(2, h // 6), max(2, w // 6), generator=gen), (h, w),
                           mode="bilinear", align_corners=False)[0] * 5
    for logits in (smooth, torch.randn(c, h, w, generator=gen)):
        ref = F.interpolate(logits[None], (hh, ww), mode="bilinear", align_corners=False)[0].argmax(0)
        assert np.array_equal(upsampled_argmax(logits, (hh, ww)), ref.numpy())


def test_parser_redraws_input_in_place_exactly(tiny_checkpoint):
    """Serving redraws only the changed click windows of its kept input buffer; every click
    sequence (added, moved, removed clicks; another image; an outside forward in between) must
    give the logits of a freshly built input."""
    from ihp_backend.core.inference import Parser, network_size

    parser = Parser.from_file(tiny_checkpoint, threads=1, max_side=64)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (90, 70, 3), dtype=np.uint8) for _ in range(2)]
    sequences = [[(10, 10, 1)], [(10, 10, 1), (50, 30, 2)], [(50, 30, 2)], [], [(89, 69, 23), (0, 0, 0)] * 3,
                 [(45.5, 35.2, 3)]]
    cases = [(img, np.asarray(clicks, float).reshape(-1, 3)) for img in images + images[:1] for clicks in sequences]
    got = [parser.logits(img, arr) for img, arr in cases]  # consecutive: the in-place path
    parser.forward(torch.zeros(1, 27, 64, 48))  # someone else's input in the buffer
    got.append(parser.logits(*cases[1]))
    for (img, arr), g in zip(cases + cases[1:2], got):
        hw = network_size(img.shape[:2], parser.max_side)
        small, rgb = parser._network_image(img, hw)
        ref = parser.forward(network_input(small, scale_clicks(arr, img.shape[:2], hw), 24, rgb=rgb)[None])[0]
        assert torch.allclose(g, ref, atol=1e-5)


def test_flip_parser_is_mirror_equivariant(tiny_checkpoint):
    """With test-time flip the logits of a mirrored photo with mirrored clicks are the mirror of
    the logits (up to float rounding), and the flip pass really changes the answer."""
    from ihp_backend.core.inference import Parser

    plain = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    flip = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, flip=True, precision="float32")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    clicks = np.array([[10, 5, 1], [40, 30, 2], [60, 47, 0]], float)
    mirrored = clicks.copy()
    mirrored[:, 1] = img.shape[1] - 1 - clicks[:, 1]
    a = flip.logits(img, clicks)
    b = flip.logits(np.ascontiguousarray(img[:, ::-1]), mirrored)
    assert torch.allclose(a, b.flip(-1), atol=1e-4)
    assert (a - plain.logits(img, clicks)).abs().max() > 10 * (a - b.flip(-1)).abs().max()


def test_flip_swaps_the_vocabulary_heads_left_and_right(tmp_path):
    """A mirrored photo shows the person's left arm as a right arm: with test-time flip, the
    vocabulary head's "Left-arm" score of a photo is the "Right-arm" score of its mirror (mirrored
    back), so flipping never mixes the sides of a zero-click parse; names without a side stay."""
    from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
    from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD
    from ihp_backend.core.inference import Parser
    from ihp_backend.core.network import NetConfig, build_network
    from ihp_backend.core.vocabulary import VOCABULARY, mirrored_channels

    torch.manual_seed(2)
    cfg = NetConfig(num_slots=24, aspp_channels=32, decoder_channels=32, low_level_channels=16,
                    prev_mask=True, unclaimed=True, vocab_size=len(VOCABULARY))
    net = build_network(cfg)
    torch.nn.init.normal_(net.classifier.weight, std=1.0)  # channels that differ from each other
    path = str(tmp_path / "vocab.pt")
    save_checkpoint(make_checkpoint(net, Binding("shuffled", 24, ["background"], vocabulary=VOCABULARY),
                                    256, IMAGENET_MEAN, IMAGENET_STD, "tiny-vocab"), path)
    swap = mirrored_channels()
    assert VOCABULARY[swap[VOCABULARY.index("Left-arm")]] == "Right-arm"
    assert VOCABULARY[swap[VOCABULARY.index("Right-shoe")]] == "Left-shoe"
    assert swap[VOCABULARY.index("Hair")] == VOCABULARY.index("Hair")
    flip = Parser.from_file(path, threads=1, max_side=64, flip=True, precision="float32")
    img = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    a = flip.logits(img, np.zeros((0, 3)))
    b = flip.logits(np.ascontiguousarray(img[:, ::-1]), np.zeros((0, 3))).flip(-1)
    v = cfg.vocab_start
    assert torch.allclose(a[:v], b[:v], atol=1e-4)  # slots and the unclaimed channel
    assert torch.allclose(a[v:], b[v:][swap], atol=1e-4)
    la, ra = v + VOCABULARY.index("Left-arm"), v + VOCABULARY.index("Right-arm")
    assert (a[la] - b[la]).abs().max() > 1e-3  # the swap is real: the sides differ


def test_cpu_has_native_bf16_reads_the_cpu_flags(tmp_path):
    from ihp_backend.core.inference import cpu_has_native_bf16

    def info(text):
        p = tmp_path / "cpuinfo"
        p.write_text(text)
        return str(p)

    assert cpu_has_native_bf16(info("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512_vnni\n"))
    assert cpu_has_native_bf16(info("flags : fpu amx_bf16 amx_tile\n"))
    assert not cpu_has_native_bf16(info("Features : fp asimd bf16 i8mm\n"))  # ARM: not measured
    assert not cpu_has_native_bf16(info("flags : fpu sse avx2 avx512f avx512bw\n"))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_pick_precision():
    from ihp_backend.core.inference import cpu_has_native_bf16, pick_precision

    cpu = torch.device("cpu")
    assert pick_precision("float32", cpu) == torch.float32
    assert pick_precision("BFloat16", cpu) == torch.bfloat16
    assert pick_precision(None, torch.device("cuda")) == torch.float32  # auto: float32 on CUDA
    assert pick_precision("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        pick_precision("fp16", cpu)


def test_auto_precision_keeps_the_faster_compute_type():
    """``auto`` times the forward in both compute types: a CPU flag alone mispredicted it on
    one of our machines (bfloat16 1.5x slower there). Here a net that is slow in bfloat16,
    then one that is slow in float32 (timed as served: weights and input cast)."""
    from ihp_backend.core.inference import faster_dtype

    class Slow(torch.nn.Module):
        def __init__(self, slow_in_bf16: bool):
            super().__init__()
            self.slow_in_bf16 = slow_in_bf16

        def forward(self, x, features=False):
            in_bf16 = x.dtype == torch.bfloat16
            time.sleep(0.02 if in_bf16 == self.slow_in_bf16 else 0.001)
            return x

    x = torch.zeros(1, 3, 8, 8)
    assert faster_dtype(Slow(slow_in_bf16=True), x) == torch.float32
    assert faster_dtype(Slow(slow_in_bf16=False), x) == torch.bfloat16


def test_precision_probe_flushes_only_the_forwards():
    """The probe times flushed forwards, but numpy must not first compute its float limits
    while flushing is on (it cached a smallest subnormal of zero and warned): run in a fresh
    process so that numpy.ma, whose import computes them, is not loaded yet."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"
        "from ihp_backend.core.inference import faster_dtype\n"
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x, features=False):\n"
        "        return x * 1.0\n"
        "faster_dtype(Net(), torch.zeros(1, 3, 8, 8), flush_denormals=True)\n"
        "import numpy as np\n"
        "assert np.finfo(np.float32).smallest_subnormal > 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_auto_parser_runs_one_of_the_two_types(tiny_checkpoint):
    from ihp_backend.core.inference import Parser

    p = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="auto")
    assert p.precision in ("float32", "bfloat16")


def test_bfloat16_parser_matches_float32(tiny_checkpoint):
    """bfloat16 autocast changes the logits by rounding only: same labels, float32 logits out."""
    from ihp_backend.core.inference import Parser

    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)
    clicks = np.array([[10, 5, 1], [40, 30, 2], [60, 47, 0]], float)
    full = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    half = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="bfloat16")
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    a, b = full.logits(img, clicks), half.logits(img, clicks)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert 0 < (a - b).abs().max()  # the bfloat16 path really ran
    la = full.parse(img, clicks).labels
    lb = half.parse(img, clicks).labels
    assert (la == lb).mean() > 0.95


def test_bfloat16_weights_cast_once_compute_what_autocast_computes(tiny_checkpoint):
    """The served bfloat16 forward casts the weights once (``weights_in``) instead of autocast
    casting them on every call: the logits are autocast's, up to bfloat16 rounding of the order
    of operations (the default model gave identical ones), and the float32 net is not touched."""
    from ihp_backend.core.inference import Parser, weights_in

    full = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    net16 = weights_in(full.net, torch.bfloat16)
    assert weights_in(full.net, torch.float32) is full.net
    assert net16 is not full.net and all(p.dtype == torch.bfloat16 for p in net16.parameters())
    assert all(p.dtype == torch.float32 for p in full.net.parameters())
    x = torch.randn(2, full.net.cfg.in_channels, 64, 48).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = full.net(x, features=True)[0].float()
        got = net16(x.to(torch.bfloat16), features=True)[0].float()
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.99


def test_precision_setting_is_checked(monkeypatch):
    from ihp_backend.settings import Settings

    monkeypatch.setenv("IHP_PRECISION", "bfloat16")
    assert Settings.from_env().precision == "bfloat16"
    monkeypatch.setenv("IHP_PRECISION", "half")
    with pytest.raises(SystemExit, match="IHP_PRECISION must be one of auto, float32, bfloat16"):
        Settings.from_env()


def test_cpu_forward_flushes_denormals_and_restores_the_thread(tiny_checkpoint):
    """Denormals slow CPU float math several-fold: the forward runs with flushing on, in the
    request's own thread (the flag is per thread), and leaves the thread as it found it."""
    import threading

    from ihp_backend.core.inference import Parser, denormals_flushed

    def tiny_survives():
        return (torch.tensor([1e-39]) * 1.0).item() != 0.0

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    with denormals_flushed():
        assert not tiny_survives()
    assert tiny_survives()
    p = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    assert tiny_survives()
    forward, seen = p.net.forward, {}

    def recording_forward(*args, **kwargs):
        seen["tiny_survives_in_forward"] = tiny_survives()
        return forward(*args, **kwargs)

    p.net.forward = recording_forward
    img = np.random.default_rng(3).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    clicks = np.array([[10, 5, 1], [40, 30, 2]], float)

    def request():
        seen["labels"] = p.parse(img, clicks).labels
        seen["tiny_survives_after"] = tiny_survives()

    t = threading.Thread(target=request)
    t.start()
    t.join()
    assert seen["tiny_survives_in_forward"] is False
    assert seen["tiny_survives_after"] is True
    assert seen["labels"].shape == (64, 48)


def test_parser_redraws_previous_prediction_planes_exactly(tmp_path):
    """For a network with the previous-prediction input, the in-place redraw updates only the
    pixels whose previous label changed; any sequence of previous masks (none, a mask, another,
    values outside the slots, none again, a new image) gives the logits of a fresh input."""
    from ihp_backend.core.checkpoint import Binding, make_checkpoint, save_checkpoint
    from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD
    from ihp_backend.core.inference import Parser, network_size
    from ihp_backend.core.network import NetConfig, build_network

    torch.manual_seed(0)
    net = build_network(NetConfig(num_slots=24, aspp_channels=32, decoder_channels=32, low_level_channels=16,
                                  prev_mask=True, unclaimed=True))
    path = str(tmp_path / "prev.pt")
    save_checkpoint(make_checkpoint(net, Binding("shuffled", 24, ["background", "part"]), 64,
                                    IMAGENET_MEAN, IMAGENET_STD, "tiny-prev", {}), path)
    parser = Parser.from_file(path, threads=1, max_side=64, precision="float32")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (90, 70, 3), dtype=np.uint8) for _ in range(2)]
    hw = network_size(images[0].shape[:2], 64)
    masks = [None, rng.integers(0, 5, hw), rng.integers(0, 5, hw).astype(np.uint8), np.full(hw, 24, np.uint8),
             rng.integers(-1, 30, hw), rng.integers(0, 256, hw).astype(np.uint8), None]
    clicks = np.array([[10, 10, 1], [50, 30, 2]], float)
    cases = [(img, m) for img in images for m in masks] + [(images[0], masks[2])]
    got = [parser.logits(img, clicks, m) for img, m in cases]
    for (img, m), g in zip(cases, got):
        small, rgb = parser._network_image(img, hw)
        x = network_input(small, scale_clicks(clicks, img.shape[:2], hw), 24, m, True, rgb=rgb)
        assert torch.allclose(g, parser.forward(x[None])[0], atol=1e-5)
