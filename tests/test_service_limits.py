"""Service limits and exposure: decode slots under load, settings from the cgroup, headers, metric
labels, error texts, gunicorn and compose settings, CSV resume, and docs/reliability.md's limits table."""

from __future__ import annotations

import csv
import json
import re
import runpy
import threading
from pathlib import Path

import pytest

from captioner.api import MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, Captioner
from captioner.commands.main import main
from service.app import API_CSP, EXTENSION_KEY, PAGE_CSP, create_app
from service.config import ENV_VARS, GUNICORN_ENV_VARS, available_cpus, load_settings

from conftest import image_bytes, make_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path):
    model = Captioner.load(tiny_checkpoint, device="cpu")
    application = create_app(
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "CAPTIONER_INSTANCE": model,
            "TESTING": True,
            "CAPTIONER_LOAD_IN_BACKGROUND": False,
            "CAPTIONER_BATCH_WAIT_MS": 0,
            "CAPTIONER_DECODE_SLOTS": 1,
            "CAPTIONER_REQUEST_TIMEOUT_S": 1,
        }
    )
    yield application
    application.extensions[EXTENSION_KEY].close()


def test_security_headers_on_pages_and_api(app) -> None:
    client = app.test_client()
    for path, csp in [
        ("/", PAGE_CSP),
        ("/docs", PAGE_CSP),
        ("/readyz", API_CSP),
        ("/openapi.json", API_CSP),
        ("/nope", API_CSP),
    ]:
        r = client.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["Referrer-Policy"] == "no-referrer", path
        assert r.headers["Content-Security-Policy"] == csp, path
        assert "frame-ancestors 'none'" in csp
    page = client.get("/").get_data(as_text=True) + client.get("/docs").get_data(as_text=True)
    # the pages' CSP runs no inline script: every <script> has a src or is JSON data
    for tag in re.findall(r"<script[^>]*>", page):
        assert "src=" in tag or 'type="application/json"' in tag, tag
    assert " style=" not in page and "<style" not in page


def test_metric_method_labels_are_a_fixed_set(app) -> None:
    client = app.test_client()
    for i in range(30):
        client.open("/healthz", method=f"INVENTED{i}")
    client.head("/healthz")
    metrics = client.get("/metrics").get_data(as_text=True)
    methods = set(re.findall(r'captioner_http_requests_total\{[^}]*method="([^"]*)"', metrics))
    assert methods <= {"GET", "POST", "HEAD", "other"} and "other" in methods, methods


def test_readyz_and_errors_show_no_paths(tmp_path: Path) -> None:
    missing = tmp_path / "secret-dir" / "model"
    application = create_app(
        {"CAPTIONER_MODEL": str(missing), "CAPTIONER_LOAD_IN_BACKGROUND": True, "CAPTIONER_WARMUP": False}
    )
    try:
        assert not application.extensions[EXTENSION_KEY].wait_ready(60)
        body = application.test_client().get("/readyz").get_json()
        assert body["status"] == "failed" and "CheckpointError" in body["error"]["message"]
        assert str(tmp_path) not in json.dumps(body) and "secret-dir" not in json.dumps(body), body
    finally:
        application.extensions[EXTENSION_KEY].close()


def test_a_decode_that_cannot_start_in_time_gets_503(app) -> None:
    """One decode slot, busy with a slow upload: a request whose deadline (1 s) passes while it waits
    gets 503 `overloaded` + Retry-After; the slow one gets its own 4xx; the service stays ready."""
    from test_hostile_formats import many_scan_jpeg

    client, slow, results = app.test_client(), many_scan_jpeg(), {}
    t = threading.Thread(
        target=lambda: results.update(
            slow=app.test_client().post("/v1/captions?attention=overlay", data=slow, content_type="image/jpeg")
        )
    )
    t.start()
    import time

    time.sleep(0.3)
    r = client.post("/v1/captions", data=image_bytes(make_image(1)), content_type="image/jpeg")
    t.join(30)
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    assert results["slow"].status_code == 422 and results["slow"].get_json()["error"]["code"] == "too_slow"
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/captions", data=image_bytes(make_image(2)), content_type="image/jpeg").status_code == 200


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_decode_slots_follow_the_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    import os

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == (min(cores, expected) if expected else cores)
    assert load_settings({"CAPTIONER_DECODE_SLOTS": 3}, {}).decode_workers == 3


def test_gunicorn_recycles_workers_with_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAPTIONER_MAX_REQUESTS", raising=False)
    conf = runpy.run_path(str(REPO / "service" / "gunicorn_conf.py"))
    assert conf["max_requests"] == 5000 and conf["max_requests_jitter"] == 500


