"""Durable store of accepted annotations (the training data of ``fit``) and training requests.

Two implementations of one interface, the same SQL: ``AnnotationStore`` (SQLite WAL in
MODEL_DIR, the embedded default) and ``PostgresAnnotationStore`` (``IHP_DATABASE_URL=
postgresql://...``, shared by every replica and training worker). ``open_annotation_store``
picks one. The webhook handler must answer Label Studio within 1 s, so it stores what arrived
(the annotation's raw result JSON and the task image bytes) in one transaction before
answering; decoding the brush RLE into a label map happens afterwards (``decode_pending``), in
the training job.

Errors: ``StoreBusy`` (retry: a lock or a lost connection), ``StoreValueError`` (a payload value
the database cannot bind); anything else from the database means the store is unusable.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import time
from contextlib import contextmanager

import numpy as np
from PIL import Image

from .history import init_db, is_transient, project_key
from .core.ls_format import annotation_to_label_map, parse_label_config

# one schema; BLOB / REAL are spelled per database by ``_schema``
SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    project TEXT NOT NULL, annotation TEXT NOT NULL, task TEXT NOT NULL,
    label_config TEXT NOT NULL, result TEXT NOT NULL, image_url TEXT,
    labels BLOB, classes TEXT, error TEXT, created REAL, updated REAL,
    PRIMARY KEY (project, annotation));
CREATE TABLE IF NOT EXISTS images (
    project TEXT NOT NULL, task TEXT NOT NULL, bytes BLOB NOT NULL, updated REAL,
    PRIMARY KEY (project, task));
CREATE TABLE IF NOT EXISTS projects (
    project TEXT PRIMARY KEY, label_config TEXT, new_samples INTEGER DEFAULT 0,
    train_requested INTEGER DEFAULT 0, updated REAL);
"""


def _schema(blob: str = "BLOB", real: str = "REAL") -> list[str]:
    sql = SCHEMA.replace("BLOB", blob).replace("REAL", real)
    return [st.strip() for st in sql.split(";") if st.strip()]


class StoreBusy(RuntimeError):
    """The store is locked by another writer or unreachable for a moment: retry."""


class StoreValueError(ValueError):
    """A payload value the database cannot store (a list or dict where text is expected)."""


def _png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def decode_result(label_config: str, result_json: str) -> tuple[bytes | None, list | None, str | None]:
    """A stored annotation -> (label map PNG, class names, error). A result that cannot be
    decoded gives its error (the row is kept, marked, never trained on)."""
    try:
        setup = parse_label_config(label_config)
        classes = list(setup.brush_labels)
        lm = annotation_to_label_map(json.loads(result_json), setup, {n: i for i, n in enumerate(classes)},
                                     background=255)  # 255: no region covers it
    except Exception as e:  # any malformed stored result
        return None, None, f"{type(e).__name__}: {e}"
    if lm is None:
        return None, classes, "the annotation has no BrushLabels region"
    return _png(lm), classes, None


