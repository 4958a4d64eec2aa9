"""Model versions per project under MODEL_DIR (shared by workers and the training job).

    MODEL_DIR/projects/<project>/versions/<version>.pt    every trained version (kept)
    MODEL_DIR/projects/<project>/versions/<version>.json  its metrics and whether it was promoted
    MODEL_DIR/projects/<project>/serving.json            the promoted version workers serve
    MODEL_DIR/projects/<project>/job.json                the training job's status / last result

Every file is written to a temporary name and renamed, so a reader (or a kill -9) never sees
half a file; a worker switches when ``serving.json`` changes.
"""
from __future__ import annotations

import json
import os
import re
import time

from .core.checkpoint import save_checkpoint, write_atomically


def _atomic_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=str)
    write_atomically(path, write)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def valid_project_id(project) -> bool:
    """A project id the registry may name a directory after: 1-64 ASCII letters, digits, _ or -."""
    return re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", str(project)) is not None


class Registry:
    def __init__(self, model_dir: str):
        self.root = os.path.join(model_dir, "projects")

    def project_dir(self, project: str, create: bool = True) -> str:
        p = str(project)
        if not valid_project_id(p):
            raise ValueError(f"invalid project id {p!r}")
        d = os.path.join(self.root, p)
        if create:
            os.makedirs(os.path.join(d, "versions"), exist_ok=True)
        return d

    def projects(self) -> list[str]:
        try:
            return sorted(os.listdir(self.root))
        except OSError:
            return []

    def new_version_name(self, project: str) -> str:
        n = len([f for f in os.listdir(os.path.join(self.project_dir(project), "versions")) if f.endswith(".json")])
        return f"project{project}-v{n + 1}-{time.strftime('%Y%m%d%H%M%S')}"

    def add_version(self, project: str, version: str, ckpt: dict, metrics: dict, promote: bool) -> str:
        d = os.path.join(self.project_dir(project), "versions")
        path = os.path.join(d, version + ".pt")
        save_checkpoint(ckpt, path)
        _atomic_json(os.path.join(d, version + ".json"),
                     {"version": version, "created": time.time(), "promoted": promote, "metrics": metrics,
                      "parent": ckpt.get("training", {}).get("parent_version")})
        if promote:
            _atomic_json(os.path.join(self.project_dir(project), "serving.json"),
                         {"version": version, "path": path, "promoted": time.time(), "metrics": metrics})
        return path

    def serving(self, project: str) -> dict | None:
        try:
            d = self.project_dir(project, create=False)
        except ValueError:
            return None
        info = _read_json(os.path.join(d, "serving.json"))
        if info and os.path.exists(info.get("path", "")):
            return info
        return None

    def serving_path(self, project: str) -> str | None:
        info = self.serving(project)
        return info["path"] if info else None

    def versions(self, project: str) -> list[dict]:
        d = os.path.join(self.project_dir(project, create=False), "versions")
        if not os.path.isdir(d):
            return []
        out = [_read_json(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".json")]
        return sorted([v for v in out if v], key=lambda v: v.get("created", 0))

    def write_job(self, project: str, status: dict) -> None:
        _atomic_json(os.path.join(self.project_dir(project), "job.json"), {**status, "updated": time.time()})

    def job(self, project: str) -> dict | None:
        return _read_json(os.path.join(self.project_dir(project, create=False), "job.json"))
