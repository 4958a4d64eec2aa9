"""IHPModel: the Label Studio-facing model (``predict`` / ``fit``), over the HTTP-free core.

It has the familiar shape of label-studio-ml's ``LabelStudioMLBase`` (``predict(tasks,
context=None, **kw)``, ``fit(event, data, **kw)``) without depending on that package.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from functools import lru_cache

import numpy as np

from .annotations import AnnotationStore
from .core.checkpoint import BindingError
from .history import ClickHistory, MemoryHistory, is_transient, project_key
from .images import FetchSettings, ImageFetcher, ImageFetchError
from .core.inference import Parser
from .core.label_rules import allowed_slots, answered_labels, fill_channels, slot_names, zero_click_channels
from .locks import is_locked
from .core.ls_format import (ClickError, LabelConfigError, LabelSetup, brush_results, keypoints_to_clicks,
                        parse_label_config, resolve_brush_regions, validate_results)
from .registry import Registry
from .model_pool import ModelPool
from .settings import Settings
from .shared_state import MemoryPredictions, RedisHistory, RedisPredictions, SharedStateUnavailable, resolved

log = logging.getLogger("ihp_backend")


class RequestError(ValueError):
    """A request the backend cannot serve because of its content; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _setup_of(label_config) -> LabelSetup:
    if not isinstance(label_config, str):
        raise LabelConfigError("the label config must be an XML string")
    return _cached_setup(label_config)


@lru_cache(maxsize=64)
def _cached_setup(label_config: str) -> LabelSetup:
    return parse_label_config(label_config)


def _image_url(task: dict, key: str):
    """The task's image URL from ``task["data"][key]``: None when absent, a 400 when not a string."""
    data = task.get("data")
    url = data.get(key) if isinstance(data, dict) else None
    if url and not isinstance(url, str):
        raise RequestError(f"task.data.{key} must be a string (the image's URL)")
    return url


def click_state(clicks) -> tuple:
    """A task's click set as a hashable key (order kept: the history's order)."""
    return tuple((round(c.x, 3), round(c.y, 3), c.label) for c in clicks)


def neighbours(a: tuple, b: tuple) -> bool:
    """Two click sets one annotator step apart: a click added, removed, or replaced."""
    return len(set(a) ^ set(b)) <= 2


def previous_input(stack: list[tuple], state: tuple):
    """The previous-prediction input for click set ``state``, from the task's stack of
    ``(state, previous input used, answer)``: the input an earlier visit of the same click set
    used (an undo, Alt-click, returns to exactly the earlier masks), else the newest answer.
    As stored (a Redis entry's array is fetched lazily: ``shared_state.resolved``)."""
    for st, used, _ in reversed(stack):
        if st == state:
            return used
    return stack[-1][2] if stack else None


