import glob
import os

import pytest
import torch
import yaml
from torchvision.models import mobilenet_v3_large, resnet50

from ihp_backend.core.checkpoint import Binding, binding_of, make_checkpoint, network_of, read_checkpoint, save_checkpoint
from ihp_backend.core.network import NetConfig, build_network, load_backbone_weights, load_widening
from tests.conftest import ROOT


@pytest.mark.parametrize("backbone", ["mobilenet_v3_large", "resnet50"])
def test_forward_shapes_and_stride4_features(backbone):
    cfg = NetConfig(num_slots=7, backbone=backbone, aspp_channels=32, decoder_channels=24)
    net = build_network(cfg).eval()
    x = torch.randn(1, cfg.in_channels, 96, 64)
    with torch.no_grad():
        out = net(x)
        logits4, feats = net(x, features=True)
    assert out.shape == (1, 7, 96, 64)
    assert logits4.shape == (1, 7, 24, 16) and feats.shape == (1, 24, 24, 16)
    first = net.encoder.first_conv()
    assert first.in_channels == 3 + 7 and first.kernel_size == (7, 7)


@pytest.mark.parametrize("backbone,ctor", [("mobilenet_v3_large", mobilenet_v3_large), ("resnet50", resnet50)])
def test_backbone_weights_from_local_file(tmp_path, backbone, ctor):
    ref = ctor(weights=None)
    path = str(tmp_path / "w.pth")
    torch.save(ref.state_dict(), path)
    net = build_network(NetConfig(num_slots=5, backbone=backbone, aspp_channels=16, decoder_channels=16))
    missing = load_backbone_weights(net, path)
    assert missing == []
    w = net.encoder.first_conv().weight
    assert torch.all(w[:, 3:] == 0)  # click channels start at zero
    key = "features.0.0.weight" if backbone.startswith("mobilenet") else "conv1.weight"
    if ref.state_dict()[key].shape[-1] == 7:
        assert torch.allclose(w[:, :3], ref.state_dict()[key])


def test_checkpoint_round_trip_weights_only(tmp_path):
    net = build_network(NetConfig(num_slots=4, aspp_channels=16, decoder_channels=16))
    ck = make_checkpoint(net, Binding("fixed", 4, ["bg", "a", "b", "c"]), 320, [0.5] * 3, [0.2] * 3, "v1",
                         {"metrics": {"miou": 0.5}})
    p = str(tmp_path / "c.pt")
    save_checkpoint(ck, p)
    back = read_checkpoint(p)
    assert back["model_version"] == "v1" and back["input_size"] == 320
    b = binding_of(back)
    assert b.kind == "fixed" and b.bind(["a"]) == {"a": 1}
    net2 = network_of(back)
    for (k, v), (k2, v2) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    torch.save({"format": "something-else"}, str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="not an IHP checkpoint"):
        read_checkpoint(str(tmp_path / "x.pt"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "model_training", "configs", "*.yaml"))))
def test_recipe_files_build(path):
    from model_training.train import load_config, sample_config
    cfg = load_config(path, [])
    nc = NetConfig.from_dict(cfg["net"])
    sc = sample_config(cfg, nc.num_slots)
    assert sc.binding in ("fixed", "shuffled") and cfg["steps"] > 0
    if "paper_" in path:
        assert nc.backbone == "resnet101" and cfg["lr"] == 0.0007 and cfg["batch_size"] == 12
        assert sc.crop == (473, 473) and sc.scale_range == (0.5, 1.5)


