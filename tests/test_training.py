"""Short real training runs: loss goes down, the checkpoint is served, DDP (gloo) works."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.core.inference import Parser
from tests.conftest import CCP, ROOT

pytestmark = pytest.mark.skipif(not os.path.isdir(CCP), reason="../shared/data/ccp not present")


def tiny_ccp(tmp_path, n=6):
    """A CCP-layout root with the first n train images (symlinks to the real files)."""
    r = tmp_path / "ccp"
    (r / "images").mkdir(parents=True)
    (r / "labels").mkdir()
    ids = open(os.path.join(CCP, "train.txt")).read().split()[:n]
    for i in ids:
        os.symlink(os.path.join(CCP, "images", i + ".jpg"), r / "images" / (i + ".jpg"))
        os.symlink(os.path.join(CCP, "labels", i + ".png"), r / "labels" / (i + ".png"))
    (r / "train.txt").write_text("\n".join(ids) + "\n")
    (r / "val.txt").write_text("\n".join(ids[:2]) + "\n")
    os.symlink(os.path.join(CCP, "classes.txt"), r / "classes.txt")
    return str(r)


SMALL = ["net.aspp_channels=32", "net.decoder_channels=32", "net.low_level_channels=16",
         "sample.crop=[128,96]", "sample.base_scale=0.2", "sample.scale_range=[0.9,1.1]",
         "optimizer=adamw", "lr=0.003", "weight_decay=0", "batch_size=4", "workers=0",
         "log_every=1", "save_every=1000", "input_size=192"]


def run_train(args, env_extra=None, torchrun=False):
    env = dict(os.environ, IHP_TORCH_THREADS="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2"]
           if torchrun else [sys.executable]) + ["-m", "model_training.train"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_short_cpu_training_lowers_loss_and_is_served(tmp_path):
    root = tiny_ccp(tmp_path)
    out = str(tmp_path / "run")
    sets = SMALL + [f"data.root={root}", "data.merge=ccp12", "steps=60", "sample.strategy=central",
                    "iterative.enabled=false", f"out={out}"]
    run_train(["--config", "model_training/configs/ccp_cpu.yaml"] + sum((["--set", s] for s in sets), []))
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
    assert os.path.exists(os.path.join(out, "curves.png"))
    ck = read_checkpoint(os.path.join(out, "final.pt"))
    assert ck["binding"] == "shuffled" and ck["training"]["step"] == 60 and "optimizer" not in ck["training"]
    # the backend's own parser serves it
    p = Parser.from_file(os.path.join(out, "final.pt"))
    img = np.zeros((100, 80, 3), np.uint8)
    res = p.parse(img, np.array([[50, 40, 3]]), allowed_slots=[0, 3])
    assert res.labels.shape == (100, 80) and set(np.unique(res.labels)) <= {0, 3}
    # release: optimizer state dropped, BatchNorm statistics re-estimated, still served
    from model_training.release import release
    info = release(os.path.join(out, "last.pt"), os.path.join(out, "rel.pt"), "rel-1", {"x": 1}, recalibrate=2)
    rel = read_checkpoint(os.path.join(out, "rel.pt"))
    assert info["version"] == "rel-1" and "optimizer" not in rel["training"] and rel["training"]["metrics"] == {"x": 1}
    key = [k for k in rel["state_dict"] if k.endswith("running_mean")][0]
    assert not torch.equal(rel["state_dict"][key], ck["state_dict"][key])
    Parser.from_file(os.path.join(out, "rel.pt")).parse(img, np.array([[50, 40, 3]]), allowed_slots=[0, 3])
    # resume continues from the saved step
    run_train(["--config", "model_training/configs/ccp_cpu.yaml"] +
              sum((["--set", s] for s in sets + ["steps=64"]), []))
    assert read_checkpoint(os.path.join(out, "last.pt"))["training"]["step"] == 64


def test_iterative_near_edge_fixed_binding_runs(tmp_path):
    root = tiny_ccp(tmp_path, n=4)
    out = str(tmp_path / "run2")
    sets = SMALL + [f"data.root={root}", "data.merge=ccp12", "steps=3", "sample.strategy=near-edge",
                    "sample.binding=fixed", "net.num_slots=12", "net.prev_mask=true",
                    "iterative.enabled=true", "iterative.p=1.0", "sp_weight=3", f"out={out}"]
    run_train(["--config", "model_training/configs/ccp_cpu.yaml"] + sum((["--set", s] for s in sets), []))
    ck = read_checkpoint(os.path.join(out, "final.pt"))
    assert ck["binding"] == "fixed" and ck["class_names"][0] == "background" and ck["net"]["prev_mask"]


def test_ddp_two_process_gloo(tmp_path):
    root = tiny_ccp(tmp_path, n=8)
    out = str(tmp_path / "ddp")
    sets = SMALL + [f"data.root={root}", "data.merge=ccp12", "steps=3", "batch_size=2",
                    "iterative.enabled=false", f"out={out}"]
    run_train(["--config", "model_training/configs/ccp_cpu.yaml"] + sum((["--set", s] for s in sets), []),
              torchrun=True)
    ck = read_checkpoint(os.path.join(out, "final.pt"))
    assert ck["training"]["step"] == 3
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert rows[-1]["step"] == 3
