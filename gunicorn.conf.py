"""gunicorn settings for the IHP backend (read automatically from the repo root); every value
comes from ``ihp_backend.settings.Settings`` (the README's Configuration table)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ihp_backend.core.allocator import env_with_allocator, preloaded_jemalloc, tune_malloc  # noqa: E402  (ctypes only)
from ihp_backend.settings import Settings, default_workers  # noqa: E402  (no torch import: cheap)

_s = Settings.from_env()
bind = _s.bind
workers = default_workers()  # IHP_WORKERS, else one per 4 cores (1 on a 2-core box)
threads = _s.http_threads
timeout = _s.timeout
graceful_timeout = 30
worker_class = "gthread"
accesslog = _s.access_log
# each worker loads the model itself, in the background, after the fork (no preload)
preload_app = False
# a worker is replaced after this many requests (plus jitter), so no slow leak in a library can
# grow a worker without bound; the replacement loads the model in ~1 s and /predict waits for it
max_requests = _s.max_requests
max_requests_jitter = max_requests // 10


def on_starting(server):
    """jemalloc (IHP_ALLOCATOR, default: when installed) can only be loaded before a process starts:
    the master re-executes itself once with it preloaded, before it binds or forks (same PID); the
    workers inherit it. A configuration error (IHP_ALLOCATOR=jemalloc, no library) stops here."""
    env = env_with_allocator(_s.allocator, os.environ)
    if env is not None:
        server.log.info("IHP_ALLOCATOR=%s: restarting with LD_PRELOAD=%s", _s.allocator, env["LD_PRELOAD"])
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def post_fork(server, worker):
    """Where glibc serves the mallocs (IHP_ALLOCATOR=glibc, or no jemalloc installed), tune it per
    worker, before it loads anything (``ihp_backend.core.allocator``): arenas capped
    (IHP_MALLOC_ARENAS, default 2: with several request threads glibc would otherwise keep up to
    8 x cores arenas of freed memory around), and freed memory kept for the next forward
    (IHP_MALLOC_KEEP_MB, default 256: each forward faulted ~60 MB of pages in again without it)."""
    if not preloaded_jemalloc(os.environ):
        tune_malloc(max(0, _s.malloc_arenas), max(0, _s.malloc_keep_mb))
