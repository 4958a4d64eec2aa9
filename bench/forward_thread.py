"""How busy a CPU forward's OpenMP team is: the default network's forward at 576 x 384 (whole
input) timed in a loop on ``TorchThread.shared()``, the Parser built there (as served), (a) with
no torch op run on any other thread, (b) after one parallel torch op on the main thread, which
gives the main thread an OpenMP team of its own (as when the network was built on another thread).
Each case in a fresh child process, the cases taking turns ``--rounds`` times; prints ms per
forward and CPU time / wall time (2.0 on two cores when the team never idles).

    .venv/bin/python bench/forward_thread.py [--rounds 3]

Not a test: absolute numbers drift on shared machines; compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("one_team", "second_team")


def child(case: str, checkpoint: str) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from ihp_backend.core.checkpoint import read_checkpoint
    from ihp_backend.core.inference import Parser, TorchThread, denormals_flushed
    from ihp_backend.core.options import ParserOptions

    if case == "second_team":
        torch.ones(1 << 22).mul_(2.0)  # a parallel op: this thread's OpenMP team exists
    parser = Parser(read_checkpoint(checkpoint), **ParserOptions(precision="float32").parser_kwargs())

    def loop():
        x = torch.randn(1, parser.net.cfg.in_channels, 384, 576).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), denormals_flushed(True):
            for _ in range(3):
                parser.net(x, features=True)
            times, c0, w0 = [], time.process_time(), time.perf_counter()
            for _ in range(12):
                t = time.perf_counter()
                parser.net(x, features=True)
                times.append(1000 * (time.perf_counter() - t))
            return {"forward_ms": round(statistics.median(times), 1),
                    "cpu_over_wall": round((time.process_time() - c0) / (time.perf_counter() - w0), 2)}

    return TorchThread.shared().run(loop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "ihp_backend/models/default.pt"))
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.checkpoint)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in CASES}
    for r in range(a.rounds):
        for case in (CASES if r % 2 == 0 else CASES[::-1]):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--checkpoint",
                                  a.checkpoint], check=True, capture_output=True, text=True, cwd=ROOT)
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {case}: {runs[case][-1]}", file=sys.stderr)
    summary = {c: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for c, rs in runs.items()}
    print("| forward on | ms per forward | CPU / wall |\n|---|---|---|", file=sys.stderr)
    for c, m in summary.items():
        print(f"| {c} | {m['forward_ms']} | {m['cpu_over_wall']} |", file=sys.stderr)
    print(json.dumps({"rounds": a.rounds, "median_of_rounds": summary}))


if __name__ == "__main__":
    main()
