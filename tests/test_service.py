"""The Flask service through its test client: every endpoint, every error, batching, limits."""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from captioner import Captioner
from service.app import EXTENSION_KEY, create_app
from service.batching import BatcherClosed, BatchTimeout, DecodeSettings, MicroBatcher, QueueFull
from service.config import ConfigError, load_settings

from conftest import assert_scored_by_the_model, image_bytes, make_image

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers
def validate(instance, schema, root, path="$"):
    """A small JSON-Schema check for the keywords openapi.py uses (fails on anything undocumented)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return validate(instance, root["components"]["schemas"][name], root, path)
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        assert isinstance(instance, int) and not isinstance(instance, bool), f"{path}: {instance!r} is not an integer"
    elif kind == "number":
        assert isinstance(instance, (int, float)) and not isinstance(instance, bool), (
            f"{path}: {instance!r} is not a number"
        )
    elif kind:
        assert isinstance(instance, checks[kind]), f"{path}: {instance!r} is not {kind}"
    if "enum" in schema:
        assert instance in schema["enum"], f"{path}: {instance!r} not in {schema['enum']}"
    if "minimum" in schema:
        assert instance >= schema["minimum"] - 1e-9, f"{path}: {instance} < {schema['minimum']}"
    if "maximum" in schema:
        assert instance <= schema["maximum"] + 1e-9, f"{path}: {instance} > {schema['maximum']}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], instance), f"{path}: {instance[:40]!r} !~ {schema['pattern']}"
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in instance, f"{path}: missing {key}"
        if schema.get("additionalProperties") is False:
            extra = set(instance) - set(props)
            assert not extra, f"{path}: undocumented properties {extra}"
        for key, value in instance.items():
            if key in props:
                validate(value, props[key], root, f"{path}.{key}")
    if kind == "array":
        assert len(instance) >= schema.get("minItems", 0), path
        assert len(instance) <= schema.get("maxItems", 10**9), path
        for i, item in enumerate(instance):
            validate(item, schema.get("items", {}), root, f"{path}[{i}]")


def response_schema(spec, path, method, status, media="application/json"):
    return spec["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def check_error(response, status, code, spec=None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if spec is not None:
        validate(body, {"$ref": "#/components/schemas/Error"}, spec)
    return body["error"]


def jpeg(seed=0, size=(96, 72)):
    return image_bytes(make_image(seed, size))


def multipart(data: bytes, name="photo.jpg", content_type="image/jpeg", **fields):
    return {"image": (io.BytesIO(data), name, content_type), **{k: str(v) for k, v in fields.items()}}


def metric_samples(client, name):
    text = client.get("/metrics").get_data(as_text=True)
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data): a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


class GatedCaptioner:
    """Wraps a Captioner: ``see`` (the batcher's encoder pass) waits for ``gate``; ``fail_next`` makes the next
    decode raise."""

    def __init__(self, real: Captioner, open_gate: bool = False) -> None:
        self.real = real
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.entered = threading.Event()
        self.fail_next: Exception | None = None

    def __getattr__(self, name):
        return getattr(self.real, name)

    def see(self, images, threads=None):
        self.entered.set()
        assert self.gate.wait(30)
        return self.real.see(images, threads)

    def decode(self, annotations, **kwargs):
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return self.real.decode(annotations, **kwargs)


def make_app(tiny_checkpoint, captioner=None, **overrides):
    config = {
        "CAPTIONER_MODEL": str(tiny_checkpoint),
        "CAPTIONER_LOAD_IN_BACKGROUND": False,
        "CAPTIONER_BATCH_WAIT_MS": 5,
        "TESTING": True,
    }
    if captioner is not None:
        config["CAPTIONER_INSTANCE"] = captioner
    config.update(overrides)
    return create_app(config)


def close(app):
    app.extensions[EXTENSION_KEY].close()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Captioner:
    return Captioner.load(tiny_checkpoint, device="cpu")  # as served: the CPU fast path


@pytest.fixture(scope="module")
def app(tiny_checkpoint, model):
    application = make_app(tiny_checkpoint, model)
    yield application
    close(application)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def spec(app):
    return app.test_client().get("/openapi.json").get_json()


# ---------------------------------------------------------------- captions: success
def test_caption_multipart(client, spec, model):
    r = client.post("/v1/captions", data=multipart(jpeg(1)))
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    validate(body, response_schema(spec, "/v1/captions", "post", 200), spec)
    H, W = model.grid
    assert body["grid"] == [H, W]
    assert body["caption"] == " ".join(t["word"] for t in body["tokens"])
    assert body["tokens"], "the tiny model always emits at least one word"
    for tok in body["tokens"]:
        grid = np.asarray(tok["attention"])
        assert grid.shape == (H, W)
        assert grid.sum() == pytest.approx(1.0, abs=1e-4)
        assert tok["logprob"] <= 0
    assert body["image"] == {"width": 96, "height": 72}
    assert body["model"] == {"name": "tiny-test", "version": "0.0"}
    assert body["parameters"] == {
        "beam_size": 3,
        "max_length": 12,
        "n_best": 1,
        "attention": "grid",
        "guidance": "concepts",
    }
    assert body["alternatives"] == []
    t = body["timing_ms"]
    assert set(t) == {"queue", "preprocess", "inference", "postprocess", "total"}
    assert all(v >= 0 for v in t.values()) and t["total"] >= t["inference"]


def test_same_caption_as_the_library(client, model):
    data = jpeg(2)
    expected = model.caption(data, beam_size=3)
    body = client.post("/v1/captions", data=multipart(data)).get_json()
    assert body["caption"] == expected.text
    assert body["score"] == pytest.approx(expected.score, abs=1e-3)
    words = [t["word"] for t in body["tokens"]]
    assert " ".join(words) == body["caption"]
    assert_scored_by_the_model(
        model, data, words, [t["logprob"] for t in body["tokens"]], body["score"], body["parameters"]["max_length"]
    )


@pytest.mark.parametrize(
    "fmt,mode,content_type",
    [
        ("PNG", "RGB", "image/png"),
        ("PNG", "RGBA", "image/png"),
        ("PNG", "L", "image/png"),
        ("PNG", "I;16", "image/png"),
        ("GIF", "P", "image/gif"),
        ("BMP", "RGB", "image/bmp"),
        ("TIFF", "CMYK", "image/tiff"),
        ("WEBP", "RGB", "image/webp"),
        ("JPEG", "L", "image/jpeg"),
        ("TIFF", "RGB", "application/octet-stream"),
    ],
)
def test_raw_body_every_allowed_format(client, fmt, mode, content_type):
    img = make_image(3, (80, 60)).convert("L").convert(mode) if mode == "I;16" else make_image(3, (80, 60), mode)
    r = client.post("/v1/captions", data=image_bytes(img, fmt), content_type=content_type)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["image"] == {"width": 80, "height": 60}


def test_parameters_from_form_and_query(client):
    body = client.post(
        "/v1/captions?beam_size=2&n_best=2&max_length=5&guidance=none", data=multipart(jpeg(4))
    ).get_json()
    assert body["parameters"] == {"beam_size": 2, "max_length": 5, "n_best": 2, "attention": "grid", "guidance": "none"}
    assert len(body["alternatives"]) == 1 and len(body["tokens"]) <= 5
    # A form field wins over the query parameter of the same name.
    body = client.post("/v1/captions?beam_size=2", data=multipart(jpeg(4), beam_size=1)).get_json()
    assert body["parameters"]["beam_size"] == 1
    body = client.post("/v1/captions?n_best=4&beam_size=4", data=jpeg(4), content_type="image/jpeg").get_json()
    assert len(body["alternatives"]) == 3
    assert all(set(a) == {"caption", "score"} for a in body["alternatives"])


def test_attention_none_and_overlay(client, spec, model):
    body = client.post("/v1/captions?attention=none", data=multipart(jpeg(5))).get_json()
    validate(body, response_schema(spec, "/v1/captions", "post", 200), spec)
    assert all(set(t) == {"word", "logprob"} for t in body["tokens"])

    body = client.post("/v1/captions", data=multipart(jpeg(5, (300, 200)), attention="overlay")).get_json()
    validate(body, response_schema(spec, "/v1/captions", "post", 200), spec)
    for tok in body["tokens"]:
        assert set(tok) == {"word", "logprob", "attention", "overlay"}
        prefix = "data:image/png;base64,"
        assert tok["overlay"].startswith(prefix)
        png = Image.open(io.BytesIO(base64.b64decode(tok["overlay"][len(prefix) :])))
        assert png.format == "PNG" and png.size == (300, 200)


def test_exif_orientation_and_original_size(client):
    img = make_image(6, (90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = image_bytes(img, "JPEG", exif=exif.tobytes())
    body = client.post("/v1/captions", data=data, content_type="image/jpeg").get_json()
    assert body["image"] == {"width": 90, "height": 60}  # as received (header size)


# ---------------------------------------------------------------- captions: errors
@pytest.mark.parametrize(
    "query",
    [
        "beam_size=0",
        "beam_size=11",
        "beam_size=abc",
        "beam_size=3.5",
        "max_length=0",
        "max_length=61",
        "n_best=0",
        "n_best=11",
        "attention=heatmap",
        "guidance=sometimes",
    ],
)
def test_invalid_parameters(client, spec, query):
    err = check_error(client.post(f"/v1/captions?{query}", data=multipart(jpeg())), 400, "invalid_parameter", spec)
    assert query.split("=")[0] in err["message"]


def test_missing_image(client, spec):
    check_error(client.post("/v1/captions"), 400, "missing_image", spec)
    check_error(
        client.post("/v1/captions", data={"beam_size": "3"}, content_type="multipart/form-data"),
        400,
        "missing_image",
        spec,
    )
    err = check_error(
        client.post("/v1/captions", data={"image": "not a file"}, content_type="multipart/form-data"),
        400,
        "missing_image",
    )
    assert "file" in err["message"]
    check_error(client.post("/v1/captions", data=multipart(b"")), 400, "missing_image")
    check_error(client.post("/v1/captions", data=b"", content_type="image/jpeg"), 400, "missing_image")


@pytest.mark.parametrize(
    "data", [b"not an image at all", jpeg(7)[:300], b"GIF89a" + b"\x00" * 20, png_header_only(64, 64)[:40]]
)
def test_undecodable_image(client, spec, data):
    err = check_error(client.post("/v1/captions", data=multipart(data)), 400, "undecodable", spec)
    assert "object at 0x" not in err["message"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(json={"image": "x"}),
        dict(data="hello", content_type="text/plain"),
        dict(data={"image": "abc"}, content_type="application/x-www-form-urlencoded"),
        dict(data=multipart(b"hello", "a.txt", "text/plain")),
    ],
)
def test_unsupported_media_type(client, spec, kwargs):
    check_error(client.post("/v1/captions", **kwargs), 415, "unsupported_media_type", spec)


class CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.bytes_read = 0

    def read(self, size=-1):
        chunk = super().read(size)
        self.bytes_read += len(chunk)
        return chunk

    def readline(self, size=-1):  # pragma: no cover - multipart parsing reads in chunks
        chunk = super().readline(size)
        self.bytes_read += len(chunk)
        return chunk


def test_upload_above_the_limit_is_refused_unread(tiny_checkpoint, model, spec):
    app = make_app(tiny_checkpoint, model, CAPTIONER_MAX_UPLOAD_MB=0.05)  # 51,200 bytes
    try:
        client = app.test_client()
        big = image_bytes(
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)), "PNG"
        )
        assert len(big) > 60_000
        stream = CountingStream(big)
        r = client.post(
            "/v1/captions", input_stream=stream, content_type="image/png", headers={"Content-Length": str(len(big))}
        )
        err = check_error(r, 413, "payload_too_large", spec)
        assert "0.05 MiB" in err["message"]
        assert stream.bytes_read == 0, "the body must be refused before it is read"
        check_error(client.post("/v1/captions", data=multipart(big, "big.png", "image/png")), 413, "payload_too_large")
        # A chunked body (no Content-Length; the server terminates the stream) is cut at the limit: refused too.
        r = client.post(
            "/v1/captions",
            input_stream=io.BytesIO(big),
            content_type="image/png",
            environ_overrides={"wsgi.input_terminated": True},
        )
        check_error(r, 413, "payload_too_large")
        small = jpeg(1)
        r = client.post(
            "/v1/captions",
            input_stream=io.BytesIO(small),
            content_type="image/jpeg",
            environ_overrides={"wsgi.input_terminated": True},
        )
        assert r.status_code == 200, r.get_data(as_text=True)
        assert client.post("/v1/captions", data=multipart(jpeg(1))).status_code == 200  # small ones still pass
    finally:
        close(app)


def test_image_above_the_pixel_limit(client, spec, tiny_checkpoint, model):
    # A decompression bomb: tiny file, enormous header size; refused from the header alone.
    err = check_error(
        client.post("/v1/captions", data=png_header_only(100_000, 100_000), content_type="image/png"),
        413,
        "too_large",
        spec,
    )
    assert "pixels" in err["message"]
    app = make_app(tiny_checkpoint, model, CAPTIONER_MAX_PIXELS=5_000)
    try:
        check_error(app.test_client().post("/v1/captions", data=multipart(jpeg(1, (100, 100)))), 413, "too_large")
        assert app.test_client().post("/v1/captions", data=multipart(jpeg(1, (60, 60)))).status_code == 200
    finally:
        close(app)


def test_uploads_never_touch_the_disk(client, monkeypatch):
    import tempfile

    import werkzeug.formparser

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for module in (tempfile, werkzeug.formparser):
        for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)
    noise = np.random.default_rng(1).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    big = image_bytes(Image.fromarray(noise), "PNG")
    assert len(big) > 600_000  # above Werkzeug's 500 kB in-memory threshold
    r = client.post("/v1/captions", data=multipart(big, "noise.png", "image/png"))
    assert r.status_code == 200, r.get_data(as_text=True)


def test_not_found_and_method_not_allowed_are_json(client, spec):
    check_error(client.get("/nope"), 404, "not_found", spec)
    check_error(client.post("/v2/captions", data=multipart(jpeg())), 404, "not_found", spec)
    r = client.get("/v1/captions")
    check_error(r, 405, "method_not_allowed", spec)
    assert "POST" in r.headers["Allow"]
    check_error(client.delete("/healthz"), 405, "method_not_allowed")


# ---------------------------------------------------------------- overload, timeouts, failures
def test_queue_full_answers_503_with_retry_after(tiny_checkpoint, model, spec):
    gated = GatedCaptioner(model)
    app = make_app(tiny_checkpoint, gated, CAPTIONER_QUEUE_SIZE=1, CAPTIONER_MAX_BATCH=1, CAPTIONER_WARMUP=False)
    state = app.extensions[EXTENSION_KEY]
    results: dict[str, int] = {}

    def post(name):
        results[name] = app.test_client().post("/v1/captions", data=multipart(jpeg(1))).status_code

    try:
        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert gated.entered.wait(10)  # the batcher is busy with the first request
        second = threading.Thread(target=post, args=("second",))
        second.start()
        deadline = time.time() + 10
        while state.batcher.depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        assert state.batcher.depth == 1  # the second one waits in the queue
        r = app.test_client().post("/v1/captions", data=multipart(jpeg(1)))
        check_error(r, 503, "overloaded", spec)
        assert int(r.headers["Retry-After"]) >= 1
        client = app.test_client()
        assert [s.value for s in metric_samples(client, "captioner_queue_depth")] == [1.0]
        rejected = {s.labels["reason"]: s.value for s in metric_samples(client, "captioner_rejected_requests_total")}
        assert rejected.get("overloaded") == 1.0
    finally:
        gated.gate.set()
        first.join(30)
        second.join(30)
        close(app)
    assert results == {"first": 200, "second": 200}


def test_request_timeout_answers_504_and_the_worker_survives(tiny_checkpoint, model, spec):
    gated = GatedCaptioner(model)
    # 3 s: long enough for the tiny model on a busy machine, so the request after the gate opens must succeed
    app = make_app(tiny_checkpoint, gated, CAPTIONER_REQUEST_TIMEOUT_S=3, CAPTIONER_WARMUP=False)
    try:
        client = app.test_client()
        started = time.perf_counter()
        r = client.post("/v1/captions", data=multipart(jpeg(1)))
        assert 3 <= time.perf_counter() - started < 10
        check_error(r, 504, "timeout", spec)
        assert "Retry-After" in r.headers
        gated.gate.set()
        # The same process keeps serving.
        ok = app.test_client().post("/v1/captions", data=multipart(jpeg(1)))
        assert ok.status_code == 200, ok.get_data(as_text=True)
        assert client.get("/healthz").status_code == 200
    finally:
        gated.gate.set()
        close(app)


def test_model_failure_is_a_json_500_and_the_next_request_works(tiny_checkpoint, model, spec):
    gated = GatedCaptioner(model, open_gate=True)
    app = make_app(tiny_checkpoint, gated, CAPTIONER_WARMUP=False)
    try:
        client = app.test_client()
        gated.fail_next = RuntimeError("CUDA out of memory (simulated)")
        err = check_error(client.post("/v1/captions", data=multipart(jpeg(1))), 500, "internal", spec)
        assert "CUDA" not in err["message"]  # internals are logged, not leaked
        assert client.post("/v1/captions", data=multipart(jpeg(1))).status_code == 200
        assert client.get("/readyz").status_code == 200
    finally:
        close(app)


# ---------------------------------------------------------------- readiness
def test_closed_app_is_not_ready(tiny_checkpoint, model, spec):
    app = make_app(tiny_checkpoint, model, CAPTIONER_WARMUP=False)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    close(app)  # what gunicorn's worker_exit hook does
    r = client.get("/readyz")
    assert r.status_code == 503 and r.get_json()["status"] == "stopped"
    validate(r.get_json(), response_schema(spec, "/readyz", "get", 503), spec)
    check_error(client.post("/v1/captions", data=multipart(jpeg(1))), 503, "unavailable", spec)
    assert client.get("/healthz").status_code == 200


def test_healthz_and_readyz(client, spec):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    validate(r.get_json(), response_schema(spec, "/readyz", "get", 200), spec)
    fast = ["fold_bn", "channels_last", "encode_chunk2", "int8_decoder"]
    assert r.get_json() == {
        "status": "ready",
        "model": {"name": "tiny-test", "version": "0.0", "optimizations": fast, "runtime": "torch"},
    }


@pytest.mark.parametrize("fast", ["1", "0"])
def test_service_loads_the_cpu_fast_path_unless_turned_off(tiny_checkpoint, fast):
    app = make_app(tiny_checkpoint, CAPTIONER_FAST=fast, CAPTIONER_WARMUP=False)
    try:
        client = app.test_client()
        applied = client.get("/readyz").get_json()["model"]["optimizations"]
        assert applied == (["fold_bn", "channels_last", "encode_chunk2", "int8_decoder"] if fast == "1" else [])
        r = client.post("/v1/captions", data=multipart(jpeg(1)))
        assert r.status_code == 200 and r.get_json()["caption"]
    finally:
        close(app)


def test_readyz_503_while_loading_then_200(tiny_checkpoint, model, spec):
    gated = GatedCaptioner(model)
    app = make_app(tiny_checkpoint, gated, CAPTIONER_LOAD_IN_BACKGROUND=True)
    try:
        client = app.test_client()
        assert gated.entered.wait(10)  # warm-up inference is running (blocked)
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["Retry-After"]
        validate(r.get_json(), response_schema(spec, "/readyz", "get", 503), spec)
        assert r.get_json()["status"] == "loading"
        assert client.get("/healthz").status_code == 200
        check_error(client.post("/v1/captions", data=multipart(jpeg(1))), 503, "not_ready", spec)
        gated.gate.set()
        assert app.extensions[EXTENSION_KEY].wait_ready(30)
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/captions", data=multipart(jpeg(1))).status_code == 200
    finally:
        gated.gate.set()
        close(app)


def test_readyz_503_when_the_model_cannot_load(tmp_path, spec):
    app = create_app({"CAPTIONER_MODEL": str(tmp_path / "missing"), "CAPTIONER_LOAD_IN_BACKGROUND": True})
    state = app.extensions[EXTENSION_KEY]
    assert not state.wait_ready(30)
    client = app.test_client()
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.get_json()
    validate(body, response_schema(spec, "/readyz", "get", 503), spec)
    assert body["status"] == "failed" and "not a checkpoint" in body["error"]["message"]
    assert client.get("/healthz").status_code == 200
    check_error(client.post("/v1/captions", data=multipart(jpeg(1))), 503, "not_ready")
    with pytest.raises(Exception, match="not a checkpoint"):  # loading in create_app fails loudly
        create_app({"CAPTIONER_MODEL": str(tmp_path / "missing"), "CAPTIONER_LOAD_IN_BACKGROUND": False})


def test_model_path_from_environment(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CAPTIONER_MODEL", str(tiny_checkpoint))
    monkeypatch.setenv("CAPTIONER_LOAD_IN_BACKGROUND", "0")
    monkeypatch.setenv("CAPTIONER_BEAM_SIZE", "2")
    app = create_app()
    try:
        client = app.test_client()
        assert client.get("/readyz").get_json()["model"]["name"] == "tiny-test"
        assert client.post("/v1/captions", data=multipart(jpeg(1))).get_json()["parameters"]["beam_size"] == 2
    finally:
        close(app)


# ---------------------------------------------------------------- batching
def post_queued(app, gated: GatedCaptioner, n, params=lambda i: {}):
    """One request holds the model (the gate is shut) while ``n`` more queue up; then the gate opens.

    The batcher then takes the ``n`` queued requests as one batch. Returns their responses.
    """
    state = app.extensions[EXTENSION_KEY]
    blocker = threading.Thread(target=lambda: app.test_client().post("/v1/captions", data=multipart(jpeg(9))))
    blocker.start()
    try:
        assert gated.entered.wait(30)  # the first batch (the blocker alone) is in the model
        out: list = [None] * n

        def worker(i):
            out[i] = app.test_client().post("/v1/captions", data=multipart(jpeg(i), **params(i)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while state.batcher.depth < n and time.time() < deadline:
            time.sleep(0.01)
        assert state.batcher.depth == n
    finally:
        gated.gate.set()
    for t in [blocker, *threads]:
        t.join(60)
    return out


def test_concurrent_requests_are_batched(tiny_checkpoint, model):
    gated = GatedCaptioner(model)
    app = make_app(tiny_checkpoint, gated, CAPTIONER_BATCH_WAIT_MS=300, CAPTIONER_MAX_BATCH=8, CAPTIONER_WARMUP=False)
    try:
        responses = post_queued(app, gated, 6)
        assert all(r.status_code == 200 for r in responses), [r.get_data(as_text=True) for r in responses]
        assert [r.get_json()["batch_size"] for r in responses] == [6] * 6
        client = app.test_client()
        count = next(s.value for s in metric_samples(client, "captioner_batch_size_count"))
        total = next(s.value for s in metric_samples(client, "captioner_batch_size_sum"))
        ones = next(s.value for s in metric_samples(client, "captioner_batch_size_bucket") if s.labels["le"] == "1.0")
        assert (count, total, ones) == (2, 7, 1)  # the blocker alone, then the six together
        # Each request still got the caption of its own image, scored on that image.
        for i, r in enumerate(responses):
            body = r.get_json()
            assert body["caption"] == model.caption(jpeg(i), beam_size=3).text
            assert_scored_by_the_model(
                model,
                jpeg(i),
                [t["word"] for t in body["tokens"]],
                [t["logprob"] for t in body["tokens"]],
                body["score"],
                body["parameters"]["max_length"],
            )
    finally:
        close(app)


def test_batches_are_grouped_by_decoding_settings(tiny_checkpoint, model):
    gated = GatedCaptioner(model)
    app = make_app(tiny_checkpoint, gated, CAPTIONER_BATCH_WAIT_MS=300, CAPTIONER_MAX_BATCH=8, CAPTIONER_WARMUP=False)
    try:
        responses = post_queued(app, gated, 4, lambda i: {"beam_size": 1 + i % 2, "n_best": 1 + i % 2})
        for i, r in enumerate(responses):
            assert r.status_code == 200
            body = r.get_json()
            assert body["parameters"]["beam_size"] == 1 + i % 2 and body["batch_size"] == 4
            assert len(body["alternatives"]) == i % 2
            expected = model.caption(jpeg(i), beam_size=1 + i % 2, n_best=1 + i % 2)
            assert body["caption"] == expected.text
            assert_scored_by_the_model(
                model,
                jpeg(i),
                [t["word"] for t in body["tokens"]],
                [t["logprob"] for t in body["tokens"]],
                body["score"],
                body["parameters"]["max_length"],
            )
        groups = metric_samples(app.test_client(), "captioner_batch_groups_sum")[0].value
        batches = metric_samples(app.test_client(), "captioner_batch_groups_count")[0].value
        assert (batches, groups) == (2, 3)  # the blocker's one group, then one batch holding both settings
    finally:
        close(app)


class FakeCaptioner:
    """Records calls; 'annotations' are just the first pixel of each image."""

    def __init__(self) -> None:
        self.encode_shapes: list[tuple] = []
        self.decode_calls: list[tuple] = []

    def see(self, images, threads=None):
        self.encode_shapes.append(tuple(images.shape))
        return images[:, :1, 0, 0].reshape(len(images), 1, 1), None  # no concepts

    def decode(self, annotations, beam_size, max_length, n_best, concepts=None, guidance=None):
        self.decode_calls.append((len(annotations), beam_size, max_length, n_best))
        return [f"img{int(a.item())}/b{beam_size}" for a in annotations]


def test_micro_batcher_one_encode_one_decode_per_group():
    fake = FakeCaptioner()
    sizes: list[int] = []
    batcher = MicroBatcher(
        fake, max_batch=16, wait_ms=200, queue_size=16, on_batch=lambda n, g, s: sizes.append(n)
    ).start()
    try:
        a, b = DecodeSettings(3, 20, 1), DecodeSettings(1, 20, 1)
        futures = [batcher.submit(torch.full((3, 4, 4), float(i)), a if i % 3 else b) for i in range(7)]
        results = [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert fake.encode_shapes == [(7, 3, 4, 4)]  # one encoder pass for the whole batch
    assert sorted(fake.decode_calls) == [(3, 1, 20, 1), (4, 3, 20, 1)]  # one decode per settings group
    assert sizes == [7]
    for i, r in enumerate(results):
        assert r.caption == f"img{i}/b{3 if i % 3 else 1}"
        assert r.batch_size == 7 and r.group_size == (4 if i % 3 else 3)


def test_batcher_encodes_the_next_batch_on_one_thread_while_one_decodes():
    """The two stages overlap: while a batch decodes, the next is encoded (on one thread) instead of waiting;
    a batch that finds the decoder idle is encoded on every thread. Each request still gets its own caption."""
    fake = FakeCaptioner()
    seen: list[int | None] = []  # each encoder pass's threads
    real_see = fake.see

    def see(images, threads=None):
        seen.append(threads)
        return real_see(images)

    fake.see = see
    decoding, release = threading.Event(), threading.Event()
    real_decode = fake.decode

    def slow_decode(annotations, **kwargs):
        decoding.set()
        assert release.wait(10)
        return real_decode(annotations, **kwargs)

    fake.decode = slow_decode
    batcher = MicroBatcher(fake, max_batch=4, wait_ms=0, queue_size=8).start()
    s = DecodeSettings(1, 5)
    try:
        first = batcher.submit(torch.zeros(3, 4, 4), s)
        assert decoding.wait(10)  # the first batch is in the decoder ...
        second = batcher.submit(torch.ones(3, 4, 4), s)
        deadline = time.time() + 5
        while len(fake.encode_shapes) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert fake.encode_shapes == [(1, 3, 4, 4), (1, 3, 4, 4)]  # ... and the second was encoded meanwhile
        assert not first.done() and not second.done()
        release.set()
        assert first.result(10).caption == "img0/b1" and second.result(10).caption == "img1/b1"
    finally:
        release.set()
        batcher.close()
    assert seen == [None, 1]  # alone: every thread; beside a decode: one


def test_adaptive_wait_starts_a_lone_request_at_once_and_waits_for_incoming_ones():
    fake = FakeCaptioner()
    batcher = MicroBatcher(fake, max_batch=8, wait_ms=2000, queue_size=8, adaptive_wait=True).start()
    s = DecodeSettings(1, 5)
    try:
        started = time.perf_counter()
        batcher.run(torch.zeros(3, 4, 4), s, timeout=10)
        assert time.perf_counter() - started < 1.0  # nobody else on the way: no 2 s wait
        with batcher.incoming():  # a second request is still being prepared ...
            first = batcher.submit(torch.zeros(3, 4, 4), s)
            time.sleep(0.3)
            assert not first.done()  # ... so the batch is held open for it
            second = batcher.submit(torch.ones(3, 4, 4), s)
        assert first.result(10).batch_size == second.result(10).batch_size == 2
    finally:
        batcher.close()
    assert fake.encode_shapes == [(1, 3, 4, 4), (2, 3, 4, 4)]


def test_micro_batcher_max_batch_queue_limit_timeout_and_shutdown():
    fake = FakeCaptioner()
    gate = threading.Event()
    real_see = fake.see
    fake.see = lambda x, threads=None: (gate.wait(10), real_see(x))[1]
    batcher = MicroBatcher(fake, max_batch=2, wait_ms=0, queue_size=3)
    with pytest.raises(BatcherClosed):
        batcher.submit(torch.zeros(3, 4, 4), DecodeSettings(1, 5))  # not started yet
    batcher.start()
    s = DecodeSettings(1, 5)
    first = batcher.submit(torch.zeros(3, 4, 4), s)
    deadline = time.time() + 5
    while batcher.depth and time.time() < deadline:  # the batcher took it and is blocked in encode
        time.sleep(0.01)
    with pytest.raises(BatchTimeout):
        batcher.run(torch.full((3, 4, 4), 9.0), s, timeout=0.05)  # cancelled: must never be decoded
    queued = [batcher.submit(torch.full((3, 4, 4), float(i)), s) for i in (1, 2)]
    assert batcher.depth == 3
    with pytest.raises(QueueFull):
        batcher.submit(torch.ones(3, 4, 4), s)
    assert batcher.retry_after() >= 1
    gate.set()
    assert first.result(10).caption == "img0/b1"
    assert [f.result(10).caption for f in queued] == ["img1/b1", "img2/b1"]
    assert fake.encode_shapes == [(1, 3, 4, 4), (2, 3, 4, 4)]  # never more than max_batch; the cancelled one skipped
    batcher.close()
    assert not batcher.running
    with pytest.raises(BatcherClosed):
        batcher.submit(torch.zeros(3, 4, 4), s)


# ---------------------------------------------------------------- metrics
def test_metrics(client):
    client.post("/v1/captions", data=multipart(jpeg(1)))
    client.get("/nope")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    families = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    assert {
        "captioner_http_requests",
        "captioner_http_request_duration_seconds",
        "captioner_batch_size",
        "captioner_queue_depth",
        "captioner_model_ready",
        "captioner_model_info",
    } <= set(families)
    counts = {
        (s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value
        for s in families["captioner_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert counts[("/v1/captions", "POST", "200")] >= 1
    assert counts[("unmatched", "GET", "404")] >= 1
    assert any(
        s.labels.get("endpoint") == "/v1/captions" for s in families["captioner_http_request_duration_seconds"].samples
    )
    assert [s.value for s in families["captioner_model_ready"].samples] == [1.0]
    assert [s.value for s in families["captioner_queue_depth"].samples] == [0.0]


# ---------------------------------------------------------------- OpenAPI, docs, pages
def test_openapi_documents_every_route(app, spec):
    assert spec["openapi"].startswith("3.")
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        routes[rule.rule] = {m.lower() for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {path: set(ops) for path, ops in spec["paths"].items()}
    assert documented == routes
    # Every $ref resolves.
    text = str(spec)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in spec["components"]["schemas"]
    caption_op = spec["paths"]["/v1/captions"]["post"]
    assert {p["name"] for p in caption_op["parameters"]} == {
        "beam_size",
        "max_length",
        "n_best",
        "attention",
        "guidance",
    }
    assert {"200", "400", "413", "415", "500", "503", "504"} <= set(caption_op["responses"])
    assert set(caption_op["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/octet-stream"}


def test_docs_page(client, spec):
    r = client.get("/docs")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    for path in spec["paths"]:
        assert f"<code>{path}</code>" in html
    for name in spec["components"]["schemas"]:
        assert f'id="schema-{name}"' in html


def test_index_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.get_data(as_text=True)
    assert 'id="file-input"' in html and 'id="heatmap"' in html
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert client.get(asset).status_code == 200, asset


def test_pages_use_no_external_resources():
    folder = REPO / "service"
    for path in list((folder / "templates").iterdir()) + list((folder / "static").iterdir()):
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", text), path
        assert 'fetch("http' not in text and "fetch('http" not in text, path


# ---------------------------------------------------------------- configuration
def test_settings_from_env_and_config(tiny_checkpoint):
    s = load_settings(
        {"CAPTIONER_MAX_BATCH": 4},
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_MAX_BATCH": "9",
            "CAPTIONER_MAX_UPLOAD_MB": "2",
            "CAPTIONER_LOAD_IN_BACKGROUND": "false",
        },
    )
    assert s.max_batch == 4 and s.model_path == tiny_checkpoint and s.max_upload_bytes == 2 * 2**20
    assert s.load_in_background is False
    defaults = load_settings({}, {})
    assert (
        defaults.max_upload_mb == 20
        and defaults.default_beam_size == 3
        and defaults.model_path.name == "flickr8k-lite2"
    )
    for bad in (
        {"CAPTIONER_MAX_BATCH": "x"},
        {"CAPTIONER_QUEUE_SIZE": "0"},
        {"CAPTIONER_BEAM_SIZE": "11"},
        {"CAPTIONER_WARMUP": "maybe"},
        {"CAPTIONER_MAX_UPLOAD_MB": "-1"},
    ):
        with pytest.raises(ConfigError):
            load_settings({}, bad)


def test_docs_cover_every_setting_and_metric(app):
    from service.config import ENV_VARS, GUNICORN_ENV_VARS

    doc = (REPO / "docs" / "service.md").read_text()
    for name in list(ENV_VARS) + list(GUNICORN_ENV_VARS):
        assert f"| `{name}` |" in doc, f"{name} missing from the docs/service.md table"
    registry = app.extensions[EXTENSION_KEY].metrics.registry
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in doc, f"metric {name} is not documented"
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            assert f"`{rule.rule}`" in doc, rule.rule


def load_gunicorn_conf(monkeypatch, **env):
    import runpy

    for key in ("HOST", "PORT", "CAPTIONER_WORKERS", "CAPTIONER_THREADS", "CAPTIONER_WORKER_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return runpy.run_path(str(REPO / "service" / "gunicorn_conf.py"))


def test_gunicorn_conf(monkeypatch):
    conf = load_gunicorn_conf(monkeypatch)
    assert conf["bind"] == ["127.0.0.1:8000"] and conf["worker_class"] == "gthread"
    assert conf["workers"] == 1 and conf["threads"] == 32 and conf["preload_app"] is False
    assert conf["control_socket_disable"] is True
    assert conf["accesslog"] == "-" and conf["errorlog"] == "-"
    assert conf["timeout"] > 0 and conf["graceful_timeout"] > 0
    conf = load_gunicorn_conf(
        monkeypatch,
        HOST="::",
        PORT="9001",
        CAPTIONER_WORKERS="2",
        CAPTIONER_THREADS="16",
        CAPTIONER_WORKER_TIMEOUT="300",
    )
    assert conf["bind"] == ["[::]:9001"] and conf["workers"] == 2 and conf["threads"] == 16 and conf["timeout"] == 300
    with pytest.raises(SystemExit):
        load_gunicorn_conf(monkeypatch, CAPTIONER_WORKERS="zero")
