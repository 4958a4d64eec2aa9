"""IHPModel: the Label Studio-facing model (``predict`` / ``fit``), over the HTTP-free core.

It has the familiar shape of label-studio-ml's ``LabelStudioMLBase`` (``predict(tasks,
context=None, **kw)``, ``fit(event, data, **kw)``) without depending on that package.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

import numpy as np

from .core.checkpoint import BindingError
from .history import ClickHistory, MemoryHistory, is_transient, project_key
from .images import FetchSettings, ImageFetcher, ImageFetchError
from .core.inference import Parser
from .core.label_rules import (allowed_slots, answered_labels, fill_channels, prior_channels, slot_names,
                               zero_click_channels)
from .core.ls_format import ClickError, LabelSetup, brush_results, keypoints_to_clicks, validate_results
from .errors import RequestError
from .registry import open_registry
from .model_pool import ModelPool
from .settings import Settings
from .shared_state import MemoryPredictions, RedisHistory, RedisPredictions, SharedStateUnavailable, resolved
from .webhooks import Webhooks, image_url, setup_of

log = logging.getLogger("ihp_backend")


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
        self.history_error: str | None = None
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
            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels), cache_bytes=s.image_cache_mb << 20)
        self.projects: dict[str, dict] = {}
        self.registry = open_registry(s)
        self.pool = ModelPool(s, self.registry)
        self.webhooks = Webhooks(s, self.registry, self.fetcher, forget_task=self._forget_task,
                                 known_config=lambda p: self.projects.get(p, {}).get("label_config"))
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
            setup_of(label_config)
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
        setup = setup_of(label_config)
        if context is not None and not isinstance(context, dict):
            raise RequestError("'params.context' must be an object or null")
        self._request.timings = {}
        try:
            return self._answer_in_time(tasks, lambda t: self._predict_task(t, context, setup, project))
        except SharedStateUnavailable as e:
            raise RequestError(f"{e}; retry the click", status=503) from None

    def _answer_in_time(self, tasks: list, answer) -> list:
        """``answer(task)`` for each task until ``IHP_BATCH_SECONDS`` have passed (the first task
        always), then ``[]`` (no prediction) for the rest. Label Studio sends every task selected
        for "Retrieve predictions" in one request and gives up after 100 s (ML_TIMEOUT_PREDICT),
        storing nothing; answered in time, it stores what came back, and the next "Retrieve
        predictions" sends only the tasks without a prediction of this model version."""
        budget = self.settings.batch_seconds
        t0 = time.monotonic()
        out: list = []
        for task in tasks:
            if out and budget > 0 and time.monotonic() - t0 > budget:
                break
            out.append(answer(task))
        if len(out) < len(tasks):
            log.warning("batch of %d tasks: %d answered within IHP_BATCH_SECONDS=%g s, %d left without a "
                        "prediction; run \"Retrieve predictions\" again for them", len(tasks), len(out), budget,
                        len(tasks) - len(out))
            out += [[] for _ in tasks[len(out):]]
        return out

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
        url = image_url(task, setup.image_key)
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
            prior = prior_channels(parser.binding, parser.vocab_start, setup.brush_labels, label_to_slot,
                                   arr[:, 2], parser.unclaimed) if parser.uses_vocabulary_prior else None
            res = parser.parse(image, arr, allowed_slots=allowed, prev_mask=resolved(prev), fill=fill, prior=prior)
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

    def _forget_task(self, project, task):
        """The task's annotation is final: drop its click history and previous predictions."""
        self.history.clear(project, task)
        self._forget_prev(project, task)

    def _storage_failed(self, e: Exception) -> None:
        self.history_error = (f"MODEL_DIR {self.settings.model_dir!r} cannot be written ({type(e).__name__}: {e}); "
                              f"serving continues with click history in memory per worker")
        log.error(self.history_error)

    # -- fit: webhooks -> stored samples -> fit runs (ihp_backend.webhooks) ------------------
    def fit(self, event: str, data: dict, **kw) -> dict:
        """Record a Label Studio webhook event (``Webhooks.handle``)."""
        return self.webhooks.handle(event, data)

    def maybe_start_training(self, project) -> str:
        return self.webhooks.maybe_start_training(project)

    def status(self) -> dict:
        return self.webhooks.status()

    @property
    def store(self):
        return self.webhooks.store

    @property
    def jobs(self) -> dict:
        """This worker's fit child processes per project (the local launcher; none with a queue)."""
        return getattr(self.webhooks.jobs, "procs", {})

    @property
    def state_error(self) -> str | None:
        return self.history_error or self.webhooks.state_error
