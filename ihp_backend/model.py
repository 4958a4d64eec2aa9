"""IHPModel: the Label Studio-facing model (``predict`` / ``fit``), over the HTTP-free core.

It has the familiar shape of label-studio-ml's ``LabelStudioMLBase`` (``predict(tasks,
context=None, **kw)``, ``fit(event, data, **kw)``) without depending on that package.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from .checkpoint import BindingError
from .history import ClickHistory, project_key
from .images import FetchSettings, ImageFetcher, ImageFetchError
from .inference import Parser, default_threads
from .ls_format import (ClickError, LabelConfigError, LabelSetup, brush_results, keypoints_to_clicks,
                        parse_label_config, validate_results)
from .settings import Settings

log = logging.getLogger("ihp_backend")


class RequestError(ValueError):
    """A request the backend cannot serve because of its content; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ModelNotReady(RuntimeError):
    pass


@lru_cache(maxsize=64)
def _setup_of(label_config: str) -> LabelSetup:
    return parse_label_config(label_config)


class IHPModel:
    """One per worker process. The network loads in a background thread at start."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        s = self.settings
        os.makedirs(s.model_dir, exist_ok=True)
        self.history = ClickHistory(os.path.join(s.model_dir, "state.db"), ttl=s.history_ttl)
        self.fetcher = ImageFetcher(FetchSettings(
            ls_url=s.ls_url, api_key=s.api_key, allowed_hosts=s.allowed_hosts, local_root=s.local_root,
            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels))
        self.parser: Parser | None = None
        self.load_error: str | None = None
        self._loaded = threading.Event()
        self._prev: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._prev_lock = threading.Lock()
        self.projects: dict[str, dict] = {}

    # -- loading ------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the serving checkpoint (blocking). Records the error instead of raising."""
        t0 = time.time()
        try:
            self.parser = Parser.from_file(self.settings.checkpoint, device=self.settings.device,
                                           max_side=self.settings.max_side,
                                           threads=self.settings.torch_threads or default_threads())
            log.info("model %s loaded from %s in %.1fs", self.parser.model_version,
                     self.settings.checkpoint, time.time() - t0)
        except Exception as e:  # reported by /health and by every /predict
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", self.settings.checkpoint, self.load_error)
        finally:
            self._loaded.set()

    def load_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self.load, name="ihp-model-load", daemon=True)
        t.start()
        return t

    @property
    def model_loaded(self) -> bool:
        return self.parser is not None

    @property
    def model_version(self) -> str:
        return self.parser.model_version if self.parser else "not-loaded"

    def _ready_parser(self) -> Parser:
        self._loaded.wait(self.settings.load_wait)
        if self.parser is None:
            raise ModelNotReady(self.load_error or "the model is still loading; retry in a few seconds")
        return self.parser

    # -- Label Studio API ---------------------------------------------------------------------
    def setup(self, project, label_config: str | None, hostname: str = "", access_token: str = "") -> dict:
        """Remember a project's config and LS connection (LS waits only 3 s: no model work)."""
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
        return [self._predict_task(t, context, setup, project) for t in tasks]

    def _predict_task(self, task, context, setup: LabelSetup, project) -> dict:
        if not isinstance(task, dict) or "id" not in task:
            raise RequestError("each task must be an object with an 'id'")
        parser = self._ready_parser()
        try:
            label_to_slot = parser.binding.bind(list(setup.labels))
        except BindingError as e:
            raise RequestError(str(e), status=422) from None
        if context is None:
            clicks, size = [], None
            if parser.binding.kind != "fixed":
                return self._empty(parser)  # a label-agnostic model needs clicks
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
            clicks = self.history.apply(project, task["id"], new, size)
            if not clicks:
                self._forget_prev(project, task["id"])
                return self._empty(parser)
        url = (task.get("data") or {}).get(setup.image_key)
        if not url:
            raise RequestError(f"task {task['id']} has no image in data[{setup.image_key!r}]")
        try:
            image = self.fetcher.get(url)
        except ImageFetchError as e:
            raise RequestError(str(e), status=422) from None
        h, w = image.shape[:2]
        sx, sy = (w / size[0], h / size[1]) if size else (1.0, 1.0)
        arr = np.array([(c.y * sy, c.x * sx, label_to_slot[c.label]) for c in clicks
                        if c.label in label_to_slot], np.float64).reshape(-1, 3)
        allowed = self._allowed_slots(parser, label_to_slot, arr, setup)
        key = (project_key(project), str(task["id"]))
        with self._prev_lock:
            prev = self._prev.get(key)
        res = parser.parse(image, arr, allowed_slots=allowed, prev_mask=prev)
        self._remember_prev(key, res.labels)
        slot_to_label = self._slot_names(label_to_slot, setup)
        results = brush_results(res.labels, slot_to_label, setup, res.confidence)
        validate_results(results, setup)
        return {"result": results, "score": res.score, "model_version": parser.model_version}

    @staticmethod
    def _allowed_slots(parser: Parser, label_to_slot: dict, clicks: np.ndarray, setup: LabelSetup):
        """Slots the argmax may choose from.

        fixed (class-aware): every slot of the config's labels. shuffled (label-agnostic):
        background plus the slots that have at least one click; a slot nobody clicked carries
        no meaning for such a model.
        """
        brush_slots = {label_to_slot[lab] for lab in setup.brush_labels if lab in label_to_slot}
        if parser.binding.kind == "fixed":
            return sorted(brush_slots | set(label_to_slot.values()))
        return sorted({0} | {int(s) for s in clicks[:, 2]})

    @staticmethod
    def _slot_names(label_to_slot: dict, setup: LabelSetup) -> dict[int, str]:
        """Slot -> BrushLabels name (the brush control's spelling wins)."""
        out = {}
        for lab in setup.labels:
            if lab in label_to_slot and (label_to_slot[lab] not in out or lab in setup.brush_labels):
                out[label_to_slot[lab]] = lab
        return out

    def _empty(self, parser: Parser) -> dict:
        return {"result": [], "score": 0.0, "model_version": parser.model_version}

    def _remember_prev(self, key, labels):
        with self._prev_lock:
            self._prev[key] = labels
            self._prev.move_to_end(key)
            while len(self._prev) > 64:
                self._prev.popitem(last=False)

    def _forget_prev(self, project, task):
        with self._prev_lock:
            self._prev.pop((project_key(project), str(task)), None)

    def fit(self, event: str, data: dict, **kw) -> dict:
        """Webhook events. Annotation events end the task's interactive session (click history
        cleared). Training from annotations is not implemented yet: START_TRAINING is
        acknowledged and reported as not started."""
        project = data.get("project")
        task = (data.get("task") or {}).get("id") or (data.get("annotation") or {}).get("task")
        if event in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED") and task is not None:
            self.history.clear(project, task)
            self._forget_prev(project, task)
            return {"event": event, "history_cleared": True, "task": task}
        if event == "START_TRAINING":
            return {"event": event, "training": "not-available",
                    "message": "training from annotations is not implemented in this version"}
        return {"event": event, "ignored": True}
