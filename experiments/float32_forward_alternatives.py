"""Ways to run the default's forward faster in float32 (a CPU without native bfloat16), each
against the served eager channels-last forward, on stride-4 logits at 576 x 384:

1. the memory layout: NCHW instead of channels-last;
2. TorchScript, frozen and ``optimize_for_inference`` (oneDNN fusions);
3. int8 (``torch.ao`` FX post-training quantization, x86 engine) of the ASPP, low-level
   projection, decoder and classifier, calibrated on the served inputs of CCP train photos
   200-223, compared with float32 on photos 0-23 (stride-4 argmax agreement over the 12 slots
   and the unclaimed channel);
4. the ASPP's dilated 3x3 convs as one matrix product per tap over only the pixels whose tap
   falls inside the map (at 36 x 24 most dilation-18 taps fall in the zero padding); exact;
5. ``torch.compile`` (inductor, C++ on the CPU) of the stride-4 forward (``--compile``: about a
   minute to compile).

    PYTHONPATH=. .venv/bin/python experiments/float32_forward_alternatives.py [--photos 24]

Prints medians of interleaved runs. Not a test. Measured on 2026-12-07 (docs/performance.md,
"On a CPU without native bfloat16" and "The ASPP through one shared low-rank projection"): none is
worth serving; what was, the ASPP factored at rank 128, is experiments/aspp_low_rank.py.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions

CCP = "../shared/data/ccp"


def timed(fn, *args, repeats: int = 15) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(*args)
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


class StrideFour(nn.Module):
    """The network's stride-4 logits from its full input (as ``forward(features=True)``)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_features(x)[0]


class Head(nn.Module):
    """ASPP, low-level projection, decoder and classifier: (stride-16, stride-4 features) -> logits."""

    def __init__(self, net):
        super().__init__()
        self.aspp, self.low_proj, self.decoder, self.classifier = net.aspp, net.low_proj, net.decoder, net.classifier

    def forward(self, high, low):
        ctx = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(torch.cat([ctx, self.low_proj(low)], 1)))


