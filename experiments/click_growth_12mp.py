"""Why the 10th click on a 12 MP photo costs more than the 2nd (issue 29), in process: the CCP
photo of ``bench/latency.py`` enlarged 5x, ten clicks on 10 of 12 slots (the bench's
positions), each parse fed the previous one's network-size labels and choosing among the clicked
labels and the unclaimed output, as served (without the vocabulary prior and share, which the
bench's LIP config adds). Then the 2nd and
the 10th parse are repeated alternately and timed by stage, with the refinement's parts wrapped
in timers; last, ``paint_clicks`` alone for the ten clicks.

    PYTHONPATH=. .venv/bin/python experiments/click_growth_12mp.py [--rounds 8] [--labels 12]

Not a test; medians of the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

import ihp_backend.core.inference as inference
import ihp_backend.core.refine as refine
from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.inference import Parser, network_size, read_channels, scale_clicks
from ihp_backend.core.options import ParserOptions

PHOTO = "../shared/data/ccp/images/0002.jpg"
TIMED = ((refine, "class_coefficients"), (refine, "network_size_argmax"), (inference, "refined_argmax"),
         (inference, "paint_clicks"), (inference, "previous_prediction"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--labels", type=int, default=12, help="the clicks cycle over this many labels (2: ten clicks, two labels)")
    a = ap.parse_args()
    parser = Parser(read_checkpoint(a.checkpoint), **ParserOptions().parser_kwargs())
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))
    big = np.asarray(Image.fromarray(photo).resize((photo.shape[1] * 5, photo.shape[0] * 5), Image.BICUBIC))
    rng = np.random.default_rng(0)
    clicks = np.array([(rng.uniform(0.2, 0.8) * big.shape[0], rng.uniform(0.3, 0.7) * big.shape[1], i % 12)
                       for i in range(10)])
    clicks[:, 2] %= a.labels
    def allowed(j):  # as served (label_rules.allowed_slots): the clicked labels' slots and the unclaimed one
        return sorted(set(clicks[:j, 2].astype(int).tolist())) + [parser.unclaimed]

    prev = [None]
    for j in range(1, 11):
        prev.append(parser.parse(big, clicks[:j], allowed_slots=allowed(j), prev_mask=prev[-1]).network_labels)
    hw = network_size(big.shape[:2], parser.max_side)
    for j in (2, 10):
        keep, ones = read_channels(parser.num_slots, scale_clicks(clicks[:j], big.shape[:2], hw), prev[j - 1],
                                   parser.use_prev_mask)
        print(f"click {j}: {len(keep)} input channels carry information, "
              f"{len(np.unique(prev[j - 1]))} labels in the previous parse")

    spent: dict[str, float] = {}
    for mod, name in TIMED:
        def timed(*args, _f=getattr(mod, name), _n=name, **kw):
            t = time.perf_counter()
            out = _f(*args, **kw)
            spent[_n] = spent.get(_n, 0.0) + time.perf_counter() - t
            return out
        setattr(mod, name, timed)
    stages: dict[int, dict[str, list[float]]] = {2: {}, 10: {}}
    for _ in range(a.rounds):
        for j in (2, 10):
            spent.clear()
            res = parser.parse(big, clicks[:j], allowed_slots=allowed(j), prev_mask=prev[j - 1])
            for k, v in list(res.timings.items()) + list(spent.items()):
                stages[j].setdefault(k, []).append(1000 * v)
    for j in (2, 10):
        print(f"click {j}, ms: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stages[j].items()))

    paint = getattr(refine.paint_clicks, "__wrapped__", None) or refine.paint_clicks
    labels = np.zeros(big.shape[:2], np.uint8)
    radius = parser.click_radius * max(big.shape[0] / hw[0], big.shape[1] / hw[1])
    times = []
    for _ in range(20):
        t = time.perf_counter()
        paint(labels, big, clicks, radius)
        times.append(time.perf_counter() - t)
    print(f"paint_clicks, 10 clicks at radius {radius:.0f} px: {1000 * statistics.median(times):.2f} ms")


if __name__ == "__main__":
    main()
