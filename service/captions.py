"""The captions blueprint: ``POST /v1/captions``.

A request thread reads the upload, decodes it in the decode pool (bounded in time and memory),
preprocesses it with :func:`captioner.images.preprocess`, hands the tensor to the micro-batcher
and answers :meth:`captioner.api.Caption.to_dict` plus the request's image, model, parameters,
batch size and timings (docs/service.md).
"""

from __future__ import annotations

import base64
import math
import time

import torch
from flask import Blueprint, Response, g, jsonify, request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from captioner.api import GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT
from captioner.decode_pool import PoolBusy
from captioner.images import ImageError, preprocess
from captioner.overlay import overlay_png

from . import logs
from .batching import BatcherClosed, BatchResult, BatchTimeout, DecodeSettings, QueueFull
from .errors import ApiError, public_message
from .protocols import Batcher, ServedModel
from .state import ServiceState, current_state

ATTENTION_MODES = ("none", "grid", "overlay")
#: ImageError code -> (HTTP status, error code) for uploads that are refused.
IMAGE_ERRORS = {"too_large": (413, "too_large"), "too_slow": (422, "too_slow")}
#: Content types accepted as a raw image body (besides every ``image/*``).
RAW_TYPES = ("application/octet-stream",)
ACCEPTED = "send the image as the multipart/form-data field 'image', or as a raw body with an image/* Content-Type"

captions = Blueprint("captions", __name__)


@captions.post("/v1/captions")
def create() -> Response:
    """Caption the uploaded image."""
    t0 = g.get("t0", time.perf_counter())
    state = current_state()
    cap, batcher = _serving(state)
    data = upload_bytes()
    decode_settings, attention = decode_params(cap, state.settings.default_beam_size)
    t_pre = time.perf_counter()
    tensor, original_size, thumbnail = _prepare(state, cap, batcher, data, attention == "overlay", t0)
    preprocess_s = time.perf_counter() - t_pre
    result = _infer(state, batcher, tensor, decode_settings, t0)
    logs.annotate(request.environ, batch_size=result.batch_size)

    t_post = time.perf_counter()
    caption = result.caption
    overlays = None
    if attention == "overlay":
        side = state.settings.overlay_max_side
        overlays = [_data_uri(overlay_png(thumbnail, grid, max_side=side)) for grid in caption.attention]
    body = caption.to_dict(attention=attention != "none", overlays=overlays, complete=True) | {
        "image": {"width": int(original_size[0]), "height": int(original_size[1])},
        "model": {"name": cap.name, "version": cap.version},
        "parameters": {
            "beam_size": decode_settings.beam_size,
            "max_length": decode_settings.max_length,
            "n_best": decode_settings.n_best,
            "attention": attention,
            "guidance": decode_settings.guidance,
        },
        "batch_size": result.batch_size,
    }
    now = time.perf_counter()
    body["timing_ms"] = {
        "queue": round(result.queue_ms, 2),
        "preprocess": _ms(preprocess_s),
        "inference": round(result.inference_ms, 2),
        "postprocess": _ms(now - t_post),
        "total": _ms(now - t0),
    }
    return jsonify(body)


def _serving(state: ServiceState) -> tuple[ServedModel, Batcher]:
    """The model and its batcher; 503 while loading, after a failed load, or when shutting down."""
    if state.ready and state.captioner is not None and state.batcher is not None:
        return state.captioner, state.batcher
    state.metrics.rejected.labels("not_ready").inc()
    if state.status == "failed":
        raise ApiError(503, "not_ready", "the model could not be loaded; see /readyz", {"Retry-After": "30"})
    if state.status == "stopped":
        raise ApiError(503, "unavailable", "the service is shutting down", {"Retry-After": "5"})
    raise ApiError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "5"})


def _overloaded(state: ServiceState, batcher: Batcher) -> ApiError:
    state.metrics.rejected.labels("overloaded").inc()
    return ApiError(
        503,
        "overloaded",
        "too many requests are waiting for the model; retry later",
        {"Retry-After": str(batcher.retry_after())},
    )


def _prepare(
    state: ServiceState,
    cap: ServedModel,
    batcher: Batcher,
    data: bytes,
    overlay: bool,
    t0: float,
) -> tuple[torch.Tensor, tuple[int, int], Image.Image | None]:
    """Upload bytes -> (model input (3, S, S), original (width, height), overlay-sized thumbnail or None)."""
    settings, size = state.settings, cap.encoder_cfg.image_size
    # incoming(): the batcher may hold its next batch open for this request while it is prepared
    with batcher.incoming():
        if batcher.depth >= batcher.queue_size:  # full already: refuse before paying for the decode
            raise _overloaded(state, batcher)
        try:
            # JPEGs decode at a reduced scale when only a small image is needed (DCT scaling);
            # overlays are drawn on the image, so then it is decoded large enough for them.
            # Only the model-sized square and an overlay-sized thumbnail come back from the decoder.
            decoded = state.decoder.decode(
                data,
                size,
                max_pixels=settings.max_pixels,
                draft_size=max(size, settings.overlay_max_side) if overlay else size,
                thumbnail_side=settings.overlay_max_side if overlay else 0,
                deadline=time.monotonic() + settings.request_timeout_s - (time.perf_counter() - t0),
            )
        except PoolBusy:
            state.metrics.rejected.labels("decode_busy").inc()
            raise ApiError(
                503,
                "overloaded",
                "too many uploads are waiting to be decoded; retry later",
                {"Retry-After": str(max(1, math.ceil(settings.decode_timeout_s)))},
            ) from None
        except ImageError as exc:
            state.metrics.rejected.labels(exc.code).inc()
            status, code = IMAGE_ERRORS.get(exc.code, (400, "undecodable"))
            raise ApiError(status, code, public_message(str(exc))) from None
        del data
        tensor = preprocess(decoded.image, size, cap.encoder_cfg.norm)  # (3, S, S)
        # only the small thumbnail waits for the model, never the full image
        return tensor, decoded.original_size, decoded.thumbnail


