"""The real server: the `make serve` command (gunicorn + service/gunicorn_conf.py) on a free loopback port."""

from __future__ import annotations

import http.client
import json
import select
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, gunicorn_server, image_bytes, make_image

pytestmark = pytest.mark.slow


def request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """(status, headers, body bytes) without raising for HTTP errors."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def chunked_upload(port: int, n_chunks: int, chunk: int = 65536) -> tuple[int, bytes]:
    """POST ``n_chunks`` chunks of an image/jpeg body with chunked transfer encoding on a raw socket.

    It stops sending as soon as the server answers (or stops reading), then returns the
    answer's (status, body); the server must answer even when it refuses the rest of the body.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        try:
            for i in range(n_chunks):
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer is here: stop sending
                sock.sendall(b"%x\r\n" % chunk + bytes([i % 251]) * chunk + b"\r\n")
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed its side after answering; the answer is read below
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def multipart_body(image: bytes, filename="photo.jpg", content_type="image/jpeg", **fields) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_image(base: str, image: bytes, query: str = "", **fields):
    body, ctype = multipart_body(image, **fields)
    return request(f"{base}/v1/captions{query}", body, {"Content-Type": ctype})


@contextmanager
def serve(tmp_path: Path, model: Path, **env_extra: str):
    with gunicorn_server(
        tmp_path,
        {"CAPTIONER_MODEL": str(model), "CAPTIONER_TORCH_THREADS": "1", **env_extra},
        ready_timeout=180,
        stop_timeout=60,
    ) as running:
        yield running


def metric(base: str, name: str, **labels) -> float:
    _, _, body = request(f"{base}/metrics")
    total = 0.0
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_make_serve_command_captions_over_http(tmp_path, tiny_checkpoint):
    makefile = (REPO / "Makefile").read_text()
    assert '$(BIN)/gunicorn --config service/gunicorn_conf.py "service.app:create_app()"' in makefile

    with serve(
        tmp_path, tiny_checkpoint, CAPTIONER_THREADS="8", CAPTIONER_BATCH_WAIT_MS="250", CAPTIONER_MAX_UPLOAD_MB="1"
    ) as (base, proc, log_path):
        status, _, body = request(f"{base}/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}

        # An uploaded photo, captioned over HTTP.
        status, headers, body = post_image(base, image_bytes(make_image(1, (120, 90))), "?n_best=2")
        assert status == 200, body
        assert headers["Content-Type"] == "application/json"
        result = json.loads(body)
        assert result["caption"] and result["model"]["name"] == "tiny-test"
        assert result["image"] == {"width": 120, "height": 90} and len(result["alternatives"]) == 1
        assert len(result["tokens"]) == len(result["caption"].split())
        assert abs(sum(map(sum, result["tokens"][0]["attention"])) - 1) < 1e-4

        # A raw image body.
        status, _, body = request(
            f"{base}/v1/captions?attention=none", image_bytes(make_image(2), "PNG"), {"Content-Type": "image/png"}
        )
        assert status == 200 and "attention" not in json.loads(body)["tokens"][0]

        # Errors are JSON over the wire too.
        status, _, body = request(f"{base}/v1/captions", b"{}", {"Content-Type": "application/json"})
        assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_media_type"
        status, _, body = request(f"{base}/missing")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        # A body announced above the limit is refused from its Content-Length, before it is sent.
        conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
        conn.putrequest("POST", "/v1/captions")
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(5 * 2**20))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "payload_too_large"
        conn.close()
        # So is a chunked upload (no Content-Length) that goes past the limit: the 413 arrives while it is sent.
        status, payload = chunked_upload(int(base.rsplit(":", 1)[1]), 24)  # 24 x 64 KiB = 1.5 MiB
        assert status == 413 and json.loads(payload)["error"]["code"] == "payload_too_large"

        # Concurrent requests share micro-batches inside the worker.
        before_sum = metric(base, "captioner_batch_size_sum")
        before_count = metric(base, "captioner_batch_size_count")
        barrier = threading.Barrier(6)
        statuses: list[int] = []

        def client(i: int) -> None:
            data = image_bytes(make_image(10 + i))
            barrier.wait()
            statuses.append(post_image(base, data)[0])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert statuses == [200] * 6
        images = metric(base, "captioner_batch_size_sum") - before_sum
        batches = metric(base, "captioner_batch_size_count") - before_count
        assert images == 6 and batches < 6, f"{images} images in {batches} batches: nothing was batched"
        assert metric(base, "captioner_http_requests_total", endpoint="/v1/captions", status="200") >= 8

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    log = log_path.read_text()
    assert "POST /v1/captions" in log  # access log on stdout
    assert "Booting worker" in log and "gthread" in log


def test_multiple_workers_share_metrics(tmp_path, tiny_checkpoint):
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale")  # cleared at start-up
    with serve(
        tmp_path,
        tiny_checkpoint,
        CAPTIONER_WORKERS="2",
        CAPTIONER_THREADS="2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    ) as (base, _, _):
        deadline = time.time() + 180
        while metric(base, "captioner_model_ready") < 2 and time.time() < deadline:  # both workers warm
            time.sleep(0.5)
        assert metric(base, "captioner_model_ready") == 2
        for _ in range(10):
            assert request(f"{base}/healthz")[0] == 200
        # Whichever worker answers the scrape, it reports all workers' requests.
        assert metric(base, "captioner_http_requests_total", endpoint="/healthz") == 10
        assert metric(base, "captioner_http_requests_total", endpoint="/healthz") == 10
        assert post_image(base, image_bytes(make_image(3)))[0] == 200
