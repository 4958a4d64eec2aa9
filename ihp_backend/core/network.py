"""The IHP network: DeepLabV3+ whose first convolution reads RGB plus click maps.

One definition, used by serving (`ihp_backend.core.inference`) and training
(`model_training.train`). MobileNetV3 and the ASPP block are in `backbones` (torchvision's
layout, without importing torchvision); the ResNet backbones come from torchvision; the
DeepLabV3+ decoder (low-level skip at stride 4) is written here, because torchvision ships
DeepLabV3 without it.

Input: ``3 + num_slots (+ num_slots if prev_mask)`` channels = normalised RGB, one
localization map per class slot (paper Eq. 1, background included: the paper's C+4
channels for C part classes) and, optionally, the previous prediction as one-hot
slot channels (RITM-style iterative input; off in the paper).
Output: ``num_slots`` logits at the input resolution, and the stride-4 decoder
features that the SP-loss (paper Eq. 2) is computed on. Optionally two more heads on the same
1x1 classifier: an *unclaimed* channel (a person part that no click names: its pixels get no
label, so a parse grows with the clicks) and a *vocabulary* head of ``vocab_size`` class-aware
channels (``ihp_backend.core.vocabulary``: known label names parsed with no click). Channels:
``[slots | unclaimed | vocabulary]``.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ASPP, mobilenet_v3_large_features

BACKBONES = ("mobilenet_v3_large", "resnet50", "resnet101")


@dataclass(frozen=True)
class NetConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    num_slots: int = 24
    backbone: str = "mobilenet_v3_large"
    aspp_channels: int = 128
    decoder_channels: int = 96
    low_level_channels: int = 32
    first_kernel: int = 7
    prev_mask: bool = False
    unclaimed: bool = False  # one more output after the slots: "a part nobody has clicked"
    vocab_size: int = 0  # outputs of the vocabulary head (known class names, zero-click parse)
    vocab_branch: int = 0  # > 0: a branch of this width (two separable 3x3 convs + 1x1) whose
    # output is added to the vocabulary logits: class-aware capacity of its own, beside the slots
    vocab_context: int = 0  # > 0: a head of this width on the backbone's stride-16 features
    # (``VocabContext``) whose logits, upsampled, are added to the vocabulary logits
    vocab_context_blocks: int = 0  # > 0: the head has its own copy of the backbone's last this
    # many blocks and reads the features before them (class-aware backbone capacity of its own)
    vocab_context_pool: tuple = ()  # pyramid pooling bins of the context head (e.g. (1, 2, 4)):
    # the head also sees the photo's average features over a bins x bins grid (the whole outfit)

    @property
    def in_channels(self) -> int:
        return 3 + self.num_slots * (2 if self.prev_mask else 1)

    @property
    def unclaimed_channel(self) -> int | None:
        """Output channel of the unclaimed class (None when the network has none)."""
        return self.num_slots if self.unclaimed else None

    @property
    def vocab_start(self) -> int:
        """First output channel of the vocabulary head."""
        return self.num_slots + int(self.unclaimed)

    @property
    def out_channels(self) -> int:
        return self.vocab_start + self.vocab_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "vocab_context_pool" in known:
            known["vocab_context_pool"] = tuple(known["vocab_context_pool"])
        return cls(**known)


def _separable(cin: int, cout: int) -> nn.Sequential:
    """Depthwise-separable 3x3 conv + BN + ReLU, as in the DeepLabV3+ decoder."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _Encoder(nn.Module):
    """A backbone at output stride 16 returning (stride-4, stride-16) features."""

    def __init__(self, name: str, in_channels: int, first_kernel: int):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        self.name = name
        pad = first_kernel // 2
        if name == "mobilenet_v3_large":
            feats = mobilenet_v3_large_features(dilated=True)
            old = feats[0][0]
            feats[0][0] = nn.Conv2d(in_channels, old.out_channels, first_kernel, stride=2,
                                    padding=pad, bias=False)
            self.low = feats[:4]  # stride 4, 24 channels
            self.high = feats[4:]  # stride 16 (dilated last stage), 960 channels
            self.low_channels, self.high_channels = 24, 960
        else:
            from torchvision.models import resnet50, resnet101  # imported only for these (torch._dynamo comes with it)
            ctor = resnet50 if name == "resnet50" else resnet101
            net = ctor(weights=None, replace_stride_with_dilation=[False, False, True])
            net.conv1 = nn.Conv2d(in_channels, 64, first_kernel, stride=2, padding=pad, bias=False)
            self.low = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
            self.high = nn.Sequential(net.layer2, net.layer3, net.layer4)
            self.low_channels, self.high_channels = 256, 2048

    def forward(self, x: torch.Tensor, first_conv: nn.Module | None = None, tap: int = 0):
        """(stride-4, stride-16) features; ``first_conv`` replaces the first conv (an input in
        another channel layout, ``restricted_first_conv``). ``tap`` > 0: also the features before
        the last ``tap`` blocks of ``high``, as a third element."""
        if first_conv is None:
            low = self.low(x)
        else:
            # mobilenet: low[0] = (conv, norm, activation), then blocks; resnet: low = (conv1, bn1, ...)
            stem = list(self.low[0])[1:] if self.name == "mobilenet_v3_large" else []
            low = first_conv(x)
            for m in stem + list(self.low)[1:]:
                low = m(low)
        if not tap:
            return low, self.high(low)
        mid = self.high[:-tap](low)
        return low, self.high[-tap:](mid), mid

    def first_conv(self) -> nn.Conv2d:
        return self.low[0][0] if self.name == "mobilenet_v3_large" else self.low[0]

    def first_conv_key(self) -> str:
        """The first conv's weight name in this encoder's state dict (found from ``first_conv``,
        so the layout is written in one place)."""
        first = self.first_conv()
        return next(n for n, m in self.named_modules() if m is first) + ".weight"


