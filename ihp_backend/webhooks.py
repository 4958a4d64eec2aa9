"""Label Studio webhooks -> stored training samples -> fit runs (``Webhooks``, used by IHPModel.fit).

ANNOTATION_CREATED / UPDATED store the annotation (overlapping brush regions resolved: the later
region wins) and the task image durably before answering; ANNOTATION_DELETED removes the
sample; START_TRAINING records a request. A fit run starts (``jobs``) when one is due.
"""
from __future__ import annotations

import logging
import sqlite3
from functools import lru_cache

from .annotations import StoreBusy, StoreValueError, open_annotation_store
from .core.ls_format import LabelConfigError, LabelSetup, parse_label_config, resolve_brush_regions
from .errors import RequestError
from .history import project_key
from .images import ImageFetchError
from .jobs import open_jobs
from .shared_state import SharedStateUnavailable

log = logging.getLogger("ihp_backend")


@lru_cache(maxsize=64)
def cached_setup(label_config: str) -> LabelSetup:
    return parse_label_config(label_config)


def setup_of(label_config) -> LabelSetup:
    """The parsed label config, or a 400 saying what is wrong with it."""
    if not isinstance(label_config, str):
        raise RequestError("the label config must be an XML string")
    try:
        return cached_setup(label_config)
    except LabelConfigError as e:
        raise RequestError(str(e)) from None


def image_url(task: dict, key: str):
    """The task's image URL from ``task["data"][key]``: None when absent, a 400 when not a string."""
    data = task.get("data")
    url = data.get(key) if isinstance(data, dict) else None
    if url and not isinstance(url, str):
        raise RequestError(f"task.data.{key} must be a string (the image's URL)")
    return url


