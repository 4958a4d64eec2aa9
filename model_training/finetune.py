"""``fit``'s training step as a library: fine-tune a model on one project's accepted annotations
and gate it (no storage, no locks: the server's fit job, ``ihp_backend.fit_job``, reads the
samples, calls ``fine_tune`` and records the version).

1. the project's samples come split into train and a held-out slice (``in_holdout``: every task
   whose id hashes into the last ``holdout`` fraction; never trained on);
2. fine-tunes from the parent with the project's own class-aware binding: ``fixed`` channels for
   its labels (the paper's class-aware model), mapped onto the slots the label-agnostic parent
   gave them, with the paper's click simulation and losses;
3. evaluates parent and candidate on the held-out slice with the NoC harness;
4. the gate (``promote``): the candidate is promoted only if it is not worse (mean data-set mIoU
   over k = 0..K corrections, ties allowed).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np

from ihp_backend.core.checkpoint import Binding, binding_of, read_checkpoint
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions

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
    pb = binding_of(parent)
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


def fine_tune(parent: dict, labels: list[str], train_samples: list[dict], held_samples: list[dict],
              version: str, workdir: str, steps: int, max_corrections: int = 5, standard: float = 0.85,
              status=lambda st: None, overrides: dict | None = None,
              options: ParserOptions | None = None) -> tuple[dict, dict, bool]:
    """Fine-tune ``parent`` (a checkpoint dict) on a project's samples (``{"task", "image",
    "labels", "classes"}``, labels in the config's class indices) with the project's class-aware
    binding, then evaluate parent and candidate on ``held_samples`` with the NoC harness, both
    run with ``options`` (the fit job passes the server's, so the gate judges what is served;
    None: ``ParserOptions()``, the served defaults). Returns (candidate checkpoint, metrics,
    promoted by the gate). No storage: the caller (the server's fit job) reads the samples and
    records the version."""
    binding, slot_of = project_binding(parent, labels)
    ds = ArrayDataset([s["image"] for s in train_samples], [to_slots(s, slot_of) for s in train_samples],
                      binding.class_names, LIP_FLIP)
    cfg = load_config(None, [])
    cfg.update(json.loads(json.dumps(DEFAULT_RECIPE)))
    cfg["net"] = dict(parent["net"])
    cfg["steps"] = steps
    cfg.update(overrides or {})
    cfg["input_size"] = parent["input_size"]
    cfg["data"] = {"kind": "label-studio-project", "root": "project", "split": "train", "merge": None}
    cfg["model_version"] = version
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cfg["out"] = tmp
        status({"phase": "training", "step": 0, "steps": steps, "version": version,
                "samples": len(train_samples), "held_out": len(held_samples)})
        train(cfg, dataset=ds, init_state=parent["state_dict"], binding=binding,
              on_step=lambda st, tot, rec: status({"phase": "training", "step": st, "steps": tot,
                                                    "version": version, "loss": rec["loss"]}) if st % 5 == 0 else None)
        cand = read_checkpoint(os.path.join(tmp, "last.pt"))
    cand["training"] = {k: v for k, v in cand["training"].items() if k not in ("optimizer", "config")}
    cand["training"].update(parent_version=parent.get("model_version"), samples=len(train_samples),
                            held_out=len(held_samples))
    status({"phase": "evaluating", "version": version})
    classes = [n for n in binding.class_names if n]
    idx = np.zeros(256, np.int64)
    for i, n in enumerate(classes):
        idx[binding.class_names.index(n)] = i
    gts = [(s["image"], idx[to_slots(s, slot_of)]) for s in held_samples]
    ecfg = EvalConfig(standard=standard, max_corrections=max_corrections, min_area=16)
    run = (options or ParserOptions()).parser_kwargs()
    r_parent = evaluate(CorePredictor(Parser(parent, **run), classes), gts, classes, ecfg, progress=False)
    r_cand = evaluate(CorePredictor(Parser(cand, **run), classes), gts, classes, ecfg, progress=False)
    metrics = {"parent": r_parent.summary(), "candidate": r_cand.summary(),
               "gate": {"metric": "mean mIoU over k=0..K", "parent": score(r_parent), "candidate": score(r_cand)}}
    cand["training"]["metrics"] = metrics
    return cand, metrics, promote(r_parent, r_cand)
