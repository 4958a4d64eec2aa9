"""Flask app speaking Label Studio's ML backend protocol: ``gunicorn 'ihp_backend._wsgi:app'``.

Endpoints: GET /health and /, POST /setup, POST /predict, POST /webhook, GET /versions,
GET /metrics. Every error is a JSON ``{"error": message}`` with a 4xx/5xx status.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import orjson
from flask import Flask, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from .errors import RequestError
from .model import IHPModel
from .model_pool import ModelNotReady
from .settings import Settings

logging.basicConfig(level=Settings.from_env().log_level,
                    format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("ihp_backend")


def _authorized(user: str, password: str, token: str) -> bool:
    """HTTP Basic (what Label Studio sends for http://user:pass@host URLs) or a bearer token."""
    import hmac
    auth = request.authorization
    if user and auth is not None and auth.type == "basic":
        if hmac.compare_digest(auth.username or "", user) and hmac.compare_digest(auth.password or "", password):
            return True
    if token:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip(), token):
            return True
    return False


class FastJSON(DefaultJSONProvider):
    """orjson for request and response bodies: a click's answer is thousands of RLE integers,
    which the standard library encodes in ~1.3 ms and orjson in ~0.1 ms. Falls back to the
    standard provider for anything orjson cannot encode."""

    OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

    def dumps(self, obj, **kw) -> str:
        try:
            return orjson.dumps(obj, option=self.OPTIONS).decode()
        except TypeError:
            return super().dumps(obj, **kw)

    def loads(self, s, **kw):
        try:
            return orjson.loads(s)
        except orjson.JSONDecodeError:
            return super().loads(s, **kw)  # same error message and type as before

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, option=self.OPTIONS)
        except TypeError:
            return super().response(*args, **kwargs)
        return self._app.response_class(body, mimetype=self.mimetype)


class _App(Flask):
    json_provider_class = FastJSON


def create_app(model: IHPModel | None = None, load: bool = True) -> Flask:
    app = _App(__name__)
    model = model or IHPModel()
    s = model.settings
    user, password, token = s.basic_auth_user, s.basic_auth_pass, s.auth_token
    app.config["MAX_CONTENT_LENGTH"] = s.max_body_bytes
    app.config["IHP_MODEL"] = model
    if load and not model.model_loaded:
        model.load_in_background()
    stats = {"started": time.time(), "predict_requests": 0, "predict_errors": 0, "predict_seconds": 0.0}
    stats_lock = threading.Lock()

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object")
        return data

    @app.errorhandler(RequestError)
    def _bad(e: RequestError):
        return jsonify({"error": str(e)}), e.status

    @app.errorhandler(ModelNotReady)
    def _not_ready(e):
        return jsonify({"error": f"model not ready: {e}"}), 503

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):
        return jsonify({"error": e.description or e.name}), e.code

    @app.errorhandler(Exception)
    def _crash(e: Exception):
        log.exception("unhandled error on %s", request.path)
        return jsonify({"error": f"internal error ({type(e).__name__}); see the backend log"}), 500

    @app.before_request
    def _auth():
        if (user or token) and request.path not in ("/health", "/") and not _authorized(user, password, token):
            resp = jsonify({"error": "authentication required"})
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="ihp-backend"'
            return resp
        return None

    @app.after_request
    def _worker_header(resp):
        resp.headers["X-IHP-Worker"] = str(os.getpid())  # which gunicorn worker answered
        return resp

    @app.get("/")
    @app.get("/health")
    def health():
        body = {"status": "UP", "model_loaded": model.model_loaded, "model_version": model.model_version,
                "load_error": model.load_error, "state_error": model.state_error, "model_class": "IHPModel",
                "inference": model.inference}
        try:
            body["projects"] = model.status()
        except Exception as e:  # /health must answer whatever the disk does
            body["projects_error"] = f"{type(e).__name__}: {e}"
        return jsonify(body)

    @app.post("/setup")
    def setup():
        d = body()
        return jsonify(model.setup(d.get("project"), d.get("schema"), d.get("hostname") or "",
                                   d.get("access_token") or ""))

    @app.post("/predict")
    def predict():
        t0 = time.time()
        ok = False
        try:
            d = body()
            params = d.get("params")
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise RequestError("'params' must be an object")
            preds = model.predict(d.get("tasks"), context=params.get("context"),
                                  label_config=d.get("label_config"), project=d.get("project"))
            ok = True
            resp = jsonify({"results": preds, "model_version": model.model_version})
            # W3C Server-Timing: browsers' devtools and bench/latency.py read the stages
            stages = model.last_timings()
            stages["app"] = time.time() - t0
            resp.headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in stages.items())
            return resp
        finally:
            with stats_lock:
                stats["predict_requests"] += 1
                stats["predict_errors"] += 0 if ok else 1
                stats["predict_seconds"] += time.time() - t0

    @app.post("/webhook")
    def webhook():
        d = body()
        event = d.get("action")
        if not isinstance(event, str):
            raise RequestError("webhook body needs an 'action'")
        return jsonify(model.fit(event, d)), 201

    @app.get("/versions")
    def versions():
        """?project=<id>: that project's versions (metrics, promoted or not) and the one served."""
        project = request.args.get("project")
        out = {"default": model.model_version, "versions": [model.model_version] if model.model_loaded else [],
               "serving": model.model_version}
        if project:
            try:
                vs = model.registry.versions(project)
            except ValueError as e:
                raise RequestError(str(e)) from None
            out["versions"] = out["versions"] + [v["version"] for v in vs]
            out["project_versions"] = vs
            out["serving"] = model.parser_for(project).model_version
        return jsonify(out)

    @app.get("/metrics")
    def metrics():
        with stats_lock:
            s = dict(stats)
        s["uptime_s"] = time.time() - s.pop("started")
        s["pid"] = os.getpid()
        return jsonify(s)

    return app


_app: Flask | None = None


def __getattr__(name: str):
    """``app`` is built on first access (gunicorn's import in each worker), so importing this
    module (tests, tools) starts no model load."""
    global _app
    if name == "app":
        if _app is None:
            _app = create_app()
        return _app
    raise AttributeError(name)
