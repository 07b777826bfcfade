"""gunicorn settings for the captioning service (``make serve``).

    .venv/bin/gunicorn --config service/gunicorn_conf.py "service.app:create_app()"

Worker model: ``gthread`` -- few processes, many threads. Each worker process loads
the model once; its request threads decode/resize uploads in parallel (Pillow
releases the GIL) and hand tensors to the worker's micro-batcher, which runs them
through the model together. One worker with N threads therefore batches up to N
concurrent requests; more workers multiply memory and split the traffic into
smaller batches, so add workers only when one process cannot use the cores
(e.g. ``CAPTIONER_WORKERS=2 CAPTIONER_TORCH_THREADS=<cores/2>``). See docs/service.md.

Everything is configurable from the environment (defaults in brackets): HOST
[127.0.0.1], PORT [8000], CAPTIONER_WORKERS [1], CAPTIONER_THREADS [32],
CAPTIONER_WORKER_TIMEOUT [120], CAPTIONER_GRACEFUL_TIMEOUT [30],
CAPTIONER_KEEPALIVE [5], CAPTIONER_MAX_REQUESTS [5000], CAPTIONER_MAX_REQUESTS_JITTER [500],
CAPTIONER_LOG_LEVEL [info], CAPTIONER_LOG_FORMAT [json], CAPTIONER_CONTROL_SOCKET [off],
PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker


def _int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise SystemExit(f"{name} must be >= {low}, got {value}")
    return value


def _bind() -> str:
    host = os.environ.get("HOST", "").strip() or "127.0.0.1"
    port = _int("PORT", 8000, low=0)
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}"


bind = [_bind()]
worker_class = "gthread"
workers = _int("CAPTIONER_WORKERS", 1)
# Each worker's PyTorch would otherwise start one thread per core: N workers would run N x cores
# threads, and on a CPU oversubscribed threads spin and stall each other. Split the cores instead.
_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if os.environ.get("CAPTIONER_TORCH_THREADS", "").strip() in ("", "0"):
    os.environ["CAPTIONER_TORCH_THREADS"] = str(max(1, _cores // workers))
# Threads mostly wait for the micro-batcher, so they are cheap. There should be more of them than
# requests the batcher holds (a running batch + its queue): then excess load reaches the app and is
# answered 503 + Retry-After at once instead of waiting, unseen, in gunicorn's connection queue.
threads = _int("CAPTIONER_THREADS", 32)
_held = _int("CAPTIONER_MAX_BATCH", 8) + _int("CAPTIONER_QUEUE_SIZE", 16)  # defaults as in service/config.py
# gthread workers heartbeat from their main thread, so a long inference does not trip this;
# it only catches a worker that is truly stuck.
timeout = _int("CAPTIONER_WORKER_TIMEOUT", 120)
graceful_timeout = _int("CAPTIONER_GRACEFUL_TIMEOUT", 30)
keepalive = _int("CAPTIONER_KEEPALIVE", 5)
# Replace a worker after max_requests + random(0..jitter) requests: bounds slow growth of its memory
# (docs/reliability.md records RSS growing under load); the jitter keeps workers from restarting together.
max_requests = _int("CAPTIONER_MAX_REQUESTS", 5000, low=0)
max_requests_jitter = _int("CAPTIONER_MAX_REQUESTS_JITTER", 500, low=0)
# Off: every worker builds its own app after the fork, so it loads the model and starts the
# micro-batcher threads itself (threads do not survive fork; CUDA must not be initialised before it).
preload_app = False
# Logs to stdout: one access line per request, JSON unless CAPTIONER_LOG_FORMAT=text (service/logs.py).
# access_log_format is the text format (request time in microseconds, then the request id).
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("CAPTIONER_LOG_LEVEL", "info")
logger_class = "service.logs.GunicornLogger"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(D)sus "%(a)s" request_id=%({x-request-id}o)s'
capture_output = False
proc_name = "captioner-service"
# gunicorn >= 25 opens a control socket (~/.gunicorn/gunicorn.ctl) that every instance on the machine
# would share; off unless CAPTIONER_CONTROL_SOCKET names a path for this instance.
control_socket = os.environ.get("CAPTIONER_CONTROL_SOCKET") or None
control_socket_disable = control_socket is None
if control_socket is None:
    del control_socket
# Request line / header limits stay at gunicorn's defaults; the body limit is Flask's MAX_CONTENT_LENGTH.


def on_starting(server: Arbiter) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, start from an empty folder (stale files would be summed)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and name.endswith(".db"):
                os.remove(path)
            elif os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
    server.log.info("captioner service: %d worker(s) x %d thread(s) on %s", workers, threads, ", ".join(bind))
    if threads <= _held:
        server.log.warning(
            "CAPTIONER_THREADS=%d <= CAPTIONER_MAX_BATCH + CAPTIONER_QUEUE_SIZE = %d: under overload, requests wait "
            "for a free thread instead of getting a quick 503",
            threads,
            _held,
        )


def child_exit(server: Arbiter, worker: Worker) -> None:
    """Drop an exited worker's live gauges from the multi-process metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def worker_exit(server: Arbiter, worker: Worker) -> None:
    """Stop the worker's micro-batcher so requests still queued get a clean 503."""
    app = getattr(getattr(worker, "wsgi", None), "extensions", None)
    state = app.get("captioner_service") if isinstance(app, dict) else None
    if state is not None:
        state.close()
