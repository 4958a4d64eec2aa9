"""The one checkpoint format, written by training and read by serving.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with ``weights_only=True``:

    format            "ihp-checkpoint"
    format_version    1
    state_dict        network weights (``ihp_backend.core.network.IHPNet``)
    net               ``NetConfig.to_dict()``: backbone, num_slots, widths, prev_mask
    binding           "fixed" | "shuffled" (how label names bind to input/output slots)
    class_names       fixed: the name of every slot; shuffled: the training classes (info)
    background_names  names recognised as the background label (slot 0 when shuffled)
    vocabulary        (optional) the class names of the network's vocabulary head, in channel
                      order (``ihp_backend.core.vocabulary``); absent in checkpoints without the head
    input_size        longest image side fed to the network (multiple of 16)
    mean, std         RGB normalisation
    model_version     a human-readable version string
    training          free-form metadata (data, recipe, metrics, step, ...)
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import torch

from .network import IHPNet, NetConfig, build_network

FORMAT = "ihp-checkpoint"
FORMAT_VERSION = 1
DEFAULT_BACKGROUND_NAMES = ("background", "bg", "__background__")


class BindingError(ValueError):
    """A label config cannot be mapped onto the model's slots."""


@dataclass
class Binding:
    """How label names map to network slots.

    ``fixed``: slot i is ``class_names[i]`` (the paper's class-aware channels).
    ``shuffled``: slot 0 is background; the other labels of a config take slots 1..K in
    config order (the network was trained with random slot permutations, so any order works).
    """

    kind: str
    num_slots: int
    class_names: list[str] = field(default_factory=list)
    background_names: tuple[str, ...] = DEFAULT_BACKGROUND_NAMES
    vocabulary: tuple[str, ...] = ()  # names of the vocabulary head's channels (may be empty)

    def known(self, labels: list[str]) -> dict[str, int]:
        """{label: vocabulary channel} for the labels this model knows by meaning."""
        if not self.vocabulary:
            return {}
        from .vocabulary import lookup
        return lookup(labels, self.vocabulary)

    def is_background(self, name: str) -> bool:
        return name.strip().lower() in {b.lower() for b in self.background_names}

    def bind(self, labels: list[str]) -> dict[str, int]:
        """Map each label name of a config to a slot; raise BindingError if impossible."""
        if self.kind == "fixed":
            index = {n.lower(): i for i, n in enumerate(self.class_names)}
            out, unknown = {}, []
            for lab in labels:
                if lab.lower() in index:
                    out[lab] = index[lab.lower()]
                elif self.is_background(lab) and self._background_slot() is not None:
                    out[lab] = self._background_slot()
                else:
                    unknown.append(lab)
            if unknown:
                raise BindingError(
                    f"labels {unknown} are not classes of this class-aware model "
                    f"(it knows {self.class_names})")
            return out
        if self.kind == "shuffled":
            out, nxt = {}, 1
            parts = [lab for lab in labels if not self.is_background(lab)]
            if len(parts) > self.num_slots - 1:
                raise BindingError(
                    f"the label config has {len(parts)} non-background labels but this model "
                    f"has only {self.num_slots - 1} part slots; use fewer labels or a model "
                    f"with more slots")
            for lab in labels:
                if self.is_background(lab):
                    out[lab] = 0
                else:
                    out[lab] = nxt
                    nxt += 1
            return out
        raise BindingError(f"unknown binding kind {self.kind!r}")

    def _background_slot(self) -> int | None:
        for i, n in enumerate(self.class_names):
            if self.is_background(n):
                return i
        return None


def make_checkpoint(net: IHPNet, binding: Binding, input_size: int, mean, std,
                    model_version: str, training: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "net": net.cfg.to_dict(),
        "binding": binding.kind,
        "class_names": list(binding.class_names),
        "background_names": list(binding.background_names),
        **({"vocabulary": list(binding.vocabulary)} if binding.vocabulary else {}),
        "input_size": int(input_size),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "model_version": str(model_version),
        "training": training or {},
    }


def write_atomically(path: str, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, flushed to disk, then renamed
    over ``path``: a crash never leaves a half-written file (checkpoints, registry records)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write a checkpoint atomically (``write_atomically``)."""
    write_atomically(path, lambda tmp: torch.save(ckpt, tmp))


def read_checkpoint(path: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an IHP checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {ckpt['format_version']}, "
                         f"newer than this code ({FORMAT_VERSION})")
    return ckpt


def binding_of(ckpt: dict) -> Binding:
    return Binding(kind=ckpt["binding"], num_slots=int(ckpt["net"]["num_slots"]),
                   class_names=list(ckpt.get("class_names", [])),
                   background_names=tuple(ckpt.get("background_names", DEFAULT_BACKGROUND_NAMES)),
                   vocabulary=tuple(ckpt.get("vocabulary", ())))


def network_of(ckpt: dict) -> IHPNet:
    net = build_network(NetConfig.from_dict(ckpt["net"]))
    net.load_state_dict(ckpt["state_dict"])
    return net
