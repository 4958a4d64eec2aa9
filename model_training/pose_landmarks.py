"""Body keypoints of one photo per person, for deriving part labels (``pose_labels``).

Runs in its own tool venv, never in the server's: ``mediapipe==0.10.21`` is the last release
whose wheel bundles the legacy Pose solution's models (BlazePose, Apache-2.0), and it pins
numpy<2 / protobuf<5 and pulls jax. ``python -m model_training.pose_labels --setup-tool-venv``
creates that venv; ``pose_labels`` then calls this module there:

    <tool venv>/bin/python -m model_training.pose_landmarks --images DIR --ids FILE --out DIR

Writes ``<out>/<id>.json``: ``{"width", "height", "landmarks": [[x, y, visibility] x 33] | null}``
in pixels of the photo, MediaPipe's landmark order (index 11 = the person's LEFT shoulder, as
MediaPipe defines it; ``pose_labels`` checks that convention against LIP / CIHP). Imports only
mediapipe, numpy and PIL so it works in that venv.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of <id>.jpg photos")
    ap.add_argument("--ids", required=True, help="text file, one id per line")
    ap.add_argument("--out", required=True, help="folder for <id>.json")
    ap.add_argument("--ext", default=".jpg")
    a = ap.parse_args(argv)
    import mediapipe as mp  # only here: the server's venv has no mediapipe

    with open(a.ids) as f:
        ids = [ln.split()[0] for ln in f if ln.strip()]
    os.makedirs(a.out, exist_ok=True)
    found = 0
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1,
                                enable_segmentation=False) as pose:
        for n, i in enumerate(ids):
            dst = os.path.join(a.out, i + ".json")
            if os.path.exists(dst):
                found += 1
                continue
            image = np.asarray(Image.open(os.path.join(a.images, i + a.ext)).convert("RGB"))
            h, w = image.shape[:2]
            res = pose.process(image)
            lms = None
            if res.pose_landmarks is not None:
                lms = [[round(p.x * w, 2), round(p.y * h, 2), round(p.visibility, 3)]
                       for p in res.pose_landmarks.landmark]
                found += 1
            tmp = dst + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"width": w, "height": h, "landmarks": lms}, f)
            os.replace(tmp, dst)
            if (n + 1) % 100 == 0:
                print(f"[pose] {n + 1}/{len(ids)} photos, pose found on {found}", file=sys.stderr)
    print(f"[pose] {len(ids)} photos, pose found on {found}", file=sys.stderr)


if __name__ == "__main__":
    main()