class IHPModel:
    """One per worker process. The network loads in a background thread at start."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        s = self.settings
        self.state_error: str | None = None
        self._memory_history = MemoryHistory(ttl=s.history_ttl)
        if s.redis_url:  # shared by every worker of every replica
            self.history = RedisHistory(s.redis_url, ttl=s.history_ttl)
            self.predictions = RedisPredictions(s.redis_url, ttl=s.history_ttl)
        else:
            self.predictions = MemoryPredictions()
            try:
                os.makedirs(s.model_dir, exist_ok=True)
                self.history = ClickHistory(os.path.join(s.model_dir, "state.db"), ttl=s.history_ttl)
            except (OSError, sqlite3.Error) as e:
                self._storage_failed(e)
                self.history = self._memory_history
        self.fetcher = ImageFetcher(FetchSettings(
            ls_url=s.ls_url, api_key=s.api_key, allowed_hosts=s.allowed_hosts, local_root=s.local_root,
            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels))
        self.projects: dict[str, dict] = {}
        try:
            self.store: AnnotationStore | None = AnnotationStore(os.path.join(s.model_dir, "annotations.db"))
        except (OSError, sqlite3.Error) as e:
            self._storage_failed(e)
            self.store = None
        self.registry = Registry(s.model_dir)
        self.pool = ModelPool(s, self.registry)
        self.jobs: dict[str, subprocess.Popen] = {}
        self._request = threading.local()  # per-thread timings of the last predict()

    # -- the model pool (ihp_backend.model_pool) ----------------------------------------------
    def load(self) -> None:
        """Load the serving checkpoint (blocking), then resume training a restart interrupted."""
        self.pool.load()
        for p in self.registry.projects():
            try:
                self.maybe_start_training(p)
            except Exception as e:  # never let this stop serving
                log.warning("could not resume training for project %s: %s", p, e)

    def load_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="ihp-model-load", daemon=True)
        t.start()
        return t

    @property
    def parser(self) -> Parser | None:
        return self.pool.parser

    @property
    def load_error(self) -> str | None:
        return self.pool.load_error

    @property
    def model_loaded(self) -> bool:
        return self.pool.parser is not None

    @property
    def model_version(self) -> str:
        return self.pool.model_version

    @property
    def inference(self) -> dict | None:
        return self.pool.inference

    def parser_for(self, project) -> Parser:
        return self.pool.for_project(project_key(project))

    # -- Label Studio API ---------------------------------------------------------------------
    def setup(self, project, label_config: str | None, hostname: str = "", access_token: str = "") -> dict:
        """Remember a project's config and LS connection (LS waits only 3 s: no model work)."""
        for name, v in (("hostname", hostname), ("access_token", access_token)):
            if not isinstance(v, str):
                raise RequestError(f"'{name}' must be a string")
        if label_config:
            try:
                _setup_of(label_config)
            except LabelConfigError as e:
                raise RequestError(str(e)) from None
        self.projects[project_key(project)] = {"label_config": label_config, "hostname": hostname}
        if hostname and not self.fetcher.s.ls_url:
            self.fetcher.s.ls_url = hostname.rstrip("/")
        if access_token and not self.fetcher.s.api_key:
            self.fetcher.s.api_key = access_token
        return {"model_version": self.model_version}

    def predict(self, tasks, context=None, label_config: str | None = None, project=None, **kw) -> list[dict]:
        """One prediction per task: BrushLabels regions from the task's click history."""
        if not isinstance(tasks, list) or not tasks:
            raise RequestError("'tasks' must be a non-empty list")
        if not label_config:
            label_config = self.projects.get(project_key(project), {}).get("label_config")
        if not label_config:
            raise RequestError("no label_config in the request and no /setup for this project")
        try:
            setup = _setup_of(label_config)
        except LabelConfigError as e:
            raise RequestError(str(e)) from None
        if context is not None and not isinstance(context, dict):
            raise RequestError("'params.context' must be an object or null")
        self._request.timings = {}
        try:
            return [self._predict_task(t, context, setup, project) for t in tasks]
        except SharedStateUnavailable as e:
            raise RequestError(f"{e}; retry the click", status=503) from None

    def last_timings(self) -> dict[str, float]:
        """Seconds per stage of this thread's last ``predict`` (summed over its tasks): history,
        fetch, input, forward, upsample, rle. The HTTP layer sends them as Server-Timing."""
        return dict(getattr(self._request, "timings", {}))

    def _add_time(self, stage: str, seconds: float) -> None:
        t = getattr(self._request, "timings", None)
        if t is not None:
            t[stage] = t.get(stage, 0.0) + seconds

    def _predict_task(self, task, context, setup: LabelSetup, project) -> dict:
        if not isinstance(task, dict) or "id" not in task:
            raise RequestError("each task must be an object with an 'id'")
        parser = self.parser_for(project)
        try:
            label_to_slot = parser.binding.bind(list(setup.labels))
        except BindingError as e:
            raise RequestError(str(e), status=422) from None
        if context is None:
            clicks, size = [], None
            known = zero_click_channels(parser.binding, parser.vocab_start, setup.brush_labels) \
                if self.settings.zero_click else {}
            if parser.binding.kind != "fixed" and not known:
                # a label-agnostic model without known names needs clicks: no prediction at all
                # (a list of predictions per task, empty; an empty result would show Label
                # Studio's empty "0.00%" prediction tab on every task)
                return []
        else:
            results = context.get("result")
            if results is not None and not isinstance(results, list):
                raise RequestError("'context.result' must be a list")
            try:
                new, size = keypoints_to_clicks(results or [], setup)
            except ClickError as e:
                raise RequestError(str(e)) from None
            if len(new) > self.settings.max_clicks:
                raise RequestError(f"{len(new)} clicks in one request; the limit is "
                                   f"{self.settings.max_clicks} (IHP_MAX_CLICKS)")
            for c in new:
                if c.label not in label_to_slot:
                    raise RequestError(f"keypoint label {c.label!r} is not a label of the config")
            t0 = time.perf_counter()
            try:
                clicks = self.history.apply(project, task["id"], new, size)
            except (OSError, sqlite3.Error) as e:
                if is_transient(e):  # another worker held the lock past the busy timeout
                    raise RequestError("click history is busy; retry the click", status=503) from None
                self._storage_failed(e)  # disk full / read-only: keep serving from memory
                self.history = self._memory_history
                clicks = self.history.apply(project, task["id"], new, size)
            self._add_time("history", time.perf_counter() - t0)
            if not clicks:
                self._forget_prev(project, task["id"])
                return self._empty(parser)
        url = _image_url(task, setup.image_key)
        if not url:
            raise RequestError(f"task {task['id']} has no image in data[{setup.image_key!r}]")
        t0 = time.perf_counter()
        try:
            image = self.fetcher.get(url)
        except ImageFetchError as e:
            raise RequestError(str(e), status=422) from None
        self._add_time("fetch", time.perf_counter() - t0)
        h, w = image.shape[:2]
        sx, sy = (w / size[0], h / size[1]) if size else (1.0, 1.0)
        arr = np.array([(c.y * sy, c.x * sx, label_to_slot[c.label]) for c in clicks
                        if c.label in label_to_slot], np.float64).reshape(-1, 3)
        emptied: list[str] = []
        if context is None and parser.binding.kind != "fixed":
            # zero-click parse: the vocabulary head over the config's known brush labels
            slot_to_label = {ch: lab for lab, ch in known.items()}
            res = parser.parse(image, arr, allowed_slots=sorted(slot_to_label))
            for stage, sec in res.timings.items():
                self._add_time(stage, sec)
        else:
            allowed = allowed_slots(parser.binding, label_to_slot, arr[:, 2], setup.brush_labels,
                                    parser.unclaimed)
            key = (project_key(project), str(task["id"]))
            state = click_state(clicks)
            stack = self.predictions.stack(key)
            if stack and all(st != state for st, _, _ in stack) and not neighbours(stack[-1][0], state):
                # this worker's memory of the task is stale (the history was cleared or changed
                # through another worker): start afresh
                self.predictions.drop(key)
                stack = []
            prev = previous_input(stack, state)
            fill, fill_names = fill_channels(parser.binding, parser.vocab_start, setup.brush_labels,
                                             label_to_slot, arr[:, 2]) if self.settings.fill_known else ({}, {})
            res = parser.parse(image, arr, allowed_slots=allowed, prev_mask=resolved(prev), fill=fill,
                               zoom=self.settings.zoom)
            for stage, sec in res.timings.items():
                self._add_time(stage, sec)
            emptied = [lab for st, _, _ in stack[-1:] for *_, lab in st]  # (an undo empties its label)
            # push this click set and its answer (network-size labels; None for a network
            # without the previous-prediction input); ``previous_input`` finds it on an undo.
            # ``prev`` goes as stored: Redis keeps an earlier answer's bytes, not re-encoded
            self.predictions.push(key, (state, prev, res.network_labels))
            slot_to_label = {**slot_names(label_to_slot, setup.labels, setup.brush_labels), **fill_names}
        t0 = time.perf_counter()
        slot_to_label = answered_labels(slot_to_label, parser.binding, self.settings.return_background)
        if not self.settings.return_background:
            emptied = [lab for lab in emptied if not parser.binding.is_background(lab)]
        results = brush_results(res.labels, slot_to_label, setup, res.confidence, emptied)
        validate_results(results, setup)
        self._add_time("rle", time.perf_counter() - t0)
        return {"result": results, "score": res.score, "model_version": parser.model_version}

    def _empty(self, parser: Parser) -> dict:
        return {"result": [], "score": 0.0, "model_version": parser.model_version}

    def _forget_prev(self, project, task):
        self.predictions.drop((project_key(project), str(task)))

    def _storage_failed(self, e: Exception) -> None:
        self.state_error = (f"MODEL_DIR {self.settings.model_dir!r} cannot be written ({type(e).__name__}: {e}); "
                            f"serving continues with click history in memory per worker; annotations "
                            f"are not stored")
        log.error(self.state_error)

    def _require_store(self) -> AnnotationStore:
        if self.store is None:
            raise RequestError(self.state_error or "annotation store unavailable", status=507)
        return self.store

    # -- fit: webhooks -> stored samples -> background training ------------------------------
    def fit(self, event: str, data: dict, **kw) -> dict:
        """Record a Label Studio webhook event (answers well within LS's 1 s).

        ANNOTATION_CREATED / UPDATED: the annotation (raw result) and the task image are stored
        durably before returning, and the task's click history is cleared; ANNOTATION_DELETED
        removes the sample; START_TRAINING requests a run. A training job is started in the
        background when one is due (START_TRAINING, or IHP_TRAIN_EVERY new samples)."""
        project_obj = data.get("project") if isinstance(data.get("project"), dict) else {}
        project = project_key(data.get("project"))
        ann = data.get("annotation") if isinstance(data.get("annotation"), dict) else {}
        task = data.get("task") if isinstance(data.get("task"), dict) else {}
        task_id = task.get("id", ann.get("task"))
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED") and task_id is not None:
            try:
                self.history.clear(project, task_id)
                self._forget_prev(project, task_id)
            except SharedStateUnavailable as e:  # Label Studio retries a failed webhook
                raise RequestError(f"{e}; send the webhook again", status=503) from None
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return self._store_annotation(event, project, project_obj, ann, task, task_id)
        if event == "ANNOTATION_DELETED":
            if ann.get("id") is None:
                raise RequestError("ANNOTATION_DELETED needs annotation.id")
            removed = self._store_call(lambda st: st.delete(project, ann["id"]))
            return {"event": event, "removed": removed}
        if event == "START_TRAINING":
            if not project:
                raise RequestError("START_TRAINING needs project.id")
            cfg = project_obj.get("label_config")
            if cfg:
                self._check_config(cfg)
            self._store_call(lambda st: st.request_training(project, cfg))
            return {"event": event, "training": self.maybe_start_training(project)}
        return {"event": event, "ignored": True}

    def _store_call(self, fn):
        st = self._require_store()
        try:
            return fn(st)
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError) as e:
            # a payload value SQLite cannot bind (a list, a dict): the request is wrong, not the disk
            raise RequestError(f"the payload holds a value that cannot be stored: {e}") from None
        except (OSError, sqlite3.Error) as e:
            if is_transient(e):
                raise RequestError("annotation store is busy; Label Studio will retry", status=503) from None
            self._storage_failed(e)
            raise RequestError(self.state_error, status=507) from None

    @staticmethod
    def _check_config(cfg: str) -> LabelSetup:
        try:
            return _setup_of(cfg)
        except LabelConfigError as e:
            raise RequestError(str(e)) from None

    def _store_annotation(self, event, project, project_obj, ann, task, task_id) -> dict:
        if not project or task_id is None or ann.get("id") is None:
            raise RequestError(f"{event} needs project.id, task.id and annotation.id")
        if ann.get("was_cancelled"):
            return {"event": event, "stored": False, "reason": "cancelled/skipped annotation"}
        cfg = project_obj.get("label_config") or self._store_call(lambda st: st.project_config(project)) or \
            self.projects.get(project, {}).get("label_config")
        if not cfg:
            raise RequestError("no label_config: the webhook's project has none and the project was never set up")
        setup = self._check_config(cfg)
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
        url = _image_url(task, setup.image_key)
        image, err = None, None
        if brush and url:
            try:
                image = self.fetcher.fetch_bytes(url)
            except ImageFetchError as e:
                err = str(e)
        self._store_call(lambda st: st.put(project, ann["id"], task_id, cfg, brush, url, image))
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

    def maybe_start_training(self, project) -> str:
        """Start the fine-tuning job for a project if one is due and none runs."""
        p = project_key(project)
        try:
            lock = os.path.join(self.registry.project_dir(p), "train.lock")
        except ValueError:
            return "invalid-project"
        if self.store is None or self.store.pending(p, self.settings.train_every) is None:
            return "not-due"
        if is_locked(lock):
            return "running"  # the running job picks the new request up when it finishes
        old = self.jobs.get(p)
        if old is not None and old.poll() is None:
            return "running"
        log_path = os.path.join(self.registry.project_dir(p), "job.log")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [sys.executable, "-m", "ihp_backend.fit_job", "--model-dir", os.path.abspath(self.settings.model_dir),
               "--project", p, "--default-checkpoint", os.path.abspath(self.settings.checkpoint),
               "--every", str(self.settings.train_every)]
        with open(log_path, "ab") as logf:
            self.jobs[p] = subprocess.Popen(cmd, cwd=root, stdout=logf, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started training job for project %s (pid %d)", p, self.jobs[p].pid)
        return "started"

    def status(self) -> dict:
        """Per project: samples stored, the job's state and progress, the serving version."""
        out = {}
        counts = self.store.counts() if self.store is not None else {}
        for p in sorted(set(counts) | set(self.registry.projects())):
            try:
                serving = self.registry.serving(p)
                out[p] = {**counts.get(p, {}), "job": self.registry.job(p),
                          "serving": None if not serving else {k: serving[k] for k in ("version", "promoted", "metrics")}}
            except ValueError:
                continue
        return out
