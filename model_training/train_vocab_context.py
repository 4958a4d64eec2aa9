"""Train the vocabulary context head (``NetConfig.vocab_context``) of a shipped network on its own
cached features, and write the network with it as a new checkpoint (issue 31: the zero-click parse).

The head reads the backbone's stride-16 features, the most class-aware ones; everything else stays
exactly as it is (the slots, the unclaimed output, the head's own vocabulary logits, every
BatchNorm statistic outside the new head), so the click path changes only through the vocabulary
prior and share. Because the rest is frozen, the network runs once per photo and mirror image,
with no click, as served (``ParserOptions``), and the head then trains for many epochs on what it
saw (a forward-and-backward step of the whole network costs ~7.5 s on a 2-core CPU; an epoch of the
head here ~18 s). Targets: every label space of ``model_training.pose_labels`` at once, each a
softmax over its own names (a pixel is "Torso" in PASCAL-Person-Part and "UpperClothes" in LIP).

The first ``--holdout`` train photos are kept out and scored after every epoch (LIP-20, no click,
at the decoder's stride 4): the recipe was chosen on them, not on CCP val.

  .venv/bin/python -m model_training.train_vocab_context --checkpoint ihp_backend/models/default.pt \\
      --version ihp-ccp-ctx-mnv3-s27950 --out runs/vocab_context/release.pt

About 15 minutes on a 2-core CPU (6 of them caching features; the cache, ~8 GB under
``--cache``, is reused by later runs of the same checkpoint).

With ``--live-steps N`` nothing is cached: every step draws fresh random views of the train photos
(``samples.augment``: zoom, flip with left and right swapped, colour, blur, JPEG noise), the
frozen network parses them without clicks, and the head (with ``--blocks``, its copy of the
backbone's last blocks) learns on what it saw; resumable from ``<out>.state``. ~4.5 s a step of 8
views with ``--blocks 12`` on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ihp_backend.core.checkpoint import network_of, read_checkpoint, save_checkpoint
from ihp_backend.core.inference import Parser, network_size
from ihp_backend.core.network import NetConfig, VocabContext, build_network, load_widening
from ihp_backend.core.options import ParserOptions
from ihp_backend.core.vocabulary import lookup, mirrored_channels

from .pose_labels import LABEL_SPACES, SPACE_CLASSES, ccp_parts, load_merge
from .release import stored_state
from .samples import SampleConfig, augment

IGNORE = -1


def space_classes(space: str) -> list[str]:
    return list(SPACE_CLASSES.get(space) or load_merge("ccp12")["classes"])


def vocab_target(labels: np.ndarray, classes: list[str], vocabulary, hw: tuple[int, int], stride: int = 4
                 ) -> np.ndarray:
    """A label map as vocabulary channels at the decoder's stride: the centre pixel of each cell of
    the network-size map (as ``train.vocabulary_loss``); names the vocabulary lacks and ignored
    pixels -> -1."""
    lut = np.full(256, IGNORE, np.int64)
    for name, ch in lookup(classes, vocabulary).items():
        lut[classes.index(name)] = ch
    small = np.asarray(Image.fromarray(labels).resize((hw[1], hw[0]), Image.NEAREST))
    return lut[small[stride // 2::stride, stride // 2::stride]]


def served_parser(checkpoint: str, threads: int | None) -> Parser:
    """The network as served (float32, no zoom: a zero-click parse has no clicked person)."""
    opts = ParserOptions(precision="float32", threads=threads, zoom=False)
    return Parser.from_file(checkpoint, **opts.parser_kwargs())


class TapFeatures:
    """The features a head with ``tap`` copied blocks reads (the backbone's output for 0), caught
    by a forward hook on the served network while it parses a photo without clicks."""

    def __init__(self, parser: Parser, tap: int):
        enc = parser.net.encoder
        self.got = {}
        if tap:
            self.hook = enc.high[len(enc.high) - tap - 1].register_forward_hook(
                lambda m, i, o: self.got.__setitem__("high", o.detach().float()))
        else:
            self.hook = enc.register_forward_hook(lambda m, i, o: self.got.__setitem__("high", o[1].detach().float()))

    def __call__(self, parser: Parser, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tap features (C, h, w), vocabulary logits (V, h/4, w/4)) of ``image`` with no click."""
        logits = parser.logits(image, [])[parser.vocab_start:]
        return self.got["high"][0].numpy().copy(), logits.numpy().copy()

    def close(self):
        self.hook.remove()


def cache_features(parser: Parser, data: str, parts: str, split: str, cache_dir: str, tap: int = 0) -> None:
    """``high.npy`` (N, C, H16, W16) float16, the features the head reads: the backbone's
    output, or with ``tap`` > 0 the features before its last ``tap`` blocks (the head's own copy
    of them, ``NetConfig.vocab_context_blocks``, runs on those); ``vocab.npy`` (N, V, H4, W4)
    float16, the network's vocabulary logits; ``targets.npy`` (N, spaces, H4, W4) int8. Entry 2i
    is photo i with no click, 2i + 1 its mirror image (left and right names swapped); maps are
    padded (zeros, -1) to the largest network size. Memory-mapped: ~3 GB for CCP train."""
    spaces = {s: ccp_parts(data, parts, split, s) for s in LABEL_SPACES}
    vocabulary = parser.binding.vocabulary
    mirror = np.asarray(mirrored_channels(vocabulary), np.int64)
    photos = spaces[LABEL_SPACES[0]]
    sizes = [network_size(Image.open(photos.items[i][1]).size[::-1], parser.max_side) for i in range(len(photos))]
    h4, w4 = max(h for h, _ in sizes) // 4, max(w for _, w in sizes) // 4
    n, v = 2 * len(photos), parser.net.cfg.vocab_size
    os.makedirs(cache_dir, exist_ok=True)
    arrays = {}
    features = TapFeatures(parser, tap)
    try:
        for i in tqdm(range(len(photos)), desc="features", dynamic_ncols=True):
            image, _ = photos.load(i)
            labels = {s: ds.load(i)[1] for s, ds in spaces.items()}
            for k in range(2):
                img = image[:, ::-1].copy() if k else image
                high, logits = features(parser, img)
                if not arrays:
                    open_ = np.lib.format.open_memmap
                    arrays = {"high": open_(os.path.join(cache_dir, "high.tmp.npy"), "w+", np.float16,
                                            (n, high.shape[0], h4 // 4, w4 // 4)),
                              "vocab": open_(os.path.join(cache_dir, "vocab.tmp.npy"), "w+", np.float16, (n, v, h4, w4)),
                              "targets": open_(os.path.join(cache_dir, "targets.tmp.npy"), "w+", np.int8,
                                               (n, len(spaces), h4, w4))}
                    arrays["targets"][:] = IGNORE
                j = 2 * i + k
                arrays["high"][j, :, :high.shape[1], :high.shape[2]] = high
                arrays["vocab"][j, :, :logits.shape[1], :logits.shape[2]] = logits
                for si, (s, ds) in enumerate(spaces.items()):
                    lab = labels[s][:, ::-1].copy() if k else labels[s]
                    t = vocab_target(lab, ds.classes, vocabulary, sizes[i])
                    if k:
                        t = np.where(t >= 0, mirror[np.maximum(t, 0)], IGNORE)
                    arrays["targets"][j, si, :t.shape[0], :t.shape[1]] = t[:h4, :w4]
    finally:
        features.close()
    for name, arr in arrays.items():
        arr.flush()
        os.replace(os.path.join(cache_dir, f"{name}.tmp.npy"), os.path.join(cache_dir, f"{name}.npy"))


def space_loss(logits: torch.Tensor, target: torch.Tensor, channels: torch.Tensor,
               class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the vocabulary logits over one label space's channels (``target``: the
    vocabulary channel of each pixel, -1 ignored)."""
    inv = torch.full((logits.shape[1],), -1, dtype=torch.long)
    inv[channels] = torch.arange(len(channels))
    t = torch.where(target >= 0, inv[target.clamp(min=0)], torch.full_like(target, -1))
    if not (t >= 0).any():  # nothing labelled in this space (the mean would be 0 / 0)
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, channels], t, ignore_index=-1, weight=class_weight)


def class_weights(targets: np.ndarray, channels: np.ndarray, power: float) -> torch.Tensor | None:
    """(pixel share)^-power per class, normalised so the average pixel weighs 1 (None for 0)."""
    if not power:
        return None
    t = targets[targets >= 0].astype(np.int64)
    share = np.bincount(t, minlength=int(channels.max()) + 1)[channels] / max(1, len(t))
    w = np.maximum(share, 1e-4) ** -power
    return torch.as_tensor(w / (w * share).sum(), dtype=torch.float32)


def miou(pred: np.ndarray, gt: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """Data-set-level mean IoU over the classes present in ``gt`` or ``pred``."""
    conf = np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    iou = inter / np.maximum(union, 1)
    return float(iou[union > 0].mean()), iou


def held_out_miou(head: VocabContext, high: torch.Tensor, vocab: torch.Tensor, target: torch.Tensor,
                  channels: np.ndarray) -> tuple[float, np.ndarray]:
    """mIoU of the zero-click parse at stride 4 (argmax over ``channels``)."""
    inv = np.full(int(channels.max()) + 1, -1)
    inv[channels] = np.arange(len(channels))
    head.eval()
    preds, gts = [], []
    with torch.no_grad():
        for j in range(0, len(high), 16):
            lg = head.added_to(vocab[j:j + 16], high[j:j + 16])
            p = lg[:, torch.as_tensor(channels)].argmax(1).numpy()
            g = target[j:j + 16].numpy()
            gi = np.where(g >= 0, inv[np.clip(g, 0, len(inv) - 1)], -1)
            preds.append(p[gi >= 0])
            gts.append(gi[gi >= 0])
    return miou(np.concatenate(preds), np.concatenate(gts), len(channels))


def context_head(ckpt: dict, width: int, blocks: int = 0, init: dict | None = None, pool: tuple = ()
                 ) -> VocabContext:
    """A fresh head for ``ckpt``'s network; with ``blocks``, its own copy of the backbone's last
    ``blocks`` blocks, starting as the trained ones; ``pool``: its pyramid pooling bins
    (``NetConfig.vocab_context_pool``); ``init`` (a checkpoint with a context head of this width,
    no blocks and no pooling) gives the head's own layers their start, widened without changing
    what they compute (``load_widening``: the pooled features enter through zero weights)."""
    net = network_of(ckpt)
    copied = copy.deepcopy(net.encoder.high[-blocks:]) if blocks else None
    head = VocabContext(net.encoder.high_channels, width, len(ckpt["vocabulary"]), copied, tuple(pool))
    if init is not None:
        if init["net"].get("vocab_context") != width or init["net"].get("vocab_context_blocks") \
                or init["net"].get("vocab_context_pool"):
            raise SystemExit(f"--init-head needs a context head of width {width} without blocks or pooling")
        start = build_network(NetConfig.from_dict({**init["net"], "vocab_context_pool": tuple(pool)}))
        load_widening(start, {k: v.float() for k, v in init["state_dict"].items()})
        own = {k.removeprefix("vocab_context."): v for k, v in start.state_dict().items()
               if k.startswith("vocab_context.")}
        head.load_state_dict({**head.state_dict(), **own})
    return head


def frozen_statistics(head: VocabContext) -> VocabContext:
    """The copied blocks' BatchNorm layers keep their running statistics (eval mode) while the
    head trains: batches of a few photos' stride-16 maps would give noisy ones."""
    if head.blocks is not None:
        for m in head.blocks.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    return head


def head_optimizer(head: VocabContext, lr: float, blocks_lr: float | None, steps: int):
    """AdamW with a one-cycle schedule over ``steps``; the copied blocks at ``blocks_lr``
    (default lr / 10)."""
    own = [p for n, p in head.named_parameters() if not n.startswith("blocks.")]
    groups = [{"params": own, "lr": lr}]
    if head.blocks is not None:
        groups.append({"params": list(head.blocks.parameters()), "lr": blocks_lr or lr / 10})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.05)
    return opt, sched


def space_channels(vocabulary) -> dict[str, np.ndarray]:
    """Per label space, the vocabulary channels of its names (sorted)."""
    return {s: np.array(sorted(lookup(space_classes(s), vocabulary).values())) for s in LABEL_SPACES}


def head_loss(head: VocabContext, vocab: torch.Tensor, high: torch.Tensor, targets: torch.Tensor,
              chans: dict, weights: dict) -> torch.Tensor:
    """The summed cross-entropy of every label space (``space_loss``) of one batch."""
    lg = head.added_to(vocab, high)
    return sum(space_loss(lg, targets[:, si], torch.as_tensor(chans[s]), weights.get(s))
               for si, s in enumerate(LABEL_SPACES))


def optimizer_step(loss: torch.Tensor, opt, sched) -> float:
    """One step of ``opt`` and ``sched`` on ``loss``; returns its value."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def train_head(head: VocabContext, high: torch.Tensor, vocab: torch.Tensor, targets: torch.Tensor,
               vocabulary, train_idx: np.ndarray, held_idx: np.ndarray, epochs: int, lr: float,
               batch: int, balance: float, seed: int = 0, blocks_lr: float | None = None) -> list[dict]:
    """Epochs over the cached features; returns the per-epoch log."""
    chans = space_channels(vocabulary)
    weights = {s: class_weights(targets[train_idx, si].numpy(), chans[s], balance) for si, s in enumerate(LABEL_SPACES)}
    lip = LABEL_SPACES.index("lip20")
    steps = epochs * (len(train_idx) // batch)
    opt, sched = head_optimizer(head, lr, blocks_lr, steps)
    rng = np.random.default_rng(seed)
    log, t0 = [], time.time()
    bar = tqdm(total=steps, desc="vocabulary context head", dynamic_ncols=True)  # steps: an epoch with
    for ep in range(epochs):  # copied blocks takes minutes
        frozen_statistics(head.train())
        order = rng.permutation(train_idx)
        total, nb = 0.0, 0
        for j in range(0, len(order) - batch + 1, batch):
            b = torch.as_tensor(np.sort(order[j:j + batch]))
            total += optimizer_step(head_loss(head, vocab[b], high[b], targets[b], chans, weights), opt, sched)
            nb += 1
            bar.update()
        rec = {"epoch": ep + 1, "loss": total / max(1, nb), "seconds": round(time.time() - t0, 1)}
        if len(held_idx):
            rec["held_out_lip20_miou"], _ = held_out_miou(head, high[held_idx], vocab[held_idx],
                                                          targets[held_idx, lip], chans["lip20"])
        log.append(rec)
        bar.set_postfix({k: round(v, 4) for k, v in rec.items()})
    bar.close()
    return log


# ------------------------------------------------------------- training on live augmented views
def view_config(max_side: int) -> SampleConfig:
    """Random views of a whole photo at the serving size (``max_side`` on the long side): zoom
    0.9-1.2 (a crop when > 1: partial bodies, larger people), flip with left/right swapped,
    colour jitter, some blur and JPEG noise; the crop is the serving network size of a CCP photo."""
    return SampleConfig(crop=(max_side, max_side * 2 // 3), scale_range=(0.9, 1.2), jitter=0.2, p_blur=0.1,
                        p_jpeg=0.2)


def augmented_view(image: np.ndarray, labels: dict[str, np.ndarray], flip_luts: dict[str, np.ndarray],
                   cfg: SampleConfig, seed: int, max_side: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One random view (``samples.augment``) of a photo and every label space of it: the same
    random draws for each space, so the same crop, zoom, flip and colours."""
    pre = max(image.shape[:2]) / max_side  # the photo as served: max_side on the long side
    out = {}
    for s, lab in labels.items():
        view, out[s] = augment(image, lab, cfg, flip_luts[s], np.random.default_rng(seed), prescaled=pre)
    return view, out


def padded_stack(arrays: list[np.ndarray], fill) -> torch.Tensor:
    """Arrays of a common rank stacked, each padded at the end of every axis to the largest."""
    shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
    out = np.full((len(arrays),) + shape, fill, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[(i,) + tuple(slice(0, n) for n in a.shape)] = a
    return torch.from_numpy(out)


def stacked_views(views: list[tuple]) -> list[torch.Tensor]:
    """``photo_views`` answers as a batch: features, vocabulary logits (zero-padded) and targets
    (padded with IGNORE)."""
    return [padded_stack([v[k] for v in views], fill) for k, fill in ((0, 0.0), (1, 0.0), (2, IGNORE))]


def photo_views(parser: Parser, tap: TapFeatures, spaces: dict, i: int, seed: int | None,
                cfg: SampleConfig, flip_luts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Photo ``i``'s tap features, vocabulary logits and targets (spaces, h/4, w/4) at the serving
    size; ``seed`` None: the photo as served, else a random view (``augmented_view``, mirrored
    through ``flip_luts``, each space's ``flip_lut()``)."""
    vocabulary = parser.binding.vocabulary
    image, _ = next(iter(spaces.values())).load(i)
    labels = {s: ds.load(i)[1] for s, ds in spaces.items()}
    if seed is not None:
        image, labels = augmented_view(image, labels, flip_luts, cfg, seed, parser.max_side)
    hw = network_size(image.shape[:2], parser.max_side)
    high, vocab = tap(parser, image)
    targets = np.stack([vocab_target(labels[s], ds.classes, vocabulary, hw) for s, ds in spaces.items()])
    return high, vocab, targets[:, :vocab.shape[1], :vocab.shape[2]]


def train_head_live(head: VocabContext, parser: Parser, spaces: dict, train_ids: np.ndarray,
                    held_ids: np.ndarray, steps: int, lr: float, batch: int, seed: int = 0,
                    blocks_lr: float | None = None, state_path: str | None = None, every: int = 100
                    ) -> list[dict]:
    """``steps`` of AdamW on random views of the train photos drawn afresh every step (the
    frozen network parses each view with no click; only the head and its copied blocks learn),
    so the head never sees the same input twice, unlike the cache's two views per photo. The
    kept-out photos are scored every ``every`` steps; with ``state_path`` the head, optimiser and
    log are saved there then too and a rerun resumes from it."""
    chans = space_channels(parser.binding.vocabulary)
    lip = LABEL_SPACES.index("lip20")
    tap = TapFeatures(parser, 0 if head.blocks is None else len(head.blocks))
    cfg = view_config(parser.max_side)
    flip_luts = {s: ds.flip_lut() for s, ds in spaces.items()}
    opt, sched = head_optimizer(head, lr, blocks_lr, steps)
    log, start, total, nb = [], 0, 0.0, 0
    if state_path and os.path.exists(state_path):
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        log, start = st["log"], st["step"]
        print(f"resuming at step {start} from {state_path}")
    try:
        held = [photo_views(parser, tap, spaces, int(i), None, cfg, flip_luts) for i in held_ids]
        held = stacked_views(held)
        t0 = time.time()
        bar = tqdm(total=steps, initial=start, desc="context head, live views", dynamic_ncols=True)
        for step in range(start, steps):
            rng = np.random.default_rng((seed, step))  # a resumed run draws what it would have
            views = [photo_views(parser, tap, spaces, int(i), int(rng.integers(2 ** 31)), cfg, flip_luts)
                     for i in rng.choice(train_ids, batch, replace=False)]
            high, vocab, targets = stacked_views(views)
            frozen_statistics(head.train())
            total += optimizer_step(head_loss(head, vocab, high, targets.long(), chans, {}), opt, sched)
            nb += 1
            bar.update()
            if (step + 1) % every == 0 or step + 1 == steps:
                rec = {"step": step + 1, "loss": total / nb, "seconds": round(time.time() - t0, 1)}
                rec["held_out_lip20_miou"], _ = held_out_miou(head, held[0], held[1], held[2][:, lip].long(),
                                                              chans["lip20"])
                log.append(rec)
                total, nb = 0.0, 0
                bar.set_postfix({k: round(v, 4) for k, v in rec.items()})
                if state_path:
                    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                "log": log, "step": step + 1}, state_path + ".tmp")
                    os.replace(state_path + ".tmp", state_path)
        bar.close()
    finally:
        tap.close()
    return log


def with_head(ckpt: dict, head: VocabContext, width: int, version: str, training: dict) -> dict:
    """``ckpt`` with the head added (``net.vocab_context``) under a new model version."""
    blocks = 0 if head.blocks is None else len(head.blocks)
    cfg = NetConfig.from_dict({**ckpt["net"], "vocab_context": width, "vocab_context_blocks": blocks,
                               "vocab_context_pool": head.pool_bins})
    net = build_network(cfg)
    load_widening(net, ckpt["state_dict"])
    net.vocab_context.load_state_dict(head.state_dict())
    half = ckpt.get("training", {}).get("weights_dtype", "float16") == "float16"
    return {**ckpt, "net": cfg.to_dict(), "state_dict": stored_state(net.state_dict(), half),
            "model_version": version,
            "training": {**ckpt.get("training", {}), "vocab_context": training}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="ihp_backend/models/default.pt", help="the network to extend")
    ap.add_argument("--data", default="../shared/data/ccp")
    ap.add_argument("--parts", default="data/ccp_parts", help="model_training.pose_labels output")
    ap.add_argument("--cache", default=None, help="feature cache (default: runs/vocab_context/cache-<version>)")
    ap.add_argument("--holdout", type=int, default=63, help="first train photos kept out and scored")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--balance", type=float, default=0.0, help="class weights (pixel share)^-balance (cached training only)")
    ap.add_argument("--blocks", type=int, default=0,
                    help="the head's own copy of the backbone's last N blocks, trained (0: the head alone)")
    ap.add_argument("--blocks-lr", type=float, default=None, help="learning rate of the copied blocks (default lr/10)")
    ap.add_argument("--init-head", default=None,
                    help="a checkpoint with a context head of --width and no blocks: its layers start this head's")
    ap.add_argument("--pool", type=int, nargs="*", default=[], metavar="BINS",
                    help="pyramid pooling bins of the head (e.g. 1 2 4: the whole photo's mean features, "
                         "and over 2x2 and 4x4 grids)")
    ap.add_argument("--live-steps", type=int, default=0,
                    help="train this many steps on random views of the photos drawn afresh (zoom, flip, colour, "
                         "noise; the network runs on each) instead of --epochs on the cached features")
    ap.add_argument("--every", type=int, default=100, help="--live-steps: score and save the state every N steps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", required=True, help="model version of the new checkpoint")
    ap.add_argument("--out", required=True, help="the new checkpoint")
    ap.add_argument("--recipe-stage", default=None, help=argparse.SUPPRESS)  # set by model_training.recipe
    ap.add_argument("--recipe-file", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = read_checkpoint(a.checkpoint)
    if not ckpt["net"].get("vocab_size"):
        raise SystemExit(f"{a.checkpoint} has no vocabulary head (net.vocab_size 0): nothing to extend")
    if ckpt["net"].get("vocab_context"):
        raise SystemExit(f"{a.checkpoint} already has a vocabulary context head")
    vocabulary = tuple(ckpt["vocabulary"])
    head = context_head(ckpt, a.width, a.blocks, read_checkpoint(a.init_head) if a.init_head else None,
                        tuple(a.pool))
    if a.live_steps:
        spaces = {s: ccp_parts(a.data, a.parts, "train", s) for s in LABEL_SPACES}
        ids = np.arange(len(spaces[LABEL_SPACES[0]]))
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        log = train_head_live(head, served_parser(a.checkpoint, a.threads), spaces, ids[a.holdout:],
                              ids[:a.holdout], a.live_steps, a.lr, a.batch, a.seed, a.blocks_lr,
                              state_path=a.out + ".state", every=a.every)
    else:
        cache = a.cache or os.path.join("runs", "vocab_context", f"cache-{ckpt['model_version']}"
                                        + (f"-tap{a.blocks}" if a.blocks else ""))
        if not os.path.exists(os.path.join(cache, "targets.npy")):
            cache_features(served_parser(a.checkpoint, a.threads), a.data, a.parts, "train", cache, a.blocks)
        high = torch.from_numpy(np.load(os.path.join(cache, "high.npy")).astype(np.float32))
        vocab = torch.from_numpy(np.load(os.path.join(cache, "vocab.npy")).astype(np.float32))
        targets = torch.from_numpy(np.load(os.path.join(cache, "targets.npy")).astype(np.int64))
        held = np.arange(0, 2 * a.holdout, 2)  # the photos kept out, not mirrored
        train = np.arange(2 * a.holdout, len(high))
        log = train_head(head, high, vocab, targets, vocabulary, train, held, a.epochs, a.lr, a.batch, a.balance,
                         a.seed, a.blocks_lr)
    for rec in log:
        print(rec)
    args = {k: v for k, v in vars(a).items() if not k.startswith("recipe_")}
    training = {"command": "model_training.train_vocab_context", "args": args, "log": log}
    new = with_head(ckpt, head.eval(), a.width, a.version, training)
    if a.recipe_stage:
        from .recipe import git_commit, lineage, load_recipe
        recipe = load_recipe(a.recipe_file)
        new["training"]["recipe"] = {"file": os.path.relpath(a.recipe_file), "stage": a.recipe_stage,
                                     "lineage": lineage(recipe, a.recipe_stage), "commit": git_commit()}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_checkpoint(new, a.out)
    print(f"wrote {a.out} ({a.version})")


if __name__ == "__main__":
    main()
