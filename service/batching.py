"""Micro-batching: many request threads, one model, two background threads in a pipeline.

Request threads decode and resize their upload themselves (so that CPU work runs
in parallel and never holds up the model), then :meth:`MicroBatcher.submit` the
ready tensor ``(3, S, S)``. The *encoder* thread takes the first waiting request,
waits up to ``wait_ms`` for more (up to ``max_batch``), and runs the whole batch
through **one** ``captioner.see`` of the stacked images. The *decoder* thread
takes each encoded batch, groups it by decoding settings (beam size, max length,
n-best, guidance) and runs one batched ``captioner.decode`` per group, handing each
request its caption through a :class:`concurrent.futures.Future`.

Under load the two stages overlap: the next batch is collected and encoded while
the last one decodes, at most one encoded batch waits between them, and while the
decoder is busy the encoder runs on one thread (``see(threads=1)``) so that the two
share the cores instead of fighting over them. A lone request finds the decoder
idle and is encoded on every thread, as before. Captions do not depend on either
(bit-identical encoder outputs on any thread count; batch-invariant decoding).

With ``adaptive_wait`` (the service's setting) the batcher waits only while other
request threads are still preparing an image (:meth:`MicroBatcher.incoming`): a
lone request starts at once instead of paying ``wait_ms``, and under load the
batch still fills with the requests that are about to arrive.

The queue is bounded: when it is full :meth:`submit` raises :class:`QueueFull`
at once (the service answers 503 + ``Retry-After``) instead of letting requests
pile up. A request that stops waiting (timeout) cancels its future, and the
batcher skips it if it has not started yet. Failures inside the model are set
on the futures of the affected requests; the threads themselves never die.
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
    from captioner.concepts import Concept

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
    queue_ms: float  # submit -> encoder start, plus the wait between the encoder and decoder stages
    inference_ms: float  # encoder pass + this group's decode


@dataclass
class _Item:
    tensor: torch.Tensor
    settings: DecodeSettings
    future: Future[BatchResult]
    enqueued: float


@dataclass
class _Encoded:
    """A batch between the two stages: its requests, their encoder outputs and when the encoder ran."""

    items: list[_Item]
    annotations: torch.Tensor  # (B, L, D)
    concepts: list[list[Concept]] | None  # one concept list per image; None without a concept head
    start: float  # encoder pass began
    encoded: float  # encoder pass ended


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
        self._decoder = threading.Thread(target=self._decode_loop, name=f"{name}-decoder", daemon=True)
        self._handoff: queue.Queue[_Encoded | None] = queue.Queue(maxsize=1)  # encoded batches; None: stop
        self._decoding = threading.Event()  # the decoder thread is working on a batch
        self._started = False
        self._lock = threading.Lock()
        #: Seconds the model spent on the last batch (encoder pass + decodes), for ``Retry-After`` estimates.
        self.last_batch_s = 0.0

    # ------------------------------------------------------------ life cycle
    def start(self) -> MicroBatcher:
        with self._lock:
            if not self._started:
                self._started = True
                self._decoder.start()
                self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._decoder.is_alive() and not self._stop.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking requests, finish the batch in hand, fail the ones still queued, and join the threads."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._decoder.is_alive():
            self._decoder.join(timeout)
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

    # ------------------------------------------------------------ the threads
    def _run(self) -> None:
        """The encoder thread: collect a batch, encode it, hand it to the decoder thread."""
        try:
            while not self._stop.is_set():
                try:
                    items = self._collect()
                    encoded = self._encode(items) if items else None
                    if encoded is not None:
                        self._handoff.put(encoded)  # waits while the decoder still has one batch in hand
                except Exception:  # pragma: no cover - defensive: the thread must survive anything
                    log.exception("micro-batcher loop error")
            self._fail_queued(BatcherClosed("the service is shutting down"))
        finally:
            self._handoff.put(None)

    def _decode_loop(self) -> None:
        """The decoder thread: decode each encoded batch until the encoder thread says stop."""
        while (encoded := self._handoff.get()) is not None:
            self._decoding.set()
            try:
                self._decode(encoded)
            except Exception:  # pragma: no cover - defensive: the thread must survive anything
                log.exception("micro-batcher decoder error")
            finally:
                self._decoding.clear()

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

    def _encode(self, items: list[_Item]) -> _Encoded | None:
        """One encoder pass over the live requests (None when all were cancelled or the pass failed)."""
        live = [it for it in items if it.future.set_running_or_notify_cancel()]
        if not live:
            return None
        # the decoder thread is busy (or about to be): one thread here, the other cores are its
        busy = self._decoding.is_set() or not self._handoff.empty()
        start = time.perf_counter()
        try:
            batch = torch.stack([it.tensor for it in live])  # (B, 3, S, S)
            annotations, concepts = self.captioner.see(batch, threads=1 if busy else None)  # (B, L, D), B lists
        except Exception as exc:  # handed to every waiting request
            log.exception("encoder failed on a batch of %d", len(live))
            for it in live:
                it.future.set_exception(exc)
            return None
        return _Encoded(live, annotations, concepts, start, time.perf_counter())

    def _decode(self, batch: _Encoded) -> None:
        """One decode per settings group of an encoded batch; each request gets its caption or the error."""
        live, annotations, concepts = batch.items, batch.annotations, batch.concepts
        decode_start = time.perf_counter()
        waited = decode_start - batch.encoded  # in the hand-off, behind the previous batch's decode
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
            inference_ms = ((batch.encoded - batch.start) + (time.perf_counter() - group_start)) * 1000.0
            for i, caption in zip(idxs, captions):
                it = live[i]
                queue_ms = (batch.start - it.enqueued + waited) * 1000.0
                it.future.set_result(BatchResult(caption, len(live), len(idxs), queue_ms, inference_ms))
        self.last_batch_s = (batch.encoded - batch.start) + (time.perf_counter() - decode_start)  # the model's time
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
