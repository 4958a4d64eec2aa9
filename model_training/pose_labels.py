"""Body-part labels for CCP from body keypoints (after "Weakly and Semi Supervised Human Body
Part Parsing via Pose-Guided Knowledge Transfer": part labels made out of keypoints).

CCP labels clothing finely but has one ``skin`` class and no left or right. A pose model's
33 keypoints (``pose_landmarks``, MediaPipe BlazePose in its own tool venv) split every
person pixel into ten body regions (head, torso, and the upper / lower part of each arm and
leg, on the person's own left or right); the CCP class and the region together give the
labels of each label space:

    lip20     LIP's 20 classes (skin -> Face / Left-arm / ...; shoes -> Left-/Right-shoe;
              torso skin -> ignore: LIP has no class for it)
    cihp20    LIP-20 with Torso-skin at index 10 instead of Jumpsuits (CIHP's order;
              rompers become Dress)
    ppp       PASCAL-Person-Part: head, torso, upper/lower arms (split at the elbow) and
              legs (split at the knee), clothing included
    ccp12     CCP's own merged classes (``merges/ccp12.json``), unchanged

Left and right are the person's own, MediaPipe's convention (landmark 11 = the person's left
shoulder); checked on the real LIP and CIHP samples in ``../shared/data/crossdomain`` (LIP's
Left-arm lies at MediaPipe's left wrist and elbow), see ``docs/pose_labels.md``.

One command makes everything, landmarks included (cached; nothing is committed)::

    python -m model_training.pose_labels --data ../shared/data/ccp --out data/ccp_parts

(``--tool-python`` names the mediapipe venv's interpreter; ``--setup-tool-venv`` creates it.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from .parsing_dataset import LIP_CLASSES, LIP_FLIP, PPP_CLASSES, ParsingDataset, load_merge, merge_lut

# the body regions (0 = not a person pixel)
REGIONS = ["none", "head", "torso", "left-upper-arm", "left-lower-arm", "right-upper-arm",
           "right-lower-arm", "left-upper-leg", "left-lower-leg", "right-upper-leg", "right-lower-leg"]
CIHP_CLASSES = LIP_CLASSES[:10] + ["Torso-skin"] + LIP_CLASSES[11:]
LABEL_SPACES = ("lip20", "cihp20", "ppp", "ccp12")
SPACE_CLASSES = {"lip20": LIP_CLASSES, "cihp20": CIHP_CLASSES, "ppp": PPP_CLASSES}
SPACE_FLIP = {"lip20": LIP_FLIP, "cihp20": LIP_FLIP, "ppp": [], "ccp12": []}
IGNORE = 255

# MediaPipe Pose landmark indices (person's own left / right)
NOSE, L_EAR, R_EAR = 0, 7, 8
L_SH, R_SH, L_EL, R_EL, L_WR, R_WR = 11, 12, 13, 14, 15, 16
L_PINKY, R_PINKY, L_INDEX, R_INDEX = 17, 18, 19, 20
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANK, R_ANK = 23, 24, 25, 26, 27, 28
L_HEEL, R_HEEL, L_FOOT, R_FOOT = 29, 30, 31, 32

# CCP source class -> what it is on a body: "skin" (split by region), "shoe" (left/right by
# region), a LIP class name, or "background" (carried things LIP does not label)
CCP_TO_LIP = {
    "background": "background", "accessories": "background", "bag": "background",
    "purse": "background", "wallet": "background",
    "skin": "skin", "bracelet": "skin", "ring": "skin", "watch": "skin", "earrings": "skin",
    "necklace": "skin",
    "hair": "Hair", "hat": "Hat", "sunglasses": "Sunglasses", "glasses": "Sunglasses",
    "gloves": "Glove", "scarf": "Scarf", "tie": "UpperClothes",
    "blouse": "UpperClothes", "bodysuit": "UpperClothes", "bra": "UpperClothes",
    "hoodie": "UpperClothes", "intimate": "UpperClothes", "jumper": "UpperClothes",
    "shirt": "UpperClothes", "sweater": "UpperClothes", "sweatshirt": "UpperClothes",
    "swimwear": "UpperClothes", "t-shirt": "UpperClothes", "top": "UpperClothes",
    "vest": "UpperClothes",
    "blazer": "Coat", "cape": "Coat", "cardigan": "Coat", "coat": "Coat", "jacket": "Coat",
    "suit": "Coat",
    "dress": "Dress", "romper": "Jumpsuits", "skirt": "Skirt",
    "jeans": "Pants", "leggings": "Pants", "pants": "Pants", "shorts": "Pants",
    "panties": "Pants", "belt": "Pants",
    "socks": "Socks", "stockings": "Socks", "tights": "Socks",
    "boots": "shoe", "clogs": "shoe", "flats": "shoe", "heels": "shoe", "loafers": "shoe",
    "pumps": "shoe", "sandals": "shoe", "shoes": "shoe", "sneakers": "shoe", "wedges": "shoe",
}
HEAD_ONLY = {"Hair", "Hat", "Sunglasses"}  # always the head region, wherever the pixel lies
SKIN_BY_REGION = {"head": "Face", "torso": None, "left-upper-arm": "Left-arm",
                  "left-lower-arm": "Left-arm", "right-upper-arm": "Right-arm",
                  "right-lower-arm": "Right-arm", "left-upper-leg": "Left-leg",
                  "left-lower-leg": "Left-leg", "right-upper-leg": "Right-leg",
                  "right-lower-leg": "Right-leg"}
REGION_TO_PPP = {"head": "head", "torso": "torso", "left-upper-arm": "upper-arms",
                 "left-lower-arm": "lower-arms", "right-upper-arm": "upper-arms",
                 "right-lower-arm": "lower-arms", "left-upper-leg": "upper-legs",
                 "left-lower-leg": "lower-legs", "right-upper-leg": "upper-legs",
                 "right-lower-leg": "lower-legs"}


def _segment_distance(py: np.ndarray, px: np.ndarray, a, b) -> np.ndarray:
    """Distance of points (py, px) to the segment a-b (points as (x, y))."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    t = ((px - ax) * dx + (py - ay) * dy) / max(dx * dx + dy * dy, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def _inside_polygon(py: np.ndarray, px: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for points (py, px), polygon rows (x, y)."""
    inside = np.zeros(py.shape, bool)
    n = len(poly)
    for i in range(n):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        xc = x0 + (py - y0) * (x1 - x0) / np.where(y1 == y0, 1e-6, y1 - y0)
        inside ^= crosses & (px < xc)
    return inside


