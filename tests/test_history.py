import multiprocessing as mp

import pytest

from ihp_backend.history import ClickHistory, project_key, update_history
from ihp_backend.core.ls_format import Click

R = 3.0


def test_append_and_same_label_same_spot_is_noop():
    h = update_history([], [Click(10, 10, "Hair")], R)
    h = update_history(h, [Click(50, 50, "Face")], R)
    assert [c.label for c in h] == ["Hair", "Face"]
    assert update_history(h, [Click(11, 10, "Hair")], R) == h


def test_other_label_same_spot_replaces():
    h = [Click(10, 10, "Hair"), Click(50, 50, "Face")]
    h = update_history(h, [Click(11, 11, "Face")], R)
    assert [(c.x, c.y, c.label) for c in h] == [(50, 50, "Face"), (11, 11, "Face")]


def test_negative_click_removes_nearest_of_that_label():
    h = [Click(10, 10, "Hair"), Click(100, 100, "Hair"), Click(12, 12, "Face")]
    h2 = update_history(h, [Click(90, 90, "Hair", positive=False)], R)
    assert [(c.x, c.label) for c in h2] == [(10, "Hair"), (12, "Face")]
    assert update_history(h, [Click(90, 90, "Skirt", positive=False)], R) == h


def test_full_set_replaces_and_empty_clears():
    h = [Click(10, 10, "Hair")]
    new = [Click(1, 1, "A"), Click(2, 2, "B"), Click(3, 3, "B", positive=False)]
    assert [c.label for c in update_history(h, new, R)] == ["A", "B"]
    assert update_history(h, [], R) == []


def test_project_key_normalises_predict_and_webhook_forms():
    assert project_key("3.1795294702") == project_key({"id": 3}) == project_key(3) == "3"


def test_sqlite_store_rules_and_ttl(tmp_path):
    st = ClickHistory(str(tmp_path / "s.db"))
    assert [c.label for c in st.apply("3.1", 7, [Click(1, 1, "A")], (100, 100))] == ["A"]
    assert [c.label for c in st.apply("3.2", 7, [Click(50, 50, "B")], (100, 100))] == ["A", "B"]
    assert st.apply("3.2", 8, [Click(5, 5, "C")], (100, 100))[0].label == "C"
    st.clear({"id": 3}, 7)
    assert st.get(3, 7) == [] and len(st.get(3, 8)) == 1
    expired = ClickHistory(str(tmp_path / "s.db"), ttl=-1)
    assert expired.get(3, 8) == []


def _worker(path, i, q):
    st = ClickHistory(path)
    for k in range(10):
        st.apply("1", 1, [Click(1000.0 * i + k * 50, 0.0, f"L{i}")], (5000, 5000))
    q.put(i)


def test_concurrent_processes_lose_no_click(tmp_path):
    path = str(tmp_path / "c.db")
    ClickHistory(path)
    q = mp.get_context("spawn").Queue()
    ps = [mp.get_context("spawn").Process(target=_worker, args=(path, i, q)) for i in range(3)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    assert len(ClickHistory(path).get("1", 1)) == 30


def _init_many(path, q):
    from ihp_backend.annotations import AnnotationStore
    for _ in range(5):
        ClickHistory(path + ".state")
        AnnotationStore(path + ".ann")
    q.put("ok")


def test_workers_initialising_the_same_databases_at_once_do_not_fail(tmp_path):
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        path = str(tmp_path / f"db{round_}")
        q = ctx.Queue()
        ps = [ctx.Process(target=_init_many, args=(path, q)) for _ in range(4)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(60)
        assert all(p.exitcode == 0 for p in ps)
        assert sorted(q.get(timeout=5) for _ in ps) == ["ok"] * 4
