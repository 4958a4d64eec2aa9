"""Every setting of the backend, its gunicorn launcher and the fit job, read from the environment
in one place (``Settings.from_env``; documented in the README's Configuration table). This
module imports no torch: gunicorn.conf.py reads it before any worker starts."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(PACKAGE_DIR, "models", "default.pt")


def _int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    try:
        return int(v) if v else default
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {v!r}") from None


def _float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    try:
        return float(v) if v else default
    except ValueError:
        raise SystemExit(f"{name} must be a number, got {v!r}") from None


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """gunicorn workers: ``IHP_WORKERS``, else one per 4 cores and at least one. On a small box
    one worker gives each click every core: on 2 cores the forward takes 91 ms with one worker x
    2 threads against 150 ms with 2 workers x 1 thread, at the same requests/s (README,
    Performance)."""
    return max(1, _int("IHP_WORKERS", 0) or cpu_cores() // 4)


def default_torch_threads(workers: int | None = None) -> int:
    """torch CPU threads per worker: ``IHP_TORCH_THREADS``, else the cores divided among the
    workers (``workers``, else ``default_workers()``)."""
    return max(1, _int("IHP_TORCH_THREADS", 0) or cpu_cores() // (workers or default_workers()))


from .core.options import PRECISIONS, SHIPPED_EDGE_REFINER, ParserOptions, edge_refiner_path  # noqa: F401 (re-exported)
from .core.allocator import ALLOCATORS, DEFAULT_KEEP_MB


def _edge_refiner(value: str | None) -> str | None:
    """IHP_EDGE_REFINER (``core.options.edge_refiner_path``): unset = the shipped refiner, "0" = none,
    else a file that must exist."""
    try:
        return edge_refiner_path(value)
    except ValueError as e:
        raise SystemExit(f"IHP_EDGE_REFINER: {e}") from None


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    v = os.environ.get(name, "").strip().lower() or default
    if v not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {v!r}")
    return v


@dataclass
class Settings:
    model_dir: str = "model_dir"
    checkpoint: str = DEFAULT_CHECKPOINT
    device: str | None = None
    max_side: int | None = None
    flip: bool = False
    refine: bool = True
    full_res_edges: bool = False
    click_radius: float = 10.0
    precision: str = "auto"
    torch_threads: int | None = None
    ls_url: str = ""
    api_key: str = field(default="", repr=False)
    allowed_hosts: tuple[str, ...] = ()
    local_root: str = ""
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50 * 1024 * 1024
    image_cache_mb: int = 128  # decoded photos kept per worker (IHP_IMAGE_CACHE_MB; 12 MP = 34 MB each)
    history_ttl: float = 24 * 3600
    max_clicks: int = 500
    load_wait: float = 60.0
    batch_seconds: float = 60.0  # IHP_BATCH_SECONDS: a batch /predict answers the tasks parsed within this time
    train_every: int = 10
    return_background: bool = False  # answer a Background brush region too (IHP_RETURN_BACKGROUND)
    zero_click: bool = True  # batch predictions parse known label names with no click (IHP_ZERO_CLICK)
    fill_known: bool = False  # clicks answer unclicked known parts too, by meaning (IHP_FILL_KNOWN)
    zoom: bool = True  # parse each clicked small person again on its own region (IHP_ZOOM)
    unclaimed_bias: float = 0.0  # added to the unclaimed logit (IHP_UNCLAIMED_BIAS)
    vocab_prior: float = ParserOptions.vocab_prior  # the vocabulary head's prior on clicked known names (IHP_VOCAB_PRIOR)
    vocab_share: bool = ParserOptions.vocab_share  # unclaimed pixels to the clicked known label seen there (IHP_VOCAB_SHARE)
    edge_refiner: str | None = ParserOptions.edge_refiner  # IHP_EDGE_REFINER: boundaries re-decided by a trained refiner
    edge_side: int = ParserOptions.edge_side  # IHP_EDGE_SIDE: its working size's longer side
    aspp_rank: int = ParserOptions.aspp_rank  # IHP_ASPP_RANK: the ASPP factored at load (0: exact)
    redis_url: str = ""  # IHP_REDIS_URL: click history and previous predictions in Redis
    database_url: str = field(default="", repr=False)  # IHP_DATABASE_URL: annotations, requests, versions in PostgreSQL
    fit_queue: str = ""  # IHP_FIT_QUEUE: fit runs as RQ jobs on this queue of IHP_REDIS_URL ("" = a local process)
    # HTTP side (_wsgi)
    max_body_bytes: int = 20 * 1024 * 1024  # IHP_MAX_BODY_BYTES
    basic_auth_user: str = ""  # IHP_BASIC_AUTH_USER
    basic_auth_pass: str = field(default="", repr=False)  # IHP_BASIC_AUTH_PASS
    auth_token: str = field(default="", repr=False)  # IHP_AUTH_TOKEN
    log_level: str = "INFO"  # LOG_LEVEL
    # gunicorn (gunicorn.conf.py)
    bind: str = "127.0.0.1:9090"  # IHP_BIND
    http_threads: int = 4  # IHP_THREADS: request threads per worker
    timeout: int = 120  # IHP_TIMEOUT
    access_log: str | None = "-"  # IHP_ACCESS_LOG ("" turns it off)
    max_requests: int = 5000  # IHP_MAX_REQUESTS: a worker is replaced after this many
    allocator: str = "auto"  # IHP_ALLOCATOR: jemalloc / glibc / auto (jemalloc when installed; core.allocator)
    malloc_arenas: int = 2  # IHP_MALLOC_ARENAS
    malloc_keep_mb: int = DEFAULT_KEEP_MB  # IHP_MALLOC_KEEP_MB: freed memory glibc keeps for the next forward (core.allocator)
    # the fit job (ihp_backend.fit_job)
    fit_steps: int = 250  # IHP_FIT_STEPS
    fit_holdout: float = 0.2  # IHP_FIT_HOLDOUT
    fit_threads: int = 1  # IHP_FIT_THREADS

    def parser_options(self) -> ParserOptions:
        """How every network of this backend runs (the evaluator builds the same object)."""
        return ParserOptions(device=self.device, max_side=self.max_side, flip=self.flip, refine=self.refine,
                             full_res_edges=self.full_res_edges,
                             click_radius=self.click_radius, precision=self.precision,
                             threads=self.torch_threads or default_torch_threads(),
                             unclaimed_bias=self.unclaimed_bias, zoom=self.zoom, vocab_prior=self.vocab_prior,
                             vocab_share=self.vocab_share, edge_refiner=self.edge_refiner,
                             edge_side=self.edge_side, aspp_rank=self.aspp_rank)

    @classmethod
    def from_env(cls) -> "Settings":
        hosts = tuple(h.strip().lower() for h in os.environ.get("IHP_ALLOWED_HOSTS", "").split(",") if h.strip())
        return cls(
            model_dir=os.environ.get("MODEL_DIR", "model_dir"),
            checkpoint=os.environ.get("IHP_CHECKPOINT", "") or DEFAULT_CHECKPOINT,
            device=os.environ.get("IHP_DEVICE") or None,
            max_side=_int("IHP_MAX_SIDE", 0) or None,
            flip=bool(_int("IHP_FLIP", 0)),
            refine=bool(_int("IHP_REFINE", 1)),
            full_res_edges=bool(_int("IHP_FULL_RES_EDGES", 0)),
            click_radius=_float("IHP_CLICK_RADIUS", 10.0),
            precision=_choice("IHP_PRECISION", "auto", PRECISIONS),
            torch_threads=_int("IHP_TORCH_THREADS", 0) or None,
            ls_url=os.environ.get("LABEL_STUDIO_URL", "").rstrip("/"),
            api_key=os.environ.get("LABEL_STUDIO_API_KEY", ""),
            allowed_hosts=hosts,
            local_root=os.environ.get("IHP_LOCAL_ROOT", ""),
            max_image_pixels=_int("IHP_MAX_IMAGE_PIXELS", 40_000_000),
            max_image_bytes=_int("IHP_MAX_IMAGE_BYTES", 50 * 1024 * 1024),
            image_cache_mb=_int("IHP_IMAGE_CACHE_MB", 128),
            history_ttl=_float("IHP_HISTORY_TTL", 24 * 3600),
            max_clicks=_int("IHP_MAX_CLICKS", 500),
            load_wait=_float("IHP_LOAD_WAIT", 60.0),
            batch_seconds=_float("IHP_BATCH_SECONDS", 60.0),
            train_every=_int("IHP_TRAIN_EVERY", 10),
            return_background=bool(_int("IHP_RETURN_BACKGROUND", 0)),
            zero_click=bool(_int("IHP_ZERO_CLICK", 1)),
            fill_known=bool(_int("IHP_FILL_KNOWN", 0)),
            redis_url=os.environ.get("IHP_REDIS_URL", "").strip(),
            database_url=os.environ.get("IHP_DATABASE_URL", "").strip(),
            fit_queue=os.environ.get("IHP_FIT_QUEUE", "").strip(),
            max_body_bytes=_int("IHP_MAX_BODY_BYTES", 20 * 1024 * 1024),
            basic_auth_user=os.environ.get("IHP_BASIC_AUTH_USER", ""),
            basic_auth_pass=os.environ.get("IHP_BASIC_AUTH_PASS", ""),
            auth_token=os.environ.get("IHP_AUTH_TOKEN", ""),
            log_level=os.environ.get("LOG_LEVEL", "INFO"),
            bind=os.environ.get("IHP_BIND", "127.0.0.1:9090"),
            http_threads=_int("IHP_THREADS", 4),
            timeout=_int("IHP_TIMEOUT", 120),
            access_log=os.environ.get("IHP_ACCESS_LOG", "-") or None,
            max_requests=_int("IHP_MAX_REQUESTS", 5000),
            allocator=_choice("IHP_ALLOCATOR", "auto", ALLOCATORS),
            malloc_arenas=_int("IHP_MALLOC_ARENAS", 2),
            malloc_keep_mb=_int("IHP_MALLOC_KEEP_MB", DEFAULT_KEEP_MB),
            fit_steps=_int("IHP_FIT_STEPS", 250),
            fit_holdout=_float("IHP_FIT_HOLDOUT", 0.2),
            fit_threads=_int("IHP_FIT_THREADS", 1),
            zoom=bool(_int("IHP_ZOOM", 1)),
            unclaimed_bias=_float("IHP_UNCLAIMED_BIAS", 0.0),
            vocab_prior=_float("IHP_VOCAB_PRIOR", ParserOptions.vocab_prior),
            vocab_share=bool(_int("IHP_VOCAB_SHARE", int(ParserOptions.vocab_share))),
            edge_refiner=_edge_refiner(os.environ.get("IHP_EDGE_REFINER")),
            edge_side=_int("IHP_EDGE_SIDE", ParserOptions.edge_side),
            aspp_rank=_int("IHP_ASPP_RANK", ParserOptions.aspp_rank),
        )
