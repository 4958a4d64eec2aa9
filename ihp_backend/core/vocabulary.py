"""Label names the network knows by meaning (the class-aware vocabulary head).

A label config whose names are in this vocabulary (LIP-20, CIHP-20, PASCAL-Person-Part and
CCP's 12 merged classes, with common spellings) gets a parse with no click at all: the
network's vocabulary head scores every known class (softmax over the config's known classes
only). Names outside it still work from clicks, on label-agnostic (shuffled) slots. The list
is stored in every checkpoint that has the head (``vocabulary``), so a checkpoint carries its
own meaning; this module's list is the one the shipped recipe trains.
"""
from __future__ import annotations

import re

# index = output channel of the vocabulary head; canonical spelling as in LIP / CIHP / PPP / CCP
VOCABULARY = (
    "Background", "Hat", "Hair", "Glove", "Sunglasses", "UpperClothes", "Dress", "Coat", "Socks",
    "Pants", "Jumpsuits", "Scarf", "Skirt", "Face", "Left-arm", "Right-arm", "Left-leg",
    "Right-leg", "Left-shoe", "Right-shoe", "Torso-skin",
    "Head", "Torso", "Upper-arms", "Lower-arms", "Upper-legs", "Lower-legs",
    "Skin", "Legwear", "Shoes", "Bag", "Accessories",
)
# other spellings (after ``name_key``) -> canonical name
ALIASES = {
    "bg": "Background", "background": "Background", "upperclothes": "UpperClothes",
    "upperclothing": "UpperClothes", "top": "UpperClothes", "gloves": "Glove",
    "jumpsuit": "Jumpsuits", "torso": "Torso", "upperarm": "Upper-arms", "lowerarm": "Lower-arms",
    "upperleg": "Upper-legs", "lowerleg": "Lower-legs", "leftarm": "Left-arm", "rightarm": "Right-arm",
    "leftleg": "Left-leg", "rightleg": "Right-leg", "leftshoe": "Left-shoe", "rightshoe": "Right-shoe",
    "torsoskin": "Torso-skin", "shoe": "Shoes", "bags": "Bag", "accessory": "Accessories",
    "eyewear": "Sunglasses", "glasses": "Sunglasses", "hats": "Hat", "pant": "Pants",
    "trousers": "Pants",
}


def name_key(name: str) -> str:
    """Spelling-insensitive key: lower case, letters only ("Upper-clothes" -> "upperclothes")."""
    return re.sub(r"[^a-z]", "", str(name).lower())


def vocabulary_index(names=VOCABULARY) -> dict[str, int]:
    """name key -> channel, the canonical names and their aliases."""
    index = {name_key(n): i for i, n in enumerate(names)}
    for alias, canonical in ALIASES.items():
        if canonical in names and alias not in index:
            index[alias] = names.index(canonical)
    return index


def lookup(labels, names=VOCABULARY) -> dict[str, int]:
    """{label: vocabulary channel} for the labels the vocabulary knows (others left out)."""
    index = vocabulary_index(tuple(names))
    return {lab: index[name_key(lab)] for lab in labels if name_key(lab) in index}


def mirrored_channels(names=VOCABULARY) -> list[int]:
    """Channel i -> the channel of its mirror image's name ("Left-arm" <-> "Right-arm"; itself
    for names without a side): a horizontally flipped photo shows the person's left as right."""
    index = {n: i for i, n in enumerate(names)}
    out = list(range(len(names)))
    for i, n in enumerate(names):
        for a, b in (("Left-", "Right-"), ("Right-", "Left-")):
            if n.startswith(a) and b + n[len(a):] in index:
                out[i] = index[b + n[len(a):]]
    return out
