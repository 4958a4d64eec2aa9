"""gunicorn settings for the IHP backend (read automatically from the repo root)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ihp_backend.settings import default_workers  # noqa: E402  (no torch import: cheap)

bind = os.environ.get("IHP_BIND", "127.0.0.1:9090")
workers = default_workers()  # IHP_WORKERS, else one per 4 cores (1 on a 2-core box)
threads = int(os.environ.get("IHP_THREADS", "4"))
timeout = int(os.environ.get("IHP_TIMEOUT", "120"))
graceful_timeout = 30
worker_class = "gthread"
accesslog = os.environ.get("IHP_ACCESS_LOG", "-") or None  # "" turns it off
# each worker loads the model itself, in the background, after the fork (no preload)
preload_app = False
# a worker is replaced after this many requests (plus jitter), so no slow leak in a library can
# grow a worker without bound; the replacement loads the model in ~1 s and /predict waits for it
max_requests = int(os.environ.get("IHP_MAX_REQUESTS", "5000"))
max_requests_jitter = max_requests // 10


def post_fork(server, worker):
    """Cap glibc malloc arenas per worker (IHP_MALLOC_ARENAS, default 2): with several request
    threads glibc would otherwise keep up to 8 x cores arenas of freed memory around."""
    arenas = int(os.environ.get("IHP_MALLOC_ARENAS", "2"))
    if arenas > 0:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
        except (OSError, AttributeError):
            pass  # not glibc
