"""The HTTP service under concurrent clients, with and without micro-batching.

    .venv/bin/python bench/bench_service.py [--checkpoint DIR] [--clients 1,4,8,16] [--requests 8]
    .venv/bin/python bench/bench_service.py --checkpoint runs/demo/best --clients 1,4 --requests 2   # smoke run

For each ``--max-batch`` setting (default ``8,1``: the default micro-batching, then batching
disabled) this starts the real service command on a free loopback port::

    .venv/bin/gunicorn --config service/gunicorn_conf.py "service.app:create_app()"

with ``CAPTIONER_MODEL``, ``PORT``, ``HOST=127.0.0.1`` and ``CAPTIONER_MAX_BATCH`` set, waits for
``/readyz``, sends a few warm-up requests, then for each client count C runs C threads that each
POST ``--requests`` JPEG photos (raw body, ``beam_size=3&attention=none``) back to back over a
keep-alive connection. Reported per C: throughput (successful requests/s over the phase's wall
time), p50/p99 latency, errors (non-200 or connection failures) and the mean micro-batch size
(the ``captioner_batch_size`` histogram's sum/count delta in ``/metrics`` over the phase).
Also ``throughput@8 / throughput@1`` (target >= 2 with batching). The service is stopped with
SIGTERM afterwards. Only 127.0.0.1 is used; the request count is bounded. Without ``--levers`` the
service runs as shipped (its CPU fast path on); ``--levers none`` sets ``CAPTIONER_FAST=0``; a list
of levers serves ``bench.service_levers:create_app()`` (the same service, handed the fp32 model
with those ``captioner.perf`` options applied).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import LEVERS_HELP, parse_levers, percentiles, repo_root, sample_uploads

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def batch_histogram(port: int) -> tuple[float, float]:
    """(sum, count) of ``captioner_batch_size`` from /metrics."""
    status, body = get(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    values = {}
    for line in body.decode().splitlines():
        if line.startswith(("captioner_batch_size_sum", "captioner_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values.get("captioner_batch_size_sum", 0.0), values.get("captioner_batch_size_count", 0.0)


class Service:
    """The gunicorn service command in its own process group, stopped with SIGTERM."""

    def __init__(
        self, env: dict[str, str], log_path: Path, app: str = "service.app:create_app()", tree: Path | None = None
    ) -> None:
        """``tree``: serve that source tree (its folder and ``PYTHONPATH``) with this checkout's gunicorn."""
        self.log_path = log_path
        self.log = log_path.open("wb")
        gunicorn = repo_root() / ".venv" / "bin" / "gunicorn"
        cmd = [str(gunicorn) if gunicorn.exists() else "gunicorn", "--config", "service/gunicorn_conf.py", app]
        env = env if tree is None else dict(env, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen(
            cmd, cwd=tree or repo_root(), env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, body = get(port, "/readyz", timeout=2)
            except OSError:
                status, body = 0, b""
            if status == 200:
                return
            if b'"failed"' in body:  # the model could not be loaded: no point waiting
                raise RuntimeError(f"service failed to load the model: {body.decode(errors='replace')}")
            time.sleep(0.5)
        raise RuntimeError(f"service not ready after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_clients(port: int, uploads: list[bytes], clients: int, requests: int, query: str) -> dict:
    """``clients`` threads x ``requests`` POSTs each; latencies of successes, errors counted."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    server: list[dict[str, float]] = []  # each answer's own timing_ms (queue, preprocess, inference, ...)
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        start.wait()
        for i in range(requests):
            body = uploads[(k * requests + i) % len(uploads)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/v1/captions?{query}", body=body, headers={"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                data = resp.read()
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    if resp.status == 200:
                        answer = json.loads(data)
                        latencies.append(ms)
                        batch_sizes.append(int(answer.get("batch_size", 0)))
                        server.append(answer.get("timing_ms", {}))
                    else:
                        errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=120)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    before = batch_histogram(port)
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = batch_histogram(port)
    batches = after[1] - before[1]
    out = {
        "clients": clients,
        "requests": clients * requests,
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
    }
    if latencies:
        pct = percentiles(latencies)
        out |= {"p50_ms": pct["p50"], "p99_ms": pct["p99"]}
    out["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
    out["mean_batch_size_seen"] = round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else None
    if server:  # where a request's time goes inside the service (p50 of each part); the rest is HTTP and JSON
        out["server_p50_ms"] = {k: round(statistics.median(t[k] for t in server), 2) for k in server[0]}
    return out


def bench_config(args: argparse.Namespace, max_batch: int, uploads: list[bytes], workdir: Path) -> dict:
    port = free_port()
    env = dict(
        os.environ,
        HOST=HOST,
        PORT=str(port),
        CAPTIONER_MAX_BATCH=str(max_batch),
        CAPTIONER_LOG_LEVEL=args.log_level,
        PYTHONUNBUFFERED="1",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if args.checkpoint:
        env["CAPTIONER_MODEL"] = str(Path(args.checkpoint).resolve())
    if args.threads:
        env["CAPTIONER_TORCH_THREADS"] = str(args.threads)
    if args.workers:
        env["CAPTIONER_WORKERS"] = str(args.workers)
        if args.workers > 1:  # /metrics must sum the workers' batch histograms
            metrics_dir = workdir / f"prom-max{max_batch}"
            metrics_dir.mkdir(exist_ok=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    app = "service.app:create_app()"
    if args.levers is not None and not parse_levers(args.levers):  # "none": the fp32 model as trained
        env["CAPTIONER_FAST"] = "0"
    elif args.levers:  # the same app, handed a model with these captioner.perf options applied
        env["BENCH_LEVERS"] = args.levers
        app = "bench.service_levers:create_app()"
    service = Service(env, workdir / f"service-max{max_batch}.log", app)
    try:
        t0 = time.perf_counter()
        service.wait_ready(port, args.startup_timeout)
        ready_s = time.perf_counter() - t0
        query = f"beam_size={args.beam_size}&attention=none"
        run_clients(port, uploads, 1, args.warmup, query)  # warm-up: caches, allocator, first-request paths
        levels = [run_clients(port, uploads, c, args.requests, query) for c in args.clients]
        for lv in levels:
            print(json.dumps({"max_batch": max_batch, **lv}), file=sys.stderr, flush=True)
    except BaseException:
        print(service.tail(), file=sys.stderr)
        raise
    finally:
        service.stop()
    by_c = {lv["clients"]: lv for lv in levels}
    out = {"max_batch": max_batch, "ready_seconds": round(ready_s, 1), "levels": levels}
    if 1 in by_c and 8 in by_c and by_c[1]["throughput_rps"]:
        out["throughput_ratio_8_vs_1"] = round(by_c[8]["throughput_rps"] / by_c[1]["throughput_rps"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model folder (CAPTIONER_MODEL; default: the shipped model)")
    p.add_argument("--images", help="folder of photos sent as uploads (default: scikit-image sample photos)")
    p.add_argument("--clients", default="1,4,8,16", help="concurrent client counts (comma-separated)")
    p.add_argument("--requests", type=int, default=8, help="requests per client at each level")
    p.add_argument("--warmup", type=int, default=3, help="sequential requests before measuring")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-batch", default="8,1", help="CAPTIONER_MAX_BATCH values to compare (1 = no batching)")
    p.add_argument("--threads", type=int, help="CAPTIONER_TORCH_THREADS (default: the service's default)")
    p.add_argument(
        "--workers", type=int, help="CAPTIONER_WORKERS: gunicorn worker processes (default: the service's default)"
    )
    p.add_argument("--levers", help=LEVERS_HELP + " (a list is served through bench/service_levers.py)")
    p.add_argument("--startup-timeout", type=float, default=180)
    p.add_argument("--log-level", default="warning", help="CAPTIONER_LOG_LEVEL of the service")
    args = p.parse_args()
    parse_levers(args.levers)
    args.clients = [int(c) for c in args.clients.split(",")]
    if min(args.clients) < 1 or args.requests < 1:
        p.error("--clients and --requests must be >= 1")
    uploads = sample_uploads(args.images, 16)
    results = {
        "beam_size": args.beam_size,
        "requests_per_client": args.requests,
        "uploads": len(uploads),
        "levers": "shipped default" if args.levers is None else parse_levers(args.levers),
        "torch_threads": args.threads or "default",
        "workers": args.workers or "default",
        "upload_kb_mean": round(sum(map(len, uploads)) / len(uploads) / 1024, 1),
        "cores": os.cpu_count(),
        "configs": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_service_") as tmp:
        for mb in [int(m) for m in args.max_batch.split(",")]:
            results["configs"].append(bench_config(args, mb, uploads, Path(tmp)))
    by_mb = {c["max_batch"]: c for c in results["configs"]}
    if 1 in by_mb and len(by_mb) > 1:
        batched = next(c for m, c in by_mb.items() if m != 1)
        for b_lv, u_lv in zip(batched["levels"], by_mb[1]["levels"]):
            if u_lv["throughput_rps"]:
                b_lv["vs_no_batching"] = round(b_lv["throughput_rps"] / u_lv["throughput_rps"], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
