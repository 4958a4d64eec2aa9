"""Train an IHP model: ``python -m model_training.train --config model_training/configs/X.yaml``.

CPU, one GPU (AMP) or many (``torchrun --nproc_per_node N -m model_training.train ...``:
DistributedDataParallel + DistributedSampler). Writes ``<out>/last.pt`` (resumable, the
backend's checkpoint format plus optimizer state), ``<out>/log.jsonl`` and ``<out>/curves.png``.
Any config key can be overridden: ``--set steps=200 --set sample.crop=[256,192]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ihp_backend.core.checkpoint import Binding, make_checkpoint, read_checkpoint, save_checkpoint
from ihp_backend.core.clicks import IMAGENET_MEAN, IMAGENET_STD, network_input
from ihp_backend.core.network import NetConfig, build_network, load_backbone_weights, load_widening

from . import click_simulation as cs
from .datasets import open_dataset
from .losses import balanced_ce, lovasz_softmax, sp_loss
from .samples import IGNORE, ClickSampleDataset, SampleConfig, collate

DEFAULTS = {
    "data": {"kind": "ccp", "root": "../shared/data/ccp", "split": "train", "merge": None},
    "net": {},
    "sample": {},
    "optimizer": "sgd",
    "lr": 7e-4, "momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9,
    "batch_size": 12, "steps": 1000, "workers": 2, "seed": 0,
    "sp_weight": 1.0, "sp_margin": 1.5,
    "lovasz_weight": 0.0,  # Lovász-softmax (batch IoU surrogate) added to the paper's losses
    "lovasz_pixels": 131072,  # labelled pixels per batch it is computed on (uniform sample)
    "vocab_weight": 1.0,  # the vocabulary head's cross-entropy (networks with net.vocab_size > 0)
    "iterative": {"enabled": False, "max_rounds": 3, "p": 0.8},
    "input_size": 512,
    "backbone_weights": None,
    "init_from": None,
    "out": "runs/default",
    "save_every": 100,
    "log_every": 10,
    "max_minutes": None,
    "stop_at": None,  # stop (resumably) at this step without changing the lr schedule
    "train_only": None,  # module name prefixes (e.g. [vocab_branch]): train these, freeze the rest
    # (no gradient, BatchNorm statistics kept), so the frozen outputs stay exactly as they were
    "model_version": None,
}


def deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in (upd or {}).items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[str]) -> dict:
    out: dict = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        cur = out
        keys = k.split(".")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = yaml.safe_load(v)
    return out


def load_config(path: str | None, overrides: list[str]) -> dict:
    cfg = dict(DEFAULTS)
    if path:
        with open(path) as f:
            cfg = deep_update(cfg, yaml.safe_load(f) or {})
    return deep_update(cfg, parse_overrides(overrides))


def sample_config(cfg: dict, num_slots: int, unclaimed: int | None = None) -> SampleConfig:
    s = dict(cfg["sample"])
    for k in ("crop", "scale_range", "bg_range", "pasted_height", "jpeg_quality"):
        if k in s:
            s[k] = tuple(s[k])
    s["num_slots"] = num_slots
    s["unclaimed"] = unclaimed
    return SampleConfig(**s)


def open_training_data(d: dict):
    """The config's ``data`` -> (data set, label spaces or None). With ``spaces`` ({name:
    weight}, kind ``ccp-parts``), the photos of ``root`` in several label spaces derived by
    ``model_training.pose_labels`` into ``parts`` (the first space is the data set's own)."""
    if d.get("spaces"):
        from .pose_labels import ccp_parts
        spaces = [(ccp_parts(d["root"], d["parts"], d["split"], name), float(w))
                  for name, w in d["spaces"].items()]
        return spaces[0][0], spaces
    return open_dataset(d["kind"], d["root"], d["split"], d.get("merge")), None


def click_dataset(cfg: dict, net_cfg: NetConfig, seed: int, ds=None) -> ClickSampleDataset:
    """The training samples of ``cfg`` for a network ``net_cfg`` (``ds`` replaces the data)."""
    spaces = None
    if ds is None:
        ds, spaces = open_training_data(cfg["data"])
    vocabulary = None
    if net_cfg.vocab_size:
        from ihp_backend.core.vocabulary import VOCABULARY
        if len(VOCABULARY) != net_cfg.vocab_size:
            raise SystemExit(f"net.vocab_size {net_cfg.vocab_size} != {len(VOCABULARY)} names in "
                             f"ihp_backend.core.vocabulary")
        vocabulary = VOCABULARY
    return ClickSampleDataset(ds, sample_config(cfg, net_cfg.num_slots, net_cfg.unclaimed_channel),
                              seed=seed, spaces=spaces, vocabulary=vocabulary)


def vocabulary_loss(vocab_logits4: torch.Tensor, vocab_target: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the vocabulary head at its stride 4 (targets subsampled at the centre of
    each 4x4 cell), the softmax over the channels of each sample's label space only (a pixel is
    "Torso" in PASCAL-Person-Part and "UpperClothes" in LIP at once)."""
    h, w = vocab_logits4.shape[-2:]
    st = vocab_target.shape[-1] // w
    t = vocab_target[:, st // 2::st, st // 2::st][:, :h, :w]
    masked = vocab_logits4.float().masked_fill(~used[:, :, None, None], -1e4)
    return balanced_ce(masked, t, [np.zeros((0, 3))] * t.shape[0])


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1 - min(step, total - 1) / total) ** power


def build_inputs(images: torch.Tensor, clicks: list[np.ndarray], num_slots: int,
                 prev: np.ndarray | None, use_prev: bool) -> torch.Tensor:
    """uint8 (B, H, W, 3) images + click lists -> (B, C, H, W) network input (shared encoding)."""
    xs = []
    for i in range(images.shape[0]):
        pm = None if prev is None else prev[i]
        xs.append(network_input(images[i].numpy(), clicks[i], num_slots, pm, use_prev))
    return torch.stack(xs)


def restricted_argmax(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Argmax over the slots each sample uses (its ground-truth slots)."""
    b, s = logits.shape[:2]
    allowed = torch.zeros(b, s, dtype=torch.bool, device=logits.device)
    for i in range(b):
        u = torch.unique(targets[i])
        allowed[i, u[u < s]] = True
    masked = logits.masked_fill(~allowed[:, :, None, None], float("-inf"))
    return masked.argmax(1).cpu().numpy()


def add_correction_clicks(net, images, targets, clicks, num_slots, use_prev, device, rounds, rng):
    """RITM-style iterative simulation: a few no-grad rounds, each adding the evaluation's
    correction click (largest error region) on the model's own prediction."""
    prev = None
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for _ in range(rounds):
            x = build_inputs(images, clicks, num_slots, prev, use_prev).to(device)
            pred = restricted_argmax(net(x), targets.to(device))
            tg = targets.numpy()
            tg = np.where(tg >= num_slots, IGNORE, tg)  # an unclaimed part cannot be clicked "unclaimed"
            for i in range(len(clicks)):
                c = cs.correction_click(tg[i], pred[i])
                if c is not None:
                    clicks[i] = np.concatenate([clicks[i], np.array([c], np.float32)])
            prev = pred
    net.train(was_training)
    return clicks, prev


def trained_modules(train_only) -> list[str]:
    """Names of the modules a run trains: ``train_only``'s prefixes, or everything ([""])."""
    return [""] if not train_only else [str(p) for p in train_only]


def freeze_except(net, train_only) -> list:
    """Freeze every parameter outside ``train_only`` (module name prefixes; None: nothing frozen)
    and put the frozen modules in eval mode, so their BatchNorm statistics do not move; returns
    the trainable parameters. Call again after anything that sets ``net.train()``."""
    if not train_only:
        return [p for p in net.parameters() if p.requires_grad]
    prefixes = trained_modules(train_only)
    if not any(n.startswith(pre) for n, _ in net.named_parameters() for pre in prefixes):
        raise SystemExit(f"train_only {prefixes}: no parameter of the network has such a name")
    for name, p in net.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
    for name, m in net.named_modules():
        if name and not any(name.startswith(pre) or pre.startswith(name + ".") for pre in prefixes):
            m.eval()
    return [p for p in net.parameters() if p.requires_grad]


def recalibrate_bn(net, sds, batches: int = 16, batch_size: int = 8, device=None, train_only=None) -> None:
    """Re-estimate BatchNorm running statistics as plain averages over ``batches`` training
    batches (no gradient). Short CPU runs move the weights faster than the running averages
    follow; recalibrated statistics make eval mode match what the weights learned. With
    ``train_only`` only the BatchNorms of those modules (a frozen trunk keeps its statistics)."""
    device = device or next(net.parameters()).device
    prefixes = trained_modules(train_only)
    bns = [m for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and any(n.startswith(pre) for pre in prefixes)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was = net.training
    net.train()
    freeze_except(net, train_only)  # frozen BatchNorms stay in eval mode
    n = len(sds)
    with torch.no_grad():
        for b in range(batches):
            items = [sds[(b * batch_size + i) % n] for i in range(batch_size)]
            images, _, clicks, _, _ = collate(items)
            net(build_inputs(images, clicks, net.cfg.num_slots, None, net.cfg.prev_mask).to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    net.train(was)


def setup_distributed() -> tuple[int, int, int]:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return rank, world, local
    return 0, 1, 0


def plot_curves(log_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(ln) for ln in open(log_path) if ln.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    st = [r["step"] for r in rows]
    for k in ("loss", "ce", "sp"):
        ax[0].plot(st, [r[k] for r in rows], label=k)
    ax[0].set_xlabel("step"); ax[0].legend(); ax[0].set_title("loss")
    ax[1].plot(st, [r["lr"] for r in rows]); ax[1].set_xlabel("step"); ax[1].set_title("lr")
    fig.tight_layout(); fig.savefig(png_path, dpi=80); plt.close(fig)


def train(cfg: dict, dataset=None, init_state: dict | None = None, binding: Binding | None = None,
          on_step=None) -> str:
    """Train per ``cfg``; returns the path of ``last.pt``.

    Library use (``fit``): ``dataset`` replaces the config's data, ``init_state`` (a state dict)
    is the starting point, ``binding`` is written into the checkpoint, and ``on_step(step,
    total, record)`` is called after every step (progress reporting)."""
    rank, world, local = setup_distributed()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg["seed"] + rank)
    rng = np.random.default_rng(cfg["seed"] + 1000 * rank)
    out = cfg["out"]
    os.makedirs(out, exist_ok=True)
    d = cfg["data"]
    net_cfg = NetConfig.from_dict(cfg["net"])
    sds = click_dataset(cfg, net_cfg, cfg["seed"], ds=dataset)
    ds, scfg = sds.ds, sds.cfg
    if scfg.binding == "fixed" and len(ds.classes) > net_cfg.num_slots:
        raise SystemExit(f"fixed binding needs num_slots >= {len(ds.classes)} classes")
    net = build_network(net_cfg)
    step, minutes_before = 0, 0.0
    last = os.path.join(out, "last.pt")
    resume = None
    if os.path.exists(last):
        resume = read_checkpoint(last)
        net.load_state_dict(resume["state_dict"])
        step = int(resume["training"].get("step", 0))
        minutes_before = float(resume["training"].get("minutes", 0.0))
    elif init_state is not None:
        net.load_state_dict(init_state)
    elif cfg.get("init_from"):
        widened = load_widening(net, read_checkpoint(cfg["init_from"])["state_dict"])
        if rank == 0 and widened:
            print(f"init_from: widened {len(widened)} tensors (new channels start silent): "
                  + ", ".join(f"{n} {o} -> {w}" for n, (o, w) in widened.items()), file=sys.stderr)
    elif cfg.get("backbone_weights"):
        missing = load_backbone_weights(net, cfg["backbone_weights"])
        if rank == 0 and missing:
            print(f"backbone weights: {len(missing)} encoder tensors not in file", file=sys.stderr)
    net.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None) \
        if world > 1 else net
    params = freeze_except(net, cfg.get("train_only"))
    # a frozen slot path (train_only without the classifier) needs none of the slot losses
    slot_losses = not cfg.get("train_only") or any(
        p.requires_grad for n, p in net.named_parameters() if not n.startswith("vocab_branch."))
    if cfg["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["weight_decay"])
    if resume is not None and "optimizer" in resume.get("training", {}):
        opt.load_state_dict(resume["training"]["optimizer"])
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    sampler = torch.utils.data.distributed.DistributedSampler(sds, world, rank, seed=cfg["seed"]) \
        if world > 1 else None
    per_rank = len(sds) // world
    if per_rank < 2:  # batch norm needs two samples per batch
        raise SystemExit(f"{len(sds)} training samples are too few for {world} process(es): need 2 each")
    if per_rank < cfg["batch_size"]:  # tiny data sets (fit on a few annotations): smaller batches
        cfg = {**cfg, "batch_size": per_rank}
    loader_kw = dict(batch_size=cfg["batch_size"], collate_fn=collate, drop_last=True,
                     num_workers=cfg["workers"], persistent_workers=cfg["workers"] > 0)
    total = int(cfg["steps"])
    binding = binding or Binding(scfg.binding, net_cfg.num_slots, list(ds.classes),
                                 vocabulary=tuple(sds.vocabulary or ()))
    version = cfg.get("model_version") or f"ihp-{os.path.basename(os.path.normpath(out))}"
    log_path = os.path.join(out, "log.jsonl")
    t_start = time.time()
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    def checkpoint():
        """last.pt: resumable (with optimizer state); final.pt: the finished model alone."""
        if rank != 0:
            return
        meta = {"step": step, "steps": total, "config": cfg, "data": f"{d['kind']}:{d['split']}",
                "classes": list(ds.classes), "finished": step >= total,
                "minutes": round((time.time() - t_start) / 60 + minutes_before, 2)}
        ck = make_checkpoint(net, binding, cfg["input_size"], IMAGENET_MEAN, IMAGENET_STD, version, meta)
        save_checkpoint({**ck, "training": {**meta, "optimizer": opt.state_dict()}}, last)
        if step >= total:
            save_checkpoint(ck, os.path.join(out, "final.pt"))
        if cfg.get("keep_every") and step % int(cfg["keep_every"]) == 0:
            # snapshots along the trajectory, for release's weight averaging
            save_checkpoint(ck, os.path.join(out, f"step_{step:06d}.pt"))

    epoch = step * cfg["batch_size"] * world // max(1, len(sds))
    model.train()
    freeze_except(net, cfg.get("train_only"))
    done = False
    while not done:
        sds.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(sds, sampler=sampler, shuffle=sampler is None,
                                             generator=torch.Generator().manual_seed(cfg["seed"] + epoch),
                                             **loader_kw)
        for images, targets, clicks, vocab_target, vocab_used in loader:
            if step >= total or (cfg.get("stop_at") and step >= int(cfg["stop_at"])):
                done = True
                break
            t0 = time.time()
            lr = poly_lr(cfg["lr"], step, total, cfg["poly_power"])
            for g in opt.param_groups:
                g["lr"] = lr
            prev = None
            it = cfg["iterative"]
            if it.get("enabled") and rng.random() < it.get("p", 0.8):
                rounds = int(rng.integers(1, it.get("max_rounds", 3) + 1))
                clicks, prev = add_correction_clicks(net, images, targets, clicks, net_cfg.num_slots,
                                                     net_cfg.prev_mask, device, rounds, rng)
                freeze_except(net, cfg.get("train_only"))
            x = build_inputs(images, clicks, net_cfg.num_slots, prev, net_cfg.prev_mask).to(device)
            y = targets.to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                out4, feats = model(x, features=True)
                logits4 = out4[:, :net_cfg.vocab_start]  # the slots (and the unclaimed channel)
                logits = F.interpolate(logits4, size=y.shape[-2:], mode="bilinear", align_corners=False)
            zero = torch.zeros((), device=device)
            ce = balanced_ce(logits.float(), y, clicks) if slot_losses else zero
            voc = vocabulary_loss(out4[:, net_cfg.vocab_start:], vocab_target.to(device), vocab_used.to(device)) \
                if net_cfg.vocab_size and vocab_target is not None else torch.zeros((), device=device)
            sp = sp_loss(feats.float(), y, clicks, cfg["sp_margin"]) if cfg["sp_weight"] > 0 and slot_losses \
                else zero
            lov = lovasz_softmax(logits, y, max_pixels=cfg["lovasz_pixels"]) if cfg["lovasz_weight"] > 0 and slot_losses \
                else zero
            loss = ce + cfg["sp_weight"] * sp + cfg["lovasz_weight"] * lov + cfg["vocab_weight"] * voc
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            dt = time.time() - t0
            bar.update(1)
            if on_step is not None and rank == 0:
                on_step(step, total, {"loss": loss.item(), "elapsed_s": time.time() - t_start})
            if rank == 0 and (step % cfg["log_every"] == 0 or step == 1):
                rec = {"step": step, "loss": loss.item(), "ce": ce.item(), "sp": sp.item(), "lovasz": lov.item(), "vocab": voc.item(), "lr": lr,
                       "images_per_s": cfg["batch_size"] * world / dt, "elapsed_s": time.time() - t_start}
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ips=f"{rec['images_per_s']:.1f}")
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if step % cfg["save_every"] == 0:
                checkpoint()
            if cfg.get("max_minutes") and time.time() - t_start > 60 * cfg["max_minutes"]:
                done = True
                break
        epoch += 1
    bar.close()
    checkpoint()
    if rank == 0:
        plot_curves(log_path, os.path.join(out, "curves.png"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="recipe YAML (model_training/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted), value parsed as YAML")
    ap.add_argument("--out", help="output directory (overrides the config's 'out')")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, all cores)")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.set + ([f"out={a.out}"] if a.out else []))
    if a.threads:
        torch.set_num_threads(a.threads)
    train(cfg)


if __name__ == "__main__":
    main()
