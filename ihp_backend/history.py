"""Per-task click history, shared by all gunicorn workers through SQLite (WAL) in MODEL_DIR.

Label Studio sends only the newest click of an interactive session, so the backend keeps
the others. Rules (also in the README):

- one positive keypoint: appended; a click of another label at the same spot (within
  ``same_spot`` pixels) replaces the old one; the same label at the same spot is a no-op;
- one negative keypoint (Alt-click, ``is_positive: false``): removes that label's nearest
  click (undo);
- several keypoints: the history becomes exactly that set (API clients send full sets);
- ``{"result": []}``, or an ANNOTATION_CREATED/UPDATED webhook for the task: cleared;
- entries untouched for ``ttl`` seconds are forgotten.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time

from .core.ls_format import Click

DEFAULT_TTL = 24 * 3600


def same_spot_radius(size: tuple[int, int] | None) -> float:
    """Pixels within which two clicks count as the same spot: 0.5% of the diagonal, >= 2 px."""
    if not size:
        return 2.0
    return max(2.0, 0.005 * math.hypot(*size))


def update_history(history: list[Click], new: list[Click], radius: float) -> list[Click]:
    """Apply the rules above to a history (pure function)."""
    if not new:
        return []
    if len(new) > 1:
        return [c for c in new if c.positive]
    c = new[0]
    if not c.positive:
        same = [(math.hypot(h.x - c.x, h.y - c.y), i) for i, h in enumerate(history) if h.label == c.label]
        if not same:
            return list(history)
        _, drop = min(same)
        return [h for i, h in enumerate(history) if i != drop]
    out = []
    for h in history:
        near = math.hypot(h.x - c.x, h.y - c.y) <= radius
        if near and h.label == c.label:
            return list(history)
        if near:
            continue  # another label at the same spot: replaced by the new click
        out.append(h)
    out.append(c)
    return out


def _enc(clicks: list[Click]) -> str:
    return json.dumps([[c.x, c.y, c.label] for c in clicks])


def _dec(s: str) -> list[Click]:
    return [Click(float(x), float(y), str(lab)) for x, y, lab in json.loads(s)]


def project_key(project) -> str:
    """Label Studio sends "3.1795294702" to /predict and {"id": 3} to /webhook: keep the id."""
    if isinstance(project, dict):
        project = project.get("id", "")
    return str(project if project is not None else "").split(".", 1)[0]


def is_transient(e: Exception) -> bool:
    """SQLite 'database is locked/busy' (another process holds the lock): retry, not a failure."""
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def init_db(path: str, statements: list[str], attempts: int = 100) -> None:
    """Create tables and switch to WAL, retrying while another worker does the same at start
    (changing the journal mode does not wait on the busy handler)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for i in range(attempts):
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            for st in statements:
                db.execute(st)
            return
        except sqlite3.OperationalError as e:
            if not is_transient(e) or i == attempts - 1:
                raise
            time.sleep(0.05 + 0.01 * i)
        finally:
            db.close()


class ClickHistory:
    """SQLite-backed store; safe across processes (each call is one short transaction)."""

    PURGE_EVERY = 60.0  # seconds between sweeps of expired entries

    def __init__(self, path: str, ttl: float = DEFAULT_TTL):
        self.path, self.ttl = path, ttl
        init_db(path, ["CREATE TABLE IF NOT EXISTS clicks (project TEXT, task TEXT, clicks TEXT, "
                       "size TEXT, updated REAL, PRIMARY KEY (project, task))"])
        self._local = threading.local()
        self._purged = 0.0

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened once (per process: never shared across a fork).
        synchronous=NORMAL: in WAL mode a commit survives a crash of the process, not a power
        cut, and skips an fsync per click (the clicks also live in Label Studio)."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def _drop_conn(self) -> None:
        db, self._local.db = getattr(self._local, "db", None), None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def apply(self, project, task, new: list[Click], size: tuple[int, int] | None) -> list[Click]:
        """Update the task's history with a context's clicks and return the full history."""
        p, t, now = project_key(project), str(task), time.time()
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT clicks, size, updated FROM clicks WHERE project=? AND task=?",
                             (p, t)).fetchone()
            old = []
            if row and now - row[2] <= self.ttl and (size is None or row[1] == json.dumps(size)):
                old = _dec(row[0])
            hist = update_history(old, new, same_spot_radius(size))
            if hist:
                db.execute("INSERT OR REPLACE INTO clicks VALUES (?, ?, ?, ?, ?)",
                           (p, t, _enc(hist), json.dumps(size), now))
            else:
                db.execute("DELETE FROM clicks WHERE project=? AND task=?", (p, t))
            if now - self._purged >= self.PURGE_EVERY:  # a table scan: not on every click
                db.execute("DELETE FROM clicks WHERE updated < ?", (now - self.ttl,))
                self._purged = now
            db.execute("COMMIT")
            return hist
        except BaseException as e:
            try:
                db.execute("ROLLBACK") if db.in_transaction else None
            finally:
                if not is_transient(e):
                    self._drop_conn()  # a disk or file error may have left it unusable
            raise

    def get(self, project, task) -> list[Click]:
        try:
            row = self._conn().execute("SELECT clicks, updated FROM clicks WHERE project=? AND task=?",
                                       (project_key(project), str(task))).fetchone()
        except sqlite3.Error as e:
            if not is_transient(e):
                self._drop_conn()
            raise
        if not row or time.time() - row[1] > self.ttl:
            return []
        return _dec(row[0])

    def clear(self, project, task) -> None:
        try:
            self._conn().execute("DELETE FROM clicks WHERE project=? AND task=?",
                                 (project_key(project), str(task)))
        except sqlite3.Error as e:
            if not is_transient(e):
                self._drop_conn()
            raise


class MemoryHistory:
    """Fallback when MODEL_DIR cannot be written: the same rules, kept in this worker only."""

    def __init__(self, ttl: float = DEFAULT_TTL):
        self.ttl = ttl
        self._d: dict[tuple[str, str], tuple[list[Click], float]] = {}

    def apply(self, project, task, new: list[Click], size) -> list[Click]:
        key, now = (project_key(project), str(task)), time.time()
        old, t = self._d.get(key, ([], 0.0))
        hist = update_history(old if now - t <= self.ttl else [], new, same_spot_radius(size))
        if hist:
            self._d[key] = (hist, now)
        else:
            self._d.pop(key, None)
        return hist

    def get(self, project, task) -> list[Click]:
        old, t = self._d.get((project_key(project), str(task)), ([], 0.0))
        return old if time.time() - t <= self.ttl else []

    def clear(self, project, task) -> None:
        self._d.pop((project_key(project), str(task)), None)
