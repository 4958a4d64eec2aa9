"""Which output channels may win, and which label each names: the one place for these rules,
used by serving (``ihp_backend.model``) and by the evaluation (``model_training.evaluate``), so
that the evaluation measures what is served. Pure functions; no HTTP."""
from __future__ import annotations

import numpy as np

from .checkpoint import Binding


def allowed_slots(binding: Binding, label_to_slot: dict[str, int], click_slots, brush_labels,
                  unclaimed: int | None = None) -> list[int]:
    """Output channels the argmax may choose from for an interactive parse.

    fixed (class-aware): every slot of the config's labels. shuffled (label-agnostic):
    background plus the slots that have at least one click (a slot nobody clicked carries no
    meaning for such a model) plus, when the network has one, the unclaimed channel: a part
    that no click names stays unlabelled, so the parse grows with the clicks.
    """
    if binding.kind == "fixed":
        brush = {label_to_slot[lab] for lab in brush_labels if lab in label_to_slot}
        return sorted(brush | set(label_to_slot.values()))
    extra = set() if unclaimed is None else {int(unclaimed)}
    return sorted({0} | {int(s) for s in np.asarray(click_slots).reshape(-1)} | extra)


def zero_click_channels(binding: Binding, vocab_start: int, brush_labels) -> dict[str, int]:
    """{brush label: vocabulary output channel} for a parse with no click: the config's part
    labels that the model knows by meaning, plus background (under the config's own background
    label when it has one, else ``"__background__"``, which names no region). Empty when the
    model has no vocabulary or the config no known part label."""
    if not binding.vocabulary:
        return {}
    known = binding.known(list(brush_labels))
    parts = [lab for lab in known if not binding.is_background(lab)]
    if not parts:
        return {}
    out = {lab: vocab_start + known[lab] for lab in parts}
    bg = next((lab for lab in known if binding.is_background(lab)), "__background__")
    out[bg] = vocab_start + binding.known(["Background"])["Background"]
    return out


def fill_channels(binding: Binding, vocab_start: int, brush_labels, label_to_slot: dict[str, int],
                  click_slots) -> tuple[dict[int, int], dict[int, str]]:
    """For a parse that fills parts nobody clicked by meaning (``IHP_FILL_KNOWN``): ({vocabulary
    channel: label value} for ``Parser.parse(fill=...)``, {label value: brush label}). The
    config's known part labels that have no click take part; vocabulary background counts as
    slot 0 (background)."""
    zc = zero_click_channels(binding, vocab_start, brush_labels)
    clicked = {int(s) for s in np.asarray(click_slots).reshape(-1)}
    fill, names = {}, {}
    for lab, ch in zc.items():
        if binding.is_background(lab):
            fill[ch] = 0
        elif label_to_slot.get(lab) not in clicked:
            fill[ch], names[ch] = ch, lab
    return (fill, names) if names else ({}, {})


def prior_channels(binding: Binding, vocab_start: int, brush_labels, label_to_slot: dict[str, int],
                   click_slots, unclaimed: int | None) -> dict[int, list[int]]:
    """For the vocabulary head's prior on an interactive parse (``Parser.parse(prior=...)``,
    ``IHP_VOCAB_PRIOR``): {output channel: the vocabulary channels it stands for}. Background
    (slot 0) is the vocabulary's Background, a clicked slot its label's class, the unclaimed
    channel every known part label nobody clicked. Empty (no prior) unless every part label of
    the config is known by meaning: a name the head does not know has no probability to add."""
    zc = zero_click_channels(binding, vocab_start, brush_labels)
    parts = [lab for lab in brush_labels if not binding.is_background(lab)]
    if not zc or any(lab not in zc for lab in parts):
        return {}
    bg = next(ch for lab, ch in zc.items() if binding.is_background(lab) or lab == "__background__")
    clicked = {int(s) for s in np.asarray(click_slots).reshape(-1)}
    out: dict[int, list[int]] = {0: [bg]}
    rest = []
    for lab in parts:
        slot = label_to_slot.get(lab)
        if slot in clicked:
            out.setdefault(slot, []).append(zc[lab])
        else:
            rest.append(zc[lab])
    if unclaimed is not None:
        out[int(unclaimed)] = rest
    return out


def slot_names(label_to_slot: dict[str, int], labels, brush_labels) -> dict[int, str]:
    """Slot -> BrushLabels name (the brush control's spelling wins)."""
    out = {}
    for lab in labels:
        if lab in label_to_slot and (label_to_slot[lab] not in out or lab in brush_labels):
            out[label_to_slot[lab]] = lab
    return out


def answered_labels(slot_to_label: dict[int, str], binding: Binding, return_background: bool) -> dict[int, str]:
    """The channels answered as regions: background labels only when asked for
    (``IHP_RETURN_BACKGROUND``); unlabelled pixels are background anyway."""
    if return_background:
        return dict(slot_to_label)
    return {s: lab for s, lab in slot_to_label.items() if not binding.is_background(lab)}
