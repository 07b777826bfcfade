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

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}}


def _schemas() -> dict[str, Any]:
    number = {"type": "number"}
    return {
        "ErrorBody": {
            "type": "object",
            "additionalProperties": False,
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "Machine-readable error code, e.g. `missing_image`, `undecodable`, `too_large`, `too_slow`, `invalid_parameter`, `unsupported_media_type`, `payload_too_large`, `overloaded`, `timeout`, `not_ready`, `not_found`, `method_not_allowed`, `internal`."},
                "message": {"type": "string", "description": "What went wrong, for people."},
                "request_id": {"type": "string", "description": "The request's id, as in the `X-Request-ID` response header and the service's log lines."},
            },
        },
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": _ref("ErrorBody")},
        },
        "Token": {
            "type": "object",
            "additionalProperties": False,
            "required": ["word", "logprob"],
            "properties": {
                "word": {"type": "string"},
                "logprob": {"type": "number", "maximum": 0, "description": "log p(word | previous words, image)."},
                "attention": {
                    "type": "array",
                    "description": "Where the model looked for this word: the H x W grid (rows of columns) over the image, summing to 1. Absent when `attention=none`.",
                    "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                },
                "overlay": {
                    "type": "string",
                    "pattern": "^data:image/png;base64,",
                    "description": "Only with `attention=overlay`: the heat map drawn over the image, as a PNG data URI.",
                },
            },
        },
        "Alternative": {
            "type": "object",
            "additionalProperties": False,
            "required": ["caption", "score"],
            "properties": {"caption": {"type": "string"}, "score": number},
        },
        "Concept": {
            "type": "object",
            "additionalProperties": False,
            "required": ["word", "probability"],
            "properties": {
                "word": {"type": "string", "description": "A caption-vocabulary word for what the encoder's ImageNet classifier sees."},
                "probability": {"type": "number", "minimum": 0, "maximum": 1,
                                "description": "Summed probability of the ImageNet classes that name this word."},
            },
        },
        "Model": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "version"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "optimizations": {"type": "array", "items": {"type": "string"},
                                  "description": "CPU speed-ups applied to the loaded model (/readyz only; see CAPTIONER_FAST)."},
                "runtime": {"type": "string", "enum": ["torch", "onnxruntime-fp32"],
                            "description": "What runs the encoder (/readyz only; see CAPTIONER_RUNTIME)."},
            },
        },
        "CaptionResponse": {
            "type": "object",
            "additionalProperties": False,
            "required": ["caption", "score", "tokens", "grid", "alternatives", "concepts", "image", "model", "parameters", "batch_size", "timing_ms"],
            "properties": {
                "caption": {"type": "string", "description": "The best caption, words joined by spaces."},
                "score": {"type": "number", "description": "Its search score (length-normalised log-probability)."},
                "tokens": {"type": "array", "items": _ref("Token"), "description": "One entry per word of `caption`."},
                "grid": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2,
                         "description": "[H, W] of every attention grid."},
                "alternatives": {"type": "array", "items": _ref("Alternative"),
                                 "description": "The next `n_best - 1` captions, best first (empty when `n_best` = 1)."},
                "concepts": {"type": "array", "items": _ref("Concept"), "maxItems": 5,
                             "description": "Up to 5 visual concepts with probability >= 0.1, best first (empty for a model without an ImageNet head). "
                                            "With `guidance=concepts` the caption names the first one unless that costs the model too much."},
                "image": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["width", "height"],
                    "properties": {"width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}},
                    "description": "Size of the image as received (from its header).",
                },
                "model": _ref("Model"),
                "parameters": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["beam_size", "max_length", "n_best", "attention", "guidance"],
                    "properties": {
                        "beam_size": {"type": "integer"},
                        "max_length": {"type": "integer"},
                        "n_best": {"type": "integer"},
                        "attention": {"type": "string", "enum": ["none", "grid", "overlay"]},
                        "guidance": {"type": "string", "enum": list(GUIDANCE)},
                    },
                    "description": "The settings used, defaults filled in.",
                },
                "batch_size": {"type": "integer", "minimum": 1, "description": "Images in the micro-batch this request was run in."},
                "timing_ms": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["queue", "preprocess", "inference", "postprocess", "total"],
                    "properties": {
                        "queue": {**number, "description": "Waiting for the micro-batcher."},
                        "preprocess": {**number, "description": "Decoding and resizing the upload."},
                        "inference": {**number, "description": "Encoder pass of the batch + this request's decode group."},
                        "postprocess": {**number, "description": "Building the response (and overlays)."},
                        "total": {**number, "description": "From the start of the request to the response."},
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}},
        },
        "Ready": {
            "type": "object",
            "additionalProperties": False,
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["loading", "ready", "failed", "stopped"]},
                "model": _ref("Model"),
                "error": _ref("ErrorBody"),
            },
        },
        "CaptionForm": {
            "type": "object",
            "required": ["image"],
            "properties": {
                "image": {"type": "string", "contentMediaType": "application/octet-stream",
                          "description": "The image file (any format Pillow reads)."},
                "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE},
                "max_length": {"type": "integer", "minimum": 1, "maximum": MAX_LENGTH_LIMIT},
                "n_best": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE},
                "attention": {"type": "string", "enum": ["none", "grid", "overlay"]},
                "guidance": {"type": "string", "enum": list(GUIDANCE)},
            },
        },
    }


