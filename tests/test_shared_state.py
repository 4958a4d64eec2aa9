"""Shared state in a real Redis (started here on loopback, stopped by PID): the click history and
the previous-prediction stacks behave as the embedded stores do, two gunicorn replicas that
share only Redis answer one task's alternating clicks exactly as one replica does, and a Redis
restart gives a clear 503 and then recovers."""
import copy
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import requests

from ihp_backend.core.ls_format import Click
from ihp_backend.history import ClickHistory, MemoryHistory
from ihp_backend.settings import DEFAULT_CHECKPOINT
from ihp_backend.shared_state import MemoryPredictions, RedisHistory, RedisPredictions, resolved
from tests.test_gunicorn import free_port, start_gunicorn, stop
from tests.test_http import click_body
from tests.services import REDIS, start_redis, stop_redis

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server not installed (.ci/run installs Debian's)")


@pytest.fixture()
def redis_url(tmp_path):
    port = free_port()
    proc = start_redis(tmp_path, port)
    yield f"redis://127.0.0.1:{port}/0", port, proc
    if proc.poll() is None:
        stop_redis(proc)


def test_redis_history_follows_the_same_rules_as_the_embedded_stores(tmp_path, redis_url):
    url, _, _ = redis_url
    stores = [MemoryHistory(), ClickHistory(str(tmp_path / "state.db")), RedisHistory(url)]
    size = (640, 480)
    steps = [[Click(10, 10, "Hair")], [Click(100, 50, "Face")], [Click(101, 50, "Coat")],  # replaces Face
             [Click(10, 10, "Hair")],  # same label, same spot: no-op
             [Click(12, 11, "Hair", positive=False)],  # undo of Hair
             [Click(5, 5, "A"), Click(6, 6, "B")]]  # a full set
    for step in steps:
        answers = [s.apply("3.1795", 7, step, size) for s in stores]
        assert answers[0] == answers[1] == answers[2]
    assert stores[2].get("3", 7) == stores[0].get("3", 7)
    stores[2].apply("3", 7, [Click(1, 1, "C")], (100, 100))  # another image size: starts afresh
    assert [c.label for c in stores[2].get("3", 7)] == ["C"]
    stores[2].clear("3", 7)
    assert stores[2].get("3", 7) == []
    short = RedisHistory(url, ttl=1)
    short.apply("3", 8, [Click(1, 1, "C")], size)
    time.sleep(2.2)
    assert short.get("3", 8) == []  # the history's TTL


def test_redis_prediction_stacks_match_the_memory_stacks(redis_url):
    url, _, _ = redis_url
    mem, red = MemoryPredictions(), RedisPredictions(url)
    rng = np.random.default_rng(0)
    key = ("3", "7")
    for i in range(40):  # more entries than MAX_STATES, with a repeated click set
        state = (((1.0, 2.0, "Hair"),) if i % 7 == 0 else ((float(i), 2.0, "Hair"), (3.0, 4.0, "Face")))
        used = None if i == 0 else rng.integers(0, 5, (12, 8)).astype(np.uint8)
        entry = (state, used, rng.integers(0, 5, (12, 8)).astype(np.uint8))
        mem.push(key, entry)
        red.push(key, entry)
    a, b = mem.stack(key), red.stack(key)
    assert [e[0] for e in a] == [e[0] for e in b] and len(a) == 32
    for (_, ua, la), (_, ub, lb) in zip(a, b):
        assert np.array_equal(ua, resolved(ub)) and np.array_equal(la, resolved(lb))
    red.drop(key)
    assert red.stack(key) == []


def _task_body(payloads, task, x, y, label):
    body = click_body(payloads, x, y, label)
    body["tasks"][0]["id"] = task
    return body


def _masks(resp):
    return {r["value"]["brushlabels"][0]: r["value"]["rle"] for r in resp.json()["results"][0]["result"]}


@pytest.mark.skipif(not os.path.exists(DEFAULT_CHECKPOINT), reason="needs the embedded default model")
def test_two_replicas_sharing_redis_answer_like_one_and_survive_a_redis_restart(tmp_path, redis_url, payloads,
                                                                                image_server):
    """Replica A and B (2 workers each, own MODEL_DIR, one Redis): clicks of one task sent
    alternately to A and B give exactly the masks of the same clicks sent to A alone (the
    embedded default has the previous-prediction input, so the stack must be shared); with
    Redis down a click is a clear 503, and after the restart clicks work again."""
    url, port, proc = redis_url
    env = {"LABEL_STUDIO_URL": image_server["url"], "LABEL_STUDIO_API_KEY": "abcdef123456",
           "IHP_REDIS_URL": url, "IHP_PRECISION": "float32"}  # one compute type on every replica
    a, url_a = start_gunicorn(tmp_path / "a", DEFAULT_CHECKPOINT, env)
    b, url_b = start_gunicorn(tmp_path / "b", DEFAULT_CHECKPOINT, env)
    try:
        seq = [(50, 21, "Hair"), (50, 50, "Face"), (45, 80, "Left-arm"), (60, 80, "Left-arm"), (52, 25, "Hair")]
        alone, mixed = [], []
        for i, (x, y, lab) in enumerate(seq):
            r = requests.post(url_a + "/predict", json=_task_body(payloads, 901, x, y, lab), timeout=60)
            assert r.status_code == 200, r.text
            alone.append(_masks(r))
            r = requests.post((url_a, url_b)[i % 2] + "/predict", json=_task_body(payloads, 902, x, y, lab), timeout=60)
            assert r.status_code == 200, r.text
            mixed.append(_masks(r))
        assert mixed == alone
        import redis
        keys = {k.decode() for k in redis.Redis(port=port).keys("ihp:*")}
        assert {"ihp:clicks:3:902", "ihp:prev:3:902"} <= keys  # (project 3 of the payloads)
        stop_redis(proc)
        r = requests.post(url_b + "/predict", json=_task_body(payloads, 903, 50, 21, "Hair"), timeout=60)
        assert r.status_code == 503 and "Redis" in r.json()["error"], r.text
        proc2 = start_redis(tmp_path, port)
        try:
            for u in (url_a, url_b):
                r = requests.post(u + "/predict", json=_task_body(payloads, 904, 50, 21, "Hair"), timeout=60)
                assert r.status_code == 200, r.text
            assert requests.get(url_b + "/health", timeout=2).status_code == 200
        finally:
            stop_redis(proc2)
    finally:
        stop(a)
        stop(b)
