"""The README's results table from a ``scripts/evaluate_default.sh`` output folder (prints
Markdown; not a test):  .venv/bin/python bench/results_table.py runs/eval_default"""
from __future__ import annotations

import json
import os
import sys


def _paper(path: str, k=(0, 5, 10, 20)) -> dict | None:
    p = os.path.join(path, "summary.json")
    if not os.path.exists(p):
        return None
    r = json.load(open(p))["results"][0]
    c = r["miou_curve"]
    return {"images": r["images"], **{f"k{i}": c[i] if i < len(c) else None for i in k},
            "add": r["add"], "avg": r["avg"]}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table(out: str) -> str:
    rows = [("CCP val, 12 classes, central clicks on every part", "ccp12"),
            ("CCP val, 12 classes, three people side by side in one photo", "ccp12_three_people"),
            ("CCP val, pose-derived LIP-20 labels", "lip20"),
            ("CCP val, LIP-20, **no click** (zero-click parse, then corrections)", "lip20_zero_click"),
            ("real LIP samples (2, `crossdomain/lip`)", "crossdomain_lip"),
            ("real CIHP samples (5, several people)", "crossdomain_cihp"),
            ("real PASCAL-Person-Part samples (4)", "crossdomain_pascal_person_part")]
    lines = ["| photos, labels | images | mIoU@0 | mIoU@5 | mIoU@10 | mIoU@20 | Add. | Avg. clicks/class |",
             "|---|---|---|---|---|---|---|---|"]
    for name, sub in rows:
        r = _paper(os.path.join(out, sub))
        if r is None:
            continue
        add = "not reached" if r["add"] is None else str(r["add"])
        avg = "-" if r["avg"] is None else f"{r['avg']:.2f}"
        lines.append(f"| {name} | {r['images']} | {_pct(r['k0'])} | {_pct(r['k5'])} | {_pct(r['k10'])} | "
                     f"{_pct(r['k20'])} | {add} | {avg} |")
    prog = os.path.join(out, "ccp12_progressive", "progressive.json")
    if os.path.exists(prog):
        r = json.load(open(prog))["results"][0]
        curve = ", ".join(_pct(v) for v in r["miou_after_part"])
        lines += ["", f"Progressive protocol (CCP val, parts clicked one at a time, unclicked parts must stay "
                      f"unlabelled): mIoU after 1, 2, ... parts {curve}; the first clicked part's IoU "
                      f"{r['first_click_part_iou']:.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "runs/eval_default"))
