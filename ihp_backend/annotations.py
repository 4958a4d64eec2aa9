"""Durable store of accepted annotations (the training data of ``fit``), SQLite WAL in MODEL_DIR.

The webhook handler must answer Label Studio within 1 s, so it stores what arrived (the
annotation's raw result JSON and the task image bytes) in one transaction before answering;
decoding the brush RLE into a label map happens afterwards (``decode_pending``), in a
background thread of the worker or in the training job, whichever comes first.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import time

import numpy as np
from PIL import Image

from .history import init_db, project_key
from .core.ls_format import annotation_to_label_map, parse_label_config

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


def _png(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


class AnnotationStore:
    def __init__(self, path: str):
        self.path = path
        init_db(path, [st.strip() for st in SCHEMA.split(";") if st.strip()])

    def _conn(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA synchronous=FULL")
        return db

    # -- writes from the webhook ------------------------------------------------------------
    def put(self, project, annotation_id, task_id, label_config: str, result: list, image_url: str | None,
            image_bytes: bytes | None) -> None:
        """Insert or replace one annotation's sample (and its task image) atomically."""
        p, now = project_key(project), time.time()
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            if image_bytes is not None:
                db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)", (p, str(task_id), image_bytes, now))
            old = db.execute("SELECT created FROM samples WHERE project=? AND annotation=?",
                             (p, str(annotation_id))).fetchone()
            db.execute("INSERT OR REPLACE INTO samples (project, annotation, task, label_config, result, image_url,"
                       " labels, classes, error, created, updated) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
                       (p, str(annotation_id), str(task_id), label_config, json.dumps(result), image_url,
                        old[0] if old else now, now))
            db.execute("INSERT INTO projects (project, label_config, new_samples, updated) VALUES (?, ?, 1, ?) "
                       "ON CONFLICT(project) DO UPDATE SET label_config=excluded.label_config, "
                       "new_samples=new_samples+1, updated=excluded.updated", (p, label_config, now))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def delete(self, project, annotation_id) -> bool:
        db = self._conn()
        try:
            cur = db.execute("DELETE FROM samples WHERE project=? AND annotation=?",
                             (project_key(project), str(annotation_id)))
            return cur.rowcount > 0
        finally:
            db.close()

    def request_training(self, project, label_config: str | None = None) -> None:
        p, now = project_key(project), time.time()
        db = self._conn()
        try:
            db.execute("INSERT INTO projects (project, label_config, train_requested, updated) VALUES (?, ?, 1, ?) "
                       "ON CONFLICT(project) DO UPDATE SET train_requested=train_requested+1, "
                       "updated=excluded.updated, "
                       "label_config=COALESCE(excluded.label_config, label_config)", (p, label_config, now))
        finally:
            db.close()

    # -- decoding ---------------------------------------------------------------------------
    def decode_pending(self, project=None, limit: int | None = None) -> int:
        """Decode stored results into label maps; a result that cannot be decoded is marked
        with its error (kept, never trained on). Returns how many rows were processed."""
        db = self._conn()
        try:
            q = "SELECT project, annotation, label_config, result, updated FROM samples WHERE labels IS NULL AND error IS NULL"
            args: tuple = ()
            if project is not None:
                q += " AND project=?"
                args = (project_key(project),)
            rows = db.execute(q + (f" LIMIT {int(limit)}" if limit else ""), args).fetchall()
        finally:
            db.close()
        for p, ann, cfg, result, updated in rows:
            labels, classes, err = None, None, None
            try:
                setup = parse_label_config(cfg)
                classes = list(setup.brush_labels)
                lm = annotation_to_label_map(json.loads(result), setup, {n: i for i, n in enumerate(classes)},
                                             background=255)  # 255: no region covers it
                if lm is None:
                    err = "the annotation has no BrushLabels region"
                else:
                    labels = _png(lm)
            except Exception as e:  # any malformed stored result: kept, marked, never trained on
                err = f"{type(e).__name__}: {e}"
            db = self._conn()
            try:  # only if the row was not replaced meanwhile
                db.execute("UPDATE samples SET labels=?, classes=?, error=? WHERE project=? AND annotation=? "
                           "AND updated=?", (labels, json.dumps(classes), err, p, ann, updated))
            finally:
                db.close()
        return len(rows)

    # -- reads ------------------------------------------------------------------------------
    def samples(self, project) -> list[dict]:
        """Decoded, usable samples of a project: dicts with task, annotation, image (uint8 HxWx3),
        labels (uint8 HxW, index into classes), classes."""
        db = self._conn()
        try:
            rows = db.execute(
                "SELECT s.annotation, s.task, s.labels, s.classes, i.bytes FROM samples s JOIN images i "
                "ON s.project=i.project AND s.task=i.task WHERE s.project=? AND s.labels IS NOT NULL "
                "ORDER BY s.task, s.annotation", (project_key(project),)).fetchall()
        finally:
            db.close()
        out = []
        for ann, task, labels, classes, img in rows:
            image = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
            lab = _unpng(labels)
            if image.shape[:2] != lab.shape:
                continue
            out.append({"annotation": ann, "task": task, "image": image, "labels": lab,
                        "classes": json.loads(classes)})
        return out

    def counts(self, project=None) -> dict:
        db = self._conn()
        try:
            q = ("SELECT project, COUNT(*), SUM(labels IS NOT NULL), SUM(error IS NOT NULL) FROM samples"
                 + (" WHERE project=?" if project is not None else "") + " GROUP BY project")
            rows = db.execute(q, (project_key(project),) if project is not None else ()).fetchall()
            pr = {r[0]: r[1:] for r in db.execute(
                "SELECT project, new_samples, train_requested, label_config FROM projects").fetchall()}
        finally:
            db.close()
        out = {}
        for p, n, ok, bad in rows:
            out[p] = {"samples": n, "decoded": int(ok or 0), "invalid": int(bad or 0),
                      "new_since_training": int(pr.get(p, (0,))[0] or 0),
                      "training_requested": bool(pr.get(p, (0, 0))[1])}
        return out

    def project_config(self, project) -> str | None:
        db = self._conn()
        try:
            row = db.execute("SELECT label_config FROM projects WHERE project=?", (project_key(project),)).fetchone()
        finally:
            db.close()
        return row[0] if row else None

    def pending(self, project, every: int) -> tuple[int, int] | None:
        """A training run is due when one was requested (START_TRAINING) or ``every`` new
        samples arrived. Returns the ticket (new samples, requests) to ``consume`` once the run
        finished, or None. Not consumed here: a run killed midway stays pending."""
        db = self._conn()
        try:
            row = db.execute("SELECT new_samples, train_requested FROM projects WHERE project=?",
                             (project_key(project),)).fetchone()
        finally:
            db.close()
        if not row:
            return None
        n, req = int(row[0] or 0), int(row[1] or 0)
        return (n, req) if req > 0 or (every > 0 and n >= every) else None

    def consume(self, project, ticket: tuple[int, int]) -> None:
        """Subtract what a finished run covered; events that arrived during it stay pending."""
        db = self._conn()
        try:
            db.execute("UPDATE projects SET new_samples=MAX(0, new_samples-?), "
                       "train_requested=MAX(0, train_requested-?) WHERE project=?",
                       (ticket[0], ticket[1], project_key(project)))
        finally:
            db.close()
