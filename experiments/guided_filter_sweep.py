"""The colour refinement's guided filter radius and eps, on CCP train photos at 4x, k = 0
(docs/experiments.md, "The edge refiner"):

    .venv/bin/python experiments/guided_filter_sweep.py RADIUS EPS [PHOTOS] [more evaluate flags]
"""
import sys, functools, json, io, contextlib
sys.path.insert(0, __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__))))
import ihp_backend.core.inference as inf
import ihp_backend.core.refine as ref
from model_training import evaluate
r, e = int(sys.argv[1]), float(sys.argv[2])
orig = ref.refined_argmax
inf.refined_argmax = functools.partial(orig, radius=r, eps=e)
inf.photo_guide = functools.partial(ref.photo_guide, radius=r, eps=e)  # the Parser's per-photo terms
sys.argv = ['x', '--checkpoint', 'ihp_backend/models/default.pt', '--precision', 'float32', '--data', '../shared/data/ccp',
            '--split', 'train', '--limit', sys.argv[3] if len(sys.argv) > 3 else '30', '--kind', 'ccp', '--merge', 'ccp12', '--upscale', '4',
            '--max-corrections', '0', '--out', f'/tmp/ev_sweep_{r}_{e}'] + sys.argv[4:]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    evaluate.main()
res = json.loads([l for l in buf.getvalue().splitlines() if l.startswith('{')][-1])['results'][0]
print(r, e, 'mIoU', res['miou_k0'], 'F1', res['edge_f1_k0'], 'edge mIoU', res['edge_miou_k0'])