def body_regions(landmarks: np.ndarray, person: np.ndarray, head_pixels: np.ndarray | None = None) -> np.ndarray:
    """Split the pixels of ``person`` (H, W bool) into the ten ``REGIONS`` (uint8, 0 elsewhere).

    Each pixel goes to the nearest body part, measured as its distance to the part's skeleton
    (a segment between two keypoints; the torso is the shoulder-hip quadrilateral, the head a
    disk around the face keypoints) minus the part's half-width, scaled from the shoulder and
    hip widths. ``head_pixels`` (hair, hat, ...) are head whatever their distance.
    ``landmarks`` is (33, 2+) in pixels, MediaPipe's order.
    """
    p = np.asarray(landmarks, np.float64)[:, :2]
    ys, xs = np.nonzero(person)
    out = np.zeros(person.shape, np.uint8)
    if len(ys) == 0:
        return out
    py, px = ys.astype(np.float64), xs.astype(np.float64)
    shoulder_w = max(np.hypot(*(p[L_SH] - p[R_SH])), 1.0)
    hip_w = max(np.hypot(*(p[L_HIP] - p[R_HIP])), 1.0)
    torso_len = max(np.hypot(*((p[L_SH] + p[R_SH]) / 2 - (p[L_HIP] + p[R_HIP]) / 2)), 1.0)
    scale = max(shoulder_w, 0.6 * torso_len)  # side views: narrow shoulders, same torso
    head_c = p[[NOSE, L_EAR, R_EAR]].mean(axis=0)
    head_r = max(0.5 * np.hypot(*(p[L_EAR] - p[R_EAR])), 0.22 * scale)
    l_hand, r_hand = p[[L_INDEX, L_PINKY]].mean(axis=0), p[[R_INDEX, R_PINKY]].mean(axis=0)
    l_foot, r_foot = p[[L_FOOT, L_HEEL]].mean(axis=0), p[[R_FOOT, R_HEEL]].mean(axis=0)
    arm_r, leg_r = 0.16 * scale, 0.22 * max(hip_w, 0.5 * scale)
    torso = np.stack([p[L_SH], p[R_SH], p[R_HIP], p[L_HIP]])
    cost = np.empty((10, len(py)))
    cost[0] = np.hypot(px - head_c[0], py - head_c[1]) - head_r
    d_edge = np.min([_segment_distance(py, px, torso[i], torso[(i + 1) % 4]) for i in range(4)], axis=0)
    cost[1] = np.where(_inside_polygon(py, px, torso), -d_edge, d_edge)
    limbs = [(L_SH, L_EL, arm_r), (L_EL, l_hand, arm_r), (R_SH, R_EL, arm_r), (R_EL, r_hand, arm_r),
             (L_HIP, L_KNEE, leg_r), (L_KNEE, l_foot, leg_r), (R_HIP, R_KNEE, leg_r), (R_KNEE, r_foot, leg_r)]
    for k, (a, b, r) in enumerate(limbs):
        a = p[a] if np.isscalar(a) else a
        b = p[b] if np.isscalar(b) else b
        cost[2 + k] = _segment_distance(py, px, a, b) - r
    region = cost.argmin(axis=0) + 1
    if head_pixels is not None:
        region[head_pixels[ys, xs]] = 1
    out[ys, xs] = region
    return out


