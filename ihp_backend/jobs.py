"""Where fit runs happen: a child process of this worker (the embedded default) or a job on an
RQ queue (``IHP_FIT_QUEUE`` on ``IHP_REDIS_URL``) that ``python -m ihp_backend.worker`` runs on
any machine, e.g. the GPU box.

One run per project at a time across the cluster: the run holds ``project_run_lock`` (a
PostgreSQL advisory lock with ``IHP_DATABASE_URL``, else a lock file in the project's registry
directory); the lock dies with its process, so a killed run never blocks the next. A run
consumes only the training requests it covered, so a killed run's requests stay pending and
the next ``start`` (a webhook, a replica's start, the worker's sweep) runs them again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

from .locks import project_lock

log = logging.getLogger("ihp_backend")

FIT_JOB_TIMEOUT = 6 * 3600  # seconds an RQ fit job may run


def _lock_key(project: str) -> int:
    """A signed 64-bit advisory-lock key per project."""
    return int.from_bytes(hashlib.sha256(f"ihp-fit:{project}".encode()).digest()[:8], "big", signed=True)


RUN_LOCK_WAIT = 5.0  # seconds a run keeps asking for its lock (see project_run_lock)


@contextmanager
def project_run_lock(settings, registry, project: str, wait: float = 0.0):
    """Yields True when this process now holds the project's run lock, False when another does.
    ``run_locked`` asks by taking the lock for a moment, so a run that started just then would
    find it taken and end without work (seen in CI: the job done in 6 ms, the sweep's second job
    trained): runs pass ``wait`` (``RUN_LOCK_WAIT``) and ask again every 50 ms until then."""
    deadline = time.monotonic() + wait
    while True:
        with _try_run_lock(settings, registry, project) as got:
            if got or time.monotonic() >= deadline:
                yield got
                return
        time.sleep(0.05)


@contextmanager
def _try_run_lock(settings, registry, project: str):
    if settings.database_url:
        import psycopg
        db = psycopg.connect(settings.database_url, autocommit=True)
        try:
            got = db.execute("SELECT pg_try_advisory_lock(%s)", (_lock_key(project),)).fetchone()[0]
            yield bool(got)
        finally:
            db.close()  # releases the session's advisory lock
    else:
        with project_lock(os.path.join(registry.project_dir(project), "train.lock")) as got:
            yield got


def run_locked(settings, registry, project: str, tries: int = 3) -> bool:
    """Whether a run holds the project's lock. Asked by taking it for a moment, so two askers
    can meet: it is taken ``tries`` times 10 ms apart before the answer is yes."""
    for i in range(tries):
        if i:
            time.sleep(0.01)
        with _try_run_lock(settings, registry, project) as got:
            if got:
                return False
    return True


def fit_command(settings, project: str) -> list[str]:
    return [sys.executable, "-m", "ihp_backend.fit_job", "--model-dir", os.path.abspath(settings.model_dir),
            "--project", project, "--default-checkpoint", os.path.abspath(settings.checkpoint),
            "--every", str(settings.train_every)]


class LocalJobs:
    """A fit run is a child process of this worker (``ihp_backend.fit_job``)."""

    def __init__(self, settings, registry):
        self.settings, self.registry = settings, registry
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, project: str, due=None) -> str:
        """Start the project's fit run unless one runs; ``due`` as in ``QueueJobs.start``."""
        if run_locked(self.settings, self.registry, project):
            return "running"  # the running job picks the new request up when it finishes
        old = self.procs.get(project)
        if old is not None and old.poll() is None:
            return "running"
        if due is not None and not due():
            return "not-due"
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(self.registry.project_dir(project), "job.log"), "ab") as logf:
            self.procs[project] = subprocess.Popen(fit_command(self.settings, project), cwd=root, stdout=logf,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
        log.info("started training job for project %s (pid %d)", project, self.procs[project].pid)
        return "started"


class QueueJobs:
    """A fit run is an RQ job (``run_queued_fit``) on ``settings.fit_queue``; at most one queued
    or running per project (a short Redis lock guards the enqueue against other replicas)."""

    STALE_START = 10.0  # a STARTED job without the run lock for this long died with its worker

    def __init__(self, settings, registry):
        import redis
        from rq import Queue
        self.settings, self.registry = settings, registry
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.queue = Queue(settings.fit_queue, connection=self.redis)

    def _current_key(self, project: str) -> str:
        return f"ihp:fit:{self.settings.fit_queue}:current:{project}"

    def current_job(self, project: str):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        jid = self.redis.get(self._current_key(project))
        if not jid:
            return None
        try:
            return Job.fetch(jid.decode(), connection=self.redis)
        except NoSuchJobError:
            return None

    def _alive(self, job, project: str) -> bool:
        # status and start time read together: refreshing the status alone left ``started_at`` as
        # fetched, None for a job a worker took since, which looked dead and got a second job
        job.refresh()
        status = job.get_status(refresh=False)
        if status in ("queued", "deferred", "scheduled"):
            return True
        if status == "started":
            if run_locked(self.settings, self.registry, project) or job.started_at is None:
                return True  # running, or a worker is starting it now
            return time.time() - job.started_at.timestamp() < self.STALE_START  # picking the lock up, or dead
        return False

    def start(self, project: str, due=None) -> str:
        """Enqueue the project's fit run unless one is queued or running. ``due`` (a callable;
        the store's pending check) is asked again once the current job is seen not alive: a
        job that has just released its run lock but is not yet FINISHED consumed the requests
        the caller saw pending, and a second run would find nothing to do."""
        import redis
        from rq import Retry
        try:
            if run_locked(self.settings, self.registry, project):
                return "running"
            guard = f"ihp:fit:{self.settings.fit_queue}:enqueue:{project}"
            if not self.redis.set(guard, "1", nx=True, ex=10):
                return "queued"  # another replica is enqueueing it now
            try:
                job = self.current_job(project)
                if job is not None and self._alive(job, project):
                    return "queued" if job.get_status() != "started" else "running"
                if due is not None and not due():
                    return "not-due"
                job = self.queue.enqueue("ihp_backend.jobs.run_queued_fit", project,
                                         job_id=f"ihp-fit-{project}-{uuid.uuid4().hex[:12]}",
                                         job_timeout=FIT_JOB_TIMEOUT, retry=Retry(max=3),
                                         result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600)
                self.redis.set(self._current_key(project), job.id)
            finally:
                self.redis.delete(guard)
        except redis.exceptions.RedisError as e:
            log.warning("could not enqueue the fit run of project %s: %s", project, e)
            return "queue-unavailable"
        log.info("queued fit run %s for project %s on %s", job.id, project, self.settings.fit_queue)
        return "queued"


def open_jobs(settings, registry):
    if settings.fit_queue:
        if not settings.redis_url:
            raise ValueError("IHP_FIT_QUEUE needs IHP_REDIS_URL (the queue lives in Redis)")
        return QueueJobs(settings, registry)
    return LocalJobs(settings, registry)


def run_queued_fit(project: str) -> list[dict]:
    """The RQ job: the fit runs due for one project (settings from the worker's environment).
    The run lock is taken first thing, so that a replica sees the job running from its start."""
    from .registry import Registry
    from .settings import Settings
    settings = Settings.from_env()
    with project_run_lock(settings, Registry(settings.model_dir), project, wait=RUN_LOCK_WAIT) as got:
        if not got:
            return [{"status": "busy", "project": project}]
        from .fit_job import fit_project, run_pending
        results = run_pending(settings, project)
    return results + [r for r in fit_project(settings, project) if r.get("status") != "busy"]
