"""``fit``: fine-tune the serving model on one project's accepted annotations, then gate it.

Started by the backend as a separate process (never inside a request):

    python -m model_training.finetune --model-dir MODEL_DIR --project 3

One job per project at a time (an exclusive lock file); requests that arrive during a run are
picked up by the same job when it finishes. A run:

1. decodes newly stored annotations (``ihp_backend.annotations``);
2. splits the project's samples into train and a held-out slice (every task whose id hashes
   into the last ``holdout`` fraction; never trained on);
3. fine-tunes from the project's serving model (or the embedded default) with the project's
   own class-aware binding: ``fixed`` channels for its labels (the paper's class-aware model),
   mapped onto the slots the label-agnostic parent gave them, with the paper's click
   simulation and losses;
4. evaluates parent and candidate on the held-out slice with the NoC harness;
5. promotes the candidate only if it is not worse (mean data-set mIoU over k = 0..K
   corrections, ties allowed); every version is kept with its metrics.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from ihp_backend.annotations import AnnotationStore
from ihp_backend.checkpoint import Binding, read_checkpoint, save_checkpoint
from ihp_backend.inference import Parser
from ihp_backend.ls_format import parse_label_config
from ihp_backend.registry import Registry

from .datasets import LIP_FLIP, ParsingDataset
from .evaluate import CorePredictor, EvalConfig, evaluate
from .train import load_config, train

DEFAULT_RECIPE = {
    "sample": {"crop": [320, 224], "base_scale": 0.5, "scale_range": [0.8, 1.2], "strategy": "random",
               "max_extra": 10, "p_background_click": 0.5, "p_extra": 0.7, "min_area": 16, "binding": "fixed"},
    "optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4, "batch_size": 8, "workers": 0,
    "sp_weight": 1.0, "iterative": {"enabled": True, "max_rounds": 2, "p": 0.5},
    "log_every": 10, "save_every": 1000000, "seed": 0,
}


class ArrayDataset(ParsingDataset):
    """In-memory samples (already in slot space) behind the ParsingDataset interface."""

    def __init__(self, images, labels, classes, flip_pairs=()):
        super().__init__("project", [(str(i), "", "") for i in range(len(images))], classes, list(flip_pairs))
        self.images, self.labels = images, labels

    def load(self, i):
        return self.images[i], self.labels[i]


def in_holdout(task_id: str, fraction: float) -> bool:
    h = int(hashlib.sha1(str(task_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h >= 1.0 - fraction


def project_binding(parent: dict, labels: list[str]) -> tuple[Binding, dict[str, int]]:
    """The project's class-aware binding: each label keeps the slot the parent gives it."""
    pb = Binding(parent["binding"], int(parent["net"]["num_slots"]), list(parent.get("class_names", [])),
                 tuple(parent.get("background_names", ("background", "bg"))))
    slot_of = pb.bind(labels)
    names = [""] * pb.num_slots
    names[0] = next((lab for lab in labels if pb.is_background(lab)), "Background")
    for lab, s in slot_of.items():
        names[s] = lab
    return Binding("fixed", pb.num_slots, names, pb.background_names), slot_of


def to_slots(sample: dict, slot_of: dict[str, int]) -> np.ndarray:
    """Label map in the config's class indices (255 = not covered) -> slot indices (bg = 0)."""
    lut = np.full(256, 0, np.uint8)
    for i, name in enumerate(sample["classes"]):
        lut[i] = slot_of.get(name, 0)
    lut[255] = 0
    return lut[sample["labels"]]


def score(result) -> float:
    """Gate score: mean data-set mIoU over k = 0..K corrections (higher is better)."""
    return float(np.mean(result.miou_curve))


def promote(parent_result, candidate_result) -> bool:
    """The promotion gate: the candidate replaces the parent unless it is worse on the slice."""
    return score(candidate_result) >= score(parent_result) - 1e-9