def space_luts(ccp_classes: list[str]) -> dict[str, np.ndarray]:
    """(CCP source class, region) -> class of each label space, as (256, len(REGIONS)) uint8
    lookups (IGNORE for an unknown source class; ``lut[space][ccp_label, region]``)."""
    out = {}
    ccp12 = load_merge("ccp12")
    merged = merge_lut(ccp_classes, ccp12)
    for space in LABEL_SPACES:
        lut = np.full((256, len(REGIONS)), IGNORE, np.uint8)
        for ci, name in enumerate(ccp_classes):
            kind = CCP_TO_LIP[name]
            for ri, region in enumerate(REGIONS):
                if space == "ccp12":
                    lut[ci, ri] = merged[ci]
                    continue
                if kind == "background":
                    lut[ci, ri] = 0
                    continue
                if region == "none":  # a person pixel outside every region cannot happen
                    lut[ci, ri] = IGNORE
                    continue
                if space == "ppp":
                    lut[ci, ri] = PPP_CLASSES.index(REGION_TO_PPP[region])
                    continue
                classes = SPACE_CLASSES[space]
                if kind == "skin":
                    target = SKIN_BY_REGION[region]
                    if target is None:  # torso skin
                        target = "Torso-skin" if space == "cihp20" else None
                elif kind == "shoe":
                    target = "Left-shoe" if region.startswith("left") else \
                        "Right-shoe" if region.startswith("right") else None
                    if target is None:  # a shoe pixel closest to head/torso: nearest leg unknown
                        lut[ci, ri] = IGNORE
                        continue
                else:
                    target = "Dress" if kind == "Jumpsuits" and space == "cihp20" else kind
                lut[ci, ri] = IGNORE if target is None else classes.index(target)
        out[space] = lut
    return out


def derive_labels(ccp_labels: np.ndarray, landmarks, ccp_classes: list[str]) -> dict[str, np.ndarray]:
    """CCP source labels (H, W) + landmarks -> {"regions": ..., space: labels} (uint8 maps).
    Without landmarks (no pose found) the body-part spaces are all IGNORE on the person."""
    background = [i for i, n in enumerate(ccp_classes) if CCP_TO_LIP[n] == "background"]
    person = ~np.isin(ccp_labels, background)
    head = np.isin(ccp_labels, [i for i, n in enumerate(ccp_classes) if CCP_TO_LIP[n] in HEAD_ONLY])
    if landmarks is None:
        regions = np.zeros(ccp_labels.shape, np.uint8)
    else:
        regions = body_regions(np.asarray(landmarks), person, head)
    out = {"regions": regions}
    for space, lut in space_luts(ccp_classes).items():
        lab = lut[ccp_labels, regions]
        if landmarks is None and space != "ccp12":
            lab = np.where(person, IGNORE, lab).astype(np.uint8)
        out[space] = lab
    return out


def ensure_tool_venv(path: str) -> str:
    """Create the mediapipe tool venv at ``path`` when missing; return its interpreter."""
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-cache-dir", "mediapipe==0.10.21"], check=True)
    return py