def test_compose_is_hardened_and_consistent() -> None:
    yaml = pytest.importorskip("yaml")
    svc = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("captioner", "caption"):
        assert svc[name]["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc[name]["security_opt"]
    env = svc["captioner"]["environment"]
    assert int(env["CAPTIONER_THREADS"]) > int(env["CAPTIONER_MAX_BATCH"]) + int(env["CAPTIONER_QUEUE_SIZE"])
    assert svc["captioner"]["ports"] == ["${CAPTIONER_PUBLISH:-127.0.0.1}:8000:8000"]
    # memory limit >= model (1.5 GB) + slots x (cap + 60 MB process) + threads x body limit
    need_mb = (
        1536
        + int(env["CAPTIONER_DECODE_SLOTS"]) * (int(env["CAPTIONER_DECODE_MEMORY_MB"]) + 60)
        + int(env["CAPTIONER_THREADS"]) * float(env["CAPTIONER_MAX_UPLOAD_MB"])
    )
    limit = svc["captioner"]["deploy"]["resources"]["limits"]["memory"]
    assert int(limit.rstrip("g")) * 1024 >= need_mb


def test_csv_resume_after_a_torn_row_with_a_newline_in_its_path(
    tiny_checkpoint: Path, tmp_path: Path, load_once: None
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    names = ["a.jpg", "b\nnewline.jpg", "c.jpg", "d\nx.jpg"]
    for i, name in enumerate(names):
        (folder / name).write_bytes(image_bytes(make_image(i)))
    out = tmp_path / "out.csv"
    argv = [
        "caption",
        *[str(folder / n) for n in names],
        "--checkpoint",
        str(tiny_checkpoint),
        "--workers",
        "0",
        "-q",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    full = list(csv.DictReader(out.open(newline="")))
    assert [Path(r["image"]).name for r in full] == names
    text = out.read_bytes()
    cut = text.index(str(folder / "d\nx.jpg").encode()) + len(str(folder / "d\n").encode())
    out.write_bytes(text[:cut])  # killed inside the quoted path, just after its newline
    assert main([*argv, "--resume"]) == 0
    assert list(csv.DictReader(out.open(newline=""))) == full


def test_limits_table_matches_the_code_row_by_row() -> None:
    """Every row of docs/reliability.md's Limits table, parsed, against the settings' defaults."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    table = doc[doc.index("| Dimension |") :]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    s = load_settings({}, {})
    expected = {  # dimension: (default text, setting)
        "Request body": (f"{s.max_upload_mb:g} MiB", "`CAPTIONER_MAX_UPLOAD_MB`"),
        "Image size": (f"{s.max_pixels:,} pixels", "`CAPTIONER_MAX_PIXELS`"),
        "Image formats": ("JPEG, PNG, GIF, WebP, BMP, TIFF", "`captioner.images.ALLOWED_FORMATS`"),
        "Beam size": (f"1–{MAX_BEAM_SIZE}", f"`CAPTIONER_BEAM_SIZE` (default {s.default_beam_size})"),
        "Caption length": (f"1–{MAX_LENGTH_LIMIT}", ""),
        "Alternatives `n_best`": (f"1–{MAX_BEAM_SIZE}", ""),
        "Waiting for the model": (f"{s.queue_size} requests per worker", "`CAPTIONER_QUEUE_SIZE`"),
        "Decodes at once": ("the CPU quota (cgroup), 1–8", "`CAPTIONER_DECODE_SLOTS`"),
        "Waiting for a decode": (f"the request's remaining {s.request_timeout_s:g} s", "`CAPTIONER_REQUEST_TIMEOUT_S`"),
        "Decode time": (f"{s.decode_timeout_s:g} s", "`CAPTIONER_DECODE_TIMEOUT_S`"),
        "Decode memory": (f"{s.decode_memory_mb} MB", "`CAPTIONER_DECODE_MEMORY_MB`"),
        "Time for a caption": (f"{s.request_timeout_s:g} s", "`CAPTIONER_REQUEST_TIMEOUT_S`"),
        "Overlay images": (f"{s.overlay_max_side} px", "`CAPTIONER_OVERLAY_MAX_SIDE`"),
    }
    for dimension, (default, setting) in expected.items():
        assert dimension in rows, f"no row {dimension!r} in the limits table"
        cells = rows[dimension]
        assert cells[1].startswith(default), (dimension, cells[1], default)
        assert cells[2] == setting, (dimension, cells[2], setting)
        name = setting.strip("`").split("`")[0]
        if name.startswith("CAPTIONER_"):
            assert name in ENV_VARS or name in GUNICORN_ENV_VARS, name
