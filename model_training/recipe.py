"""Run a staged training recipe: ``python -m model_training.recipe model_training/configs/default.yaml``.

A recipe is data (YAML): named ``layers`` of config overrides and a list of ``stages``, each one of

- ``train: CONFIG`` (+ ``init: REF``, ``set: [layer names or override dicts]``, optional
  ``release: VERSION`` or ``release: {version, average_steps: [..], recalibrate_bn: 16}``):
  trains into ``<runs>/<name>`` (resumes its ``last.pt``), then releases ``<runs>/<name>/release.pt``;
- ``average: [REF, ...]`` + ``release``: a uniform weight average of earlier stages, released;
- ``derive_labels: {data, out}``: the pose-derived body-part labels (``model_training.pose_labels``);
- ``vocab_context: {from: REF, ...}`` + ``release: VERSION``: REF's network with a vocabulary
  context head trained on its cached features (``model_training.train_vocab_context``; the other
  keys are that command's options, e.g. ``epochs: 30``; ``init_head: REF`` starts the head from
  that stage's).

``REF`` names an earlier stage: ``NAME`` is its product (its release, or its ``last.pt`` when it has
none), ``NAME/last`` its ``last.pt``. ``product`` names the stage whose release is the model the
recipe makes. Every release carries ``training.recipe`` (recipe file, stage, lineage, git commit),
written here: no checkpoint is edited by hand.

Stages whose output exists are skipped, so the runner resumes after a stop. ``--dry-run`` prints
the plan, ``--print-config NAME`` a stage's merged training config (e.g. to run that stage on many
GPUs with ``torchrun -m model_training.train --config <that file>``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import yaml

STAGE_KINDS = ("train", "average", "derive_labels", "vocab_context")


@dataclass
class Stage:
    name: str
    kind: str
    spec: dict
    overrides: list = field(default_factory=list)  # resolved override dicts, in order

    @property
    def release(self) -> dict | None:
        r = self.spec.get("release")
        if r is None:
            return None
        r = {"version": r} if isinstance(r, str) else dict(r)
        if "version" not in r:
            raise ValueError(f"stage {self.name}: release needs a version")
        r.setdefault("recalibrate_bn", 16)
        return r


@dataclass
class Recipe:
    path: str
    stages: list[Stage]
    product: str
    threads: int | None = None

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in {self.path} (stages: {', '.join(s.name for s in self.stages)})")

    def index(self, name: str) -> int:
        return self.stages.index(self.stage(name))


def parse_recipe(doc: dict, path: str = "<recipe>") -> Recipe:
    """Validate a recipe document: unique names, one kind per stage, references only to earlier
    stages, known layers."""
    layers = doc.get("layers") or {}
    stages: list[Stage] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc.get("stages") or []):
        name = raw.get("name")
        if not name or "/" in name:
            raise ValueError(f"{path}: stage {i} needs a name without '/'")
        if name in seen:
            raise ValueError(f"{path}: stage name {name!r} used twice")
        kinds = [k for k in STAGE_KINDS if k in raw]
        if len(kinds) != 1:
            raise ValueError(f"{path}: stage {name!r} needs exactly one of {', '.join(STAGE_KINDS)}")
        overrides = []
        for o in raw.get("set") or []:
            if isinstance(o, str):
                if o not in layers:
                    raise ValueError(f"{path}: stage {name!r} uses unknown layer {o!r}")
                overrides.append(layers[o])
            elif isinstance(o, dict):
                overrides.append(o)
            else:
                raise ValueError(f"{path}: stage {name!r}: 'set' holds layer names or dicts")
        st = Stage(name, kinds[0], raw, overrides)
        for ref in references(st):
            base = ref.split("/", 1)[0]
            if base not in seen:
                raise ValueError(f"{path}: stage {name!r} refers to {ref!r}, not an earlier stage")
        if st.kind in ("average", "vocab_context") and st.release is None:
            raise ValueError(f"{path}: {st.kind} stage {name!r} needs a release")
        seen.add(name)
        stages.append(st)
    if not stages:
        raise ValueError(f"{path}: no stages")
    product = doc.get("product", stages[-1].name)
    if product not in seen:
        raise ValueError(f"{path}: product {product!r} is not a stage")
    return Recipe(path, stages, product, doc.get("threads"))


def load_recipe(path: str) -> Recipe:
    with open(path) as f:
        return parse_recipe(yaml.safe_load(f) or {}, path)


def references(st: Stage) -> list[str]:
    if st.kind == "train":
        return [st.spec["init"]] if st.spec.get("init") else []
    if st.kind == "average":
        return list(st.spec["average"])
    if st.kind == "vocab_context":
        spec = st.spec["vocab_context"]
        return [spec["from"]] + ([spec["init_head"]] if spec.get("init_head") else [])
    return []


def stage_dir(runs: str, st: Stage) -> str:
    return os.path.join(runs, st.name)


def product_path(recipe: Recipe, runs: str, ref: str) -> str:
    """The file an earlier stage hands on: its release, or ``NAME/last`` its last.pt."""
    name, _, part = ref.partition("/")
    st = recipe.stage(name)
    if part == "last" or (not part and st.kind == "train" and st.release is None):
        if st.kind != "train":
            raise ValueError(f"{ref}: only a train stage has a last.pt")
        return os.path.join(stage_dir(runs, st), "last.pt")
    if part:
        raise ValueError(f"{ref}: a reference is NAME or NAME/last")
    if st.release is None:
        raise ValueError(f"{ref}: stage {name} makes no release")
    return os.path.join(stage_dir(runs, st), "release.pt")


def lineage(recipe: Recipe, name: str) -> list[str]:
    """Stage names from the first ancestor to ``name`` (depth first, each once)."""
    out: list[str] = []

    def visit(n):
        st = recipe.stage(n)
        for ref in references(st):
            visit(ref.split("/", 1)[0])
        if n not in out:
            out.append(n)
    visit(name)
    return out


def train_config(recipe: Recipe, runs: str, st: Stage) -> dict:
    """The stage's full training config: its file, its override layers in order, ``init_from``
    and ``out`` set by the recipe."""
    from .train import deep_update, load_config
    cfg = load_config(st.spec["train"], [])
    for o in st.overrides:
        cfg = deep_update(cfg, o)
    if st.spec.get("init"):
        cfg["init_from"] = product_path(recipe, runs, st.spec["init"])
    cfg["out"] = stage_dir(runs, st)
    return cfg


def training_done(cfg: dict) -> bool:
    last = os.path.join(cfg["out"], "last.pt")
    if not os.path.exists(last):
        return False
    from ihp_backend.core.checkpoint import read_checkpoint
    t = read_checkpoint(last).get("training", {})
    end = cfg.get("stop_at") or cfg["steps"]
    return bool(t.get("finished")) or int(t.get("step", 0)) >= int(end)


def stage_done(recipe: Recipe, runs: str, st: Stage) -> bool:
    if st.kind == "derive_labels":
        from .pose_labels import LABEL_SPACES
        out = st.spec["derive_labels"]["out"]
        return all(os.path.isdir(os.path.join(out, d)) for d in ("landmarks", "regions") + tuple(LABEL_SPACES))
    if st.release is not None:
        return os.path.exists(os.path.join(stage_dir(runs, st), "release.pt"))
    return training_done(train_config(recipe, runs, st))


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def recipe_metadata(recipe: Recipe, st: Stage) -> dict:
    return {"file": os.path.relpath(recipe.path), "stage": st.name, "lineage": lineage(recipe, st.name),
            "commit": git_commit()}


def release_stage(recipe: Recipe, runs: str, st: Stage) -> dict:
    from .release import release
    r = st.release
    d = stage_dir(runs, st)
    if st.kind == "average":
        srcs = [product_path(recipe, runs, ref) for ref in st.spec["average"]]
    elif r.get("average_steps"):
        srcs = [os.path.join(d, f"step_{int(s):06d}.pt") for s in r["average_steps"]]
    else:
        srcs = [os.path.join(d, "last.pt")]
    missing = [p for p in srcs if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"stage {st.name}: cannot release, missing {', '.join(missing)}")
    return release(srcs if len(srcs) > 1 else srcs[0], os.path.join(d, "release.pt"), r["version"],
                   recalibrate=int(r["recalibrate_bn"]), extra={"recipe": recipe_metadata(recipe, st)})


def run_stage(recipe: Recipe, runs: str, st: Stage, log=print) -> None:
    if st.kind == "derive_labels":
        from . import pose_labels
        d = st.spec["derive_labels"]
        pose_labels.main(["--data", d["data"], "--out", d["out"], "--setup-tool-venv"])
        return
    if st.kind == "vocab_context":
        from . import train_vocab_context
        spec = dict(st.spec["vocab_context"])
        args = ["--checkpoint", product_path(recipe, runs, spec.pop("from")), "--version", st.release["version"],
                "--out", os.path.join(stage_dir(runs, st), "release.pt"), "--recipe-stage", st.name,
                "--recipe-file", recipe.path]
        if spec.get("init_head"):
            args += ["--init-head", product_path(recipe, runs, spec.pop("init_head"))]
        for k, v in spec.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        log(f"[{st.name}] vocabulary context head on {args[1]} -> {st.release['version']}")
        train_vocab_context.main(args)
        return
    if st.kind == "train":
        cfg = train_config(recipe, runs, st)
        if not training_done(cfg):
            from .train import train
            log(f"[{st.name}] training {cfg['steps']} steps from {cfg.get('init_from') or 'scratch'} "
                f"into {cfg['out']}")
            train(cfg)
    if st.release is not None:
        log(f"[{st.name}] releasing {st.release['version']}")
        log(f"[{st.name}] {release_stage(recipe, runs, st)}")


def plan(recipe: Recipe, runs: str, until: str | None = None, only: str | None = None) -> list[Stage]:
    """The stages to run: ``only`` one, or every stage up to ``until`` (default: the product)."""
    if only:
        return [recipe.stage(only)]
    return recipe.stages[:recipe.index(until or recipe.product) + 1]


def describe(recipe: Recipe, runs: str, st: Stage) -> str:
    done = "done" if stage_done(recipe, runs, st) else "todo"
    if st.kind == "train":
        cfg = train_config(recipe, runs, st)
        what = f"train {st.spec['train']} {cfg['steps']} steps, from {cfg.get('init_from') or 'scratch'}"
    elif st.kind == "average":
        what = "average " + " + ".join(product_path(recipe, runs, r) for r in st.spec["average"])
    elif st.kind == "vocab_context":
        what = "vocabulary context head on " + product_path(recipe, runs, st.spec["vocab_context"]["from"])
    else:
        what = f"derive labels into {st.spec['derive_labels']['out']}"
    rel = f" -> {st.release['version']}" if st.release else ""
    return f"{done:4s} {st.name}: {what}{rel}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML, e.g. model_training/configs/default.yaml")
    ap.add_argument("--runs", default="runs", help="directory of the stages' outputs (default: runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the recipe's)")
    ap.add_argument("--until", metavar="STAGE", help="stop after this stage (default: the product)")
    ap.add_argument("--only", metavar="STAGE", help="run this stage alone (its inputs must exist)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and each stage's state")
    ap.add_argument("--print-config", metavar="STAGE", help="print a train stage's merged config (YAML)")
    ap.add_argument("--install", metavar="PATH", help="copy the product's release here when done "
                                                      "(e.g. ihp_backend/models/default.pt)")
    a = ap.parse_args(argv)
    recipe = load_recipe(a.recipe)
    if a.print_config:
        st = recipe.stage(a.print_config)
        if st.kind != "train":
            raise SystemExit(f"{st.name} is not a train stage")
        yaml.safe_dump(train_config(recipe, a.runs, st), sys.stdout, sort_keys=False)
        return
    stages = plan(recipe, a.runs, a.until, a.only)
    if a.dry_run:
        for st in stages:
            print(describe(recipe, a.runs, st))
        return
    threads = a.threads or recipe.threads
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    for st in stages:
        if stage_done(recipe, a.runs, st):
            print(f"[{st.name}] done, skipped")
            continue
        run_stage(recipe, a.runs, st)
    if a.install:
        src = product_path(recipe, a.runs, recipe.product)
        shutil.copyfile(src, a.install)
        print(f"installed {src} -> {a.install}")


if __name__ == "__main__":
    main()
