"""The team topology from processes: Redis and PostgreSQL on loopback, two gunicorn replicas
that share only them and one MODEL_DIR, and a training worker (``python -m ihp_backend.worker``)
taking fit jobs from the RQ queue. Webhooks spread over both replicas are all trained on by
exactly one job; the promoted version is served by both replicas within 5 s; a worker killed
with SIGKILL mid-training loses nothing and its run is retried by the next worker."""
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from ihp_backend.annotations import open_annotation_store
from ihp_backend.core.checkpoint import read_checkpoint
from ihp_backend.registry import open_registry
from ihp_backend.settings import Settings
from tests.conftest import ROOT
from tests.services import REDIS, start_redis, stop_redis
from tests.test_fit import CONFIG, webhook_body
from tests.test_gunicorn import free_port
from bench.live_backend import start_gunicorn as start_live, stop

pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server not installed (.ci/run installs Debian's)")
QUEUE = "ihp-fit-test"


@pytest.fixture()
def team(tmp_path, tiny_checkpoint, database_url):
    port = free_port()
    redis_proc = start_redis(tmp_path, port)
    env = {"MODEL_DIR": str(tmp_path / "shared_model_dir"), "IHP_CHECKPOINT": tiny_checkpoint,
           "IHP_REDIS_URL": f"redis://127.0.0.1:{port}/0", "IHP_DATABASE_URL": database_url,
           "IHP_FIT_QUEUE": QUEUE, "IHP_TRAIN_EVERY": "1000", "IHP_FIT_STEPS": "30", "IHP_PRECISION": "float32",
           "IHP_THREADS": "2", "IHP_TORCH_THREADS": "1", "IHP_FIT_THREADS": "1"}
    replicas = [start_live(env, workers=1) for _ in range(2)]
    workers = []

    def start_worker(**extra):
        log = open(tmp_path / f"worker{len(workers)}.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "ihp_backend.worker", "--sweep-every", "2"], cwd=ROOT,
                             env={**os.environ, **env, **extra}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        workers.append(p)
        return p

    yield {"env": env, "urls": [u for _, u in replicas], "start_worker": start_worker, "tmp": tmp_path}
    for p in workers:
        if p.poll() is None:
            kill_worker(p)
    for proc, _ in replicas:
        stop(proc)
    stop_redis(redis_proc)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (RQ's work-horse runs in its own process group)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill_worker(p) -> None:
    """SIGKILL a worker and its work-horse (a machine lost mid-run)."""
    horses = children(p.pid)
    os.killpg(p.pid, signal.SIGKILL)
    for h in horses:
        try:
            os.kill(h, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(10)


def post_webhooks(urls, project, n):
    for i in range(n):
        body, _ = webhook_body("ANNOTATION_CREATED", project, 100 + i, 1000 + i, seed=i % 7)
        r = requests.post(urls[i % len(urls)] + "/webhook", json=body, timeout=30)
        assert r.status_code == 201 and r.json()["stored"], r.text


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def served_version(url, project):
    body = {"tasks": [{"id": 1, "data": {"image": webhook_body("x", project, 1, 1)[0]["task"]["data"]["image"]}}],
            "project": f"{project}.1", "label_config": CONFIG, "params": {"context": None}}
    r = requests.post(url + "/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    return res["model_version"] if res else None


def finished_jobs(env):
    import redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry
    q = Queue(QUEUE, connection=redis.Redis.from_url(env["IHP_REDIS_URL"]))
    return FinishedJobRegistry(queue=q).get_job_ids()


def test_webhooks_over_two_replicas_one_job_promoted_everywhere(team):
    env, urls = team["env"], team["urls"]
    team["start_worker"]()
    post_webhooks(urls, 4, 100)
    store = open_annotation_store(env["IHP_DATABASE_URL"], env["MODEL_DIR"])
    assert store.counts()["4"]["samples"] == 100  # every replica wrote to the one store
    r = requests.post(urls[1] + "/webhook", json={"action": "START_TRAINING",
                                                  "project": {"id": 4, "label_config": CONFIG}}, timeout=10)
    assert r.status_code == 201 and r.json()["training"] in ("queued", "running")
    r = requests.post(urls[0] + "/webhook", json={"action": "START_TRAINING",
                                                  "project": {"id": 4, "label_config": CONFIG}}, timeout=10)
    assert r.json()["training"] in ("queued", "running")  # a second request joins the same job
    reg = open_registry(Settings(model_dir=env["MODEL_DIR"], database_url=env["IHP_DATABASE_URL"]))
    job = wait_for(lambda: (reg.job("4") or {}).get("phase") == "idle" and store.pending("4", 1000) is None
                   and reg.job("4"), 300, "the fit run")
    wait_for(lambda: finished_jobs(env), 30, "the RQ job to finish")
    versions = reg.versions("4")
    assert len(versions) == 1 and len(finished_jobs(env)) == 1, (versions, finished_jobs(env))  # exactly one job
    ck = read_checkpoint(os.path.join(reg.project_dir("4"), "versions", versions[0]["version"] + ".pt"))
    assert ck["training"]["samples"] + ck["training"]["held_out"] == 100  # trained on every annotation
    assert job["last"]["version"] == versions[0]["version"]
    if not versions[0]["promoted"]:
        pytest.skip(f"the gate kept the parent ({versions[0]['metrics']['gate']}): nothing to switch to")
    promoted_at = reg.serving("4")["promoted"]
    for url in urls:
        wait_for(lambda: served_version(url, 4) == versions[0]["version"], 5.0, f"{url} to serve the new version")
    assert time.time() - promoted_at < 5.0 + 2.0  # (the two waits overlap; each is bounded by 5 s)


def test_worker_killed_mid_training_is_retried_and_loses_nothing(team):
    env, urls = team["env"], team["urls"]
    first = team["start_worker"](IHP_FIT_STEPS="2000")
    post_webhooks(urls, 5, 12)
    r = requests.post(urls[0] + "/webhook", json={"action": "START_TRAINING",
                                                  "project": {"id": 5, "label_config": CONFIG}}, timeout=10)
    assert r.json()["training"] in ("queued", "running")
    reg = open_registry(Settings(model_dir=env["MODEL_DIR"], database_url=env["IHP_DATABASE_URL"]))
    wait_for(lambda: (reg.job("5") or {}).get("phase") == "training" and (reg.job("5") or {}).get("step", 0) >= 3,
             180, "training to start")
    r = requests.post(urls[1] + "/webhook", json={"action": "START_TRAINING",
                                                  "project": {"id": 5, "label_config": CONFIG}}, timeout=10)
    assert r.json()["training"] == "running"  # the other replica sees the run (its lock)
    kill_worker(first)
    store = open_annotation_store(env["IHP_DATABASE_URL"], env["MODEL_DIR"])
    store.decode_pending()
    assert len(store.samples(5)) == 12 and reg.versions("5") == [] and store.pending("5", 1000) is not None
    team["start_worker"](IHP_FIT_STEPS="3")  # its sweep finds the dead run and enqueues it again
    wait_for(lambda: len(reg.versions("5")) == 1 and store.pending("5", 1000) is None, 300, "the retried run")
    time.sleep(3)  # (a late duplicate would add a second version)
    assert len(reg.versions("5")) == 1 and len(store.samples(5)) == 12


def test_a_job_a_worker_is_starting_is_alive(tmp_path):
    """A replica asking while a worker takes the job sees it STARTED: it must read the start
    time of that moment, not the one it fetched before (None then), or it enqueues a second run
    (seen once in CI: two finished jobs for one request pair). A STARTED job that holds no run
    lock long after its start died with its worker."""
    from datetime import datetime, timedelta, timezone
    from ihp_backend.jobs import QueueJobs
    from ihp_backend.registry import Registry
    from ihp_backend.settings import Settings

    class Job:
        def __init__(self, started_at):
            self.started_at, self._now = None, started_at  # as fetched before the worker took it

        def refresh(self):
            self.started_at = self._now

        def get_status(self, refresh=True):
            return "started"

    jobs = object.__new__(QueueJobs)  # no Redis needed for this decision
    jobs.settings, jobs.registry = Settings(model_dir=str(tmp_path)), Registry(str(tmp_path))
    now = datetime.now(timezone.utc)
    assert jobs._alive(Job(now), "4")
    assert not jobs._alive(Job(now - timedelta(seconds=60)), "4")


def test_a_job_that_just_released_its_lock_gets_no_second_run(tmp_path):
    """The run releases its lock after consuming the requests and a moment before RQ marks it
    FINISHED; a sweep or webhook that saw the request pending before asks in that moment. The
    job looks dead (STARTED, no lock, started long ago): ``start`` must ask the store again and
    enqueue nothing (seen in CI: two finished RQ jobs, one version). A request still pending
    then (a killed run) is enqueued again."""
    from datetime import datetime, timedelta, timezone
    from ihp_backend.jobs import QueueJobs
    from ihp_backend.registry import Registry
    from ihp_backend.settings import Settings

    class Job:
        id, started_at = "ihp-fit-4-old", datetime.now(timezone.utc) - timedelta(seconds=60)

        def refresh(self):
            pass

        def get_status(self, refresh=True):
            return "started"

    class Redis:
        def __init__(self):
            self.kv = {}

        def set(self, k, v, nx=False, ex=None):
            if nx and k in self.kv:
                return False
            self.kv[k] = v
            return True

        def get(self, k):
            return self.kv.get(k)

        def delete(self, k):
            self.kv.pop(k, None)

    class Queue:
        def __init__(self):
            self.enqueued = []

        def enqueue(self, *a, job_id, **kw):
            self.enqueued.append(job_id)
            return type("J", (), {"id": job_id})()

    jobs = object.__new__(QueueJobs)
    jobs.settings = Settings(model_dir=str(tmp_path), fit_queue="q")
    jobs.registry, jobs.redis, jobs.queue = Registry(str(tmp_path)), Redis(), Queue()
    jobs.current_job = lambda project: Job()
    assert jobs.start("4", due=lambda: False) == "not-due" and jobs.queue.enqueued == []
    assert jobs.start("4", due=lambda: True) == "queued" and len(jobs.queue.enqueued) == 1
