"""The Flask application factory: ``create_app(config=None)``.

Routes (docs/service.md), one blueprint each group: ``POST /v1/captions`` (:mod:`service.captions`);
``GET /healthz``, ``/readyz``, ``/metrics``, ``/openapi.json`` (:mod:`service.operations`); the web
page ``GET /`` and ``GET /docs`` (:mod:`service.pages`).

Each process that calls :func:`create_app` loads the model once (in a background thread by default,
so ``/healthz`` answers at once and ``/readyz`` says when the model is warm) and runs one
:class:`~service.batching.MicroBatcher` for it (:class:`~service.state.ServiceState`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from typing import IO, Any

from flask import Flask, Request, Response, g, request

from . import errors, logs
from .captions import captions
from .config import load_settings
from .metrics import Metrics, method_label
from .operations import operations
from .pages import pages
from .state import EXTENSION_KEY, ServiceState

#: On every response: no MIME sniffing (a JSON or image body is never run as HTML/script), no referrer.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
#: The pages load only their own scripts, styles and fonts, show uploads (blob:) and overlays (data:),
#: call only this origin, and may not be framed (clickjacking).
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: API answers are data: nothing in them may load or run, nor be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'"


class InMemoryRequest(Request):
    """Multipart uploads are parsed into memory, never spooled to a temporary file.

    The body size is already capped by ``MAX_CONTENT_LENGTH``, so memory is bounded.
    """

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the service. ``config`` keys override environment variables of the same name
    (``CAPTIONER_MODEL``, ``CAPTIONER_MAX_BATCH``, ...; see service.config.ENV_VARS);
    ``CAPTIONER_INSTANCE`` may hand in an already loaded Captioner; other keys
    (``TESTING``, ...) go to ``app.config``."""
    config = dict(config or {})
    settings = load_settings(config)
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update({k: v for k, v in config.items() if not k.startswith("CAPTIONER_")})
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # Flask's DefaultJSONProvider
    _use_gunicorn_logging()

    state = ServiceState(settings, Metrics(), captioner=config.get("CAPTIONER_INSTANCE"))
    app.extensions[EXTENSION_KEY] = state
    errors.register(app)
    _register_hooks(app, state)
    for blueprint in (captions, operations, pages):
        app.register_blueprint(blueprint)
    state.start()
    return app


def _register_hooks(app: Flask, state: ServiceState) -> None:
    """Per request: the timer, the request metrics, the security headers, the request id and model on the log line."""

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        state.metrics.requests.labels(endpoint, method_label(request.method), str(response.status_code)).inc()
        response.headers.update(SECURITY_HEADERS)
        response.headers["Content-Security-Policy"] = PAGE_CSP if response.mimetype == "text/html" else API_CSP
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return response

    @app.after_request
    def _tag(response: Response) -> Response:
        """The request id as a response header; the served model on the request's access line (service/logs.py)."""
        response.headers[logs.HEADER] = logs.request_id(request.environ)
        if state.captioner is not None:
            logs.annotate(request.environ, model=state.captioner.name, model_version=state.captioner.version)
        return response


def _use_gunicorn_logging() -> None:
    """Under gunicorn, send the service's and the library's logs to gunicorn's handlers (stdout)."""
    gunicorn_logger = logging.getLogger("gunicorn.error")
    if not gunicorn_logger.handlers:
        return
    for name in ("service", "captioner"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.handlers = list(gunicorn_logger.handlers)
            logger.setLevel(gunicorn_logger.level)
            logger.propagate = False


__all__ = ["API_CSP", "EXTENSION_KEY", "PAGE_CSP", "InMemoryRequest", "ServiceState", "create_app"]
