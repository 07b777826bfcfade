"""The Flask application: ``create_app(config=None)``.

Routes: ``POST /v1/captions``, ``GET /healthz``, ``GET /readyz``, ``GET /metrics``,
``GET /openapi.json``, ``GET /docs`` and the web page ``GET /``. See docs/service.md.

Each process that calls :func:`create_app` loads the model once (in a background
thread by default, so ``/healthz`` answers at once and ``/readyz`` says when the
model is warm) and runs one :class:`~service.batching.MicroBatcher` for it.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flask import Flask, Request, Response, g, jsonify, render_template, request
from markupsafe import Markup, escape
from werkzeug.exceptions import RequestEntityTooLarge

from captioner.api import GUIDANCE, MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, Captioner
from captioner.decode_pool import DecodePool, PoolBusy
from captioner.images import ImageError, preprocess
from captioner.overlay import overlay_png

from . import errors, logs, openapi
from .batching import BatchResult, BatcherClosed, BatchTimeout, DecodeSettings, MicroBatcher, QueueFull
from .config import Settings, load_settings
from .errors import ApiError
from .metrics import Metrics, method_label

log = logging.getLogger("service")

ATTENTION_MODES = ("none", "grid", "overlay")
#: ImageError code -> (HTTP status, error code) for uploads that are refused.
IMAGE_ERRORS = {"too_large": (413, "too_large"), "too_slow": (422, "too_slow")}
#: On every response: no MIME sniffing (a JSON or image body is never run as HTML/script), no referrer.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
#: The pages load only their own scripts, styles and fonts, show uploads (blob:) and overlays (data:),
#: call only this origin, and may not be framed (clickjacking).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: API answers are data: nothing in them may load or run, nor be framed.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
#: Content types accepted as a raw image body (besides every ``image/*``).
RAW_TYPES = ("application/octet-stream",)
EXTENSION_KEY = "captioner_service"


class InMemoryRequest(Request):
    """Multipart uploads are parsed into memory, never spooled to a temporary file.

    The body size is already capped by ``MAX_CONTENT_LENGTH``, so memory is bounded.
    """

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):  # noqa: D401
        return io.BytesIO()


class ServiceState:
    """The model, its micro-batcher and readiness, one per app (so one per worker process)."""

    def __init__(self, settings: Settings, metrics: Metrics, captioner: Any | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.captioner: Any | None = captioner
        self.batcher: MicroBatcher | None = None
        # Uploads are decoded in these processes, CAPTIONER_DECODE_SLOTS at a time: bounded in time and memory.
        self.decoder = DecodePool(settings.decode_workers, settings.decode_timeout_s, settings.decode_memory_mb)
        self.status = "loading"  # loading -> ready | failed; ready -> stopped
        self.error: str | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ loading
    def start(self) -> None:
        self.decoder.start()
        if self.settings.load_in_background:
            self._thread = threading.Thread(target=self._load_safely, name="model-loader", daemon=True)
            self._thread.start()
        else:
            self._load()

    def _load_safely(self) -> None:
        try:
            self._load()
        except Exception:  # noqa: BLE001 - reported by /readyz, logged
            pass

    def _load(self) -> None:
        s = self.settings
        try:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            if self.captioner is None:
                started = time.perf_counter()
                log.info("loading model %s", s.model_path)
                self.captioner = Captioner.load(s.model_path, device=s.device, fast=s.fast, runtime=s.runtime)
                log.info("loaded %s %s on %s in %.1f s", self.captioner.name, self.captioner.version,
                         getattr(self.captioner, "device", "?"), time.perf_counter() - started)
            cap = self.captioner
            self.metrics.model_info.labels(cap.name, cap.version).set(1)
            self.batcher = MicroBatcher(
                cap, s.max_batch, s.batch_wait_ms, s.queue_size,
                on_batch=self.metrics.observe_batch, on_queue_depth=self.metrics.queue_depth.set,
                adaptive_wait=True,
            ).start()
            if s.warmup:
                started = time.perf_counter()
                size = cap.encoder_cfg.image_size
                self.batcher.run(torch.zeros(3, size, size), self.default_settings(), timeout=max(300.0, s.request_timeout_s))
                log.info("warm-up inference took %.2f s", time.perf_counter() - started)
            self.status = "ready"
            self.metrics.ready.set(1)
            self._ready.set()
        except Exception as exc:
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model could not be loaded from %s", s.model_path)
            raise
        finally:
            self._done.set()

    def default_settings(self) -> DecodeSettings:
        return DecodeSettings(self.settings.default_beam_size, int(self.captioner.defaults["max_length"]), 1)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until loading finished; True when the model is ready."""
        self._done.wait(timeout)
        return self._ready.is_set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        """Stop serving (worker exit): readiness off, batcher stopped, queued requests answered 503."""
        self._ready.clear()
        if self.status == "ready":
            self.status = "stopped"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.close()
        self.decoder.close()


