"""Does a worker's memory grow with the edge refiner's batch shapes? (docs/performance.md, "Memory
that grew with every click's shapes"). Runs the refiner on 200 differently sized crops of one
served parse (the bench's CCP photo, five clicks) and prints the RSS growth every 50 calls, for
this tree's ``core.edges`` or, with ``--rev``, that git revision's (``2f2130d``: before the
batches were padded to fixed shapes). One process per run; compare two runs.

    PYTHONPATH=. .venv/bin/python experiments/edge_refiner_memory.py [--rev 2f2130d]
"""
from __future__ import annotations

import argparse
import os
import subprocess

import numpy as np
import torch

from bench.latency import ccp_photo, status_mb
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import SHIPPED_EDGE_REFINER, ParserOptions
from ihp_backend.settings import DEFAULT_CHECKPOINT


def rss_mb() -> float:
    return status_mb(os.getpid(), "VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", help="git revision whose ihp_backend/core/edges.py to run instead of this tree's")
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.rev:
        src = subprocess.run(["git", "show", f"{a.rev}:ihp_backend/core/edges.py"], capture_output=True,
                             text=True, check=True).stdout
        edges: dict = {}
        exec(compile(src, f"edges@{a.rev}", "exec"), edges)
    else:
        import ihp_backend.core.edges as module
        edges = vars(module)
    image = ccp_photo()
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    clicks = np.array([(rng.uniform(.2, .8) * h, rng.uniform(.3, .7) * w, i) for i in range(5)])
    parser = Parser.from_file(DEFAULT_CHECKPOINT, **dict(ParserOptions().parser_kwargs(), edge_refiner=None))
    labels = parser.parse(image, clicks, allowed_slots=list(range(5)) + [parser.unclaimed]).labels
    net = edges["load_edge_refiner"](SHIPPED_EDGE_REFINER).to(torch.bfloat16)
    edges["refine_edges"](labels, image, net)
    start = rss_mb()
    for i in range(1, a.calls + 1):
        ch, cw = int(rng.integers(h // 3, h)), int(rng.integers(w // 3, w))
        edges["refine_edges"](labels[:ch, :cw], image[:ch, :cw], net)
        if i % 50 == 0:
            print(f"{a.rev or 'this tree'}: after {i} calls RSS +{rss_mb() - start:.1f} MB")


if __name__ == "__main__":
    main()
