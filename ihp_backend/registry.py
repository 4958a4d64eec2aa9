"""Model versions per project under MODEL_DIR (shared by workers and the training job).

    MODEL_DIR/projects/<project>/versions/<version>.pt    every trained version (kept)
    MODEL_DIR/projects/<project>/versions/<version>.json  its metrics and whether it was promoted
    MODEL_DIR/projects/<project>/serving.json            the promoted version workers serve
    MODEL_DIR/projects/<project>/job.json                the training job's status / last result

With ``IHP_DATABASE_URL`` the records are rows in PostgreSQL instead (``PostgresRegistry``);
the checkpoint files stay here.

Every file is written to a temporary name and renamed, so a reader (or a kill -9) never sees
half a file; a worker switches when ``serving.json`` changes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

from .core.checkpoint import save_checkpoint, write_atomically

log = logging.getLogger("ihp_backend")


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


REGISTRY_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS versions (project TEXT NOT NULL, version TEXT NOT NULL, created DOUBLE PRECISION,"
    " promoted BOOLEAN, metrics TEXT, parent TEXT, path TEXT, PRIMARY KEY (project, version))",
    "CREATE TABLE IF NOT EXISTS serving (project TEXT PRIMARY KEY, version TEXT NOT NULL, path TEXT NOT NULL,"
    " promoted DOUBLE PRECISION, metrics TEXT)",
    "CREATE TABLE IF NOT EXISTS jobs (project TEXT PRIMARY KEY, status TEXT NOT NULL, updated DOUBLE PRECISION)",
]


class PostgresRegistry(Registry):
    """The same registry with its records in PostgreSQL (``IHP_DATABASE_URL``): the versions,
    the promoted one and the job status are rows; the checkpoint files stay under
    ``MODEL_DIR/projects/<project>/versions/`` (a directory every replica and worker mounts).
    Promotion is one transaction: the version row and the serving row together."""

    def __init__(self, model_dir: str, url: str):
        import psycopg
        super().__init__(model_dir)
        self._psycopg, self.url = psycopg, url
        with self._db() as db:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(72640002)")
                for st in REGISTRY_SCHEMA:
                    db.execute(st)

    def _db(self):
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def _read(self, fn, default):
        """A read that answers ``default`` while PostgreSQL is unreachable (serving goes on
        with the version already loaded; /health stays up)."""
        try:
            with self._db() as db:
                return fn(db)
        except self._psycopg.OperationalError as e:
            log.warning("version registry unreachable: %s", e)
            return default

    def projects(self) -> list[str]:
        rows = self._read(lambda db: db.execute("SELECT project FROM versions UNION SELECT project FROM jobs")
                          .fetchall(), [])
        return sorted(r[0] for r in rows)

    def new_version_name(self, project: str) -> str:
        with self._db() as db:
            n = db.execute("SELECT COUNT(*) FROM versions WHERE project=%s", (str(project),)).fetchone()[0]
        return f"project{project}-v{n + 1}-{time.strftime('%Y%m%d%H%M%S')}"

    def add_version(self, project: str, version: str, ckpt: dict, metrics: dict, promote: bool) -> str:
        path = os.path.join(self.project_dir(project), "versions", version + ".pt")
        save_checkpoint(ckpt, path)  # the file first: a row never names a missing file
        now, m = time.time(), json.dumps(metrics, default=str)
        with self._db() as db:
            with db.transaction():
                db.execute("INSERT INTO versions VALUES (%s, %s, %s, %s, %s, %s, %s)",
                           (str(project), version, now, promote, m, ckpt.get("training", {}).get("parent_version"), path))
                if promote:
                    db.execute("INSERT INTO serving VALUES (%s, %s, %s, %s, %s) ON CONFLICT (project) DO UPDATE SET "
                               "version=excluded.version, path=excluded.path, promoted=excluded.promoted, "
                               "metrics=excluded.metrics", (str(project), version, path, now, m))
        return path

    def serving(self, project: str) -> dict | None:
        if not valid_project_id(project):
            return None
        row = self._read(lambda db: db.execute("SELECT version, path, promoted, metrics FROM serving WHERE "
                                               "project=%s", (str(project),)).fetchone(), None)
        if row and os.path.exists(row[1]):
            return {"version": row[0], "path": row[1], "promoted": row[2], "metrics": json.loads(row[3])}
        return None

    def versions(self, project: str) -> list[dict]:
        rows = self._read(lambda db: db.execute("SELECT version, created, promoted, metrics, parent FROM versions "
                                                "WHERE project=%s ORDER BY created", (str(project),)).fetchall(), [])
        return [{"version": v, "created": c, "promoted": p, "metrics": json.loads(m), "parent": par}
                for v, c, p, m, par in rows]

    def write_job(self, project: str, status: dict) -> None:
        now = time.time()
        with self._db() as db:
            db.execute("INSERT INTO jobs VALUES (%s, %s, %s) ON CONFLICT (project) DO UPDATE SET "
                       "status=excluded.status, updated=excluded.updated",
                       (str(project), json.dumps({**status, "updated": now}, default=str), now))

    def job(self, project: str) -> dict | None:
        row = self._read(lambda db: db.execute("SELECT status FROM jobs WHERE project=%s",
                                               (str(project),)).fetchone(), None)
        return json.loads(row[0]) if row else None


def open_registry(settings) -> Registry:
    """PostgreSQL records with ``IHP_DATABASE_URL``, else JSON files; checkpoints in MODEL_DIR."""
    if settings.database_url:
        return PostgresRegistry(settings.model_dir, settings.database_url)
    return Registry(settings.model_dir)