class _SqlAnnotationStore:
    """The store's queries, written once with ``?`` placeholders; a subclass gives ``_connect``
    (a DB-API connection in autocommit mode), ``_begin`` and error translation (``_errors``)."""

    placeholder = "?"
    begin = "BEGIN"

    def _connect(self):
        raise NotImplementedError

    def _translate(self, e: Exception) -> Exception | None:
        return None

    @contextmanager
    def _db(self):
        """One connection; database errors become StoreBusy / StoreValueError where they mean that."""
        db = None
        try:
            db = self._connect()
            yield _Conn(db, self.placeholder)
        except Exception as e:
            t = self._translate(e)
            if t is None:
                raise
            raise t from e
        finally:
            if db is not None:
                db.close()

    @contextmanager
    def _transaction(self):
        with self._db() as db:
            db.execute(self.begin)
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.rollback()
                raise

    # -- writes from the webhook ------------------------------------------------------------
    def put(self, project, annotation_id, task_id, label_config: str, result: list, image_url: str | None,
            image_bytes: bytes | None) -> None:
        """Insert or replace one annotation's sample (and its task image) atomically."""
        p, now = project_key(project), time.time()
        with self._transaction() as db:
            if image_bytes is not None:
                db.execute("INSERT INTO images (project, task, bytes, updated) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (project, task) DO UPDATE SET bytes=excluded.bytes, updated=excluded.updated",
                           (p, str(task_id), image_bytes, now))
            db.execute("INSERT INTO samples (project, annotation, task, label_config, result, image_url,"
                       " labels, classes, error, created, updated) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?) "
                       "ON CONFLICT (project, annotation) DO UPDATE SET task=excluded.task, "
                       "label_config=excluded.label_config, result=excluded.result, image_url=excluded.image_url, "
                       "labels=NULL, classes=NULL, error=NULL, updated=excluded.updated",
                       (p, str(annotation_id), str(task_id), label_config, json.dumps(result), image_url, now, now))
            db.execute("INSERT INTO projects (project, label_config, new_samples, updated) VALUES (?, ?, 1, ?) "
                       "ON CONFLICT (project) DO UPDATE SET label_config=excluded.label_config, "
                       "new_samples=projects.new_samples+1, updated=excluded.updated", (p, label_config, now))

    def delete(self, project, annotation_id) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM samples WHERE project=? AND annotation=?",
                              (project_key(project), str(annotation_id))).rowcount > 0

    def request_training(self, project, label_config: str | None = None) -> None:
        p, now = project_key(project), time.time()
        with self._db() as db:
            db.execute("INSERT INTO projects (project, label_config, train_requested, updated) VALUES (?, ?, 1, ?) "
                       "ON CONFLICT (project) DO UPDATE SET train_requested=projects.train_requested+1, "
                       "updated=excluded.updated, "
                       "label_config=COALESCE(excluded.label_config, projects.label_config)", (p, label_config, now))

    # -- decoding ---------------------------------------------------------------------------
    def decode_pending(self, project=None, limit: int | None = None) -> int:
        """Decode stored results into label maps (``decode_result``). Returns how many rows
        were processed."""
        q = "SELECT project, annotation, label_config, result, updated FROM samples WHERE labels IS NULL AND error IS NULL"
        args: tuple = ()
        if project is not None:
            q += " AND project=?"
            args = (project_key(project),)
        with self._db() as db:
            rows = db.execute(q + (f" LIMIT {int(limit)}" if limit else ""), args).fetchall()
        for p, ann, cfg, result, updated in rows:
            labels, classes, err = decode_result(cfg, result)
            with self._db() as db:  # only if the row was not replaced meanwhile
                db.execute("UPDATE samples SET labels=?, classes=?, error=? WHERE project=? AND annotation=? "
                           "AND updated=?", (labels, json.dumps(classes), err, p, ann, updated))
        return len(rows)

    # -- reads ------------------------------------------------------------------------------
    def samples(self, project) -> list[dict]:
        """Decoded, usable samples of a project: dicts with task, annotation, image (uint8 HxWx3),
        labels (uint8 HxW, index into classes), classes."""
        with self._db() as db:
            rows = db.execute(
                "SELECT s.annotation, s.task, s.labels, s.classes, i.bytes FROM samples s JOIN images i "
                "ON s.project=i.project AND s.task=i.task WHERE s.project=? AND s.labels IS NOT NULL "
                "ORDER BY s.task, s.annotation", (project_key(project),)).fetchall()
        out = []
        for ann, task, labels, classes, img in rows:
            image = np.asarray(Image.open(io.BytesIO(bytes(img))).convert("RGB"))
            lab = _unpng(bytes(labels))
            if image.shape[:2] != lab.shape:
                continue
            out.append({"annotation": ann, "task": task, "image": image, "labels": lab,
                        "classes": json.loads(classes)})
        return out

    def counts(self, project=None) -> dict:
        q = ("SELECT project, COUNT(*), COUNT(labels), COUNT(error) FROM samples"
             + (" WHERE project=?" if project is not None else "") + " GROUP BY project")
        with self._db() as db:
            rows = db.execute(q, (project_key(project),) if project is not None else ()).fetchall()
            pr = {r[0]: r[1:] for r in db.execute(
                "SELECT project, new_samples, train_requested, label_config FROM projects").fetchall()}
        out = {}
        for p, n, ok, bad in rows:
            out[p] = {"samples": n, "decoded": int(ok or 0), "invalid": int(bad or 0),
                      "new_since_training": int(pr.get(p, (0,))[0] or 0),
                      "training_requested": bool(pr.get(p, (0, 0))[1])}
        return out

    def project_config(self, project) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT label_config FROM projects WHERE project=?", (project_key(project),)).fetchone()
        return row[0] if row else None

    def pending(self, project, every: int) -> tuple[int, int] | None:
        """A training run is due when one was requested (START_TRAINING) or ``every`` new
        samples arrived. Returns the ticket (new samples, requests) to ``consume`` once the run
        finished, or None. Not consumed here: a run killed midway stays pending."""
        with self._db() as db:
            row = db.execute("SELECT new_samples, train_requested FROM projects WHERE project=?",
                             (project_key(project),)).fetchone()
        if not row:
            return None
        n, req = int(row[0] or 0), int(row[1] or 0)
        return (n, req) if req > 0 or (every > 0 and n >= every) else None

    def consume(self, project, ticket: tuple[int, int]) -> None:
        """Subtract what a finished run covered; events that arrived during it stay pending."""
        n, r = int(ticket[0]), int(ticket[1])
        with self._db() as db:
            db.execute("UPDATE projects SET "
                       "new_samples=CASE WHEN new_samples > ? THEN new_samples - ? ELSE 0 END, "
                       "train_requested=CASE WHEN train_requested > ? THEN train_requested - ? ELSE 0 END "
                       "WHERE project=?", (n, n, r, r, project_key(project)))


