"""The OpenAPI 3.1 document (``GET /openapi.json``) and its HTML rendering (``GET /docs``).

The document is written by hand to describe the service exactly; the tests check
that every route is documented and that real responses validate against these
schemas (which forbid undocumented properties).
"""

from __future__ import annotations

import json
from typing import Any

from captioner import __version__
from captioner.api import GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT

from .config import Settings
from .openapi_schemas import SCHEMAS, ref

JSON = "application/json"


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": ref("Error")}}}


RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}
}


def _caption_parameters(settings: Settings) -> list[dict[str, Any]]:
    def q(name: str, schema: dict, description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return [
        q(
            "beam_size",
            {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE, "default": settings.default_beam_size},
            "Beam width (1 = greedy). A form field of the same name wins over the query parameter.",
        ),
        q(
            "max_length",
            {"type": "integer", "minimum": 1, "maximum": MAX_LENGTH_LIMIT},
            "Most words in the caption (default: the model's setting).",
        ),
        q(
            "n_best",
            {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE, "default": 1},
            "How many captions to return: the best plus `n_best - 1` alternatives.",
        ),
        q(
            "attention",
            {"type": "string", "enum": ["none", "grid", "overlay"], "default": "grid"},
            "`grid`: each token carries its H x W attention grid; `overlay`: also a PNG heat map over the image "
            "(data URI); `none`: neither.",
        ),
        q(
            "guidance",
            {"type": "string", "enum": list(GUIDANCE), "default": "concepts"},
            "`concepts`: the caption names one of the two most likely objects and the place (kitchen, bathroom, "
            "table) the classifier sees, each once (constrained beam search), unless that costs the model too much; "
            "`none`: the plain model's caption.",
        ),
    ]


def _create_caption(settings: Settings) -> dict[str, Any]:
    """The ``POST /v1/captions`` operation."""
    limit_mb = f"{settings.max_upload_mb:g}"
    binary = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
    return {
        "operationId": "createCaption",
        "summary": "Caption an image",
        "description": (
            "Send the image as the multipart field `image`, or as the raw request body with an "
            "`image/*` (or `application/octet-stream`) Content-Type. Any format Pillow reads is accepted. "
            "Concurrent requests are micro-batched through the model."
        ),
        "parameters": _caption_parameters(settings),
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": ref("CaptionForm")},
                "image/*": binary,
                "application/octet-stream": binary,
            },
        },
        "responses": {
            "200": {
                "description": "The caption, per-word attention and alternatives.",
                "content": {JSON: {"schema": ref("CaptionResponse")}},
            },
            "400": _error_response(
                "`missing_image`, `undecodable` (not a JPEG, PNG, GIF, WebP, BMP or TIFF image; "
                "truncated, empty) or `invalid_parameter`."
            ),
            "413": _error_response(
                f"`payload_too_large`: body above {limit_mb} MiB (refused before it is read); "
                f"`too_large`: image above {settings.max_pixels:,} pixels (decompression bomb), "
                f"or needing more than {settings.decode_memory_mb} MB to decode."
            ),
            "422": _error_response(
                f"`too_slow`: the image took longer than {settings.decode_timeout_s:g} s to decode."
            ),
            "415": _error_response("`unsupported_media_type`: the body or the `image` part is not an image type."),
            "500": _error_response("`internal`: an unexpected failure (logged); the worker keeps serving."),
            "503": {
                **_error_response(
                    "`overloaded`: the request queue is full, or no decode slot "
                    "freed up within the request's time limit; `not_ready`: the model is loading "
                    "or failed to load; `unavailable`: shutting down."
                ),
                "headers": RETRY_AFTER,
            },
            "504": {
                **_error_response(f"`timeout`: no caption within {settings.request_timeout_s:g} s."),
                "headers": RETRY_AFTER,
            },
        },
    }


def _operation_paths() -> dict[str, Any]:
    """The health, readiness, metrics, document and page operations."""
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness: the process answers",
                "responses": {"200": {"description": "Alive.", "content": {JSON: {"schema": ref("Health")}}}},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "ready",
                "summary": "Readiness: the model is loaded and a warm-up inference ran",
                "responses": {
                    "200": {"description": "Ready to caption.", "content": {JSON: {"schema": ref("Ready")}}},
                    "503": {
                        "description": "Still loading, the model failed to load (`error` says why), or shutting down.",
                        "headers": RETRY_AFTER,
                        "content": {JSON: {"schema": ref("Ready")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "description": "Request counts by endpoint and status, latency and batch-size histograms, queue depth. "
                "Per worker process unless PROMETHEUS_MULTIPROC_DIR is set (see docs/service.md).",
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {"description": "OpenAPI 3.1 document.", "content": {JSON: {"schema": {"type": "object"}}}}
                },
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "This document as a web page",
                "responses": {"200": {"description": "HTML.", "content": html}},
            }
        },
        "/": {
            "get": {
                "operationId": "index",
                "summary": "Web page: upload an image, read its caption, see where each word looked",
                "responses": {"200": {"description": "HTML.", "content": html}},
            }
        },
    }


def build_spec(settings: Settings) -> dict[str, Any]:
    """The whole OpenAPI document for a service run with ``settings`` (its limits appear in the text)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Captioner service",
            "version": __version__,
            "description": (
                "Show, Attend and Tell image captioning over HTTP. Every error answers "
                '`{"error": {"code", "message", "request_id"}}`. Every response carries an '
                "`X-Request-ID` header: the client's own when it sends a sane one (1-128 characters of "
                "`A-Z a-z 0-9 . _ : + / = -`), else a new one. Uploads are limited to "
                f"{settings.max_upload_mb:g} MiB and {settings.max_pixels:,} pixels and are never written to disk."
            ),
        },
        "paths": {"/v1/captions": {"post": _create_caption(settings)}, **_operation_paths()},
        "components": {"schemas": {name: build() for name, build in SCHEMAS.items()}},
    }


def operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Flattened operations for the HTML page."""
    out = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            responses = []
            for status, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                schema_names = sorted(
                    {c["schema"]["$ref"].rsplit("/", 1)[-1] for c in content.values() if "$ref" in c.get("schema", {})}
                )
                responses.append(
                    {
                        "status": status,
                        "description": resp.get("description", ""),
                        "types": list(content),
                        "schemas": schema_names,
                        "headers": list(resp.get("headers", {})),
                    }
                )
            body = op.get("requestBody", {}).get("content", {})
            out.append(
                {
                    "id": op.get("operationId", f"{method}-{path}"),
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "parameters": op.get("parameters", []),
                    "request_types": list(body),
                    "responses": responses,
                }
            )
    return out


def schema_texts(spec: dict[str, Any]) -> dict[str, str]:
    """Each component schema as indented JSON, for the HTML page."""
    return {name: json.dumps(schema, indent=2) for name, schema in spec["components"]["schemas"].items()}
