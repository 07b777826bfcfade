"""Prometheus metrics (``GET /metrics``).

By default every app (so every gunicorn worker process) has its own registry and
``/metrics`` reports the worker that answered the scrape: scrape each worker, or
run one worker (the default; it uses its threads and the micro-batcher for
throughput). When ``PROMETHEUS_MULTIPROC_DIR`` names a writable, empty folder
*before* the process starts, prometheus_client stores values in files there
and ``/metrics`` aggregates all live workers (gunicorn_conf.py clears the folder
at start-up and marks exited workers dead).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The ``*_created`` timestamp series only add noise to a scrape.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


#: HTTP methods counted by name; any other (invented) method is counted as ``other``, so that clients
#: cannot create new time series.
METHODS = ("GET", "POST", "HEAD")


def method_label(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else ``"other"``."""
    return method if method in METHODS else "other"


def multiprocess_dir() -> str | None:
    # the lowercase name is prometheus_client's older spelling, which it still reads
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None  # noqa: SIM112


class Metrics:
    """The service's metrics in their own registry (several apps in one process do not collide)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "captioner_http_requests",
            "HTTP requests answered, by endpoint (route), method (GET/POST/HEAD/other) and status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "captioner_http_request_duration_seconds",
            "Time to answer a request, by endpoint (route).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "captioner_batch_size",
            "Images per micro-batch (one encoder pass).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_groups = Histogram(
            "captioner_batch_groups",
            "Decoding groups (distinct beam_size/max_length/n_best) per micro-batch.",
            buckets=(1, 2, 3, 4, 6, 8, 16),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "captioner_batch_duration_seconds",
            "Model time per micro-batch (encode + all decodes).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "captioner_queue_depth",
            "Requests waiting for the model (summed over live workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ready = Gauge(
            "captioner_model_ready",
            "1 when the model is loaded and warmed up (summed over live workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rejected = Counter(
            "captioner_rejected_requests",
            "Caption requests refused before inference, by reason.",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "captioner_model_info",
            "The served model (value 1).",
            ["name", "version"],
            multiprocess_mode="livemax",
            registry=r,
        )

    def observe_batch(self, size: int, groups: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_groups.observe(groups)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        folder = multiprocess_dir()
        if folder and os.path.isdir(folder):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=folder)
            return generate_latest(registry)
        return generate_latest(self.registry)
