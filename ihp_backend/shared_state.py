"""What every worker of every replica must see the same: the click history and the previous
prediction of each task. Two implementations of each, one interface:

- embedded (nothing set): the click history in SQLite under MODEL_DIR (``history.ClickHistory``,
  shared by the workers of one host) and the previous-prediction stacks in worker memory
  (``MemoryPredictions``);
- ``IHP_REDIS_URL``: both in Redis (``RedisHistory``, ``RedisPredictions``), with the history's
  TTL, so that a click answered by any worker of any replica parses exactly the same.

A task's previous-prediction stack is a list of entries ``(click set, previous-prediction input
used, answer)`` (the answer: network-size labels), newest last; ``model.previous_input`` reads
it. Stores keep at most ``MAX_STATES`` entries per task.
"""
from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict

import numpy as np

from .core.ls_format import Click
from .history import DEFAULT_TTL, project_key, same_spot_radius, update_history

MAX_STATES = 32  # click sets remembered per task (for undo), each a network-size label map


class SharedStateUnavailable(RuntimeError):
    """The shared store (Redis) cannot be reached: the request is answered 503, retried later."""


def pushed(stack: list[tuple], entry: tuple, limit: int = MAX_STATES) -> list[tuple]:
    """The stack with ``entry`` on top: an older entry of the same click set is dropped, and the
    oldest beyond ``limit``."""
    return [e for e in stack if e[0] != entry[0]][-(limit - 1):] + [entry]


class MemoryPredictions:
    """Previous-prediction stacks in this worker's memory (the embedded default; LRU over tasks)."""

    def __init__(self, max_tasks: int = 64):
        self._d: OrderedDict[tuple, list] = OrderedDict()
        self._lock = threading.Lock()
        self.max_tasks = max_tasks

    def stack(self, key: tuple) -> list[tuple]:
        with self._lock:
            return list(self._d.get(key, []))

    def push(self, key: tuple, entry: tuple) -> None:
        with self._lock:
            self._d[key] = pushed(self._d.get(key, []), entry)
            self._d.move_to_end(key)
            while len(self._d) > self.max_tasks:
                self._d.popitem(last=False)

    def drop(self, key: tuple) -> None:
        with self._lock:
            self._d.pop(key, None)


def encode_array(a: np.ndarray | None) -> bytes:
    """A label map as compressed ``.npy`` bytes (b"" for None); no pickle either way."""
    if a is None:
        return b""
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.ascontiguousarray(a))
    return buf.getvalue()


def decode_array(b: bytes | None) -> np.ndarray | None:
    if not b:
        return None
    with np.load(io.BytesIO(b), allow_pickle=False) as z:
        return z["a"]


def _state_json(state: tuple) -> list:
    return [list(c) for c in state]


def _state_of(js) -> tuple:
    return tuple((float(x), float(y), str(lab)) for x, y, lab in js)


class _Redis:
    """A Redis connection from a URL; every command error becomes ``SharedStateUnavailable``."""

    def __init__(self, url: str, prefix: str = "ihp"):
        import redis
        self.redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                             redis.exceptions.BusyLoadingError)
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2,
                                      health_check_interval=30)
        self.prefix = prefix

    def call(self, fn):
        try:
            return fn(self.r)
        except self.redis_errors as e:
            raise SharedStateUnavailable(f"the shared state (Redis) is unreachable: {e}") from None


