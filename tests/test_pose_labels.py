"""Body-part labels derived from keypoints (model_training.pose_labels) on a synthetic person
whose landmarks are known, and the vocabulary that binds known names to class-aware channels."""
from __future__ import annotations

import numpy as np

from ihp_backend.core.checkpoint import Binding
from ihp_backend.core.vocabulary import VOCABULARY, lookup
from model_training.datasets import LIP_CLASSES, PPP_CLASSES
from model_training.pose_labels import CIHP_CLASSES, derive_labels

CCP = ["background", "skin", "hair", "t-shirt", "jeans", "shoes", "bag"]


def synthetic_person():
    """A front-facing person, 200 x 120: the person's LEFT side is on the image's RIGHT. Arms
    hang at the sides (bare skin), a t-shirt torso, jeans legs, shoes, hair above a face."""
    h, w = 200, 120
    lab = np.zeros((h, w), np.uint8)
    lm = np.zeros((33, 3))
    pts = {0: (60, 22), 7: (70, 20), 8: (50, 20),  # nose, left ear (image right), right ear
           11: (78, 45), 12: (42, 45), 13: (88, 75), 14: (32, 75), 15: (90, 100), 16: (30, 100),
           17: (91, 106), 18: (29, 106), 19: (90, 108), 20: (30, 108),
           23: (70, 105), 24: (50, 105), 25: (72, 145), 26: (48, 145), 27: (72, 180), 28: (48, 180),
           29: (72, 186), 30: (48, 186), 31: (74, 190), 32: (46, 190)}
    for i, (x, y) in pts.items():
        lm[i] = (x, y, 1.0)
    yy, xx = np.mgrid[:h, :w]
    lab[((yy - 24) ** 2 + (xx - 60) ** 2) < 12 ** 2] = 1  # face (skin)
    lab[(yy < 18) & (((yy - 20) ** 2 + (xx - 60) ** 2) < 14 ** 2)] = 2  # hair
    lab[40:105, 44:77] = 3  # t-shirt torso
    lab[45:105, 82:94] = 1  # left arm (image right), skin
    lab[45:105, 26:38] = 1  # right arm
    lab[105:182, 64:78] = 4  # left leg, jeans
    lab[105:182, 42:56] = 4  # right leg
    lab[182:194, 64:80] = 5  # left shoe
    lab[182:194, 40:56] = 5  # right shoe
    return lab, lm


def test_lip_parts_follow_the_persons_own_left_and_right():
    lab, lm = synthetic_person()
    out = derive_labels(lab, lm, CCP)["lip20"]
    assert out[90, 88] == LIP_CLASSES.index("Left-arm") and out[90, 32] == LIP_CLASSES.index("Right-arm")
    assert out[188, 72] == LIP_CLASSES.index("Left-shoe") and out[188, 48] == LIP_CLASSES.index("Right-shoe")
    assert out[25, 60] == LIP_CLASSES.index("Face") and out[10, 60] == LIP_CLASSES.index("Hair")
    assert out[150, 70] == LIP_CLASSES.index("Pants") and out[70, 60] == LIP_CLASSES.index("UpperClothes")
    assert out[5, 5] == 0


def test_ppp_splits_limbs_at_elbow_and_knee_clothing_included():
    lab, lm = synthetic_person()
    out = derive_labels(lab, lm, CCP)["ppp"]
    assert out[55, 88] == PPP_CLASSES.index("upper-arms") and out[95, 89] == PPP_CLASSES.index("lower-arms")
    assert out[120, 70] == PPP_CLASSES.index("upper-legs") and out[170, 70] == PPP_CLASSES.index("lower-legs")
    assert out[188, 72] == PPP_CLASSES.index("lower-legs")  # feet belong to the lower legs
    assert out[10, 60] == PPP_CLASSES.index("head") and out[70, 60] == PPP_CLASSES.index("torso")


def test_cihp_has_torso_skin_and_ccp12_is_unchanged():
    lab, lm = synthetic_person()
    lab[60:70, 55:65] = 1  # bare skin on the torso
    d = derive_labels(lab, lm, CCP)
    assert d["cihp20"][65, 60] == CIHP_CLASSES.index("Torso-skin")
    assert d["lip20"][65, 60] == 255  # LIP has no class for it
    assert set(np.unique(d["ccp12"])) <= set(range(12))


def test_no_pose_leaves_the_body_parts_unknown():
    lab, _ = synthetic_person()
    d = derive_labels(lab, None, CCP)
    assert (d["lip20"][lab > 0] == 255).all() and (d["lip20"][lab == 0] == 0).all()


def test_vocabulary_binds_known_names_and_spellings():
    known = lookup(["Background", "Upper-clothes", "UpperClothes", "upper clothes", "Torso-skin",
                    "Head", "left_arm", "Fur"])
    assert "Fur" not in known
    assert known["Upper-clothes"] == known["UpperClothes"] == known["upper clothes"] == VOCABULARY.index("UpperClothes")
    assert known["left_arm"] == VOCABULARY.index("Left-arm") and known["Head"] == VOCABULARY.index("Head")
    b = Binding("shuffled", 24, vocabulary=VOCABULARY)
    mixed = ["Background", "Hair", "Fur"]
    assert b.bind(mixed) == {"Background": 0, "Hair": 1, "Fur": 2}  # click slots for every label
    assert b.known(mixed) == {"Background": 0, "Hair": VOCABULARY.index("Hair")}
    assert Binding("shuffled", 24).known(mixed) == {}  # an old checkpoint knows no names
