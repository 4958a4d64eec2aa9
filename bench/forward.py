"""The served forward, A/B/C back to back on this machine, on a CCP val photo with 1, 3 and 12
clicked parts (and the previous prediction, as an annotator's clicks come):

A. the whole 51-channel input, autocast to bfloat16 (the forward up to 1f7a9dc);
B. the whole input, the weights cast to bfloat16 once (``weights_in``);
C. what ``Parser.logits`` runs now on the CPU: no input tensor, the first conv's output kept
   for the photo and the previous prediction (``FirstConvCache``) plus the convs of the
   clicks' map patches (``click_map_patches``, ``conv_of_patches``), then B's network.

Each round runs A, B and C in a random order. Prints the medians, the ratios and the largest
logit difference of C from A (in float32 too).

    .venv/bin/python bench/forward.py [--checkpoint PATH] [--repeats 40] [--threads 2]

Not a test: absolute numbers drift on shared machines; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.clicks import network_input
from ihp_backend.core.inference import Parser, denormals_flushed, network_size, scale_clicks

PHOTO = Path(__file__).resolve().parents[1] / "../shared/data/ccp/images/0001.jpg"


def clicks_on(image: np.ndarray, n: int, num_slots: int, seed: int = 0) -> np.ndarray:
    """``n`` clicks (y, x, slot) on distinct slots inside the photo's middle."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    ys = rng.uniform(0.2 * h, 0.8 * h, n)
    xs = rng.uniform(0.3 * w, 0.7 * w, n)
    return np.stack([ys, xs, rng.permutation(num_slots)[:n]], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt")
    ap.add_argument("--photo", default=str(PHOTO))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ckpt = read_checkpoint(args.checkpoint)
    served = Parser(ckpt, threads=args.threads, precision="bfloat16")  # C
    exact = Parser(ckpt, threads=args.threads, precision="float32")
    net16 = served.net
    net32 = exact.net  # float32 weights: A runs them under autocast
    image = np.asarray(Image.open(args.photo).convert("RGB"))
    hw = network_size(image.shape[:2], served.max_side)
    rows = {}
    for n in (1, 3, 12):
        clicks = clicks_on(image, n, served.num_slots)
        prev = served.parse(image, clicks[:-1]).network_labels  # the answer before the last click
        small, rgb = served._network_image(image, hw)
        whole = network_input(small, scale_clicks(clicks, image.shape[:2], hw), served.num_slots, prev, True,
                              served.mean, served.std, rgb=rgb)  # what A and B read
        dev = whole[None].contiguous(memory_format=torch.channels_last)
        read = 3 + n + len(np.unique(prev[(prev >= 0) & (prev < served.num_slots)]))  # carrying information

        def run_a():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net32(dev, features=True, vocab_context=False)[0].float()

        def run_b():
            return net16(dev.to(torch.bfloat16), features=True, vocab_context=False)[0].float()

        def run_c():
            return served.logits(image, clicks, prev)[None]  # the previous prediction kept: a click's steady state

        times: dict[str, list[float]] = {"A": [], "B": [], "C": []}
        with torch.inference_mode(), denormals_flushed():
            out_a, out_c = run_a(), run_c()
            a_is_b = torch.equal(out_a, run_b())
            diff16 = float((out_c - out_a).abs().max())
            whole32 = net32(dev, features=True, vocab_context=False)[0]  # (the context head serves no click)
            # bfloat16's own rounding as the scale: how often A's and C's argmax differ from float32's
            agree = {k: round(float((o.argmax(1) == whole32.argmax(1)).float().mean()), 5)
                     for k, o in (("A", out_a), ("C", out_c))}
            served32 = exact.logits(image, clicks, prev)[None]  # the served path, in float32
            diff32 = float((served32 - whole32).abs().max())
            order = np.random.default_rng(n)
            for r in range(args.repeats + 1):  # each round in its own random order
                runs = [("A", run_a), ("B", run_b), ("C", run_c)]
                for i in order.permutation(3):
                    name, f = runs[i]
                    t0 = time.perf_counter()
                    f()
                    if r:
                        times[name].append((time.perf_counter() - t0) * 1000)
        med = {k: round(statistics.median(v), 1) for k, v in times.items()}
        rows[n] = {"ms_p50": med, "input_channels_carrying_information": read,
                   "ratio_c_over_a": round(med["C"] / med["A"], 3), "ratio_b_over_a": round(med["B"] / med["A"], 3),
                   "max_logit_diff_c_vs_a_bf16": round(diff16, 4), "max_logit_diff_float32": diff32,
                   "argmax_agreement_with_float32": agree, "b_logits_identical_to_a": a_is_b}
        print(f"{n:2d} clicked parts, {read} of {dev.shape[1]} channels carry information: "
              f"A {med['A']} ms, B {med['B']} ms, C {med['C']} ms (C/A {rows[n]['ratio_c_over_a']}); "
              f"max |logit C - A| {diff16:.4f} (bfloat16), {diff32:.2e} (float32); stride-4 argmax as "
              f"float32's: A {agree['A']}, C {agree['C']}; B's logits A's to the bit: {a_is_b}")
    print(json.dumps({"hw": hw, "threads": args.threads, "repeats": args.repeats, "by_clicked_parts": rows}))


if __name__ == "__main__":
    main()
