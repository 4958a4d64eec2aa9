"""The forward with the first conv's output kept across clicks (``inference.FirstConvCache``)
against the first conv restricted to the channels read (``restricted_first_conv``, the clicked
maps read whole: the path off the CPU and with test-time flip), in one process: two Parsers of
the same checkpoint, ten clicks per photo cycling over the 12 slots (each parse fed the previous
one's network-size labels, choosing among the clicked labels and the unclaimed output, as
served), the two run alternately photo by photo (order swapped every round). Prints the
forward stage's p50 per click index and over clicks 2-10, and how many of the answers' pixels
differ between the two.

    PYTHONPATH=. .venv/bin/python bench/first_conv_cache.py [--scale 5] [--precision float32] [--rounds 6]

``--scale 5``: the bench's CCP photo enlarged 5x (11.4 MP, the network size is the same);
not a test, timings are noisy: run with nothing else on the CPU and compare medians.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from PIL import Image

from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions

PHOTO = "../shared/data/ccp/images/0002.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--scale", type=int, default=5)
    ap.add_argument("--precision", default="float32", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=6, help="photos; the first is a warm-up, not timed")
    a = ap.parse_args()
    ck = read_checkpoint(a.checkpoint)
    kw = ParserOptions().parser_kwargs()
    kw["precision"] = a.precision
    parsers = {"kept": Parser(ck, **kw), "restricted": Parser(ck, **kw)}
    parsers["restricted"]._stem = None  # the path before FirstConvCache
    print("precision", {m: p.precision for m, p in parsers.items()})
    photo = Image.open(PHOTO).convert("RGB")
    rng = np.random.default_rng(0)
    forward = {m: {j: [] for j in range(1, 11)} for m in parsers}
    differ = []
    for rnd in range(a.rounds):
        big = np.asarray(photo.resize((photo.width * a.scale, photo.height * a.scale), Image.BICUBIC))
        clicks = np.array([(rng.uniform(0.2, 0.8) * big.shape[0], rng.uniform(0.3, 0.7) * big.shape[1], i % 12)
                           for i in range(10)])
        answers = {}
        for m in (("kept", "restricted") if rnd % 2 == 0 else ("restricted", "kept")):
            p, prev = parsers[m], None
            for j in range(1, 11):
                allowed = sorted(set(clicks[:j, 2].astype(int).tolist())) + [p.unclaimed]
                res = p.parse(big, clicks[:j], allowed_slots=allowed, prev_mask=prev)
                prev = res.network_labels
                answers.setdefault(m, []).append(res.labels)
                if rnd:
                    forward[m][j].append(1000 * res.timings["forward"])
        differ += [float(np.mean(x != y)) for x, y in zip(answers["kept"], answers["restricted"])]
    for m in parsers:
        by_click = " ".join(f"{statistics.median(forward[m][j]):.1f}" for j in range(1, 11))
        rest = statistics.median([v for j in range(2, 11) for v in forward[m][j]])
        print(f"{m:>10}: forward p50 ms by click {by_click} | clicks 2-10 {rest:.1f}")
    print(f"answers' pixels that differ: mean {100 * np.mean(differ):.4f}%, max {100 * max(differ):.4f}%")


if __name__ == "__main__":
    main()