def run_landmarks(tool_python: str, images: str, ids: list[str], out: str) -> None:
    """Run ``pose_landmarks`` in the tool venv for the ids that have no landmarks yet."""
    todo = [i for i in ids if not os.path.exists(os.path.join(out, i + ".json"))]
    if not todo:
        return
    os.makedirs(out, exist_ok=True)
    lst = os.path.join(out, ".todo.txt")
    with open(lst, "w") as f:
        f.write("\n".join(todo) + "\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([tool_python, "-m", "model_training.pose_landmarks", "--images", images,
                    "--ids", lst, "--out", out], check=True, cwd=root)
    os.unlink(lst)


def _ids(root: str) -> list[str]:
    ids = []
    for split in ("train", "val", "test"):
        p = os.path.join(root, f"{split}.txt")
        if os.path.exists(p):
            with open(p) as f:
                ids += [ln.split()[0] for ln in f if ln.strip()]
    return ids


def ccp_parts(root: str, parts_root: str, split: str, space: str) -> ParsingDataset:
    """A derived label space of CCP as a data set (``open_dataset("ccp-parts:<space>", ...)``):
    images from ``root``, labels from ``parts_root/<space>/``."""
    from .parsing_dataset import _items, _read_ids
    if space not in LABEL_SPACES:
        raise ValueError(f"unknown label space {space!r}; choose one of {LABEL_SPACES}")
    ids = _read_ids(os.path.join(root, f"{split}.txt"))
    classes = SPACE_CLASSES.get(space) or load_merge("ccp12")["classes"]
    return ParsingDataset(f"ccp-{space}", _items(ids, os.path.join(root, "images"),
                                                 os.path.join(parts_root, space)),
                          list(classes), list(SPACE_FLIP[space]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/ccp", help="CCP root (images/, labels/, classes.txt)")
    ap.add_argument("--out", default="data/ccp_parts")
    ap.add_argument("--tool-python", default=None,
                    help="python of a venv with mediapipe==0.10.21 (default: <out>/../mediapipe-venv)")
    ap.add_argument("--setup-tool-venv", action="store_true", help="create the mediapipe venv if missing")
    ap.add_argument("--force", action="store_true", help="rewrite label PNGs that exist")
    a = ap.parse_args(argv)
    from tqdm import tqdm
    with open(os.path.join(a.data, "classes.txt")) as f:
        classes = [ln.strip() for ln in f if ln.strip()]
    ids = _ids(a.data)
    lm_dir = os.path.join(a.out, "landmarks")
    if any(not os.path.exists(os.path.join(lm_dir, i + ".json")) for i in ids):
        venv = os.path.join(os.path.dirname(os.path.abspath(a.out)), "mediapipe-venv")
        tool = a.tool_python or (ensure_tool_venv(venv) if a.setup_tool_venv else os.path.join(venv, "bin", "python"))
        if not os.path.exists(tool):
            raise SystemExit(f"no mediapipe tool venv at {tool}: pass --setup-tool-venv (creates it, "
                             f"pip install mediapipe==0.10.21) or --tool-python")
        run_landmarks(tool, os.path.join(a.data, "images"), ids, lm_dir)
    for d in ("regions",) + LABEL_SPACES:
        os.makedirs(os.path.join(a.out, d), exist_ok=True)
    no_pose = 0
    for i in tqdm(ids, desc="part labels", dynamic_ncols=True):
        if not a.force and all(os.path.exists(os.path.join(a.out, d, i + ".png")) for d in ("regions",) + LABEL_SPACES):
            continue
        with open(os.path.join(lm_dir, i + ".json")) as f:
            lms = json.load(f)["landmarks"]
        no_pose += lms is None
        lab = np.asarray(Image.open(os.path.join(a.data, "labels", i + ".png")))
        for name, arr in derive_labels(lab, lms, classes).items():
            Image.fromarray(arr).save(os.path.join(a.out, name, i + ".png"))
    with open(os.path.join(a.out, "README.txt"), "w") as f:
        f.write("Derived by python -m model_training.pose_labels; do not edit. Class lists:\n")
        for space in LABEL_SPACES:
            f.write(f"{space}: {', '.join(SPACE_CLASSES.get(space) or load_merge('ccp12')['classes'])}\n")
    print(f"[pose_labels] {len(ids)} photos in {a.out} ({no_pose} written now without a pose)")


if __name__ == "__main__":
    main()
