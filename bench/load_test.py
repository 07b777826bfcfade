"""Bounded load test of the real service on loopback: gunicorn as `make serve` runs it, many clients, then a burst.

    .venv/bin/python bench/load_test.py                       # shipped model (or a tiny one), 16 clients x 120 s
    .venv/bin/python bench/load_test.py --clients 8 --duration 30 --checkpoint runs/demo/best

Phases:

1. **steady**: ``--clients`` keep-alive clients for ``--duration`` seconds, each sending a mix of good
   uploads (JPEG/PNG photos of several sizes, beam 1-5, n_best, attention none/grid/overlay) and bad
   ones (garbage, truncated JPEG, decompression-bomb header, wrong Content-Type, bad parameter, no image).
   Expected: every good upload 200, every bad one its documented 4xx, no 5xx, no dropped connection.
2. **burst**: ``--burst-clients`` clients (default: more than the worker's threads + queue) sending
   good uploads for ``--burst-duration`` seconds. Expected: the excess is answered at once with
   503 ``overloaded`` + ``Retry-After``; nothing else fails, nothing is dropped. Clients wait the
   ``Retry-After`` they are given before trying again (``--no-backoff``: retry at once).

It reports p50/p90/p99 latency, throughput, the status mix, the worker's RSS (``/proc``) before/after,
whether the worker survived (same pid), and ``/readyz`` at the end, as one JSON object on stdout
(progress on stderr). The server only listens on 127.0.0.1 and is stopped at the end (SIGTERM) in
every case. Exit status 0 when every expectation held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
# Exactly what `make serve` runs (HOST/PORT/CAPTIONER_MODEL come from the environment).
SERVE = [str(GUNICORN), "--config", "service/gunicorn_conf.py", "service.app:create_app()"]
HOST = "127.0.0.1"


def log(message: str) -> None:
    print(f"[load_test {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- payloads
@dataclass(frozen=True)
class Payload:
    kind: str  # "good" or "bad"
    name: str
    path: str  # request target (path + query)
    body: bytes
    headers: dict[str, str]
    expect: frozenset[int]  # statuses that count as correct


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like picture (gradients, shapes, sensor noise) so that JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, (seed * 67) % 256)], -1)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(min(w, h) // 10, min(w, h) // 3)
        mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r**2
        img[mask] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def multipart(data: bytes, filename: str, content_type: str, **fields: str) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def build_payloads() -> tuple[list[Payload], list[Payload]]:
    good: list[Payload] = []
    sizes = [(320, 240), (640, 480), (1024, 768), (500, 375), (1600, 1200)]
    queries = ["", "?beam_size=1", "?beam_size=5&n_best=3", "?attention=none", "?attention=overlay", "?max_length=12"]
    for i, size in enumerate(sizes):
        img = photo(i, size)
        jpg = encode(img, "JPEG", quality=88)
        for j, query in enumerate(queries):
            if j % 2:
                body, headers = multipart(jpg, f"photo{i}.jpg", "image/jpeg")
            else:
                body, headers = jpg, {"Content-Type": "image/jpeg"}
            good.append(
                Payload(
                    "good", f"jpeg-{size[0]}x{size[1]}{query}", f"/v1/captions{query}", body, headers, frozenset({200})
                )
            )
    png = encode(photo(9, (400, 300)), "PNG")
    good.append(Payload("good", "png-400x300", "/v1/captions", png, {"Content-Type": "image/png"}, frozenset({200})))

    jpg = encode(photo(7, (640, 480)), "JPEG")
    rnd = random.Random(0)
    bad = [
        Payload(
            "bad",
            "garbage",
            "/v1/captions",
            bytes(rnd.getrandbits(8) for _ in range(4096)),
            {"Content-Type": "image/jpeg"},
            frozenset({400}),
        ),
        Payload(
            "bad",
            "truncated-jpeg",
            "/v1/captions",
            jpg[: len(jpg) // 3],
            {"Content-Type": "image/jpeg"},
            frozenset({400}),
        ),
        Payload(
            "bad",
            "bomb-30000x30000",
            "/v1/captions",
            png_bomb(30000, 30000),
            {"Content-Type": "image/png"},
            frozenset({413}),
        ),
        Payload(
            "bad",
            "json-body",
            "/v1/captions",
            b'{"image": "x"}',
            {"Content-Type": "application/json"},
            frozenset({415}),
        ),
        Payload(
            "bad", "beam_size=0", "/v1/captions?beam_size=0", jpg, {"Content-Type": "image/jpeg"}, frozenset({400})
        ),
        Payload(
            "bad",
            "empty-image-file",
            "/v1/captions",
            *multipart(b"", "empty.jpg", "image/jpeg", beam_size="2"),
            frozenset({400}),
        ),
    ]
    return good, bad


# ---------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def get(port: int, path: str, timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if r.getheader("Content-Type", "").startswith("application/json") else {})
    finally:
        conn.close()


def default_checkpoint(workdir: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from captioner import checkpoint
    from captioner.settings import default_model_path

    try:
        return checkpoint.resolve(default_model_path())
    except checkpoint.CheckpointError:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_checkpoint

        log(f"no shipped model at {default_model_path()}: building a tiny untrained checkpoint")
        return build_tiny_checkpoint(workdir / "tiny")


class Server:
    def __init__(self, checkpoint: Path, workdir: Path, ready_timeout: float) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
        env.update(HOST=HOST, PORT=str(self.port), CAPTIONER_MODEL=str(checkpoint))
        self.log_path = workdir / "gunicorn.log"
        with open(self.log_path, "wb") as fh:
            self.proc = subprocess.Popen(
                SERVE, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        started = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if get(self.port, "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() - started > ready_timeout:
                raise RuntimeError(f"not ready after {ready_timeout:g} s:\n{self.tail()}")
            time.sleep(0.3)
        self.ready_s = round(time.time() - started, 1)
        self.worker = self.workers()[0]

    def workers(self) -> list[int]:
        return sorted(children(self.proc.pid))

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


# ---------------------------------------------------------------- clients
@dataclass
class Record:
    kind: str
    name: str
    status: int | None  # None: no HTTP response (dropped connection / timeout)
    seconds: float
    correct: bool
    error_code: str | None = None
    retry_after: str | None = None
    failure: str | None = None


@dataclass
class Phase:
    name: str
    clients: int
    duration: float
    backoff: bool = False
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(
    port: int,
    phase: Phase,
    payloads: list[Payload],
    weights: list[float],
    seed: int,
    deadline: float,
    timeout: float,
    backoff: bool,
) -> None:
    rnd = random.Random(seed)
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        while time.perf_counter() < deadline:
            p = rnd.choices(payloads, weights)[0]
            started = time.perf_counter()
            try:
                conn.request("POST", p.path, body=p.body, headers=p.headers)
                r = conn.getresponse()
                raw = r.read()
                elapsed = time.perf_counter() - started
                body = json.loads(raw) if raw else {}
                code = body.get("error", {}).get("code") if isinstance(body, dict) else None
                rec = Record(p.kind, p.name, r.status, elapsed, r.status in p.expect, code, r.getheader("Retry-After"))
                if r.status == 200 and not body.get("caption"):
                    rec.correct, rec.failure = False, "200 without a caption"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                rec = Record(
                    p.kind, p.name, None, time.perf_counter() - started, False, failure=f"{type(exc).__name__}: {exc}"
                )
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
            with phase.lock:
                phase.records.append(rec)
            if backoff and rec.status == 503 and rec.retry_after and rec.retry_after.isdigit():
                time.sleep(max(0.0, min(float(rec.retry_after), deadline - time.perf_counter())))
                # The wait may outlast the server's keep-alive (CAPTIONER_KEEPALIVE, 5 s), after which it
                # closes the idle connection: like any HTTP client, start a fresh one instead of reusing it.
                conn.close()
    finally:
        conn.close()


def run_phase(
    port: int, phase: Phase, payloads: list[Payload], weights: list[float], timeout: float, backoff: bool = False
) -> float:
    log(f"{phase.name}: {phase.clients} clients for {phase.duration:g} s")
    deadline = time.perf_counter() + phase.duration
    threads = [
        threading.Thread(
            target=client_loop, daemon=True, args=(port, phase, payloads, weights, 1000 + i, deadline, timeout, backoff)
        )
        for i in range(phase.clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(phase.duration + timeout + 30)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarise(phase: Phase, wall: float) -> dict:
    recs = phase.records
    ok = [r for r in recs if r.status == 200]
    statuses = Counter("dropped" if r.status is None else str(r.status) for r in recs)
    codes = Counter(r.error_code for r in recs if r.error_code)
    overloaded = [r for r in recs if r.status == 503 and r.error_code == "overloaded"]
    return {
        "clients": phase.clients,
        "backoff_on_503": phase.backoff,
        "duration_s": round(wall, 1),
        "requests": len(recs),
        "throughput_rps": round(len(recs) / wall, 2),
        "captions_per_s": round(len(ok) / wall, 2),
        "statuses": dict(sorted(statuses.items())),
        "error_codes": dict(sorted(codes.items())),
        "5xx": sum(1 for r in recs if r.status and r.status >= 500),
        "5xx_other_than_overloaded": sum(1 for r in recs if r.status and r.status >= 500 and r not in overloaded),
        "dropped_connections": statuses.get("dropped", 0),
        "wrong_answers": sum(
            1
            for r in recs
            if r.status is not None and not r.correct and not (r.status == 503 and r.error_code == "overloaded")
        ),
        "latency_ms_200": {
            "p50": percentile([r.seconds for r in ok], 50),
            "p90": percentile([r.seconds for r in ok], 90),
            "p99": percentile([r.seconds for r in ok], 99),
            "max": percentile([r.seconds for r in ok], 100),
        },
        "latency_ms_4xx": {
            "p50": percentile([r.seconds for r in recs if r.status and 400 <= r.status < 500], 50),
            "p99": percentile([r.seconds for r in recs if r.status and 400 <= r.status < 500], 99),
        },
        "latency_ms_503": {
            "p50": percentile([r.seconds for r in overloaded], 50),
            "p99": percentile([r.seconds for r in overloaded], 99),
        },
        "503_overloaded": len(overloaded),
        "503_with_retry_after": sum(1 for r in overloaded if r.retry_after and r.retry_after.isdigit()),
        "retry_after_s": sorted({int(r.retry_after) for r in overloaded if r.retry_after and r.retry_after.isdigit()}),
        "failures": sorted(
            Counter(
                f"{r.name}: {r.failure or r.status}"
                for r in recs
                if r.failure or (r.status is not None and not r.correct and r.status != 503)
            ).items()
        )[:10],
    }


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--checkpoint", help="model folder (default: the shipped models/flickr8k-lite2, else a tiny one)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients in the steady phase")
    ap.add_argument("--duration", type=float, default=120, help="seconds of the steady phase")
    ap.add_argument("--bad-fraction", type=float, default=0.2, help="share of bad uploads in the steady phase")
    ap.add_argument("--burst-clients", type=int, help="clients in the burst (default: threads + queue + 16)")
    ap.add_argument("--burst-duration", type=float, default=20, help="seconds of the burst phase (0 = none)")
    ap.add_argument(
        "--no-backoff",
        action="store_true",
        help="burst clients retry at once after a 503 instead of waiting its Retry-After",
    )
    ap.add_argument("--timeout", type=float, default=90, help="client socket timeout, seconds")
    ap.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for /readyz")
    args = ap.parse_args(argv)
    if not GUNICORN.exists():
        ap.error(f"{GUNICORN} not found: run from the project's virtual environment")

    threads = int(os.environ.get("CAPTIONER_THREADS") or 32)
    queue = int(os.environ.get("CAPTIONER_QUEUE_SIZE") or 16)
    burst_clients = args.burst_clients or threads + queue + 16
    good, bad = build_payloads()
    with tempfile.TemporaryDirectory(prefix="load_test-") as tmp:
        workdir = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(workdir)
        log(f"starting gunicorn with {checkpoint} ...")
        server = Server(checkpoint, workdir, args.ready_timeout)
        summary: dict = {
            "checkpoint": str(checkpoint),
            "host": HOST,
            "port": server.port,
            "cpu_cores": os.cpu_count(),
            "worker_threads": threads,
            "queue_size": queue,
            "server_ready_s": server.ready_s,
        }
        try:
            status, ready = get(server.port, "/readyz")
            summary["model"] = ready.get("model")
            worker = server.worker
            rss: dict = {"before": rss_mb(worker)}
            log(f"ready in {server.ready_s} s; worker {worker} RSS {rss['before']}")

            steady = Phase("steady", args.clients, args.duration)
            share = args.bad_fraction
            weights = [(1 - share) / len(good)] * len(good) + [share / len(bad)] * len(bad)
            wall = run_phase(server.port, steady, good + bad, weights, args.timeout)
            summary["steady"] = summarise(steady, wall)
            rss["after_steady"] = rss_mb(worker)
            log(json.dumps(summary["steady"]))

            if args.burst_duration > 0:
                burst = Phase("burst", burst_clients, args.burst_duration, not args.no_backoff)
                wall = run_phase(server.port, burst, good, [1.0] * len(good), args.timeout, not args.no_backoff)
                summary["burst"] = summarise(burst, wall)
                rss["after_burst"] = rss_mb(worker)
                log(json.dumps(summary["burst"]))

            time.sleep(1)
            status, ready = get(server.port, "/readyz")
            summary["readyz_after"] = {"status": status, "body": ready.get("status")}
            summary["worker_rss_mb"] = rss
            summary["worker_survived"] = server.workers() == [worker]
        finally:
            summary["server_exit"] = server.stop()
            if summary["server_exit"] != 0:
                summary["server_log_tail"] = server.tail()

    s, b = summary.get("steady", {}), summary.get("burst")
    checks = {
        "steady: zero 5xx": s.get("5xx") == 0,
        "steady: zero dropped connections": s.get("dropped_connections") == 0,
        "steady: every answer as expected": s.get("wrong_answers") == 0,
        "ready after the load": summary.get("readyz_after", {}).get("status") == 200,
        "the worker survived (no restart)": summary.get("worker_survived") is True,
        "clean shutdown": summary.get("server_exit") == 0,
    }
    if b is not None:
        checks |= {
            "burst: overload answered 503 overloaded": b["503_overloaded"] > 0,
            "burst: every 503 has Retry-After": b["503_with_retry_after"] == b["503_overloaded"],
            "burst: no other 5xx": b["5xx_other_than_overloaded"] == 0,
            "burst: zero dropped connections": b["dropped_connections"] == 0,
            "burst: every other answer as expected": b["wrong_answers"] == 0,
        }
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    print(json.dumps(summary, indent=1))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
