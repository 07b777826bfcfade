"""Request ids and structured logs (service/logs.py): the id rules, the echo in headers and error bodies,
one JSON access line per request under the real server, and CAPTIONER_LOG_FORMAT=text."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import urllib.error
import urllib.request

import pytest
from gunicorn.config import Config

from service import logs
from service.app import create_app
from service.config import ConfigError, load_settings

from conftest import gunicorn_server, image_bytes, make_image

HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("given", ["abc", "3f2a-11:req.7_x", "Zm9vYmFy+/==", "x" * 128])
def test_a_sane_request_id_is_kept(given):
    assert logs.request_id({"HTTP_X_REQUEST_ID": given}) == given


@pytest.mark.parametrize("given", ["", "x" * 129, "two words", 'quote"d', "line\nbreak", "é", "a;b", "<script>"])
def test_an_insane_request_id_is_replaced(given):
    environ = {"HTTP_X_REQUEST_ID": given}
    rid = logs.request_id(environ)
    assert HEX_ID.fullmatch(rid) and logs.request_id(environ) == rid  # assigned once per request
    assert logs.request_id({}) != rid


@pytest.fixture(scope="module")
def client(tiny_checkpoint):
    app = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_LOAD_IN_BACKGROUND": "0",
            "CAPTIONER_WARMUP": "0",
            "CAPTIONER_FAST": "0",
            "TESTING": True,
        }
    )
    return app.test_client()


def test_request_id_is_echoed_in_headers_and_error_bodies(client):
    r = client.get("/healthz", headers={"X-Request-ID": "client-id-1"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "client-id-1"
    r = client.get("/nope", headers={"X-Request-ID": "client-id-2"})
    assert r.status_code == 404 and r.headers["X-Request-ID"] == "client-id-2"
    assert r.get_json()["error"] == {
        "code": "not_found",
        "message": r.get_json()["error"]["message"],
        "request_id": "client-id-2",
    }
    r = client.post(
        "/v1/captions", data=b"not an image", content_type="image/jpeg", headers={"X-Request-ID": "bad id\twith tab"}
    )
    rid = r.headers["X-Request-ID"]
    assert r.status_code == 400 and HEX_ID.fullmatch(rid) and r.get_json()["error"]["request_id"] == rid
    r1, r2 = client.get("/healthz"), client.get("/healthz")
    assert HEX_ID.fullmatch(r1.headers["X-Request-ID"]) and r1.headers["X-Request-ID"] != r2.headers["X-Request-ID"]


def test_json_formatter_writes_one_line_with_the_request_id(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test_logs.formatter")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with client.application.test_request_context("/v1/captions", headers={"X-Request-ID": "ctx-7"}):
            logger.warning("slow %s", "decode")
            try:
                raise RuntimeError("boom\nsecond line")
            except RuntimeError:
                logger.exception("failed")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines  # newlines inside messages and tracebacks are escaped
    first, second, third = (json.loads(line) for line in lines)
    assert first["level"] == "warning" and first["message"] == "slow decode" and first["request_id"] == "ctx-7"
    assert first["logger"] == "test_logs.formatter" and re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", first["time"])
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]
    assert "request_id" not in third


def test_the_log_format_setting(monkeypatch):
    assert load_settings({}, {}).log_format == "json"
    assert load_settings({"CAPTIONER_LOG_FORMAT": " TEXT "}, {}).log_format == "text"
    for bad in ("xml", ""):
        with pytest.raises(ConfigError, match="CAPTIONER_LOG_FORMAT"):
            load_settings({"CAPTIONER_LOG_FORMAT": bad}, {})
    monkeypatch.setenv("CAPTIONER_LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit, match="CAPTIONER_LOG_FORMAT"):  # gunicorn refuses to start
        logs.GunicornLogger(Config())


def test_access_line_levels_and_fields(monkeypatch):
    from datetime import timedelta
    from types import SimpleNamespace

    monkeypatch.delenv("CAPTIONER_LOG_FORMAT", raising=False)
    cfg = Config()
    cfg.set("accesslog", "-")
    logger = logs.GunicornLogger(cfg)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    saved = logger.access_log.handlers[:]
    logger.access_log.handlers = [handler]
    try:
        for status in (200, 404, 503, 500):
            environ = {
                "REQUEST_METHOD": "POST",
                "PATH_INFO": "/v1/captions",
                "REMOTE_ADDR": "10.0.0.1",
                "HTTP_X_REQUEST_ID": f"r{status}",
            }
            if status == 200:
                logs.annotate(environ, model="m", model_version="1", batch_size=4)
            resp = SimpleNamespace(status=f"{status} X", status_code=status, sent=12, headers=[])
            logger.access(resp, SimpleNamespace(headers=[]), environ, timedelta(milliseconds=250))
    finally:
        logger.access_log.handlers = saved
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["status"], r["level"]) for r in lines] == [
        (200, "info"),
        (404, "info"),
        (503, "warning"),
        (500, "error"),
    ]
    assert list(lines[0])[4:] == list(logs.ACCESS_FIELDS)
    assert lines[0] | {"time": None} == {
        "time": None,
        "level": "info",
        "logger": "gunicorn.access",
        "message": "POST /v1/captions 200",
        "request_id": "r200",
        "method": "POST",
        "path": "/v1/captions",
        "status": 200,
        "duration_ms": 250.0,
        "model": "m",
        "model_version": "1",
        "batch_size": 4,
        "remote_addr": "10.0.0.1",
        "bytes": 12,
    }
    assert lines[1]["model"] is None and lines[1]["batch_size"] is None


def _get(url: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.mark.slow
def test_gunicorn_writes_one_json_access_line_per_request(tmp_path, tiny_checkpoint):
    env = {"CAPTIONER_MODEL": str(tiny_checkpoint), "CAPTIONER_TORCH_THREADS": "1"}
    with gunicorn_server(tmp_path, env) as (base, _, log_path):
        photo = image_bytes(make_image(3))
        status, headers, body = _get(
            f"{base}/v1/captions?attention=none", {"Content-Type": "image/jpeg", "X-Request-ID": "req-caption-1"}, photo
        )
        assert status == 200 and headers["X-Request-ID"] == "req-caption-1"
        batch_size = json.loads(body)["batch_size"]
        status, headers, body = _get(f"{base}/missing", {"X-Request-ID": "x" * 200})
        generated = headers["X-Request-ID"]
        assert status == 404 and HEX_ID.fullmatch(generated) and json.loads(body)["error"]["request_id"] == generated
        _get(f"{base}/healthz", {})
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON: gunicorn's, the service's, the access log
    access = [r for r in records if r["logger"] == "gunicorn.access"]
    caption = [r for r in access if r["request_id"] == "req-caption-1"]
    assert len(caption) == 1, access
    line = caption[0]
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert {k: line[k] for k in ("level", "method", "path", "status", "model", "model_version", "batch_size")} == {
        "level": "info",
        "method": "POST",
        "path": "/v1/captions",
        "status": 200,
        "model": "tiny-test",
        "model_version": "0.0",
        "batch_size": batch_size,
    }
    assert line["duration_ms"] > 0 and line["bytes"] > 0 and line["remote_addr"] == "127.0.0.1"
    missing = [r for r in access if r["request_id"] == generated]
    assert len(missing) == 1 and missing[0]["status"] == 404 and missing[0]["batch_size"] is None
    assert any(r["logger"] == "service" and "loaded tiny-test" in r["message"] for r in records)
    assert len([r for r in access if r["path"] == "/v1/captions"]) == 1


@pytest.mark.slow
def test_text_log_format_for_a_terminal(tmp_path, tiny_checkpoint):
    env = {"CAPTIONER_MODEL": str(tiny_checkpoint), "CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_LOG_FORMAT": "text"}
    with gunicorn_server(tmp_path, env) as (base, _, log_path):
        assert _get(f"{base}/healthz", {"X-Request-ID": "plain-1"})[0] == 200
    text = log_path.read_text()
    assert re.search(r'"GET /healthz HTTP/1\.1" 200 \d+ \d+us ".*" request_id=plain-1$', text, re.M), text[-2000:]
    assert not any(line.startswith("{") for line in text.splitlines())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
