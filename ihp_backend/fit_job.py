"""The fit job: fine-tune a project's serving model on its accepted annotations, gate it, and
record the version. Never inside a request: a child process of the backend

    python -m ihp_backend.fit_job --model-dir MODEL_DIR --project 3

or an RQ job (``jobs.run_queued_fit``) that ``python -m ihp_backend.worker`` runs. One run per
project at a time across the cluster (``jobs.project_run_lock``); requests that arrive during a
run are picked up by the same run when it finishes. A run decodes newly stored annotations,
splits the samples into train and a held-out slice, trains and gates with
``model_training.finetune.fine_tune``, and adds the version to the ``registry`` (promoted or
not; every version is kept with its metrics). Server side: it owns the stores and imports
training, never the other way round.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch

from model_training.finetune import fine_tune, in_holdout

from .annotations import open_annotation_store
from .core.checkpoint import read_checkpoint
from .core.ls_format import parse_label_config
from .core.options import ParserOptions
from .jobs import RUN_LOCK_WAIT, project_run_lock
from .registry import PostgresRegistry, Registry, open_registry
from .settings import DEFAULT_CHECKPOINT, Settings


def run_once(model_dir: str, project: str, default_checkpoint: str, steps: int, holdout: float,
             max_corrections: int, standard: float, status, overrides: dict | None = None,
             database_url: str = "", options: ParserOptions | None = None) -> dict:
    """One fit run for ``project``; ``options``: how the gate runs parent and candidate (the
    server's ``Settings.parser_options()``, so a version is promoted on what is served)."""
    store = open_annotation_store(database_url, model_dir)
    reg = PostgresRegistry(model_dir, database_url) if database_url else Registry(model_dir)
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
    parent = read_checkpoint(reg.serving_path(project) or default_checkpoint)
    version = reg.new_version_name(project)
    cand, metrics, promoted = fine_tune(parent, labels, train_s, held, version, model_dir, steps,
                                        max_corrections, standard, status, overrides, options=options)
    reg.add_version(project, version, cand, metrics, promote=promoted)
    return {"status": "done", "version": version, "promoted": promoted, "metrics": metrics["gate"],
            "parent": parent.get("model_version")}


def run_pending(settings: Settings, project: str, max_corrections: int = 5, standard: float = 0.85) -> list[dict]:
    """Every fit run due for ``project`` now, one after the other. The caller holds the
    project's run lock (``jobs.project_run_lock``)."""
    torch.set_num_threads(settings.fit_threads)
    reg = open_registry(settings)
    store = open_annotation_store(settings.database_url, settings.model_dir)
    checkpoint = settings.checkpoint or DEFAULT_CHECKPOINT
    results = []
    while True:
        ticket = store.pending(project, settings.train_every)
        if ticket is None:
            return results
        t0 = time.time()
        try:
            res = run_once(settings.model_dir, project, checkpoint, settings.fit_steps, settings.fit_holdout,
                           max_corrections, standard,
                           lambda st: reg.write_job(project, {**st, "pid": os.getpid(), "started": t0}),
                           database_url=settings.database_url,
                           options=dataclasses.replace(settings.parser_options(), threads=settings.fit_threads))
        except Exception as e:  # recorded for /health; the request stays pending for a retry
            reg.write_job(project, {"phase": "failed", "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()[-2000:], "finished": time.time()})
            raise
        res["seconds"] = round(time.time() - t0, 1)
        store.consume(project, ticket)
        reg.write_job(project, {"phase": "idle", "last": res, "finished": time.time()})
        print(json.dumps(res), flush=True)
        results.append(res)


def fit_project(settings: Settings, project: str, max_corrections: int = 5, standard: float = 0.85) -> list[dict]:
    """``run_pending`` under the project's run lock, until nothing is pending; returns the
    runs' results ([{"status": "busy"}] when another process holds the lock)."""
    reg = open_registry(settings)
    store = open_annotation_store(settings.database_url, settings.model_dir)
    results = []
    while True:
        with project_run_lock(settings, reg, project, wait=RUN_LOCK_WAIT) as got:
            if not got:
                return results or [{"status": "busy", "project": project}]
            results += run_pending(settings, project, max_corrections, standard)
        # an event may have arrived between the last check and the unlock: look once more
        if store.pending(project, settings.train_every) is None:
            return results


def main(argv=None):
    s = Settings.from_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=s.model_dir, help="MODEL_DIR")
    ap.add_argument("--project", required=True)
    ap.add_argument("--default-checkpoint", default=None, help="IHP_CHECKPOINT")
    ap.add_argument("--steps", type=int, default=s.fit_steps, help="IHP_FIT_STEPS")
    ap.add_argument("--holdout", type=float, default=s.fit_holdout, help="IHP_FIT_HOLDOUT")
    ap.add_argument("--every", type=int, default=s.train_every, help="IHP_TRAIN_EVERY")
    ap.add_argument("--max-corrections", type=int, default=5)
    ap.add_argument("--standard", type=float, default=0.85)
    ap.add_argument("--threads", type=int, default=s.fit_threads, help="IHP_FIT_THREADS")
    a = ap.parse_args(argv)
    s = dataclasses.replace(s, model_dir=a.model_dir, checkpoint=a.default_checkpoint or s.checkpoint,
                            fit_steps=a.steps, fit_holdout=a.holdout, train_every=a.every, fit_threads=a.threads)
    res = fit_project(s, a.project, a.max_corrections, a.standard)
    if res and res[0].get("status") == "busy":
        print(json.dumps(res[0]))


if __name__ == "__main__":
    sys.exit(main())
