"""Hypothesis: whatever JSON arrives at /predict or /webhook, the answer is never a 5xx."""
import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ihp_backend._wsgi import create_app
from ihp_backend.model import IHPModel
from ihp_backend.settings import Settings
from tests.test_http import click_body

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), ch, max_size=4)),
                          max_leaves=12)


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def mutate(obj, path, value):
    if not path:
        return value
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    return obj


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory, tiny_checkpoint):
    m = IHPModel(Settings(model_dir=str(tmp_path_factory.mktemp("fz")), checkpoint=tiny_checkpoint,
                          ls_url="http://127.0.0.1:9"))
    m.load()
    m.maybe_start_training = lambda project: "disabled-in-fuzz"
    return create_app(m, load=False).test_client()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(body=json_value)
def test_random_json_never_5xx(fuzz_client, body):
    for ep in ("/predict", "/webhook", "/setup"):
        r = fuzz_client.post(ep, json=body)
        assert r.status_code < 500, (ep, body, r.get_json())


@FUZZ
@given(data=st.data())
def test_mutated_real_payloads_never_5xx(fuzz_client, payloads, data):
    base = data.draw(st.sampled_from([
        ("/predict", click_body(payloads, 50, 21, "Hair")),
        ("/predict", payloads["/predict"]["body"]),
        ("/webhook", payloads["/webhook_ANNOTATION_CREATED"]["body"]),
        ("/webhook", payloads["/webhook_ANNOTATION_UPDATED"]["body"]),
        ("/setup", payloads["/setup"]["body"]),
    ]))
    ep, body = base
    ps = list(paths(body))
    path = data.draw(st.sampled_from(ps))
    new = mutate(body, path, data.draw(json_value))
    r = fuzz_client.post(ep, json=new)
    assert r.status_code < 500, (ep, path, r.get_json())
