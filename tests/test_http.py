"""The Flask app through its test client, driven by the payloads a real Label Studio sent."""
import copy
import dataclasses

import numpy as np
import pytest

from ihp_backend._wsgi import create_app
from ihp_backend.core.ls_format import rle_to_mask
from ihp_backend.model import IHPModel
from ihp_backend.settings import Settings


@pytest.fixture()
def model(tmp_path, tiny_checkpoint, image_server):
    m = IHPModel(Settings(model_dir=str(tmp_path / "md"), checkpoint=tiny_checkpoint,
                          ls_url=image_server["url"]))
    m.load()
    calls = []
    real = m.parser.parse

    def spy(image, clicks, **kw):
        calls.append((image.shape, np.array(clicks)))
        return real(image, clicks, **kw)

    m.parser.parse = spy
    m.calls = calls
    return m


@pytest.fixture()
def client(model):
    return create_app(model, load=False).test_client()


def click_body(payloads, x, y, label, positive=True):
    body = copy.deepcopy(payloads["/predict"]["body"])
    r = copy.deepcopy(payloads["/predict_context_from_real_LSF_frontend_click"]["result"][0])
    r["value"].update(x=x, y=y, keypointlabels=[label], labels=[label])
    r["is_positive"] = positive
    body["params"]["context"] = {"result": [r]}
    return body


def test_health_and_setup(client, payloads):
    h = client.get("/health").get_json()
    assert h["status"] == "UP" and h["model_loaded"] is True and h["model_version"] == "tiny-test"
    inf = h["inference"]
    assert inf["device"] == "cpu" and inf["precision"] in ("float32", "bfloat16")
    assert inf["refine"] is True and inf["click_radius"] == 10.0 and inf["threads"] >= 1
    assert client.get("/").status_code == 200
    r = client.post("/setup", json=payloads["/setup"]["body"])
    assert r.status_code == 200 and r.get_json() == {"model_version": "tiny-test"}


def test_batch_predict_without_clicks_is_empty_not_error(client, payloads):
    r = client.post("/predict", json=payloads["/predict"]["body"])
    assert r.status_code == 200
    j = r.get_json()
    assert j["model_version"] == "tiny-test"
    assert j["results"] == [[]]  # no prediction for the task (Label Studio shows no empty tab)


def test_single_clicks_build_up_the_parse(client, model, payloads, image_server):
    client.post("/setup", json=payloads["/setup"]["body"])
    seq = [(50, 21, "Hair"), (50, 50, "Face"), (45, 80, "Left-arm"), (5, 5, "Background")]
    for i, (x, y, lab) in enumerate(seq):
        r = client.post("/predict", json=click_body(payloads, x, y, lab))
        assert r.status_code == 200, r.get_json()
        (pred,) = r.get_json()["results"]
        assert len(model.calls) == i + 1
        shape, clicks = model.calls[-1]
        assert shape == (240, 320, 3) and len(clicks) == i + 1  # the history grew by one click
        names = [res["value"]["brushlabels"][0] for res in pred["result"]]
        assert len(names) == len(set(names))
        # only clicked labels, and no Background region (unlabelled pixels are background)
        assert set(names) <= {lab for *_, lab in seq[:i + 1]} - {"Background"}
        masks = [rle_to_mask(res["value"]["rle"], 240, 320) for res in pred["result"]]
        total = np.sum(masks, axis=0) if masks else np.zeros((240, 320))
        assert total.max() <= 1  # mutually exclusive
        assert 0 <= pred["score"] <= 1
    # Label Studio fetched the image with the token /setup gave it
    assert image_server["handler"].seen_headers[-1]["Authorization"] == "Token EXAMPLE_TOKEN_0000"
    # Alt-click undoes the Face click, then {"result": []} (after Submit) clears everything
    client.post("/predict", json=click_body(payloads, 50, 50, "Face", positive=False))
    assert len(model.calls[-1][1]) == 3
    body = copy.deepcopy(payloads["/predict"]["body"])
    body["params"]["context"] = {"result": []}
    assert client.post("/predict", json=body).get_json()["results"][0]["result"] == []
    client.post("/predict", json=click_body(payloads, 50, 21, "Hair"))
    assert len(model.calls[-1][1]) == 1


def test_webhook_annotation_clears_history(client, model, payloads):
    client.post("/predict", json=click_body(payloads, 50, 21, "Hair"))
    wh = copy.deepcopy(payloads["/webhook_ANNOTATION_CREATED"]["body"])
    r = client.post("/webhook", json=wh)
    assert r.status_code == 201 and r.get_json()["stored"] is True and r.get_json()["image"] is True
    client.post("/predict", json=click_body(payloads, 50, 50, "Face"))
    assert len(model.calls[-1][1]) == 1
    r = client.post("/webhook", json=payloads["/webhook_START_TRAINING"]["body"])
    assert r.status_code == 201


