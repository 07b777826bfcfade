"""One app's serving state: the model, its micro-batcher, the decode pool and readiness.

:func:`~service.app.create_app` builds one :class:`ServiceState` per app (so one per worker
process) and keeps it in ``app.extensions[EXTENSION_KEY]``; the blueprints reach it through
:func:`current_state`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
from flask import current_app

from captioner.api import Captioner
from captioner.decode_pool import DecodePool

from .batching import DecodeSettings, MicroBatcher
from .config import Settings
from .metrics import Metrics
from .protocols import Batcher, ServedModel

log = logging.getLogger("service")

EXTENSION_KEY = "captioner_service"


class ServiceState:
    """The model, its micro-batcher and readiness, one per app (so one per worker process)."""

    def __init__(self, settings: Settings, metrics: Metrics, captioner: ServedModel | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.captioner: ServedModel | None = captioner
        self.batcher: Batcher | None = None
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
        with contextlib.suppress(Exception):  # reported by /readyz, logged by _load
            self._load()

    def _load(self) -> None:
        s = self.settings
        try:
            if s.torch_threads:
                torch.set_num_threads(s.torch_threads)
            if self.captioner is None:
                started = time.perf_counter()
                log.info("loading model %s", s.model_path)
                self.captioner = Captioner.load(s.model_path, device=s.device, fast=s.fast, runtime=s.runtime)
                log.info(
                    "loaded %s %s on %s in %.1f s",
                    self.captioner.name,
                    self.captioner.version,
                    getattr(self.captioner, "device", "?"),
                    time.perf_counter() - started,
                )
            cap = self.captioner
            self.metrics.model_info.labels(cap.name, cap.version).set(1)
            self.batcher = MicroBatcher(
                cap,
                s.max_batch,
                s.batch_wait_ms,
                s.queue_size,
                on_batch=self.metrics.observe_batch,
                on_queue_depth=self.metrics.queue_depth.set,
                adaptive_wait=True,
            ).start()
            if s.warmup:
                started = time.perf_counter()
                size = cap.encoder_cfg.image_size
                self.batcher.run(
                    torch.zeros(3, size, size), self.default_settings(), timeout=max(300.0, s.request_timeout_s)
                )
                if getattr(cap, "runtime", "torch") != "torch":  # ONNX Runtime's one-thread session, used under load
                    cap.see(torch.zeros(1, 3, size, size), threads=1)
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
        assert self.captioner is not None
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


def current_state() -> ServiceState:
    """The serving state of the app handling the current request."""
    state: ServiceState = current_app.extensions[EXTENSION_KEY]
    return state
