import pytest

from ihp_backend.core.checkpoint import Binding, BindingError
from ihp_backend.core.ls_format import parse_label_config
from tests.test_ls_format import LIP_CONFIG


def test_shuffled_lip_config_background_slot0_parts_in_order():
    s = parse_label_config(LIP_CONFIG)
    m = Binding("shuffled", 24).bind(list(s.labels))
    assert m["Background"] == 0
    assert sorted(v for k, v in m.items() if k != "Background") == list(range(1, 20))
    assert m["Hat"] == 1 and m["Right-shoe"] == 19


def test_shuffled_six_labels_and_custom_background_name():
    labels = ["bg", "Hair", "Skin", "Top", "Pants", "Shoes"]
    m = Binding("shuffled", 24).bind(labels)
    assert m == {"bg": 0, "Hair": 1, "Skin": 2, "Top": 3, "Pants": 4, "Shoes": 5}
    m2 = Binding("shuffled", 24, background_names=("Void",)).bind(["Void", "A"])
    assert m2 == {"Void": 0, "A": 1}


def test_too_many_labels_is_a_clear_error():
    with pytest.raises(BindingError, match="only 5 part slots"):
        Binding("shuffled", 6).bind(["Background"] + [f"L{i}" for i in range(6)])


def test_fixed_binding_by_name_and_unknown_label():
    b = Binding("fixed", 4, ["Background", "Hair", "Face", "Arm"])
    assert b.bind(["Face", "background"]) == {"Face": 2, "background": 0}
    with pytest.raises(BindingError, match="Skirt"):
        b.bind(["Skirt"])