class VocabContext(nn.Module):
    """Vocabulary logits from the backbone's stride-16 features, the most class-aware ones (the
    decoder's are trained mostly for label-agnostic slots): 1x1 to ``width``, a 3x3 of dilation
    2, 1x1 to the vocabulary, at stride 16 (36 x 24 positions at the serving size). Its last conv
    starts at zero, so a network given one computes what it did. Trained on inputs without clicks
    (``model_training.train_vocab_context``), it serves the parse that has none: the Parser runs
    it only then (``IHPNet.forward(vocab_context=...)``), so every clicked parse is unchanged.

    ``blocks`` (``NetConfig.vocab_context_blocks``): a copy of the backbone's last blocks, run on
    the features before them, so that the head has class-aware backbone capacity of its own while
    the shared backbone stays what the click path was trained with."""

    def __init__(self, in_channels: int, width: int, vocab_size: int, blocks: nn.Module | None = None,
                 pool_bins: tuple = ()):
        super().__init__()
        self.blocks = blocks  # None: reads the backbone's own stride-16 features
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        # pyramid pooling (Zhao et al., PSPNet, CVPR 2017): the mean features of the whole photo
        # and of a coarse grid of it, so a pixel's class can depend on the whole outfit (a skirt
        # or a dress is decided by what is above and below it)
        self.pool_bins = tuple(pool_bins)
        self.pool = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(width, width // 4, 1),
                                                nn.ReLU(inplace=True)) for b in pool_bins)
        self.context = nn.Sequential(nn.Conv2d(width + len(pool_bins) * (width // 4), width, 3, padding=2,
                                               dilation=2, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.drop = nn.Dropout2d(0.1)  # training only
        self.out = nn.Conv2d(width, vocab_size, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, high: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at stride 16 from ``high`` (with ``blocks``: the features before them)."""
        if self.blocks is not None:
            high = self.blocks(high)
        r = self.reduce(high)
        if len(self.pool):
            r = torch.cat([r] + [F.interpolate(p(r), size=r.shape[-2:], mode="bilinear", align_corners=False)
                                 for p in self.pool], 1)
        return self.out(self.drop(self.context(r)))

    def added_to(self, vocab: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``vocab`` (vocabulary logits at stride 4) plus this head's logits from ``high``,
        upsampled to them: what the network serves and what the head is trained on."""
        return vocab + F.interpolate(self(high).to(vocab.dtype), size=vocab.shape[-2:], mode="bilinear",
                                     align_corners=False)


class IHPNet(nn.Module):
    """DeepLabV3+ (ASPP + stride-4 decoder skip, output stride 16) for interactive parsing."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg.backbone, cfg.in_channels, cfg.first_kernel)
        self.aspp = ASPP(self.encoder.high_channels, [6, 12, 18], cfg.aspp_channels)
        self.low_proj = nn.Sequential(
            nn.Conv2d(self.encoder.low_channels, cfg.low_level_channels, 1, bias=False),
            nn.BatchNorm2d(cfg.low_level_channels),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            _separable(cfg.aspp_channels + cfg.low_level_channels, cfg.decoder_channels),
            _separable(cfg.decoder_channels, cfg.decoder_channels),
        )
        self.classifier = nn.Conv2d(cfg.decoder_channels, cfg.out_channels, 1)
        self.vocab_branch = None
        if cfg.vocab_branch and cfg.vocab_size:
            self.vocab_branch = nn.Sequential(
                _separable(cfg.decoder_channels, cfg.vocab_branch),
                _separable(cfg.vocab_branch, cfg.vocab_branch),
                nn.Conv2d(cfg.vocab_branch, cfg.vocab_size, 1),
            )
            nn.init.zeros_(self.vocab_branch[-1].weight)  # added to a trained head: starts silent
            nn.init.zeros_(self.vocab_branch[-1].bias)
        self.vocab_context = None
        if cfg.vocab_context and cfg.vocab_size:
            n = cfg.vocab_context_blocks
            if n and not 0 < n < len(self.encoder.high):
                raise ValueError(f"vocab_context_blocks must be 1..{len(self.encoder.high) - 1}, not {n}")
            blocks = copy.deepcopy(self.encoder.high[-n:]) if n else None
            self.vocab_context = VocabContext(self.encoder.high_channels, cfg.vocab_context, cfg.vocab_size, blocks,
                                              tuple(cfg.vocab_context_pool))
        # torchvision's MobileNetV3 uses BN momentum 0.01, tuned for very long schedules; with
        # short CPU runs and fine-tuning the running statistics would lag far behind the weights
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1

    def forward_features(self, x: torch.Tensor, first_conv: nn.Module | None = None,
                         vocab_context: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits at stride 4, decoder features at stride 4); ``first_conv`` as in
        ``_Encoder.forward``; ``vocab_context=False`` leaves the context head out (it was trained
        on inputs without clicks, and serves the parse that has none)."""
        context = self.vocab_context if vocab_context else None
        tap = self.cfg.vocab_context_blocks if context is not None else 0
        low, high, *mid = self.encoder(x, first_conv, tap)
        ctx = self.aspp(high)
        ctx = F.interpolate(ctx, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.decoder(torch.cat([ctx, self.low_proj(low)], dim=1))
        logits = self.classifier(feats)
        if self.vocab_branch is not None or context is not None:
            v = self.cfg.vocab_start
            vocab = logits[:, v:]
            if self.vocab_branch is not None:
                vocab = vocab + self.vocab_branch(feats)
            if context is not None:
                vocab = context.added_to(vocab, mid[0] if tap else high)
            logits = torch.cat([logits[:, :v], vocab], dim=1)
        return logits, feats

    def forward(self, x: torch.Tensor, features: bool = False, first_conv: nn.Module | None = None,
                vocab_context: bool = True):
        """Logits at the input resolution; with ``features=True`` the stride-4
        (logits, decoder features) pair instead (the form DDP training calls). ``first_conv``
        (serving) runs an input of fewer channels, ``restricted_first_conv``; ``vocab_context`` as
        in ``forward_features``."""
        logits, feats = self.forward_features(x, first_conv, vocab_context)
        if features:
            return logits, feats
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_network(cfg: NetConfig) -> IHPNet:
    return IHPNet(cfg)


def restricted_first_conv(conv: nn.Conv2d, keep, ones) -> nn.Conv2d:
    """``conv`` for an input made of its channels ``keep`` (in that order) and, when ``ones`` is
    not empty, one last channel of ones standing for the channels ``ones``; valid for inputs whose
    ``ones`` channels are constant 1 and whose other left-out channels are 0 (the maps of slots
    nobody clicked, paper Eq. 1 saturated; the previous-prediction planes of absent labels).
    Weight ``[W[:, keep], sum of W[:, c] over ones]``: a conv is linear in its input channels and
    zero-pads each alike, so the output is ``conv``'s up to float rounding, at a fraction of the
    work (the default's 7x7 first conv reads 51 channels at the full network size)."""
    if conv.groups != 1:
        raise ValueError("restricted_first_conv needs a dense conv (groups=1)")
    keep, ones = list(keep), list(ones)
    w = conv.weight.detach()
    parts = [w[:, keep]] + ([w[:, ones].sum(dim=1, keepdim=True)] if ones else [])
    out = nn.utils.skip_init(nn.Conv2d, len(keep) + (1 if ones else 0), conv.out_channels, conv.kernel_size,
                             conv.stride, conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None,
                             padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)  # no random init
    with torch.no_grad():
        out.weight.copy_(torch.cat(parts, dim=1))
        if conv.bias is not None:
            out.bias.copy_(conv.bias.detach())
    return out.to(memory_format=torch.channels_last)


def conv_of_patches(conv: nn.Conv2d, patches, in_hw: tuple[int, int]) -> list[tuple[slice, slice, torch.Tensor]]:
    """``conv`` (no bias; dilation 1, groups 1) of an ``in_hw`` input whose channels are zero
    everywhere but in ``patches`` [(channel, y0, x0, values (h, w) tensor)], patch by patch, as [(output rows,
    output cols, (out_channels, r, c) tensor)]: added to the conv of the rest of the input, the
    conv of the whole (a conv is linear in its input). A click changes its slot's map (paper
    Eq. 1) only in a small window: a map is 1 plus such patches (``Parser`` reads the 1 through
    ``restricted_first_conv``'s plane of ones)."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ho, wo = ((n + 2 * p - k) // st + 1 for n, p, k, st in zip(in_hw, (ph, pw), (kh, kw), (sh, sw)))
    w = conv.weight.detach()
    terms = []
    for ch, y0, x0, vals in patches:
        y1, x1 = y0 + vals.shape[0], x0 + vals.shape[1]
        o0, o1 = max(0, -(-(y0 - kh + 1 + ph) // sh)), min(ho - 1, (y1 - 1 + ph) // sh)  # outputs that see it
        q0, q1 = max(0, -(-(x0 - kw + 1 + pw) // sw)), min(wo - 1, (x1 - 1 + pw) // sw)
        if o0 > o1 or q0 > q1:
            continue
        iy0, ix0 = sh * o0 - ph, sw * q0 - pw  # their receptive field, padding included
        iy1, ix1 = sh * o1 - ph + kh, sw * q1 - pw + kw
        buf = torch.zeros((1, 1, iy1 - iy0, ix1 - ix0), dtype=w.dtype, device=w.device)
        ya, yb, xa, xb = max(y0, iy0), min(y1, iy1), max(x0, ix0), min(x1, ix1)
        buf[0, 0, ya - iy0:yb - iy0, xa - ix0:xb - ix0] = vals[ya - y0:yb - y0, xa - x0:xb - x0]
        terms.append((slice(o0, o1 + 1), slice(q0, q1 + 1), F.conv2d(buf, w[:, ch:ch + 1], stride=conv.stride)[0]))
    return terms


def label_planes_conv(weight: torch.Tensor, labels: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Conv (no bias) of the one-hot planes of ``labels`` (h, w) int, -1 for no label, through
    ``weight`` (O, K, kh, kw), one input channel per label 0..K-1 -> (O, ho, wo). Only the
    planes of the labels present are built and read (the previous-prediction input)."""
    counts = torch.bincount(labels.flatten().long().clamp(-1, weight.shape[1]) + 1, minlength=weight.shape[1] + 2)
    present = torch.nonzero(counts[1:weight.shape[1] + 1]).flatten().tolist()
    if not present:
        ho, wo = ((n + 2 * padding - k) // stride + 1 for n, k in zip(labels.shape, weight.shape[2:]))
        return weight.new_zeros((weight.shape[0], ho, wo))
    idx = torch.as_tensor(present)
    planes = (labels[None] == idx[:, None, None]).to(weight.dtype)
    return F.conv2d(planes[None], weight[:, idx], stride=stride, padding=padding)[0]


def changed_tiles(changed: torch.Tensor, out_hw: tuple[int, int], kernel: int, stride: int, padding: int,
                  tile: int) -> torch.Tensor:
    """The ``tile`` x ``tile`` blocks of a conv's output (``out_hw``, both multiples of
    ``tile``) that see an input pixel of ``changed`` (h, w) bool: (N, 2) block rows and columns.
    Output row o reads input rows ``stride * o - padding`` .. ``+ kernel - 1``, so a block reads
    a window of input rows and columns; the changed pixels in every window are counted at once
    from the running sums of ``changed`` (an integral image)."""
    h, w = changed.shape
    run = F.pad(changed.to(torch.int32).cumsum(0).cumsum(1), (1, 0, 1, 0))  # (h + 1, w + 1)

    def windows(n_blocks: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.arange(n_blocks) * tile * stride - padding
        return first.clamp(0, n_in), (first + (tile - 1) * stride + kernel).clamp(0, n_in)

    r0, r1 = windows(out_hw[0] // tile, h)
    c0, c1 = windows(out_hw[1] // tile, w)
    inside = run[r1][:, c1] - run[r0][:, c1] - run[r1][:, c0] + run[r0][:, c0]
    return torch.nonzero(inside > 0)


def conv_of_label_change(weight: torch.Tensor, old: torch.Tensor, new: torch.Tensor, tiles: torch.Tensor,
                         stride: int, padding: int, tile: int) -> torch.Tensor:
    """What changing the label map from ``old`` to ``new`` ((h, w) int, -1 for no label) adds to
    ``label_planes_conv``'s output in the output blocks ``tiles`` (``changed_tiles``): (N, O,
    tile, tile). Each block's input window (with the conv's zero padding, as label -1) is cut
    from both maps; only the labels that differ somewhere in them get a plane of
    ``onehot(new) - onehot(old)``. A conv is linear in its input, so the block's new output is
    its old one plus this."""
    kh = weight.shape[2]
    span = (tile - 1) * stride + kh
    h, w = old.shape
    pad = kh + tile * stride  # room for every block's window
    both = torch.full((2, h + 2 * pad, w + 2 * pad), -1, dtype=torch.int16)
    both[0, pad:pad + h, pad:pad + w] = old
    both[1, pad:pad + h, pad:pad + w] = new
    r = (tiles[:, 0] * tile * stride - padding + pad)[:, None] + torch.arange(span)[None]  # (N, span)
    c = (tiles[:, 1] * tile * stride - padding + pad)[:, None] + torch.arange(span)[None]
    blocks = both[:, r[:, :, None], c[:, None, :]]  # (2, N, span, span)
    differ = blocks[0] != blocks[1]
    labels = torch.unique(torch.cat([blocks[0][differ], blocks[1][differ]]))
    labels = labels[(labels >= 0) & (labels < weight.shape[1])].long()
    if not len(labels):
        return weight.new_zeros((len(tiles), weight.shape[0], tile, tile))
    planes = (blocks[1][:, None] == labels[None, :, None, None]).to(weight.dtype) \
        - (blocks[0][:, None] == labels[None, :, None, None]).to(weight.dtype)
    return F.conv2d(planes, weight[:, labels], stride=stride)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d in a Sequential into that conv
    (inference only: uses the running statistics). Same outputs up to float rounding, fewer
    passes over memory per forward. Modifies ``net`` in place and returns it."""
    if net.training:
        raise ValueError("fold_batchnorm needs a network in eval mode")
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias.detach() - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias.detach() * scale
            fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, conv.groups, bias=True,
                              padding_mode=conv.padding_mode).to(conv.weight.device)
            with torch.no_grad():
                fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                fused.bias.copy_(bias)
            seq[i], seq[i + 1] = fused, nn.Identity()
    return net


class LowRankASPP(nn.Module):
    """torchvision's ASPP (Chen et al. 2018, DeepLabV3+) whose four conv branches read one
    shared projection of the input to ``rank`` channels (``low_rank_aspp``)."""

    def __init__(self, reduce: nn.Conv2d, branches: nn.ModuleList, pooling: nn.Module, project: nn.Module):
        super().__init__()
        self.reduce, self.branches, self.pooling, self.project = reduce, branches, pooling, project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce(x)
        return self.project(torch.cat([b(z) for b in self.branches] + [self.pooling(x)], dim=1))


def aspp_saves_work(in_channels: int, taps_times_out: int, rank: int) -> bool:
    """Whether a shared rank-``rank`` projection needs fewer multiply-adds than the branches
    reading all ``in_channels`` (``taps_times_out``: every branch's kernel taps x outputs)."""
    return 0 < rank and rank * (in_channels + taps_times_out) < in_channels * taps_times_out


def top_right_singular_vectors(a: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading right singular vectors of ``a`` (columns), from the eigenvectors of
    a^T a: a third of a full SVD's time for the ASPP's 3584 x 960 kernels (0.2 s, float64)."""
    _, vecs = torch.linalg.eigh(a.T @ a)  # ascending eigenvalues
    return vecs[:, -rank:].flip(1)


def low_rank_aspp(aspp: nn.Module, rank: int, input_moment: torch.Tensor | None = None) -> nn.Module:
    """The ASPP with its branches' kernels factored through one shared 1x1 projection to
    ``rank`` channels (serving only; data-free, at load).

    The 1x1 and the three dilated 3x3 branches all read the same input (960 channels on the
    MobileNetV3 default); their 28 kernel taps stacked as one matrix M (taps x outputs, inputs)
    are close to low rank. The truncated SVD M ~ Q P (P: ``rank`` x inputs) turns P into one 1x1
    conv and Q into each branch's conv over ``rank`` channels: the same ops, about a third of
    the ASPP's time at rank 128 (docs/performance.md). Zero padding stays zero (P has no bias);
    the image-pooling branch and the projection are kept as they are. Returns ``aspp`` itself
    when the rank would save nothing. ``input_moment`` (E[x x^T] of the ASPP's input pixels, if
    known) makes the factorization minimise the error on such inputs instead of on the kernels
    (experiments/aspp_low_rank.py: rank 64 then does what rank 128 does without it).
    """
    *branches, pooling = aspp.convs
    convs = [b[0] for b in branches]
    weights = [c.weight.detach().double() for c in convs]
    m = torch.cat([w.permute(2, 3, 0, 1).reshape(-1, w.shape[1]) for w in weights])
    if not aspp_saves_work(m.shape[1], m.shape[0], rank):
        return aspp
    if input_moment is None:
        v = top_right_singular_vectors(m, rank)
        p, q = v.T, m @ v
    else:  # M x ~ Q P x for x with that second moment C: the truncated SVD of M C^1/2
        ev, evec = torch.linalg.eigh(input_moment.double())
        ev = ev.clamp_min(float(ev.max()) * 1e-7)
        root, inv_root = (evec * ev.sqrt()) @ evec.T, (evec * ev.rsqrt()) @ evec.T
        v = top_right_singular_vectors(m @ root, rank)
        p, q = v.T @ inv_root, m @ root @ v
    dev, dtype = convs[0].weight.device, convs[0].weight.dtype
    reduce = nn.Conv2d(m.shape[1], rank, 1, bias=False).to(dev)
    new_branches, row = nn.ModuleList(), 0
    with torch.no_grad():
        reduce.weight.copy_(p.to(dtype)[:, :, None, None])
        for conv, branch, w in zip(convs, branches, weights):
            out, _, kh, kw = w.shape
            block = q[row:row + kh * kw * out].reshape(kh, kw, out, rank).permute(2, 3, 0, 1)
            row += kh * kw * out
            c = nn.Conv2d(rank, out, (kh, kw), conv.stride, conv.padding, conv.dilation,
                          bias=conv.bias is not None).to(dev)
            c.weight.copy_(block.to(dtype))
            if conv.bias is not None:
                c.bias.copy_(conv.bias)
            new_branches.append(nn.Sequential(c, *list(branch)[1:]))
    return LowRankASPP(reduce, new_branches, pooling, aspp.project).train(aspp.training)


def with_low_rank_aspp(net: IHPNet, rank: int) -> IHPNet:
    """``net`` with its ASPP factored at ``rank`` (``low_rank_aspp``; 0: unchanged). In place."""
    if rank:
        net.aspp = low_rank_aspp(net.aspp, int(rank))
    return net


def load_widening(net: IHPNet, state_dict: dict) -> dict[str, tuple[tuple, tuple]]:
    """Load ``state_dict`` into ``net``, which may be *wider* than the network it came from:
    more input channels (e.g. the previous-prediction input added), a wider stride-4 decoder
    (``decoder_channels``) or low-level projection (``low_level_channels``). Function-preserving
    (Net2Net-style): every old tensor is copied into the leading block of the new one; a conv's
    weights from new input channels start at zero, so new channels feed nothing until training
    moves those weights, and the widened network computes exactly what the original did
    (BatchNorm of new channels at its defaults). A vocabulary branch or context head the old
    network lacks (``vocab_branch``, ``vocab_context``) keeps its fresh initialisation, whose last
    conv is zero: silent too. The
    ASPP width cannot change: its branches are concatenated, so old channels would not stay a
    leading block.
    Returns {tensor name: (old shape, new shape)} of the widened tensors ({} for a plain load)."""
    own = net.state_dict()
    loaded, widened = dict(state_dict), {}
    for name, old in state_dict.items():
        new = own.get(name)
        if new is None or new.shape == old.shape:
            continue
        grows = old.dim() == new.dim() and all(o <= n for o, n in zip(old.shape, new.shape))
        if not grows or name.startswith("aspp.") or (old.dim() == 4 and old.shape[2:] != new.shape[2:]):
            raise ValueError(f"{name}: cannot widen {tuple(old.shape)} to {tuple(new.shape)}")
        w = new.detach().clone()
        if w.dim() == 4:
            w[:, old.shape[1]:] = 0  # nothing flows from the new input channels
        w[tuple(slice(0, n) for n in old.shape)] = old
        loaded[name] = w
        widened[name] = (tuple(old.shape), tuple(new.shape))
    for name, t in own.items():
        if name.startswith(("vocab_branch.", "vocab_context.")) and name not in loaded:
            loaded[name] = t  # a new branch, silent at its initialisation
            widened[name] = ((), tuple(t.shape))
    net.load_state_dict(loaded)
    return widened


def load_backbone_weights(net: IHPNet, path: str) -> list[str]:
    """Load a torchvision ImageNet state dict from a local file into the encoder.

    The RGB part of the first conv is copied (averaged spatially onto the bigger kernel
    when sizes differ); click channels start at zero so the pretrained RGB path is intact.
    Returns the names of encoder parameters that were not found in the file.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    enc = net.encoder
    first_key = "features.0.0.weight" if enc.name == "mobilenet_v3_large" else "conv1.weight"
    own = {}
    if enc.name == "mobilenet_v3_large":
        for k, v in sd.items():
            if k.startswith("features."):
                idx = int(k.split(".")[1])
                rest = k.split(".", 2)[2]
                own[(f"low.{idx}." if idx < 4 else f"high.{idx}.") + rest] = v  # slices keep keys
    else:
        rn = {"conv1": "low.0", "bn1": "low.1", "layer1": "low.4", "layer2": "high.0",
              "layer3": "high.1", "layer4": "high.2"}
        for k, v in sd.items():
            head = k.split(".", 1)[0]
            if head in rn:
                own[rn[head] + k[len(head):]] = v
    first = enc.first_conv()
    first_name = enc.first_conv_key()
    if first_key in sd:
        w_rgb = sd[first_key]
        w = torch.zeros_like(first.weight)
        if w_rgb.shape[-1] != w.shape[-1]:
            w_rgb = F.interpolate(w_rgb, size=w.shape[-2:], mode="bilinear", align_corners=False)
            w_rgb = w_rgb * (sd[first_key].shape[-1] ** 2) / (w.shape[-1] ** 2)
        w[:, :3] = w_rgb
        own[first_name] = w
    missing, _ = enc.load_state_dict(own, strict=False)
    return list(missing)
