"""The training worker: runs the fit jobs of ``IHP_FIT_QUEUE`` on ``IHP_REDIS_URL``, on this
machine's GPU when it has one (CUDA is used when present), else its CPU:

    IHP_REDIS_URL=redis://redis:6379/0 IHP_FIT_QUEUE=ihp-fit \\
    IHP_DATABASE_URL=postgresql://ihp@db/ihp MODEL_DIR=/shared/model_dir python -m ihp_backend.worker

It needs the same MODEL_DIR (a shared mount: checkpoints and the version registry) and the same
database as the backend replicas. Besides RQ's own loop it sweeps the store every
``--sweep-every`` seconds: a project whose training requests are pending but whose run lock is
free and whose job is gone (a worker killed mid-run) gets its job enqueued again, so a killed
run is retried and no request is lost.
"""
from __future__ import annotations

import argparse
import logging
import threading

from .annotations import StoreBusy, open_annotation_store
from .jobs import QueueJobs
from .registry import open_registry
from .settings import Settings

log = logging.getLogger("ihp_backend")


def sweep(settings: Settings, jobs: QueueJobs, store) -> dict[str, str]:
    """Enqueue every project with a pending training request and no live job."""
    out = {}
    try:
        projects = list(store.counts())
        due = [p for p in projects if store.pending(p, settings.train_every) is not None]
    except StoreBusy as e:
        log.warning("sweep: store unreachable: %s", e)
        return out
    for p in due:
        try:  # asked again once no run is seen alive: one that just ended consumed the request
            out[p] = jobs.start(p, due=lambda p=p: store.pending(p, settings.train_every) is not None)
        except StoreBusy as e:
            log.warning("sweep: store unreachable: %s", e)
    return out


def main(argv=None):
    s = Settings.from_env()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", default=s.fit_queue or "ihp-fit", help="IHP_FIT_QUEUE (default ihp-fit)")
    ap.add_argument("--sweep-every", type=float, default=30.0, metavar="SECONDS",
                    help="how often to re-enqueue pending projects without a live job (0: never)")
    ap.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    a = ap.parse_args(argv)
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not s.redis_url:
        raise SystemExit("IHP_REDIS_URL is not set: the queue lives in Redis")
    import dataclasses

    import redis
    from rq import Queue, Worker
    s = dataclasses.replace(s, fit_queue=a.queue)
    reg = open_registry(s)
    jobs = QueueJobs(s, reg)
    store = open_annotation_store(s.database_url, s.model_dir)
    stop = threading.Event()
    if a.sweep_every > 0:
        def loop():
            while not stop.wait(a.sweep_every):
                started = sweep(s, jobs, store)
                if started:
                    log.info("sweep: %s", started)
        sweep(s, jobs, store)
        threading.Thread(target=loop, name="ihp-fit-sweep", daemon=True).start()
    conn = redis.Redis.from_url(s.redis_url)
    worker = Worker([Queue(a.queue, connection=conn)], connection=conn)
    try:
        worker.work(burst=a.burst, logging_level=s.log_level)
    finally:
        stop.set()


if __name__ == "__main__":
    main()