class Webhooks:
    """The annotation store, the training requests and the fit jobs of one worker.

    ``forget_task(project, task)`` clears a task's click history and previous prediction (the
    annotation is final); ``known_config(project)`` gives a /setup label config."""

    def __init__(self, settings, registry, fetcher, forget_task, known_config):
        self.settings, self.registry, self.fetcher = settings, registry, fetcher
        self.forget_task, self.known_config = forget_task, known_config
        self.state_error: str | None = None
        self._store = None
        self._open_store()
        self.jobs = open_jobs(settings, registry)

    # -- the store --------------------------------------------------------------------------
    def _open_store(self):
        try:
            self._store = open_annotation_store(self.settings.database_url, self.settings.model_dir)
        except StoreBusy as e:  # PostgreSQL not reachable yet: opened on first use
            log.warning("annotation store not reachable yet: %s", e)
        except (OSError, sqlite3.Error) as e:
            self.storage_failed(e)
        return self._store

    @property
    def store(self):
        return self._store

    def storage_failed(self, e: Exception) -> None:
        where = "IHP_DATABASE_URL" if self.settings.database_url else f"MODEL_DIR {self.settings.model_dir!r}"
        self.state_error = (f"{where} cannot be written ({type(e).__name__}: {e}); serving continues with "
                            f"click history in memory per worker; annotations are not stored")
        log.error(self.state_error)

    def require_store(self):
        if self._store is None and self.state_error is None:
            self._open_store()
        if self._store is None:
            if self.state_error is None:
                raise RequestError("annotation store unreachable; Label Studio will retry", status=503)
            raise RequestError(self.state_error or "annotation store unavailable", status=507)
        return self._store

    def store_call(self, fn):
        st = self.require_store()
        try:
            return fn(st)
        except StoreValueError as e:  # the request is wrong, not the disk
            raise RequestError(str(e)) from None
        except StoreBusy:
            raise RequestError("annotation store is busy; Label Studio will retry", status=503) from None
        except (OSError, sqlite3.Error) as e:
            self.storage_failed(e)
            raise RequestError(self.state_error, status=507) from None

    # -- the events -------------------------------------------------------------------------
    def handle(self, event: str, data: dict) -> dict:
        """Record one webhook event (answers well within Label Studio's 1 s)."""
        project_obj = data.get("project") if isinstance(data.get("project"), dict) else {}
        project = project_key(data.get("project"))
        ann = data.get("annotation") if isinstance(data.get("annotation"), dict) else {}
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        task_id = task.get("id", ann.get("task"))
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED") and task_id is not None:
            try:
                self.forget_task(project, task_id)
            except SharedStateUnavailable as e:  # Label Studio retries a failed webhook
                raise RequestError(f"{e}; send the webhook again", status=503) from None
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return self._store_annotation(event, project, project_obj, ann, task, task_id)
        if event == "ANNOTATION_DELETED":
            if ann.get("id") is None:
                raise RequestError("ANNOTATION_DELETED needs annotation.id")
            removed = self.store_call(lambda st: st.delete(project, ann["id"]))
            return {"event": event, "removed": removed}
        if event == "START_TRAINING":
            if not project:
                raise RequestError("START_TRAINING needs project.id")
            cfg = project_obj.get("label_config")
            if cfg:
                setup_of(cfg)
            self.store_call(lambda st: st.request_training(project, cfg))
            return {"event": event, "training": self.maybe_start_training(project)}
        return {"event": event, "ignored": True}

    def _store_annotation(self, event, project, project_obj, ann, task, task_id) -> dict:
        if not project or task_id is None or ann.get("id") is None:
            raise RequestError(f"{event} needs project.id, task.id and annotation.id")
        if ann.get("was_cancelled"):
            return {"event": event, "stored": False, "reason": "cancelled/skipped annotation"}
        cfg = project_obj.get("label_config") or self.store_call(lambda st: st.project_config(project)) or \
            self.known_config(project)
        if not cfg:
            raise RequestError("no label_config: the webhook's project has none and the project was never set up")
        setup = setup_of(cfg)
        result = ann.get("result")
        if not isinstance(result, list):
            raise RequestError("annotation.result must be a list")
        undecodable = None
        try:
            brush, regions = resolve_brush_regions(result, setup)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            # kept as sent (the training data loader skips it), as before overlap resolution
            brush = [r for r in result if isinstance(r, dict) and r.get("type") == "brushlabels"]
            regions = {"regions_in": len(brush), "regions": len(brush), "overlap_pixels": 0}
            undecodable = f"brush regions cannot be decoded ({type(e).__name__}: {e}); stored as sent, never trained on"
        url = image_url(task, setup.image_key)
        image, err = None, None
        if brush and url:
            try:
                image = self.fetcher.fetch_bytes(url)
            except ImageFetchError as e:
                err = str(e)
        self.store_call(lambda st: st.put(project, ann["id"], task_id, cfg, brush, url, image))
        out = {"event": event, "stored": True, "regions": len(brush), "image": image is not None, **regions}
        warnings = []
        if regions["overlap_pixels"] or regions["regions"] != regions["regions_in"]:
            warnings.append(f"{regions['regions_in']} brush regions stored as {regions['regions']} (one per label); "
                            f"{regions['overlap_pixels']} pixels claimed by several labels went to the later region")
            log.warning("project %s task %s: %s", project, task_id, warnings[-1])
        if undecodable:
            warnings.append(undecodable)
        if err:
            warnings.append(f"image not fetched, sample cannot be trained on: {err}")
        if warnings:
            out["warning"] = "; ".join(warnings)
        out["training"] = self.maybe_start_training(project)
        return out

    # -- fit runs ---------------------------------------------------------------------------
    def maybe_start_training(self, project) -> str:
        """Start (or enqueue) the project's fit run if one is due and none runs."""
        p = project_key(project)
        try:
            self.registry.project_dir(p)
        except ValueError:
            return "invalid-project"
        st = self._store

        def due() -> bool:
            return st is not None and st.pending(p, self.settings.train_every) is not None
        try:
            if not due():
                return "not-due"
            return self.jobs.start(p, due=due)  # asked again once no run is seen alive
        except StoreBusy:
            return "store-busy"

    def status(self) -> dict:
        """Per project: samples stored, the job's state and progress, the serving version."""
        out = {}
        try:
            counts = self._store.counts() if self._store is not None else {}
        except StoreBusy:
            counts = {}
        for p in sorted(set(counts) | set(self.registry.projects())):
            try:
                serving = self.registry.serving(p)
                out[p] = {**counts.get(p, {}), "job": self.registry.job(p),
                          "serving": None if not serving else {k: serving[k] for k in ("version", "promoted", "metrics")}}
            except ValueError:
                continue
        return out
