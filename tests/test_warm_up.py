"""``Parser.warm_up``: the first click of a worker is not the slow one, and warming leaves no trace."""
from __future__ import annotations

import numpy as np

from ihp_backend.core.inference import Parser
from tests.conftest import person_image


def clicks_in_turn(parser: Parser, image: np.ndarray) -> list[np.ndarray]:
    seq = [(50.0, 160.0, 1), (120.0, 160.0, 2), (200.0, 140.0, 3)]
    out, prev = [], None
    for i in range(1, len(seq) + 1):
        res = parser.parse(image, np.array(seq[:i]), allowed_slots=[0, 1, 2, 3], prev_mask=prev)
        out.append(res.labels)
        prev = res.network_labels
    return out


def test_a_warmed_parser_answers_exactly_as_a_fresh_one(tiny_checkpoint):
    image, _ = person_image()
    fresh = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    warmed = Parser.from_file(tiny_checkpoint, threads=1, max_side=64, precision="float32")
    assert warmed.warm_up() > 0
    for a, b in zip(clicks_in_turn(fresh, image), clicks_in_turn(warmed, image)):
        np.testing.assert_array_equal(a, b)
