"""Where Label Studio's frontend spends a click: summarises the Chromium CPU profiles that the
browser flow test writes when ``IHP_BROWSER_PROFILE`` names a folder (one ``click_<n>.cpuprofile``
per click, from the click to the suggestions drawn; each also opens in Chrome DevTools):

    IHP_BROWSER_PROFILE=runs/browser_profile .venv/bin/python -m pytest -s -q \\
        tests/test_e2e_label_studio.py -k annotator_flow_click_accept
    .venv/bin/python bench/frontend_profile.py runs/browser_profile/click_*.cpuprofile

Prints, per profile, the sampled milliseconds of script by the browser work that the backend's
answer causes: canvas allocation (``setSize``/``scale`` under Konva's ``Layer.add``: a layer of
the stage's size per brush region), PNG encoding (``toDataURL``), ``getImageData``, the accepted
regions serialised back to RLE (``Region2RLE``), and the largest self times. Not a test: sampled times on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import collections
import json

# (label, the sampled function or None for any, a function that must be on its stack or None)
KINDS = (("layer canvas allocated (Konva Layer.add -> setSize)", "scale", "add"),
         ("region image encoded to PNG (toDataURL)", "toDataURL", None),
         ("region pixels read back (getImageData)", "getImageData", None),
         ("accepted regions re-encoded to RLE (Region2RLE)", None, "Region2RLE"))


def load(path: str) -> dict:
    with open(path) as f:
        prof = json.load(f)
    return prof.get("profile", prof)


def summarise(prof: dict, top: int = 8) -> dict:
    """Milliseconds per kind of work (``KINDS``), of script in all, and the ``top`` self times."""
    nodes = {n["id"]: n for n in prof["nodes"]}
    parent = {c: n["id"] for n in prof["nodes"] for c in n.get("children", [])}

    def stack(nid):
        while nid is not None:
            yield nodes[nid]["callFrame"]["functionName"]
            nid = parent.get(nid)

    self_ms, kinds = collections.Counter(), collections.Counter()
    for nid, dt in zip(prof["samples"], prof["timeDeltas"]):
        cf = nodes[nid]["callFrame"]
        name = cf["functionName"] or "(anonymous)"
        self_ms[f"{name} {cf['url'].rsplit('/', 1)[-1][:24]}"] += dt / 1000
        for label, fn, caller in KINDS:
            if (fn is None or name == fn) and (caller is None or caller in stack(parent.get(nid))):
                kinds[label] += dt / 1000
    idle = sum(v for k, v in self_ms.items() if k.startswith("(idle)"))
    return {"sampled_ms": round(sum(self_ms.values()), 1), "busy_ms": round(sum(self_ms.values()) - idle, 1),
            "by_kind_ms": {label: round(kinds[label], 1) for label, _, _ in KINDS},
            "top_self_ms": [(k, round(v, 1)) for k, v in self_ms.most_common(top)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", help="click_<n>.cpuprofile files of the browser flow test")
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    out = {}
    for path in a.profiles:
        s = out[path] = summarise(load(path), a.top)
        print(f"{path}: {s['busy_ms']} ms busy of {s['sampled_ms']} sampled")
        for label, ms in s["by_kind_ms"].items():
            print(f"  {ms:7.1f} ms  {label}")
        for name, ms in s["top_self_ms"]:
            print(f"  {ms:7.1f} ms  self: {name}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