def test_folding_batchnorm_keeps_the_outputs():
    from ihp_backend.core.network import fold_batchnorm
    torch.manual_seed(0)
    net = build_network(NetConfig(num_slots=6))
    net.train()
    with torch.no_grad():  # move running statistics away from their initial values
        for _ in range(3):
            net(torch.randn(2, net.cfg.in_channels, 64, 48))
    net.eval()
    x = torch.randn(1, net.cfg.in_channels, 64, 48)
    with torch.no_grad():
        ref = net(x, features=True)[0]
        fold_batchnorm(net)
        out = net(x, features=True)[0]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_widening_the_input_keeps_what_the_network_computes():
    """init_from a model without the previous-prediction input: the added channels start at
    zero, so on any input the widened network answers exactly as the original did."""
    torch.manual_seed(0)
    small = NetConfig(num_slots=5, aspp_channels=16, decoder_channels=16)
    wide = NetConfig(num_slots=5, aspp_channels=16, decoder_channels=16, prev_mask=True)
    a = build_network(small).eval()
    b = build_network(wide).eval()
    widened = load_widening(b, a.state_dict())
    assert list(widened.values()) == [((16, 8, 7, 7), (16, 13, 7, 7))]  # the first conv only
    x = torch.randn(2, small.in_channels, 64, 48)
    x_wide = torch.cat([x, torch.rand(2, 5, 64, 48)], 1)  # whatever the previous prediction is
    with torch.no_grad():
        assert torch.allclose(a(x), b(x_wide), atol=1e-5)
    assert load_widening(a, a.state_dict()) == {}  # an ordinary load
    with pytest.raises(ValueError, match="cannot widen"):
        load_widening(a, b.state_dict())


def test_widening_the_decoder_keeps_what_the_network_computes_and_then_learns():
    """A wider stride-4 decoder and low-level projection (more capacity where the parse is
    drawn) from a trained narrower model: same logits at the start, and the new channels
    receive gradient through their (zero) outgoing weights, so training can use them."""
    torch.manual_seed(0)
    small = NetConfig(num_slots=5, aspp_channels=16, decoder_channels=16, low_level_channels=8)
    wide = NetConfig(num_slots=5, aspp_channels=16, decoder_channels=32, low_level_channels=12,
                     prev_mask=True)
    a = build_network(small)
    a.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        a(torch.randn(4, small.in_channels, 64, 48))
    a.eval()
    b = build_network(wide)
    widened = load_widening(b, a.state_dict())
    assert widened["classifier.weight"] == ((5, 16, 1, 1), (5, 32, 1, 1))
    assert widened["low_proj.0.weight"] == ((8, 24, 1, 1), (12, 24, 1, 1))
    b.eval()
    x = torch.randn(2, small.in_channels, 64, 48)
    x_wide = torch.cat([x, torch.rand(2, 5, 64, 48)], 1)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x_wide), atol=1e-5)
    b.train()
    b(x_wide).logsumexp(1).mean().backward()
    assert b.classifier.weight.grad[:, 16:].abs().sum() > 0
    with pytest.raises(ValueError, match="cannot widen"):  # the ASPP width is fixed
        load_widening(build_network(NetConfig(num_slots=5, aspp_channels=24, decoder_channels=16,
                                              low_level_channels=8)), a.state_dict())


def test_a_vocabulary_context_head_starts_silent_and_then_moves_only_the_vocabulary_channels():
    """``vocab_context`` added to a trained network: the same logits at the start (its last conv
    is zero); once its weights move, the vocabulary channels change and the slots do not."""
    torch.manual_seed(0)
    base = NetConfig(num_slots=5, aspp_channels=16, decoder_channels=16, unclaimed=True, vocab_size=4)
    ctx = NetConfig(**{**base.to_dict(), "vocab_context": 8})
    a = build_network(base)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        a(torch.randn(4, base.in_channels, 64, 48))
    a.eval()
    b = build_network(ctx).eval()
    widened = load_widening(b, a.state_dict())
    assert "vocab_context.out.weight" in widened
    x = torch.randn(2, base.in_channels, 64, 48)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)
        torch.nn.init.normal_(b.vocab_context.out.weight)
        torch.nn.init.normal_(b.vocab_context.out.bias)
        ya, yb = a(x), b(x)
    v = base.vocab_start
    assert torch.allclose(ya[:, :v], yb[:, :v], atol=1e-6)
    assert (ya[:, v:] - yb[:, v:]).abs().amax() > 1e-3


