"""The training recipe as data: model_training.recipe parses, plans, runs and resumes stages, and
writes the release metadata itself."""
import os
import subprocess
import sys

import pytest
import yaml

from ihp_backend.core.checkpoint import read_checkpoint
from model_training import recipe as R
from tests.conftest import CCP, ROOT
from tests.test_training import SMALL, tiny_ccp

DEFAULT = os.path.join(ROOT, "model_training", "configs", "default.yaml")


# stage -> the file it was trained from when that was the installed default (the init stage's
# release, ihp-ccp-crowds-mnv3-s27450 at commit ba43d49), not the recipe's own run folder
INSTALLED_INIT = {"parts_focus_b": "ihp_backend/models/default.pt"}


def test_default_recipe_makes_the_shipped_model():
    """The recipe's product stage trains with exactly the config stored in the embedded default."""
    rc = R.load_recipe(DEFAULT)
    ck = read_checkpoint(os.path.join(ROOT, "ihp_backend", "models", "default.pt"))
    assert ck["model_version"] == rc.stage(rc.product).release["version"]
    trained = rc.stage(rc.product)
    if trained.kind == "vocab_context":  # a head on a trained stage's network: that stage's config
        head = ck["training"]["vocab_context"]
        assert ck["training"]["recipe"]["stage"] == rc.product and head["args"]["epochs"] == \
            trained.spec["vocab_context"].get("epochs", 30)
        trained = rc.stage(trained.spec["vocab_context"]["from"])
    cfg = R.train_config(rc, "runs", trained)
    stored = dict(ck["training"]["config"])
    if stored.get("init_from") == INSTALLED_INIT.get(trained.name):
        # the product stage was trained from the installed default, which was its init stage's
        # release (the recipe names that file by the run folder it would write it to)
        stored["init_from"] = cfg["init_from"]
    differ = {k for k in set(cfg) | set(stored) if cfg.get(k) != stored.get(k)}
    assert differ == set(), differ
    assert R.lineage(rc, rc.product)[0] == "ccp_cpu" and R.lineage(rc, rc.product)[-1] == rc.product


def test_recipe_rejects_bad_documents():
    ok = {"stages": [{"name": "a", "train": "x.yaml"}]}
    assert R.parse_recipe(ok).product == "a"
    bad = [
        {"stages": [{"name": "a", "train": "x.yaml", "init": "b"}]},  # refers to a later/unknown stage
        {"stages": [{"name": "a", "train": "x.yaml"}, {"name": "a", "train": "x.yaml"}]},  # name twice
        {"stages": [{"name": "a", "train": "x.yaml", "average": ["a"]}]},  # two kinds
        {"stages": [{"name": "a", "train": "x.yaml", "set": ["nope"]}]},  # unknown layer
        {"stages": [{"name": "a", "train": "x.yaml"}, {"name": "b", "average": ["a"]}]},  # average, no release
        {"stages": [{"name": "a", "train": "x.yaml"}], "product": "z"},
        {"stages": []},
    ]
    for doc in bad:
        with pytest.raises(ValueError):
            R.parse_recipe(doc)


@pytest.mark.skipif(not os.path.isdir(CCP), reason="../shared/data/ccp not present")
def test_tiny_recipe_runs_resumes_and_writes_provenance(tmp_path):
    root = tiny_ccp(tmp_path)
    small = {}
    for s in SMALL + [f"data.root={root}", "data.merge=ccp12", "iterative.enabled=false"]:
        k, v = s.split("=", 1)
        cur = small
        for kk in k.split(".")[:-1]:
            cur = cur.setdefault(kk, {})
        cur[k.split(".")[-1]] = yaml.safe_load(v)
    doc = {"product": "soup", "threads": 1, "layers": {"small": small},
           "stages": [{"name": "base", "train": "model_training/configs/ccp_cpu.yaml", "set": ["small", {"steps": 4}]},
                      {"name": "cont", "train": "model_training/configs/ccp_cpu.yaml", "init": "base/last",
                       "set": ["small", {"steps": 3, "seed": 1}], "release": {"version": "tiny-cont", "recalibrate_bn": 1}},
                      {"name": "soup", "average": ["cont", "base"], "release": {"version": "tiny-soup", "recalibrate_bn": 1}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    runs = str(tmp_path / "runs")
    run = lambda *extra: subprocess.run([sys.executable, "-m", "model_training.recipe", str(path), "--runs", runs, *extra],
                                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                                        env=dict(os.environ, OMP_NUM_THREADS="1"))
    p = run("--dry-run")
    assert p.returncode == 0 and p.stdout.count("todo") == 3, p.stdout + p.stderr
    installed = tmp_path / "model.pt"
    p = run("--install", str(installed))
    assert p.returncode == 0, p.stderr[-3000:]
    ck = read_checkpoint(str(installed))
    assert ck["model_version"] == "tiny-soup" and "optimizer" not in ck["training"]
    meta = ck["training"]["recipe"]
    assert meta["stage"] == "soup" and meta["lineage"] == ["base", "cont", "soup"]
    assert meta["file"].endswith("recipe.yaml")
    assert len(ck["training"]["averaged_from"]) == 2
    cont = read_checkpoint(os.path.join(runs, "cont", "release.pt"))
    assert cont["training"]["config"]["init_from"] == os.path.join(runs, "base", "last.pt")
    assert cont["training"]["config"]["steps"] == 3 and cont["training"]["recipe"]["lineage"] == ["base", "cont"]
    # a second run skips every finished stage
    mtime = os.path.getmtime(os.path.join(runs, "soup", "release.pt"))
    p = run()
    assert p.returncode == 0 and p.stdout.count("done, skipped") == 3, p.stdout + p.stderr
    assert os.path.getmtime(os.path.join(runs, "soup", "release.pt")) == mtime
    p = run("--dry-run")
    assert p.stdout.count("done") == 3
