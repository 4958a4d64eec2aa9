"""An exclusive, non-blocking lock file (flock): released by the kernel if the holder dies."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager


@contextmanager
def project_lock(path: str):
    """Yields True if this process now holds the lock, False if another one does."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