class TapASPP(nn.Module):
    """torchvision's ASPP (batch norm folded) with each dilated conv as per-tap matrix products
    over the in-map pixels only; the 1x1 branch and the centre taps in one product."""

    def __init__(self, aspp):
        super().__init__()
        convs = list(aspp.convs)
        one, dilated = convs[0][0], [c[0] for c in convs[1:4]]
        self.pool, self.project, self.n = convs[4], aspp.project, one.out_channels
        self.dilations = [c.dilation[0] for c in dilated]
        self.register_buffer("w_centre", torch.cat([one.weight[:, :, 0, 0]] + [c.weight[:, :, 1, 1] for c in dilated]).t())
        self.register_buffer("b_centre", torch.cat([one.bias] + [c.bias for c in dilated]))
        self.register_buffer("w_taps", torch.stack([torch.stack([c.weight[:, :, ky, kx].t() for ky in range(3)
                                                                 for kx in range(3)]) for c in dilated]))

    def forward(self, x):
        b, cin, h, w = x.shape
        xl = x.permute(0, 2, 3, 1).contiguous()
        y = torch.addmm(self.b_centre, xl.reshape(-1, cin), self.w_centre).reshape(b, h, w, -1)
        n = self.n
        for i, d in enumerate(self.dilations):
            yi = y[..., n * (i + 1): n * (i + 2)]
            for k in range(9):
                dy, dx = (k // 3 - 1) * d, (k % 3 - 1) * d
                y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
                if (dy, dx) == (0, 0) or y0 >= y1 or x0 >= x1:
                    continue
                yi[:, y0:y1, x0:x1].add_(xl[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx] @ self.w_taps[i, k])
        return self.project(torch.cat([torch.relu_(y).permute(0, 3, 1, 2), self.pool(x)], 1))


def served_inputs(parser: Parser, ids: list[str], seed: int) -> list[torch.Tensor]:
    """The first conv's outputs of the served forward on these photos (random clicks on 1-11
    of 12 slots, the click before as the previous prediction)."""
    net, captured, forward = parser.net, [], parser.net.forward

    def recording(x, features=False, first_conv=None):
        captured.append((first_conv or net.encoder.first_conv())(x).detach().clone())
        return forward(x, features=features, first_conv=first_conv)
    net.forward = recording
    try:
        allowed = list(range(12)) + [parser.unclaimed]
        for k, i in enumerate(ids):
            img = np.asarray(Image.open(f"{CCP}/images/{i}.jpg").convert("RGB"))
            rng = np.random.default_rng(seed + k)
            n = int(rng.integers(2, 12))
            clicks = np.array([(rng.uniform(0.15, 0.85) * img.shape[0], rng.uniform(0.3, 0.7) * img.shape[1], j % 12)
                               for j in range(n)])
            prev = parser.parse(img, clicks[:-1], allowed_slots=allowed).network_labels
            captured.clear()
            parser.parse(img, clicks, allowed_slots=allowed, prev_mask=prev)
            yield captured[0]
    finally:
        net.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--compile", action="store_true", help="5. also time torch.compile of the forward")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # as the served forward runs (inference.denormals_flushed)
    parser = Parser(read_checkpoint(a.checkpoint), **ParserOptions(threads=2, precision="float32", zoom=False,
                                                                    aspp_rank=0).parser_kwargs())  # the exact ASPP
    net = parser.net
    x = torch.randn(1, net.cfg.in_channels, 576, 384).contiguous(memory_format=torch.channels_last)
    eager = StrideFour(net).eval()
    nchw = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(eager, x).eval()))
    for _ in range(2):
        print(f"1-2. stride-4 forward: eager channels-last {timed(eager, x):.1f} ms, NCHW "
              f"{timed(nchw, x.contiguous()):.1f} ms, TorchScript frozen {timed(frozen, x):.1f} ms")
    if a.compile:
        t = time.perf_counter()
        compiled = torch.compile(eager)
        with torch.inference_mode():
            diff = float((compiled(x) - eager(x)).abs().max())
        print(f"5. torch.compile: {time.perf_counter() - t:.0f} s to compile, largest difference {diff:.1e}")
        for _ in range(3):
            print(f"5. stride-4 forward: eager {timed(eager, x):.1f} ms, compiled {timed(compiled, x):.1f} ms")

    ids = [line.strip() for line in open(f"{CCP}/train.txt")]
    stem = nn.Sequential(*list(net.encoder.low[0])[1:], *list(net.encoder.low)[1:])
    with torch.inference_mode():
        def feats(y0s):
            return [(net.encoder.high(low), low) for low in (stem(y) for y in y0s)]
        calib = feats(served_inputs(parser, ids[200:200 + a.photos], seed=0))
        test = feats(served_inputs(parser, ids[:a.photos], seed=1000))
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    torch.backends.quantized.engine = "x86"
    head = Head(net).eval()
    prepared = prepare_fx(copy.deepcopy(head), get_default_qconfig_mapping("x86"), example_inputs=calib[0])
    with torch.inference_mode():
        for f in calib:
            prepared(*f)
        int8 = convert_fx(prepared)
        keep = list(range(12)) + [parser.unclaimed]
        agree = [float((head(*f)[0, keep].argmax(0) == int8(*f)[0, keep].argmax(0)).float().mean()) for f in test]
    for _ in range(2):
        print(f"3. head float32 {timed(head, *test[0]):.1f} ms, int8 {timed(int8, *test[0]):.1f} ms; stride-4 argmax "
              f"agreement mean {np.mean(agree):.4f}, worst photo {np.min(agree):.4f}")

    taps = TapASPP(net.aspp).eval()
    with torch.inference_mode():
        err = max(float((net.aspp(h) - taps(h)).abs().max()) for h, _ in test[:4])
    for _ in range(2):
        print(f"4. ASPP at {tuple(test[0][0].shape[-2:])}: conv {timed(net.aspp, test[0][0]):.1f} ms, per-tap products "
              f"{timed(taps, test[0][0]):.1f} ms (max difference {err:.1e})")


if __name__ == "__main__":
    main()
