"""The ASPP factored through one shared low-rank projection (``core.network.low_rank_aspp``,
``IHP_ASPP_RANK``): for each rank, from the kernels alone (what is served) and fitted to the
ASPP's input on CCP train photos (``input_moment``), the share of stride-4 cells whose winner
(12 slots and the unclaimed channel) is the exact ASPP's, on other CCP train photos, and the
ASPP's time at 576 x 384 in float32.

    PYTHONPATH=. .venv/bin/python experiments/aspp_low_rank.py [--photos 24] [--ranks 64 96 128 192 256]

Inputs are the served forward's (experiments/float32_forward_alternatives.served_inputs: random
clicks on 1-11 slots, the click before as the previous prediction): photos 200-231 for the
moment, 0-23 for the agreement. Any backbone (``--checkpoint``): check a rank before serving it. Prints medians of interleaved runs. Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from experiments.float32_forward_alternatives import CCP, served_inputs
from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.inference import Parser
from ihp_backend.core.network import low_rank_aspp
from ihp_backend.core.options import ParserOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 96, 128, 192, 256])
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    parser = Parser(read_checkpoint(a.checkpoint), **ParserOptions(threads=2, precision="float32", zoom=False,
                                                                    aspp_rank=0).parser_kwargs())
    net = parser.net
    ids = [line.strip() for line in open(f"{CCP}/train.txt")]
    seen = {}  # the ASPP's and the low-level projection's inputs of the last forward (any backbone)
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].detach().clone()))
             for k, m in (("high", net.aspp), ("low", net.low_proj))]

    def feats(photos, seed):
        return [(seen["high"], seen["low"]) for _ in served_inputs(parser, photos, seed=seed)]
    with torch.inference_mode():
        fit = feats(ids[200:200 + 32], 0)
        test = feats(ids[:a.photos], 1000)
        for h in hooks:
            h.remove()
        x = torch.cat([h[0].flatten(1) for h, _ in fit], 1).double()
        moment = x @ x.T / x.shape[1]

        def logits(aspp, high, low):
            ctx = F.interpolate(aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
            return net.classifier(net.decoder(torch.cat([ctx, net.low_proj(low)], 1)))
        keep = list(range(12)) + [parser.unclaimed]
        ref = [logits(net.aspp, h, low)[0, keep].argmax(0) for h, low in test]

        def ms(fn, arg):
            out = []
            for _ in range(20):
                t = time.perf_counter()
                fn(arg)
                out.append(1000 * (time.perf_counter() - t))
            return statistics.median(out)
        for rank in a.ranks:
            for kind, m in (("kernels", None), ("fitted", moment)):
                lr = low_rank_aspp(net.aspp, rank, input_moment=m).eval().to(memory_format=torch.channels_last)
                agree = [float((logits(lr, h, low)[0, keep].argmax(0) == r).float().mean())
                         for (h, low), r in zip(test, ref)]
                h0 = test[0][0]
                for _ in range(3):
                    net.aspp(h0), lr(h0)
                exact, fast = ms(net.aspp, h0), ms(lr, h0)
                print(f"rank {rank:4d} {kind:8s}: winner as the exact ASPP's on {100 * np.mean(agree):.2f}% of "
                      f"cells (worst photo {100 * np.min(agree):.2f}%); ASPP {exact:.1f} -> {fast:.1f} ms")


if __name__ == "__main__":
    main()
