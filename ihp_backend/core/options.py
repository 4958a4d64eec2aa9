"""How a network is run: one ``ParserOptions``, built by the server from its settings and by the
evaluator from its flags, so that the evaluation measures what is served."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

PRECISIONS = ("auto", "float32", "bfloat16")  # the forward's compute type (IHP_PRECISION)
# the edge refiner shipped beside the default model (docs/experiments.md, "The edge refiner")
SHIPPED_EDGE_REFINER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                                    "edge_refiner.pt")


@dataclass(frozen=True)
class ParserOptions:
    device: str | None = None  # IHP_DEVICE
    max_side: int | None = None  # IHP_MAX_SIDE (None: the checkpoint's input_size)
    flip: bool = False  # IHP_FLIP
    refine: bool = True  # IHP_REFINE
    full_res_edges: bool = False  # IHP_FULL_RES_EDGES: boundaries placed between network pixels
    # when enlarging (refine.smooth_resize; off: +0.1 boundary F1 for +25-40 ms at 12 MP, docs/performance.md)
    click_radius: float = 10.0  # IHP_CLICK_RADIUS
    precision: str = "auto"  # IHP_PRECISION
    threads: int | None = None  # IHP_TORCH_THREADS
    unclaimed_bias: float = 0.0  # IHP_UNCLAIMED_BIAS: added to the unclaimed channel's logit
    zoom: bool = True  # IHP_ZOOM: each clicked person that is small in the photo parsed again on its
    # own region at the network's resolution (inference.person_boxes; crowds, distant people)
    vocab_prior: float = 0.5  # IHP_VOCAB_PRIOR: weight of the vocabulary head's prior on clicked
    # parts of known names (inference.with_vocabulary_prior; 0: clicks alone; chosen on CCP train,
    # docs/experiments.md)
    vocab_share: bool = True  # IHP_VOCAB_SHARE: with known names, the unclaimed channel's probability
    # goes to the clicked label whose class the vocabulary head sees there (inference.with_vocabulary_share;
    # chosen on CCP train, docs/experiments.md)

    edge_refiner: str | None = SHIPPED_EDGE_REFINER  # IHP_EDGE_REFINER: a trained edge refiner (core.edges)
    # re-decides the pixels along boundaries at the photo's size up to edge_side (model_training.train_edges;
    # on by default since its rule passed on CCP val: 4x boundary F1 +3.0, docs/experiments.md); None: off
    edge_side: int = 1152  # IHP_EDGE_SIDE: the longer side of the edge refiner's working size
    aspp_rank: int = 128  # IHP_ASPP_RANK: the ASPP's branches read one shared rank-128 projection of
    # their input (network.low_rank_aspp, made at load; 0: the exact ASPP; docs/performance.md)

    def parser_kwargs(self) -> dict:
        """Keyword arguments of ``ihp_backend.core.inference.Parser``."""
        return asdict(self)


def edge_refiner_path(value: str | None) -> str | None:
    """An edge refiner setting (IHP_EDGE_REFINER, ``evaluate --edge-refiner``) -> a file or None:
    unset or empty = the default (``ParserOptions.edge_refiner``), "0" / "off" / "none" = none,
    "1" = the shipped one, else a file written by ``model_training.train_edges``, which must exist
    (ValueError)."""
    v = (value or "").strip()
    if not v:
        return ParserOptions.edge_refiner
    if v.lower() in ("0", "off", "none"):
        return None
    if v == "1":
        return SHIPPED_EDGE_REFINER
    if not os.path.isfile(v):
        raise ValueError(f"no such edge refiner file {v!r}")
    return v