def run_once(model_dir: str, project: str, default_checkpoint: str, steps: int, holdout: float,
             max_corrections: int, standard: float, status, overrides: dict | None = None) -> dict:
    store = AnnotationStore(os.path.join(model_dir, "annotations.db"))
    reg = Registry(model_dir)
    store.decode_pending(project)
    cfg_xml = store.project_config(project)
    if not cfg_xml:
        return {"status": "skipped", "reason": "no label config stored for the project"}
    labels = list(parse_label_config(cfg_xml).labels)
    samples = store.samples(project)
    train_s = [s for s in samples if not in_holdout(s["task"], holdout)]
    held = [s for s in samples if in_holdout(s["task"], holdout)]
    if len(train_s) < 2 or not held:
        return {"status": "skipped", "reason": f"need >= 2 training and >= 1 held-out samples, have "
                                                f"{len(train_s)} and {len(held)}", "samples": len(samples)}
    parent_path = reg.serving_path(project) or default_checkpoint
    parent = read_checkpoint(parent_path)
    binding, slot_of = project_binding(parent, labels)
    ds = ArrayDataset([s["image"] for s in train_s], [to_slots(s, slot_of) for s in train_s], binding.class_names,
                      LIP_FLIP)
    cfg = load_config(None, [])
    cfg.update(json.loads(json.dumps(DEFAULT_RECIPE)))
    cfg["net"] = dict(parent["net"])
    cfg["steps"] = steps
    cfg.update(overrides or {})
    cfg["input_size"] = parent["input_size"]
    cfg["data"] = {"kind": "label-studio-project", "root": project, "split": "train", "merge": None}
    version = reg.new_version_name(project)
    cfg["model_version"] = version
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        cfg["out"] = tmp
        status({"phase": "training", "step": 0, "steps": steps, "version": version, "samples": len(train_s),
                "held_out": len(held)})
        train(cfg, dataset=ds, init_state=parent["state_dict"], binding=binding,
              on_step=lambda st, tot, rec: status({"phase": "training", "step": st, "steps": tot,
                                                    "version": version, "loss": rec["loss"]}) if st % 5 == 0 else None)
        cand = read_checkpoint(os.path.join(tmp, "last.pt"))
    cand["training"] = {k: v for k, v in cand["training"].items() if k not in ("optimizer", "config")}
    cand["training"].update(parent_version=parent.get("model_version"), samples=len(train_s), held_out=len(held))
    status({"phase": "evaluating", "version": version})
    classes = [n for n in binding.class_names if n]
    gts = []
    for s in held:
        sl = to_slots(s, slot_of)
        idx = np.zeros(256, np.int64)
        for i, n in enumerate(classes):
            idx[binding.class_names.index(n)] = i
        gts.append((s["image"], idx[sl]))
    ecfg = EvalConfig(standard=standard, max_corrections=max_corrections, min_area=16)
    r_parent = evaluate(CorePredictor(Parser(parent), classes), gts, classes, ecfg, progress=False)
    r_cand = evaluate(CorePredictor(Parser(cand), classes), gts, classes, ecfg, progress=False)
    metrics = {"parent": r_parent.summary(), "candidate": r_cand.summary(),
               "gate": {"metric": "mean mIoU over k=0..K", "parent": score(r_parent), "candidate": score(r_cand)}}
    promoted = promote(r_parent, r_cand)
    cand["training"]["metrics"] = metrics
    reg.add_version(project, version, cand, metrics, promote=promoted)
    return {"status": "done", "version": version, "promoted": promoted, "metrics": metrics["gate"],
            "parent": parent.get("model_version")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--project", required=True)
    ap.add_argument("--default-checkpoint", default=None)
    ap.add_argument("--steps", type=int, default=int(os.environ.get("IHP_FIT_STEPS", "250")))
    ap.add_argument("--holdout", type=float, default=float(os.environ.get("IHP_FIT_HOLDOUT", "0.2")))
    ap.add_argument("--every", type=int, default=int(os.environ.get("IHP_TRAIN_EVERY", "10")))
    ap.add_argument("--max-corrections", type=int, default=5)
    ap.add_argument("--standard", type=float, default=0.85)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("IHP_FIT_THREADS", "1")))
    a = ap.parse_args(argv)
    from ihp_backend.settings import DEFAULT_CHECKPOINT
    torch.set_num_threads(a.threads)
    reg = Registry(a.model_dir)
    store = AnnotationStore(os.path.join(a.model_dir, "annotations.db"))
    lock_path = os.path.join(reg.project_dir(a.project), "train.lock")
    from ihp_backend.locks import project_lock
    while True:
        with project_lock(lock_path) as got:
            if not got:
                print(json.dumps({"status": "busy", "project": a.project}))
                return
            while True:
                ticket = store.pending(a.project, a.every)
                if ticket is None:
                    break
                t0 = time.time()
                try:
                    res = run_once(a.model_dir, a.project, a.default_checkpoint or DEFAULT_CHECKPOINT, a.steps,
                                   a.holdout, a.max_corrections, a.standard,
                                   lambda st: reg.write_job(a.project, {**st, "pid": os.getpid(), "started": t0}))
                except Exception as e:  # recorded for /health; the request stays pending for a retry
                    reg.write_job(a.project, {"phase": "failed", "error": f"{type(e).__name__}: {e}",
                                              "trace": traceback.format_exc()[-2000:], "finished": time.time()})
                    raise
                res["seconds"] = round(time.time() - t0, 1)
                store.consume(a.project, ticket)
                reg.write_job(a.project, {"phase": "idle", "last": res, "finished": time.time()})
                print(json.dumps(res), flush=True)
        # an event may have arrived between the last check and the unlock: look once more
        if store.pending(a.project, a.every) is None:
            return

if __name__ == "__main__":
    sys.exit(main())