def _infer(
    state: ServiceState, batcher: Batcher, tensor: torch.Tensor, settings: DecodeSettings, t0: float
) -> BatchResult:
    """Run one image (3, S, S) through the micro-batcher within the request's time limit."""
    limit = state.settings.request_timeout_s
    remaining = limit - (time.perf_counter() - t0)
    try:
        if remaining <= 0:
            raise BatchTimeout("no time left")
        return batcher.run(tensor, settings, timeout=remaining)
    except QueueFull:
        raise _overloaded(state, batcher) from None
    except BatchTimeout:
        state.metrics.rejected.labels("timeout").inc()
        raise ApiError(
            504, "timeout", f"no caption within the limit of {limit:g} s", {"Retry-After": str(batcher.retry_after())}
        ) from None
    except BatcherClosed as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from None


def _form_or_query(name: str) -> str | None:
    """A parameter from the form (which wins) or the query string."""
    return request.form.get(name) if name in request.form else request.args.get(name)


def int_param(name: str, low: int, high: int, default: int) -> int:
    """An integer parameter in [low, high]; 400 ``invalid_parameter`` otherwise."""
    raw = _form_or_query(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ApiError(
            400, "invalid_parameter", f"{name} must be an integer between {low} and {high}, got {raw!r}"
        ) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_parameter", f"{name} must be between {low} and {high}, got {value}")
    return value


def decode_params(cap: ServedModel, default_beam_size: int) -> tuple[DecodeSettings, str]:
    """The request's decoding settings and attention mode, defaults filled in from the model."""
    beam = int_param("beam_size", 1, MAX_BEAM_SIZE, default_beam_size)
    max_length = int_param("max_length", 1, MAX_LENGTH_LIMIT, min(MAX_LENGTH_LIMIT, int(cap.defaults["max_length"])))
    n_best = int_param("n_best", 1, MAX_BEAM_SIZE, 1)
    raw = _form_or_query("attention")
    attention = (raw or "grid").strip().lower()
    if attention not in ATTENTION_MODES:
        raise ApiError(400, "invalid_parameter", f"attention must be one of {', '.join(ATTENTION_MODES)}, got {raw!r}")
    raw = _form_or_query("guidance")
    guidance = (raw or str(cap.defaults["guidance"])).strip().lower()
    if guidance not in GUIDANCE:
        raise ApiError(400, "invalid_parameter", f"guidance must be one of {', '.join(GUIDANCE)}, got {raw!r}")
    return DecodeSettings(beam, max_length, n_best, guidance), attention


def upload_bytes() -> bytes:
    """The uploaded image's bytes (in memory). 415 for other content types, 400 when missing."""
    mimetype = (request.mimetype or "").lower()
    if mimetype == "multipart/form-data":
        upload = request.files.get("image")  # parsing may raise 413 (MAX_CONTENT_LENGTH)
        if upload is None:
            if "image" in request.form:
                raise ApiError(400, "missing_image", "the 'image' field must be a file upload, not a text field")
            raise ApiError(400, "missing_image", "no 'image' file field in the form; " + ACCEPTED)
        part_type = (upload.mimetype or "").lower()
        if part_type and not (part_type.startswith("image/") or part_type in RAW_TYPES):
            raise ApiError(
                415, "unsupported_media_type", f"the 'image' part has Content-Type {part_type}; expected image/*"
            )
        data = upload.read()
    elif mimetype.startswith("image/") or mimetype in RAW_TYPES:
        data = request.get_data(cache=False)  # 413 when Content-Length is above MAX_CONTENT_LENGTH
        limit = request.max_content_length
        if limit is not None and request.content_length is None and len(data) >= limit:
            # A chunked body is cut at the limit rather than refused: it reached the limit, so refuse it.
            raise RequestEntityTooLarge()
    elif not mimetype and not request.content_length and request.headers.get("Transfer-Encoding") is None:
        raise ApiError(400, "missing_image", "the request has no body; " + ACCEPTED)
    else:
        raise ApiError(415, "unsupported_media_type", f"unsupported Content-Type {mimetype or '(none)'}; " + ACCEPTED)
    if not data:
        raise ApiError(400, "missing_image", "the uploaded image is empty")
    return data


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)
