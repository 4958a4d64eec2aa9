"""The networks a backend worker serves: the default checkpoint, loaded once in the background
at start, and each project's promoted version (from the registry), loaded in the background and
swapped in when ready, so that no request waits or fails during a switch."""
from __future__ import annotations

import logging
import threading
import time

import torch

from .core.inference import Parser
from .registry import Registry, valid_project_id
from .settings import Settings

log = logging.getLogger("ihp_backend")


class ModelNotReady(RuntimeError):
    """The default model has not finished loading (or failed to): answered 503."""


class ModelPool:
    CHECK_EVERY = 1.0  # seconds between looks at a project's promoted version

    def __init__(self, settings: Settings, registry: Registry):
        self.settings, self.registry = settings, registry
        self.parser: Parser | None = None
        self.load_error: str | None = None
        self._loaded = threading.Event()
        self._project_parsers: dict[str, Parser] = {}
        self._project_checked: dict[str, float] = {}
        self._project_loading: set[str] = set()
        self._lock = threading.Lock()

    def _parser_options(self) -> dict:
        """How every network of this backend runs (default and per-project models alike)."""
        return self.settings.parser_options().parser_kwargs()

    def load(self) -> None:
        """Load the default checkpoint (blocking). Records the error instead of raising."""
        t0 = time.time()
        try:
            parser = Parser.from_file(self.settings.checkpoint, **self._parser_options())
            warm = parser.warm_up()  # before /predict may use it: the first click is not the slow one
            self.parser = parser
            log.info("model %s loaded from %s in %.1fs (%.1fs of it warming up)", parser.model_version,
                     self.settings.checkpoint, time.time() - t0, warm)
        except Exception as e:  # reported by /health and by every /predict
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load %s: %s", self.settings.checkpoint, self.load_error)
        finally:
            self._loaded.set()

    @property
    def model_version(self) -> str:
        return self.parser.model_version if self.parser else "not-loaded"

    @property
    def inference(self) -> dict | None:
        """How the default network runs (device, compute type, sizes, refinement), for /health."""
        p = self.parser
        if p is None:
            return None
        return {"device": str(p.device), "precision": p.precision,
                "max_side": p.max_side, "refine": p.refine, "click_radius": p.click_radius, "flip": p.flip,
                "edge_refiner": p.edge_net is not None, "aspp_rank": p.aspp_rank,
                "threads": torch.get_num_threads() if p.device.type == "cpu" else None}

    def ready(self) -> Parser:
        """The default parser, waiting up to IHP_LOAD_WAIT seconds for it to load."""
        self._loaded.wait(self.settings.load_wait)
        if self.parser is None:
            raise ModelNotReady(self.load_error or "the model is still loading; retry in a few seconds")
        return self.parser

    def for_project(self, p: str) -> Parser:
        """The project's promoted model if it has one, else the default. At most every
        CHECK_EVERY seconds a background thread looks at the registry (a file, or a PostgreSQL
        row) and loads a newly promoted version: the click never waits for either."""
        default = self.ready()
        if not p:
            return default
        now = time.time()
        with self._lock:
            current = self._project_parsers.get(p)
            due = now - self._project_checked.get(p, 0) >= self.CHECK_EVERY and p not in self._project_loading
            if due:
                self._project_checked[p] = now
                self._project_loading.add(p)
        if due:
            threading.Thread(target=self._refresh_project, args=(p, current), daemon=True).start()
        return current or default

    def _refresh_project(self, p: str, current: Parser | None) -> None:
        try:
            info = self.registry.serving(p) if valid_project_id(p) else None
            if info and (current is None or current.model_version != info["version"]):
                self._load_project(p, info)
        except Exception as e:  # never let a registry hiccup reach a click
            log.warning("could not check project %s's serving version: %s", p, e)
        finally:
            with self._lock:
                self._project_loading.discard(p)

    def _load_project(self, p: str, info: dict) -> None:
        try:
            parser = Parser.from_file(info["path"], **self._parser_options())
            parser.warm_up()
            with self._lock:
                self._project_parsers[p] = parser
            log.info("project %s now serves %s", p, parser.model_version)
        except Exception as e:
            log.error("could not load %s for project %s: %s", info.get("path"), p, e)