def _caption_parameters(settings: Settings) -> list[dict[str, Any]]:
    def q(name: str, schema: dict, description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}

    return [
        q("beam_size", {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE, "default": settings.default_beam_size},
          "Beam width (1 = greedy). A form field of the same name wins over the query parameter."),
        q("max_length", {"type": "integer", "minimum": 1, "maximum": MAX_LENGTH_LIMIT},
          "Most words in the caption (default: the model's setting)."),
        q("n_best", {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE, "default": 1},
          "How many captions to return: the best plus `n_best - 1` alternatives."),
        q("attention", {"type": "string", "enum": ["none", "grid", "overlay"], "default": "grid"},
          "`grid`: each token carries its H x W attention grid; `overlay`: also a PNG heat map over the image "
          "(data URI); `none`: neither."),
        q("guidance", {"type": "string", "enum": list(GUIDANCE), "default": "concepts"},
          "`concepts`: the caption names the most likely visual concept once (constrained beam search) "
          "unless that costs the model too much; `none`: the plain model's caption."),
    ]


def build_spec(settings: Settings) -> dict[str, Any]:
    limit_mb = f"{settings.max_upload_mb:g}"
    binary = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
    html = {"text/html": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Captioner service",
            "version": __version__,
            "description": (
                "Show, Attend and Tell image captioning over HTTP. Every error answers "
                "`{\"error\": {\"code\", \"message\", \"request_id\"}}`. Every response carries an "
                "`X-Request-ID` header: the client's own when it sends a sane one (1-128 characters of "
                "`A-Z a-z 0-9 . _ : + / = -`), else a new one. Uploads are limited to "
                f"{limit_mb} MiB and {settings.max_pixels:,} pixels and are never written to disk."
            ),
        },
        "paths": {
            "/v1/captions": {
                "post": {
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
                            "multipart/form-data": {"schema": _ref("CaptionForm")},
                            "image/*": binary,
                            "application/octet-stream": binary,
                        },
                    },
                    "responses": {
                        "200": {"description": "The caption, per-word attention and alternatives.",
                                "content": {JSON: {"schema": _ref("CaptionResponse")}}},
                        "400": _error("`missing_image`, `undecodable` (not a JPEG, PNG, GIF, WebP, BMP or TIFF image; "
                                      "truncated, empty) or `invalid_parameter`."),
                        "413": _error(f"`payload_too_large`: body above {limit_mb} MiB (refused before it is read); "
                                      f"`too_large`: image above {settings.max_pixels:,} pixels (decompression bomb), "
                                      f"or needing more than {settings.decode_memory_mb} MB to decode."),
                        "422": _error(f"`too_slow`: the image took longer than {settings.decode_timeout_s:g} s to decode."),
                        "415": _error("`unsupported_media_type`: the body or the `image` part is not an image type."),
                        "500": _error("`internal`: an unexpected failure (logged); the worker keeps serving."),
                        "503": {**_error("`overloaded`: the request queue is full, or no decode slot "
                                         "freed up within the request's time limit; `not_ready`: the model is loading "
                                         "or failed to load; `unavailable`: shutting down."), "headers": RETRY_AFTER},
                        "504": {**_error(f"`timeout`: no caption within {settings.request_timeout_s:g} s."),
                                "headers": RETRY_AFTER},
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: the process answers",
                    "responses": {"200": {"description": "Alive.", "content": {JSON: {"schema": _ref("Health")}}}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: the model is loaded and a warm-up inference ran",
                    "responses": {
                        "200": {"description": "Ready to caption.", "content": {JSON: {"schema": _ref("Ready")}}},
                        "503": {"description": "Still loading, the model failed to load (`error` says why), or shutting down.",
                                "headers": RETRY_AFTER, "content": {JSON: {"schema": _ref("Ready")}}},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "description": "Request counts by endpoint and status, latency and batch-size histograms, queue depth. "
                                   "Per worker process unless PROMETHEUS_MULTIPROC_DIR is set (see docs/service.md).",
                    "responses": {"200": {"description": "Prometheus text format.",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}},
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1 document.", "content": {JSON: {"schema": {"type": "object"}}}}},
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
        },
        "components": {"schemas": _schemas()},
    }


def operations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Flattened operations for the HTML page."""
    out = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            responses = []
            for status, resp in op.get("responses", {}).items():
                content = resp.get("content", {})
                schema_names = sorted({c["schema"]["$ref"].rsplit("/", 1)[-1] for c in content.values()
                                       if "$ref" in c.get("schema", {})})
                responses.append({"status": status, "description": resp.get("description", ""),
                                  "types": list(content), "schemas": schema_names,
                                  "headers": list(resp.get("headers", {}))})
            body = op.get("requestBody", {}).get("content", {})
            out.append({
                "id": op.get("operationId", f"{method}-{path}"),
                "method": method.upper(), "path": path, "summary": op.get("summary", ""),
                "description": op.get("description", ""), "parameters": op.get("parameters", []),
                "request_types": list(body), "responses": responses,
            })
    return out


def schema_texts(spec: dict[str, Any]) -> dict[str, str]:
    return {name: json.dumps(schema, indent=2) for name, schema in spec["components"]["schemas"].items()}