def test_webhook_with_unstorable_values_is_4xx_and_keeps_the_store(client, payloads):
    """A malformed payload (found by the fuzz test: task.data.image a list) is the request's
    fault: 400, and the next well-formed annotation is still stored."""
    wh = copy.deepcopy(payloads["/webhook_ANNOTATION_CREATED"]["body"])
    bad = copy.deepcopy(wh)
    bad["task"]["data"] = {k: ["a", "list"] for k in bad["task"]["data"]}
    r = client.post("/webhook", json=bad)
    assert r.status_code == 400 and "must be a string" in r.get_json()["error"]
    r = client.post("/webhook", json=wh)
    assert r.status_code == 201 and r.get_json()["stored"] is True
    b = click_body(payloads, 10, 10, "Hair")
    b["tasks"][0]["data"] = {k: ["a", "list"] for k in b["tasks"][0]["data"]}
    r = client.post("/predict", json=b)
    assert r.status_code == 400 and "must be a string" in r.get_json()["error"]


@pytest.mark.parametrize("body,status,needle", [
    ("not json", 400, "JSON object"),
    ({"tasks": []}, 400, "non-empty list"),
    ({"tasks": [{"id": 1}], "label_config": "<View>"}, 400, "not valid XML"),
])
def test_bad_requests_are_clear_4xx(client, body, status, needle):
    r = client.post("/predict", data=body) if isinstance(body, str) else client.post("/predict", json=body)
    assert r.status_code == status and needle in r.get_json()["error"]


def test_unknown_label_and_missing_image_are_4xx(client, payloads):
    r = client.post("/predict", json=click_body(payloads, 10, 10, "Skirt"))
    assert r.status_code == 400 and "Skirt" in r.get_json()["error"]
    b = click_body(payloads, 10, 10, "Hair")
    b["tasks"][0]["data"] = {}
    r = client.post("/predict", json=b)
    assert r.status_code == 400 and "no image" in r.get_json()["error"]
    b = click_body(payloads, 10, 10, "Hair")
    b["tasks"][0]["data"]["image"] = "/data/upload/3/missing.png"
    b["tasks"][0]["id"] = 99
    r = client.post("/predict", json=b)
    assert r.status_code == 422 and "404" in r.get_json()["error"]


def test_versions_and_metrics(client):
    assert client.get("/versions").get_json()["serving"] == "tiny-test"
    assert "predict_requests" in client.get("/metrics").get_json()


def test_predict_reports_server_timing(client, payloads):
    """Each /predict answer says where its time went (W3C Server-Timing, milliseconds)."""
    r = client.post("/predict", json=click_body(payloads, 50, 21, "Hair"))
    assert r.status_code == 200
    stages = dict(part.strip().split(";dur=") for part in r.headers["Server-Timing"].split(","))
    assert {"history", "fetch", "input", "forward", "upsample", "rle", "app"} <= set(stages)
    ms = {k: float(v) for k, v in stages.items()}
    assert all(v >= 0 for v in ms.values())
    assert ms["forward"] > 0 and ms["app"] >= ms["forward"] + ms["upsample"]


def test_flip_setting_reaches_the_network(tmp_path, tiny_checkpoint, image_server, payloads, monkeypatch):
    """IHP_FLIP=1 turns on test-time flip for the served network; a click still answers."""
    monkeypatch.setenv("IHP_FLIP", "1")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "md"))
    monkeypatch.setenv("IHP_CHECKPOINT", tiny_checkpoint)
    monkeypatch.setenv("LABEL_STUDIO_URL", image_server["url"])
    m = IHPModel(Settings.from_env())
    m.load()
    assert m.parser.flip
    r = create_app(m, load=False).test_client().post("/predict", json=click_body(payloads, 40, 50, "Hair"))
    assert r.status_code == 200 and r.get_json()["results"][0]["result"]


def test_the_aspp_rank_setting_reaches_the_served_network(tmp_path, tiny_checkpoint, image_server, payloads,
                                                          monkeypatch):
    """IHP_ASPP_RANK: the served network's ASPP is factored at that rank (network.low_rank_aspp)
    or exact with 0, /health says which, and both answer a click."""
    from ihp_backend.core.network import LowRankASPP

    def served(rank):
        monkeypatch.setenv("IHP_ASPP_RANK", str(rank))
        settings = Settings.from_env()
        assert settings.parser_options().aspp_rank == rank
        m = IHPModel(dataclasses.replace(settings, model_dir=str(tmp_path / f"md{rank}"),
                                         checkpoint=tiny_checkpoint, ls_url=image_server["url"]))
        m.load()
        c = create_app(m, load=False).test_client()
        r = c.post("/predict", json=click_body(payloads, 50, 21, "Hair"))
        assert r.status_code == 200 and r.get_json()["results"][0]["result"]
        return m.parser, c.get("/health").get_json()["inference"]["aspp_rank"]

    exact, reported = served(0)
    assert not isinstance(exact.net.aspp, LowRankASPP) and reported == 0
    factored, reported = served(24)
    assert isinstance(factored.net.aspp, LowRankASPP) and factored.net.aspp.reduce.out_channels == 24
    assert reported == 24