class _Conn:
    """A connection whose ``execute`` takes the store's ``?`` placeholders."""

    def __init__(self, db, placeholder: str):
        self.db, self.ph = db, placeholder

    def execute(self, sql: str, args: tuple = ()):
        return self.db.execute(sql if self.ph == "?" else sql.replace("?", self.ph), args)

    def rollback(self):
        try:
            self.db.execute("ROLLBACK")
        except Exception:
            pass


class AnnotationStore(_SqlAnnotationStore):
    """SQLite WAL in one file (the embedded default); safe across the processes of one host."""

    begin = "BEGIN IMMEDIATE"

    def __init__(self, path: str):
        self.path = path
        init_db(path, _schema())

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _translate(self, e):
        if isinstance(e, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
            return StoreValueError(f"the payload holds a value that cannot be stored: {e}")
        if is_transient(e):
            return StoreBusy("annotation store is busy")
        return None


class PostgresAnnotationStore(_SqlAnnotationStore):
    """The same store in PostgreSQL (``IHP_DATABASE_URL``): every replica and training worker
    reads and writes one database; one transaction per webhook as with SQLite."""

    placeholder = "%s"

    def __init__(self, url: str, connect_timeout: float = 5.0):
        import psycopg
        self._psycopg = psycopg
        self.url, self.connect_timeout = url, connect_timeout
        with self._db() as db:  # many workers start at once: create the tables under a lock
            db.execute("BEGIN")
            db.execute("SELECT pg_advisory_xact_lock(72640001)")
            for st in _schema(blob="BYTEA", real="DOUBLE PRECISION"):
                db.execute(st)
            db.execute("COMMIT")

    def _connect(self):
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=int(max(1, self.connect_timeout)))

    def _translate(self, e):
        pg = self._psycopg
        if isinstance(e, pg.errors.DataError) or (isinstance(e, pg.ProgrammingError) and "cannot adapt" in str(e)):
            return StoreValueError(f"the payload holds a value that cannot be stored: {e}")
        if isinstance(e, (pg.OperationalError, pg.errors.SerializationFailure, pg.errors.DeadlockDetected)):
            return StoreBusy(f"annotation store unreachable or busy ({type(e).__name__})")
        return None


def open_annotation_store(database_url: str | None, model_dir: str):
    """PostgreSQL when ``database_url`` is set, else SQLite in ``model_dir``."""
    if database_url:
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("IHP_DATABASE_URL must be a postgresql:// URL")
        return PostgresAnnotationStore(database_url)
    return AnnotationStore(os.path.join(model_dir, "annotations.db"))
