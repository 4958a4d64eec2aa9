"""The annotation store's one interface, two implementations (SQLite in MODEL_DIR, PostgreSQL
with IHP_DATABASE_URL): the same behaviour, asserted on both."""
import threading

import numpy as np
import pytest

from ihp_backend.annotations import StoreBusy, StoreValueError, open_annotation_store
from ihp_backend.core.ls_format import interactive_label_config, mask_to_rle

NAMES = ["Background", "Hair", "Face"]
CONFIG = interactive_label_config(NAMES)


def brush(mask, label):
    h, w = mask.shape
    return {"from_name": "mask", "to_name": "image", "type": "brushlabels", "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}}


@pytest.fixture()
def store(tmp_path, store_backend):
    return open_annotation_store(store_backend, str(tmp_path / "md"))


def test_put_replace_delete_and_training_tickets(store):
    m = np.zeros((20, 30), bool)
    m[2:8, 3:9] = True
    png = b"\x89PNG fake"
    store.put(3, 1, 10, CONFIG, [brush(m, "Hair")], "http://x/1.png", png)
    store.put(3, 2, 11, CONFIG, [brush(~m, "Face")], None, None)
    assert store.counts()["3"]["samples"] == 2 and store.counts()["3"]["new_since_training"] == 2
    assert store.pending(3, every=3) is None and store.pending(3, every=2) == (2, 0)
    store.put(3, 1, 10, CONFIG, [brush(~m, "Hair")], "http://x/1.png", png)  # an update replaces it
    assert store.counts()["3"]["samples"] == 2
    assert store.decode_pending(3) == 2
    assert store.decode_pending(3) == 0  # decoded once
    ticket = store.pending(3, every=2)
    assert ticket == (3, 0)
    store.request_training(3)
    store.put(3, 3, 12, CONFIG, [brush(m, "Face")], None, None)  # arrives during the run
    store.consume(3, ticket)
    assert store.pending(3, every=100) == (1, 1)  # what came during the run stays pending
    store.consume(3, (1, 1))
    assert store.pending(3, every=1) is None
    assert store.delete(3, 2) is True and store.delete(3, 2) is False
    assert store.counts(3)["3"]["samples"] == 2
    assert store.project_config(3) == CONFIG and store.project_config(99) is None


def test_samples_decode_labels_and_join_images(store):
    from tests.conftest import person_image, png_bytes
    img, lab = person_image(h=40, w=60)
    hair = lab == 1
    store.put(4, 7, 70, CONFIG, [brush(hair, "Hair")], "u", png_bytes(img))
    store.put(4, 8, 71, CONFIG, [], "u", None)  # no brush region and no image: never a sample
    store.decode_pending()
    (s,) = store.samples(4)
    assert s["classes"] == NAMES and s["image"].shape == (40, 60, 3)
    assert np.array_equal(s["labels"], np.where(hair, 1, 255))
    assert store.counts()["4"]["invalid"] == 1


def test_a_value_the_database_cannot_hold_is_a_value_error(store):
    with pytest.raises(StoreValueError):
        store.put(5, 1, {"not": "an id"}, {"a": 1}, [], None, None)


def test_concurrent_webhooks_count_exactly(store):
    def worker(k):
        for i in range(10):
            store.put(6, f"{k}-{i}", i, CONFIG, [], None, None)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = store.counts()["6"]
    assert c["samples"] == 60 and c["new_since_training"] == 60


def test_postgres_down_is_busy_then_recovers(postgres_server, database_url):
    store = open_annotation_store(database_url, "/nonexistent")
    store.request_training(9)
    postgres_server.stop(keep=True)
    try:
        with pytest.raises(StoreBusy):
            store.pending(9, 1)
    finally:
        postgres_server.start()
    assert store.pending(9, 1) == (0, 1)


def test_webhook_while_postgres_is_down_is_a_503_then_stored(tmp_path, tiny_checkpoint, postgres_server, database_url):
    from ihp_backend._wsgi import create_app
    from ihp_backend.model import IHPModel
    from ihp_backend.settings import Settings
    from tests.test_fit import webhook_body
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint, train_every=1000,
                          database_url=database_url))
    m.load()
    client = create_app(m, load=False).test_client()
    body, _ = webhook_body("ANNOTATION_CREATED", 3, 1, 1)
    postgres_server.stop(keep=True)
    try:
        r = client.post("/webhook", json=body)
        assert r.status_code == 503 and "retry" in r.get_json()["error"], r.get_json()
        assert client.get("/health").status_code == 200  # serving goes on
    finally:
        postgres_server.start()
    r = client.post("/webhook", json=body)  # Label Studio's retry
    assert r.status_code == 201 and r.get_json()["stored"]
    assert m.store.counts()["3"]["samples"] == 1


def test_version_registry_same_on_files_and_postgres(tmp_path, store_backend):
    """The version registry's two implementations (JSON files; PostgreSQL rows): versions kept,
    promotion, job status; checkpoint files under MODEL_DIR either way."""
    import os

    from ihp_backend.registry import open_registry
    from ihp_backend.settings import Settings
    reg = open_registry(Settings(model_dir=str(tmp_path / "md"), database_url=store_backend))
    assert reg.serving("7") is None and reg.versions("7") == [] and reg.job("7") is None
    v1 = reg.new_version_name("7")
    reg.add_version("7", v1, {"training": {"parent_version": "base"}, "w": 1}, {"gate": {"candidate": 0.5}}, promote=True)
    v2 = reg.new_version_name("7")
    assert v2.startswith("project7-v2-")
    reg.add_version("7", v2, {"training": {}}, {"gate": {"candidate": 0.4}}, promote=False)  # kept, not served
    vs = reg.versions("7")
    assert [v["version"] for v in vs] == [v1, v2] and [v["promoted"] for v in vs] == [True, False]
    assert vs[0]["parent"] == "base" and vs[1]["metrics"] == {"gate": {"candidate": 0.4}}
    info = reg.serving("7")
    assert info["version"] == v1 and os.path.exists(info["path"]) and info["metrics"]["gate"]["candidate"] == 0.5
    reg.write_job("7", {"phase": "training", "step": 3})
    assert reg.job("7")["step"] == 3 and reg.job("7")["updated"] > 0
    assert "7" in reg.projects()
    assert reg.serving("../etc") is None
