"""Issue 29, a tried and rejected edge step: snap the labels to superpixels of the native-size
photo (majority vote per superpixel), measured on CCP *train* photos at k = 0 (central clicks)
by boundary F1 within 5 px at 4x (labels repeated 4x, as ``evaluate --upscale 4`` scores them).
    .venv/bin/python experiments/superpixel_snap.py [n_photos=30] [checkpoint]   # about 5 min on 2 cores
"""
import os, sys, time
import numpy as np
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from skimage.segmentation import slic, felzenszwalb
from model_training.datasets import ccp
from model_training import click_simulation as cs
from scipy import ndimage
from model_training.evaluate import CorePredictor, boundary_f1_counts, confusion, edges, f1_from_counts, miou
from ihp_backend.core.inference import Parser
from ihp_backend.core.options import ParserOptions
ds = ccp(os.environ.get('IHP_SHARED_DIR', os.path.join(ROOT, '..', 'shared')) + '/data/ccp', 'train', 'ccp12')
p = Parser.from_file(sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, 'ihp_backend/models/default.pt'), **ParserOptions(precision='float32', threads=1).parser_kwargs())
pred = CorePredictor(p, ds.classes)
n = len(ds.classes)
def snap(lab, seg):
    k = seg.max() + 1
    votes = np.zeros((k, n), np.int64)
    np.add.at(votes, (seg.ravel(), lab.ravel()), 1)
    return votes.argmax(1)[seg]
def up(a, f): return np.repeat(np.repeat(a, f, 0), f, 1)
methods = {'none': None,
           'slic1500': lambda im: slic(im, n_segments=1500, compactness=10, start_label=0),
           'slic4000': lambda im: slic(im, n_segments=4000, compactness=10, start_label=0),
           'fz100': lambda im: felzenszwalb(im, scale=100, sigma=0.5, min_size=20),
           'fz50': lambda im: felzenszwalb(im, scale=50, sigma=0.5, min_size=10)}
bf = {m: np.zeros(4, np.int64) for m in methods}; conf = {m: np.zeros((n, n), np.int64) for m in methods}
tm = {m: [] for m in methods}
N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
for i in range(N):
    img, gt = ds.load(i)
    gt = gt.astype(np.int64)
    rng = np.random.default_rng((0, i))
    clicks = np.array(cs.central_clicks(np.where(gt < n, gt, 0), rng, 0, 1, cs.N_CANDIDATES), np.float64).reshape(-1, 3)
    lab = pred(img, clicks)
    G = up(gt, 4)
    G_edges = edges(G)
    G_dist = ndimage.distance_transform_edt(~G_edges)
    for m, f in methods.items():
        t = time.time()
        l2 = lab if f is None else snap(lab, f(img))
        tm[m].append(time.time() - t)
        bf[m] += boundary_f1_counts(G, up(l2, 4), gt_edges=G_edges, gt_dist=G_dist)
        conf[m] += confusion(gt, l2, n)
for m in methods:
    print(m, 'F1x4 %.2f' % (100 * f1_from_counts(bf[m])), 'mIoU %.2f' % (100 * miou(conf[m])), 'ms %.0f' % (1000 * np.median(tm[m])))