# ---------------------------------------------------------------- helpers
def _int_param(name: str, low: int, high: int, default: int) -> int:
    raw = request.form.get(name) if name in request.form else request.args.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer between {low} and {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_parameter", f"{name} must be between {low} and {high}, got {value}")
    return value


def _params(state: ServiceState) -> tuple[DecodeSettings, str]:
    cap = state.captioner
    beam = _int_param("beam_size", 1, MAX_BEAM_SIZE, state.settings.default_beam_size)
    max_length = _int_param("max_length", 1, MAX_LENGTH_LIMIT, min(MAX_LENGTH_LIMIT, int(cap.defaults["max_length"])))
    n_best = _int_param("n_best", 1, MAX_BEAM_SIZE, 1)
    raw = request.form.get("attention") if "attention" in request.form else request.args.get("attention")
    attention = (raw or "grid").strip().lower()
    if attention not in ATTENTION_MODES:
        raise ApiError(400, "invalid_parameter", f"attention must be one of {', '.join(ATTENTION_MODES)}, got {raw!r}")
    raw = request.form.get("guidance") if "guidance" in request.form else request.args.get("guidance")
    guidance = (raw or str(cap.defaults["guidance"])).strip().lower()
    if guidance not in GUIDANCE:
        raise ApiError(400, "invalid_parameter", f"guidance must be one of {', '.join(GUIDANCE)}, got {raw!r}")
    return DecodeSettings(beam, max_length, n_best, guidance), attention


def _accepted_types() -> str:
    return "send the image as the multipart/form-data field 'image', or as a raw body with an image/* Content-Type"


def _upload_bytes() -> bytes:
    """The uploaded image's bytes (in memory). 415 for other content types, 400 when missing."""
    mimetype = (request.mimetype or "").lower()
    if mimetype == "multipart/form-data":
        upload = request.files.get("image")  # parsing may raise 413 (MAX_CONTENT_LENGTH)
        if upload is None:
            if "image" in request.form:
                raise ApiError(400, "missing_image", "the 'image' field must be a file upload, not a text field")
            raise ApiError(400, "missing_image", "no 'image' file field in the form; " + _accepted_types())
        part_type = (upload.mimetype or "").lower()
        if part_type and not (part_type.startswith("image/") or part_type in RAW_TYPES):
            raise ApiError(415, "unsupported_media_type", f"the 'image' part has Content-Type {part_type}; expected image/*")
        data = upload.read()
    elif mimetype.startswith("image/") or mimetype in RAW_TYPES:
        data = request.get_data(cache=False)  # 413 when Content-Length is above MAX_CONTENT_LENGTH
        limit = request.max_content_length
        if limit is not None and request.content_length is None and len(data) >= limit:
            # A chunked body is cut at the limit rather than refused: it reached the limit, so refuse it.
            raise RequestEntityTooLarge()
    elif not mimetype and not request.content_length and request.headers.get("Transfer-Encoding") is None:
        raise ApiError(400, "missing_image", "the request has no body; " + _accepted_types())
    else:
        raise ApiError(415, "unsupported_media_type", f"unsupported Content-Type {mimetype or '(none)'}; " + _accepted_types())
    if not data:
        raise ApiError(400, "missing_image", "the uploaded image is empty")
    return data


_PATH = re.compile(r"""(?<![\w.<>/])(?:~|\.{1,2})?(?:/[^\s'"<>/]+)+/?""")


def _clean(message: str) -> str:
    """Drop object reprs ("<_io.BytesIO object at 0x...>") and file system paths from messages that are
    answered to clients (paths are logged, never sent)."""
    return _PATH.sub("<path>", re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", message))


def _md_code(text: str) -> Markup:
    """Escape ``text`` and render its `backtick` spans as <code> (for the OpenAPI descriptions on /docs)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


# ---------------------------------------------------------------- the app
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
    app.json.sort_keys = False
    _use_gunicorn_logging()

    app.add_template_filter(_md_code, "md_code")

    metrics = Metrics()
    state = ServiceState(settings, metrics, captioner=config.get("CAPTIONER_INSTANCE"))
    app.extensions[EXTENSION_KEY] = state
    errors.register(app)

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _record(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(endpoint, method_label(request.method), str(response.status_code)).inc()
        response.headers.update(SECURITY_HEADERS)
        response.headers["Content-Security-Policy"] = PAGE_CSP if response.mimetype == "text/html" else API_CSP
        metrics.latency.labels(endpoint).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return response

    @app.after_request
    def _tag(response: Response) -> Response:
        """The request id as a response header; the served model on the request's access line (service/logs.py)."""
        response.headers[logs.HEADER] = logs.request_id(request.environ)
        if state.captioner is not None:
            logs.annotate(request.environ, model=state.captioner.name, model_version=state.captioner.version)
        return response

    # ------------------------------------------------------------ API
    def overloaded() -> ApiError:
        metrics.rejected.labels("overloaded").inc()
        return ApiError(503, "overloaded", "too many requests are waiting for the model; retry later",
                        {"Retry-After": str(state.batcher.retry_after())})

    @app.post("/v1/captions")
    def captions():
        t0 = g.get("t0", time.perf_counter())
        if not state.ready:
            metrics.rejected.labels("not_ready").inc()
            if state.status == "failed":
                raise ApiError(503, "not_ready", "the model could not be loaded; see /readyz", {"Retry-After": "30"})
            if state.status == "stopped":
                raise ApiError(503, "unavailable", "the service is shutting down", {"Retry-After": "5"})
            raise ApiError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "5"})
        data = _upload_bytes()
        decode_settings, attention = _params(state)
        cap = state.captioner
        enc_cfg = cap.encoder_cfg

        t_pre = time.perf_counter()
        # incoming(): the batcher may hold its next batch open for this request while it is prepared
        with state.batcher.incoming():
            if state.batcher.depth >= state.batcher.queue_size:  # full already: refuse before paying for the decode
                raise overloaded()
            overlay = attention == "overlay"
            try:
                # JPEGs decode at a reduced scale when only a small image is needed (DCT scaling);
                # overlays are drawn on the image, so then it is decoded large enough for them.
                # Only the model-sized square and an overlay-sized thumbnail come back from the decoder.
                decoded = state.decoder.decode(
                    data, enc_cfg.image_size, max_pixels=settings.max_pixels,
                    draft_size=max(enc_cfg.image_size, settings.overlay_max_side) if overlay else enc_cfg.image_size,
                    thumbnail_side=settings.overlay_max_side if overlay else 0,
                    deadline=time.monotonic() + settings.request_timeout_s - (time.perf_counter() - t0))
            except PoolBusy:
                metrics.rejected.labels("decode_busy").inc()
                raise ApiError(503, "overloaded", "too many uploads are waiting to be decoded; retry later",
                               {"Retry-After": str(max(1, math.ceil(settings.decode_timeout_s)))}) from None
            except ImageError as exc:
                metrics.rejected.labels(exc.code).inc()
                status, code = IMAGE_ERRORS.get(exc.code, (400, "undecodable"))
                raise ApiError(status, code, _clean(str(exc))) from None
            del data
            original_size = decoded.original_size
            tensor = preprocess(decoded.image, enc_cfg.image_size, enc_cfg.norm)
            image = decoded.thumbnail  # only this small copy waits for the model, never the full image
        preprocess_s = time.perf_counter() - t_pre

        remaining = settings.request_timeout_s - (time.perf_counter() - t0)
        try:
            if remaining <= 0:
                raise BatchTimeout("no time left")
            result: BatchResult = state.batcher.run(tensor, decode_settings, timeout=remaining)
        except QueueFull:
            raise overloaded() from None
        except BatchTimeout:
            metrics.rejected.labels("timeout").inc()
            raise ApiError(504, "timeout", f"no caption within the limit of {settings.request_timeout_s:g} s",
                           {"Retry-After": str(state.batcher.retry_after())}) from None
        except BatcherClosed as exc:
            raise ApiError(503, "unavailable", str(exc), {"Retry-After": "5"}) from None
        logs.annotate(request.environ, batch_size=result.batch_size)

        t_post = time.perf_counter()
        caption = result.caption
        H, W = cap.grid
        tokens = []
        for word, logprob, grid in zip(caption.tokens, caption.logprobs, caption.attention):
            token: dict[str, Any] = {"word": word, "logprob": round(float(logprob), 4)}
            if attention != "none":
                token["attention"] = np.round(np.asarray(grid, dtype=np.float64), 6).tolist()
            if attention == "overlay":
                token["overlay"] = _data_uri(overlay_png(image, grid, max_side=settings.overlay_max_side))
            tokens.append(token)
        body = {
            "caption": caption.text,
            "score": round(float(caption.score), 4),
            "tokens": tokens,
            "grid": [H, W],
            "alternatives": [{"caption": a.text, "score": round(float(a.score), 4)} for a in caption.alternatives],
            "concepts": [c.to_dict() for c in caption.concepts],
            "image": {"width": int(original_size[0]), "height": int(original_size[1])},
            "model": {"name": cap.name, "version": cap.version},
            "parameters": {"beam_size": decode_settings.beam_size, "max_length": decode_settings.max_length,
                           "n_best": decode_settings.n_best, "attention": attention,
                           "guidance": decode_settings.guidance},
            "batch_size": result.batch_size,
            "timing_ms": {},
        }
        now = time.perf_counter()
        body["timing_ms"] = {"queue": round(result.queue_ms, 2), "preprocess": _ms(preprocess_s),
                             "inference": round(result.inference_ms, 2), "postprocess": _ms(now - t_post),
                             "total": _ms(now - t0)}
        return jsonify(body)

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        cap = state.captioner if state.ready else None
        body: dict[str, Any] = {"status": state.status}
        if cap is not None:
            body["model"] = {"name": cap.name, "version": cap.version,
                             "optimizations": list(getattr(cap, "optimizations", [])),
                             "runtime": getattr(cap, "runtime", "torch")}
            return jsonify(body)
        message = {"failed": _clean(state.error or ""), "stopped": "the service is shutting down"}.get(
            state.status, "the model is loading and warming up")
        body["error"] = {"code": "not_ready", "message": message}
        response = jsonify(body)
        response.status_code = 503
        response.headers["Retry-After"] = "30" if state.status == "failed" else "5"
        return response

    @app.get("/metrics")
    def metrics_endpoint():
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
        return Response(metrics.render(), mimetype=None, content_type=metrics.content_type)

    @app.get("/openapi.json")
    def openapi_json():
        return jsonify(openapi.build_spec(settings))

    # ------------------------------------------------------------ pages
    @app.get("/docs")
    def docs():
        spec = openapi.build_spec(settings)
        return render_template("docs.html", spec=spec, operations=openapi.operations(spec), schemas=openapi.schema_texts(spec))

    @app.get("/")
    def index():
        return render_template("index.html", settings=settings, max_beam=MAX_BEAM_SIZE, max_length=MAX_LENGTH_LIMIT)

    state.start()
    return app


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


__all__ = ["create_app", "ServiceState", "InMemoryRequest", "EXTENSION_KEY"]
