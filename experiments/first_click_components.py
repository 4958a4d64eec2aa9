"""Issue 27, the first click: where does the clicked part's mask fall short? For each photo the
progressive protocol's first click (one central click on the largest component of a random
part, `evaluate.evaluate_progressive`'s order and rng), then the clicked class's recall on the
clicked component and on the class's other components, and its precision. CCP photos, ccp12.
    .venv/bin/python experiments/first_click_components.py [--split train] [--limit 60] [--vocab-prior 0.5] [--no-zoom] [--vocab-share 0|1]
About 1 min per 60 photos on 2 cores (one forward per photo).
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from ihp_backend.core.inference import Parser  # noqa: E402
from ihp_backend.core.options import ParserOptions  # noqa: E402
from model_training import click_simulation as cs  # noqa: E402
from model_training.datasets import open_dataset  # noqa: E402
from model_training.evaluate import CorePredictor  # noqa: E402

SHARED = os.environ.get('IHP_SHARED_DIR', os.path.join(ROOT, '..', 'shared'))


def component_recall(pred: np.ndarray, gt: np.ndarray, cls: int, clicked: np.ndarray) -> dict:
    """Pixels of ``cls`` in the clicked component / elsewhere, and the share of each predicted."""
    own = gt == cls
    other = own & ~clicked
    hit = pred == cls
    return {"clicked_px": int(clicked.sum()), "other_px": int(other.sum()),
            "clicked_hit": int((hit & clicked).sum()), "other_hit": int((hit & other).sum()),
            "pred_px": int(hit.sum()), "true_pos": int((hit & own).sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "ihp_backend/models/default.pt"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--vocab-prior", type=float, default=ParserOptions.vocab_prior)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zoom", action="store_true")
    ap.add_argument("--vocab-share", type=int, default=int(ParserOptions.vocab_share))
    a = ap.parse_args(argv)
    ds = open_dataset("ccp", os.path.join(SHARED, "data/ccp"), a.split, "ccp12")
    opts = ParserOptions(precision="float32", vocab_prior=a.vocab_prior, zoom=not a.no_zoom,
                         vocab_share=bool(a.vocab_share))
    predictor = CorePredictor(Parser.from_file(a.checkpoint, **opts.parser_kwargs()), ds.classes)
    n = len(ds.classes)
    rows = {}
    for idx in range(min(a.limit, len(ds))):
        image, gt = ds.load(idx)
        gt = gt.astype(np.int64)
        rng = np.random.default_rng((a.seed, idx, 7))  # as evaluate_progressive
        parts = [int(c) for c in np.unique(gt) if 0 < c < n]
        cls = [parts[i] for i in rng.permutation(len(parts))][0]
        comp = cs.components(gt, cls)[0]
        y, x = cs.central_click(comp, rng, cs.N_CANDIDATES)
        pred = predictor(image, np.array([(y, x, cls)], np.float64), None)
        r = component_recall(pred, gt, cls, comp)
        acc = rows.setdefault(ds.classes[cls], {k: 0 for k in r} | {"n": 0})
        for k, v in r.items():
            acc[k] += v
        acc["n"] += 1
    out = {}
    for name, s in sorted(rows.items()):
        out[name] = {"n": s["n"], "other_share": round(s["other_px"] / max(1, s["clicked_px"] + s["other_px"]), 3),
                     "recall_clicked": round(s["clicked_hit"] / max(1, s["clicked_px"]), 3),
                     "recall_other": round(s["other_hit"] / max(1, s["other_px"]), 3),
                     "precision": round(s["true_pos"] / max(1, s["pred_px"]), 3)}
        print(f"{name:15s} " + " ".join(f"{k} {v}" for k, v in out[name].items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
