"""The OpenAPI document's component schemas, one function per object (``GET /openapi.json``).

:data:`SCHEMAS` lists them in the document's order; :mod:`service.openapi` builds the paths around them.
The schemas forbid undocumented properties, and the tests validate real responses against them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from captioner.api import GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT

NUMBER = {"type": "number"}


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema ``name``."""
    return {"$ref": f"#/components/schemas/{name}"}


def _error_body() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["code", "message"],
        "properties": {
            "code": {
                "type": "string",
                "description": (
                    "Machine-readable error code, e.g. `missing_image`, `undecodable`, `too_large`, `too_slow`, "
                    "`invalid_parameter`, `unsupported_media_type`, `payload_too_large`, `overloaded`, `timeout`, "
                    "`not_ready`, `not_found`, `method_not_allowed`, `internal`."
                ),
            },
            "message": {"type": "string", "description": "What went wrong, for people."},
            "request_id": {
                "type": "string",
                "description": (
                    "The request's id, as in the `X-Request-ID` response header and the service's log lines."
                ),
            },
        },
    }


def _error() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["error"],
        "properties": {"error": ref("ErrorBody")},
    }


def _token() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["word", "logprob"],
        "properties": {
            "word": {"type": "string"},
            "logprob": {"type": "number", "maximum": 0, "description": "log p(word | previous words, image)."},
            "attention": {
                "type": "array",
                "description": (
                    "Where the model looked for this word: the H x W grid (rows of columns) over the image, summing to "
                    "1. Absent when `attention=none`."
                ),
                "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
            },
            "overlay": {
                "type": "string",
                "pattern": "^data:image/png;base64,",
                "description": "Only with `attention=overlay`: the heat map drawn over the image, as a PNG data URI.",
            },
        },
    }


def _alternative() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["caption", "score"],
        "properties": {"caption": {"type": "string"}, "score": NUMBER},
    }


def _concept() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["word", "probability"],
        "properties": {
            "word": {
                "type": "string",
                "description": "A caption-vocabulary word for what the encoder's ImageNet classifier sees.",
            },
            "probability": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "Summed probability of the ImageNet classes that name this word.",
            },
        },
    }


def _model() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "version"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "optimizations": {
                "type": "array",
                "items": {"type": "string"},
                "description": "CPU speed-ups applied to the loaded model (/readyz only; see CAPTIONER_FAST).",
            },
            "runtime": {
                "type": "string",
                "enum": ["torch", "onnxruntime-fp32", "onnxruntime-int8"],
                "description": "What runs the encoder (/readyz only; see CAPTIONER_RUNTIME).",
            },
        },
    }


def _caption_response() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [
            "caption",
            "score",
            "tokens",
            "grid",
            "alternatives",
            "concepts",
            "image",
            "model",
            "parameters",
            "batch_size",
            "timing_ms",
        ],
        "properties": {
            "caption": {"type": "string", "description": "The best caption, words joined by spaces."},
            "score": {"type": "number", "description": "Its search score (length-normalised log-probability)."},
            "tokens": {"type": "array", "items": ref("Token"), "description": "One entry per word of `caption`."},
            "grid": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1},
                "minItems": 2,
                "maxItems": 2,
                "description": "[H, W] of every attention grid.",
            },
            "alternatives": {
                "type": "array",
                "items": ref("Alternative"),
                "description": "The next `n_best - 1` captions, best first (empty when `n_best` = 1).",
            },
            "concepts": {
                "type": "array",
                "items": ref("Concept"),
                "maxItems": 5,
                "description": (
                    "Up to 5 visual concepts with probability >= 0.1, best first (empty for a model without an "
                    "ImageNet head). "
                    "With `guidance=concepts` the caption names the first one unless that costs the model too much."
                ),
            },
            "image": {
                "type": "object",
                "additionalProperties": False,
                "required": ["width", "height"],
                "properties": {"width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1}},
                "description": "Size of the image as received (from its header).",
            },
            "model": ref("Model"),
            "parameters": _caption_parameters_used(),
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "description": "Images in the micro-batch this request was run in.",
            },
            "timing_ms": _timings(),
        },
    }


def _caption_parameters_used() -> dict[str, Any]:
    return {
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
    }


def _timings() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["queue", "preprocess", "inference", "postprocess", "total"],
        "properties": {
            "queue": {**NUMBER, "description": "Waiting for the micro-batcher."},
            "preprocess": {**NUMBER, "description": "Decoding and resizing the upload."},
            "inference": {**NUMBER, "description": "Encoder pass of the batch + this request's decode group."},
            "postprocess": {**NUMBER, "description": "Building the response (and overlays)."},
            "total": {**NUMBER, "description": "From the start of the request to the response."},
        },
    }


def _health() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    }


def _ready() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["loading", "ready", "failed", "stopped"]},
            "model": ref("Model"),
            "error": ref("ErrorBody"),
        },
    }


def _caption_form() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {
                "type": "string",
                "contentMediaType": "application/octet-stream",
                "description": "The image file (any format Pillow reads).",
            },
            "beam_size": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE},
            "max_length": {"type": "integer", "minimum": 1, "maximum": MAX_LENGTH_LIMIT},
            "n_best": {"type": "integer", "minimum": 1, "maximum": MAX_BEAM_SIZE},
            "attention": {"type": "string", "enum": ["none", "grid", "overlay"]},
            "guidance": {"type": "string", "enum": list(GUIDANCE)},
        },
    }


#: components/schemas, in the document's order: name -> the function that builds the schema.
SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "ErrorBody": _error_body,
    "Error": _error,
    "Token": _token,
    "Alternative": _alternative,
    "Concept": _concept,
    "Model": _model,
    "CaptionResponse": _caption_response,
    "Health": _health,
    "Ready": _ready,
    "CaptionForm": _caption_form,
}