class RedisPredictions(_Redis):
    """Previous-prediction stacks in Redis: one hash per task, the ordered click sets in field
    ``states`` ([[click set, entry id], ...]) and each entry's arrays in ``u:<id>`` (the input it
    used) and ``a:<id>`` (its answer); a click reads the click sets and one array."""

    def __init__(self, url: str, ttl: float = DEFAULT_TTL, prefix: str = "ihp"):
        super().__init__(url, prefix)
        self.ttl = max(1, int(ttl))

    def _key(self, key: tuple) -> str:
        return f"{self.prefix}:prev:{key[0]}:{key[1]}"

    def stack(self, key: tuple) -> list[tuple]:
        """The task's stack with its arrays loaded lazily (``LazyArray``), so that reading it
        costs one small field; ``model.previous_input`` touches one array."""
        k = self._key(key)
        raw = self.call(lambda r: r.hget(k, "states"))
        if not raw:
            return []
        out = []
        for st, i in json.loads(raw):
            out.append((_state_of(st), LazyArray(self, k, f"u:{i}"), LazyArray(self, k, f"a:{i}")))
        return out

    def push(self, key: tuple, entry: tuple) -> None:
        k = self._key(key)
        state, used, answer = entry

        def tx(r):
            raw = r.hget(k, "states")
            rows = json.loads(raw) if raw else []
            i = int(r.hincrby(k, "next", 1))
            kept = [row for row in rows if _state_of(row[0]) != state][-(MAX_STATES - 1):]
            dropped = [row[1] for row in rows if row not in kept]
            # the input used is an earlier answer read from Redis: its stored bytes, not re-encoded
            used_b = used.raw() if isinstance(used, LazyArray) else encode_array(used)
            p = r.pipeline()
            p.hset(k, mapping={"states": json.dumps(kept + [[_state_json(state), i]]),
                               f"u:{i}": used_b, f"a:{i}": encode_array(answer)})
            for j in dropped:
                p.hdel(k, f"u:{j}", f"a:{j}")
            p.expire(k, self.ttl)
            p.execute()

        self.call(tx)

    def drop(self, key: tuple) -> None:
        k = self._key(key)
        self.call(lambda r: r.delete(k))


class LazyArray:
    """An array of a Redis stack entry, fetched when first needed."""

    def __init__(self, store: RedisPredictions, key: str, field: str):
        self.store, self.key, self.field = store, key, field
        self._raw, self._value, self._loaded = None, None, False

    def raw(self) -> bytes:
        """The stored (compressed) bytes, fetched once."""
        if self._raw is None:
            self._raw = self.store.call(lambda r: r.hget(self.key, self.field)) or b""
        return self._raw

    def load(self) -> np.ndarray | None:
        if not self._loaded:
            self._value = decode_array(self.raw())
            self._loaded = True
        return self._value


def resolved(a):
    """An array of a stack entry, loading it if it is lazy."""
    return a.load() if isinstance(a, LazyArray) else a


class RedisHistory(_Redis):
    """The click history of ``history.ClickHistory`` in Redis (same rules, same TTL), each
    update one optimistic transaction (WATCH / MULTI), shared by every replica."""

    def __init__(self, url: str, ttl: float = DEFAULT_TTL, prefix: str = "ihp"):
        super().__init__(url, prefix)
        self.ttl = ttl

    def _key(self, project, task) -> str:
        return f"{self.prefix}:clicks:{project_key(project)}:{task}"

    def apply(self, project, task, new: list[Click], size) -> list[Click]:
        k = self._key(project, task)
        out: list = []

        def tx(pipe):
            raw = pipe.get(k)
            old = []
            if raw:
                d = json.loads(raw)
                if size is None or d.get("size") == (list(size) if size else None):
                    old = [Click(float(x), float(y), str(lab)) for x, y, lab in d["clicks"]]
            hist = update_history(old, new, same_spot_radius(size))
            pipe.multi()
            if hist:
                pipe.set(k, json.dumps({"clicks": [[c.x, c.y, c.label] for c in hist],
                                        "size": list(size) if size else None, "updated": time.time()}),
                         ex=max(1, int(self.ttl)))
            else:
                pipe.delete(k)
            out[:] = hist

        self.call(lambda r: r.transaction(tx, k))
        return list(out)

    def get(self, project, task) -> list[Click]:
        raw = self.call(lambda r: r.get(self._key(project, task)))
        if not raw:
            return []
        return [Click(float(x), float(y), str(lab)) for x, y, lab in json.loads(raw)["clicks"]]

    def clear(self, project, task) -> None:
        k = self._key(project, task)
        self.call(lambda r: r.delete(k))
