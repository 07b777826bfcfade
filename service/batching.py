"""Micro-batching: many request threads, one model, one background thread.

Request threads decode and resize their upload themselves (so that CPU work runs
in parallel and never holds up the model), then :meth:`MicroBatcher.submit` the
ready tensor ``(3, S, S)``. A single background thread takes the first waiting
request, waits up to ``wait_ms`` for more (up to ``max_batch``), and runs the
whole batch through **one** ``captioner.encode`` of the stacked images. It then
groups the batch by decoding settings (beam size, max length, n-best) and runs
one batched ``captioner.decode`` per group, handing each request its caption
through a :class:`concurrent.futures.Future`.

With ``adaptive_wait`` (the service's setting) the batcher waits only while other
request threads are still preparing an image (:meth:`MicroBatcher.incoming`): a
lone request starts at once instead of paying ``wait_ms``, and under load the
batch still fills with the requests that are about to arrive.

The queue is bounded: when it is full :meth:`submit` raises :class:`QueueFull`
at once (the service answers 503 + ``Retry-After``) instead of letting requests
pile up. A request that stops waiting (timeout) cancels its future, and the
batcher skips it if it has not started yet. Failures inside the model are set
on the futures of the affected requests; the thread itself never dies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .protocols import BatchModel

if TYPE_CHECKING:
    from captioner.api import Caption

log = logging.getLogger("service.batching")


class QueueFull(Exception):
    """The batcher already has ``queue_size`` requests waiting."""


class BatcherClosed(Exception):
    """The batcher is shutting down (or was never started)."""


class BatchTimeout(Exception):
    """No result within the request's time limit."""


@dataclass(frozen=True)
class DecodeSettings:
    """Requests are batched through the decoder only with others that share these."""

    beam_size: int
    max_length: int
    n_best: int = 1
    guidance: str | None = None  # None: the model's default (captioner.api.GUIDANCE)


@dataclass
class BatchResult:
    caption: Caption
    batch_size: int  # images in the encoder batch this request was part of
    group_size: int  # images decoded together with the same settings
    queue_ms: float  # submit -> batch start
    inference_ms: float  # encoder pass + this group's decode


@dataclass
class _Item:
    tensor: torch.Tensor
    settings: DecodeSettings
    future: Future[BatchResult]
    enqueued: float


class MicroBatcher:
    """Collects up to ``max_batch`` requests or waits ``wait_ms``, then runs them as one batch."""

    def __init__(
        self,
        captioner: BatchModel,
        max_batch: int = 16,
        wait_ms: float = 10.0,
        queue_size: int = 64,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "micro-batcher",
        adaptive_wait: bool = False,
    ) -> None:
        if max_batch < 1 or queue_size < 1 or wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1, wait_ms >= 0")
        self.captioner = captioner
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.adaptive_wait = adaptive_wait
        self._incoming = 0  # request threads preparing an image they are about to submit
        self.queue_size = queue_size
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._lock = threading.Lock()
        #: Seconds the last few batches took, for ``Retry-After`` estimates.
        self.last_batch_s = 0.0

    # ------------------------------------------------------------ life cycle
    def start(self) -> MicroBatcher:
        with self._lock:
            if not self._started:
                self._started = True
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking requests, fail the ones still queued, and join the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._fail_queued(BatcherClosed("the service is shutting down"))

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return self._queue.qsize()

    # ------------------------------------------------------------ callers
    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Wrap a request's decode/resize: with ``adaptive_wait`` the batcher waits for it."""
        with self._lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._lock:
                self._incoming -= 1

    def submit(self, tensor: torch.Tensor, settings: DecodeSettings) -> Future[BatchResult]:
        """Queue one preprocessed image (3, S, S). Raises QueueFull or BatcherClosed at once."""
        if not self.running:
            raise BatcherClosed("the model is not being served")
        item = _Item(tensor, settings, Future(), time.perf_counter())
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise QueueFull(f"{self.queue_size} requests are already waiting") from None
        self._report_depth()
        return item.future

    def run(self, tensor: torch.Tensor, settings: DecodeSettings, timeout: float | None = None) -> BatchResult:
        """Submit and wait. Raises QueueFull, BatcherClosed, BatchTimeout or the model's exception."""
        future = self.submit(tensor, settings)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()  # skipped by the batcher if it has not started on it yet
            raise BatchTimeout(f"no caption within {timeout:g} s") from None
        except CancelledError:  # pragma: no cover - only we cancel, after timing out
            raise BatchTimeout("the request was cancelled") from None

    def retry_after(self) -> int:
        """Seconds a refused client should wait: roughly how long the queue takes to drain."""
        batches = max(1, -(-self.depth // self.max_batch))
        return max(1, round(batches * max(self.last_batch_s, 0.05) + 0.5))

    # ------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                items = self._collect()
                if items:
                    self._process(items)
            except Exception:  # pragma: no cover - defensive: the thread must survive anything
                log.exception("micro-batcher loop error")
        self._fail_queued(BatcherClosed("the service is shutting down"))

    def _collect(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.25)
        except queue.Empty:
            return []
        if first.future.cancelled():  # its caller gave up (timeout) while it waited
            self._report_depth()
            return []
        items = [first]
        deadline = time.perf_counter() + self.wait_s
        while len(items) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if self.adaptive_wait and remaining > 0:
                try:  # poll: only worth waiting while some request is still being prepared
                    item = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    if self._incoming > 0:
                        continue
                    break
            else:
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break  # waited long enough and nothing more is queued
            if not item.future.cancelled():
                items.append(item)
        self._report_depth()
        return items

    def _process(self, items: list[_Item]) -> None:
        live = [it for it in items if it.future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.perf_counter()
        try:
            batch = torch.stack([it.tensor for it in live])  # (B, 3, S, S)
            annotations, concepts = self.captioner.see(batch)  # (B, L, D), B concept lists or None
        except Exception as exc:  # handed to every waiting request
            log.exception("encoder failed on a batch of %d", len(live))
            for it in live:
                it.future.set_exception(exc)
            return
        encoded = time.perf_counter()

        groups: dict[DecodeSettings, list[int]] = {}
        for i, it in enumerate(live):
            groups.setdefault(it.settings, []).append(i)
        for settings, idxs in groups.items():
            group_start = time.perf_counter()
            try:
                part = (
                    annotations
                    if len(idxs) == len(live)
                    else annotations[torch.tensor(idxs, device=annotations.device)]
                )
                captions = self.captioner.decode(
                    part,
                    beam_size=settings.beam_size,
                    max_length=settings.max_length,
                    n_best=settings.n_best,
                    concepts=[concepts[i] for i in idxs] if concepts is not None else None,
                    guidance=settings.guidance,
                )
            except Exception as exc:
                log.exception("decoder failed on a group of %d", len(idxs))
                for i in idxs:
                    live[i].future.set_exception(exc)
                continue
            inference_ms = ((encoded - start) + (time.perf_counter() - group_start)) * 1000.0
            for i, caption in zip(idxs, captions):
                it = live[i]
                it.future.set_result(
                    BatchResult(caption, len(live), len(idxs), (start - it.enqueued) * 1000.0, inference_ms)
                )
        self.last_batch_s = time.perf_counter() - start
        if self._on_batch is not None:
            try:
                self._on_batch(len(live), len(groups), self.last_batch_s)
            except Exception:  # pragma: no cover
                log.exception("on_batch callback failed")

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(exc)
        self._report_depth()

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            try:
                self._on_queue_depth(self._queue.qsize())
            except Exception:  # pragma: no cover
                log.exception("on_queue_depth callback failed")
