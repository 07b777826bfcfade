"""The operations blueprint: ``GET /healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from . import openapi
from .errors import public_message
from .state import current_state

operations = Blueprint("operations", __name__)


@operations.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify({"status": "ok"})


@operations.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 with the model once it is loaded and warm, else 503 saying why."""
    state = current_state()
    cap = state.captioner if state.ready else None
    body: dict[str, Any] = {"status": state.status}
    if cap is not None:
        body["model"] = {
            "name": cap.name,
            "version": cap.version,
            "optimizations": list(getattr(cap, "optimizations", [])),
            "runtime": getattr(cap, "runtime", "torch"),
        }
        return jsonify(body)
    message = {"failed": public_message(state.error or ""), "stopped": "the service is shutting down"}.get(
        state.status, "the model is loading and warming up"
    )
    body["error"] = {"code": "not_ready", "message": message}
    response = jsonify(body)
    response.status_code = 503
    response.headers["Retry-After"] = "30" if state.status == "failed" else "5"
    return response


@operations.get("/metrics")
def metrics() -> Response:
    """Prometheus text format (this worker's, or every worker's with PROMETHEUS_MULTIPROC_DIR)."""
    state = current_state()
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), mimetype=None, content_type=state.metrics.content_type)


@operations.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3.1 document."""
    return jsonify(openapi.build_spec(current_state().settings))