def test_the_low_rank_aspp_computes_what_the_aspp_does_when_its_kernels_have_that_rank():
    """network.low_rank_aspp: branches whose kernels all read the same rank-16 projection of the
    input are factored exactly at rank 16; at a lower rank the ASPP keeps its interface; a rank
    that saves no work returns the ASPP itself."""
    from ihp_backend.core.network import LowRankASPP, fold_batchnorm, low_rank_aspp, with_low_rank_aspp
    torch.manual_seed(0)
    net = fold_batchnorm(build_network(NetConfig(num_slots=4, aspp_channels=8, decoder_channels=8)).eval())
    shared = torch.randn(16, net.encoder.high_channels) / 30  # what every tap reads
    with torch.no_grad():
        for branch in list(net.aspp.convs)[:4]:
            w = branch[0].weight
            w.copy_((torch.randn(w.shape[2], w.shape[3], w.shape[0], 16) @ shared).permute(2, 3, 0, 1))
        x = torch.randn(1, net.encoder.high_channels, 9, 7)
        ref = net.aspp(x)
        exact = low_rank_aspp(net.aspp, 16)
        assert isinstance(exact, LowRankASPP) and exact.reduce.out_channels == 16
        assert [b[0].dilation for b in exact.branches] == [(1, 1), (6, 6), (12, 12), (18, 18)]
        assert torch.allclose(exact(x), ref, atol=1e-4), float((exact(x) - ref).abs().max())
        feats = torch.rand(net.encoder.high_channels, 500)
        aware = low_rank_aspp(net.aspp, 16, input_moment=feats @ feats.T / 500)  # fitted to such inputs
        assert torch.allclose(aware(x), ref, atol=1e-4), float((aware(x) - ref).abs().max())
        low = low_rank_aspp(net.aspp, 4)
        assert low(x).shape == ref.shape and not torch.allclose(low(x), ref, atol=1e-4)
    assert low_rank_aspp(net.aspp, 10_000) is net.aspp  # more work than the ASPP: unchanged
    assert with_low_rank_aspp(net, 0).aspp is net.aspp
    assert isinstance(with_low_rank_aspp(net, 16).aspp, LowRankASPP)


def test_own_mobilenet_v3_and_aspp_are_torchvisions_layer_for_layer():
    """``core.backbones`` (serving without torchvision) takes torchvision's state dicts strictly
    and computes the same outputs, BatchNorm statistics and dilation included."""
    from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

    from ihp_backend.core.backbones import ASPP, mobilenet_v3_large_features
    torch.manual_seed(0)
    pairs = [(mobilenet_v3_large(weights=None, dilated=True).features, mobilenet_v3_large_features(dilated=True),
              torch.randn(2, 3, 96, 64)),
             (TorchvisionASPP(64, [6, 12, 18], 16), ASPP(64, [6, 12, 18], 16), torch.randn(2, 64, 12, 8))]
    for theirs, ours, x in pairs:
        for m in theirs.modules():  # trained-looking statistics, not the identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), theirs.eval()(x))
    # seeded, the same random weights and the same random state after (tests with random networks,
    # training from scratch): torchvision's dropped classifier is drawn too
    torch.manual_seed(5)
    theirs, after = mobilenet_v3_large(weights=None, dilated=True).features, torch.rand(3)
    torch.manual_seed(5)
    ours = mobilenet_v3_large_features(dilated=True)
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))
    assert torch.equal(torch.rand(3), after)


def test_serving_imports_neither_torchvision_nor_dynamo():
    """torchvision's ops import torch._dynamo (about 75 MB per worker, a second at start): the
    backend, its default model loaded, runs without them."""
    import subprocess
    import sys
    code = ("import sys, ihp_backend._wsgi\n"
            "from ihp_backend.core.checkpoint import network_of, read_checkpoint\n"
            "network_of(read_checkpoint('ihp_backend/models/default.pt'))\n"
            "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
