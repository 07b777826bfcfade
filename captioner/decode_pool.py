"""Decoding untrusted images in worker processes, bounded in time and memory.

:class:`DecodePool` keeps ``workers`` small processes (Python + Pillow + numpy; no torch, no model).
Each decodes one image at a time with :func:`decode_for_model` (:func:`~captioner.images.load_image`,
then the model-sized square of :func:`~captioner.images.resize_square` and, when asked, an overlay
thumbnail) and sends back only those small pixel buffers. The bounds:

* memory: a worker's address space is capped (``RLIMIT_AS``) at its size after start-up plus
  ``memory_mb``; an allocation beyond it fails inside the decoder (``MemoryError`` -> ``too_large``);
* time: a decode that has not answered after ``timeout_s`` is killed (``SIGKILL``) and the worker
  replaced -> ``too_slow``; a worker that dies (a crash in a C decoder) is replaced -> ``undecodable``;
* slots: callers wait for a free worker first come, first served, until their own deadline
  (:class:`PoolBusy` when none frees up in time).

Messages are length-prefixed bytes (``multiprocessing.connection``), a JSON header plus raw pixels:
nothing is unpickled, so a worker subverted by a hostile file cannot run code in the caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageError, load_image, resize_square

#: Seconds a fresh worker may take to import Pillow and report ready (not counted as decode time).
START_TIMEOUT_S = 60.0

# The worker imports captioner.decode_pool without running captioner/__init__.py (which imports torch):
# a bare package object whose __path__ is this folder stands in for the package.
_BOOTSTRAP = (
    "import sys, types\n"
    "pkg = types.ModuleType('captioner'); pkg.__path__ = [sys.argv[1]]; sys.modules['captioner'] = pkg\n"
    "from captioner.decode_pool import worker_main\n"
    "worker_main(int(sys.argv[2]), int(sys.argv[3]))\n"
)


class PoolBusy(RuntimeError):
    """No decode worker became free before the caller's deadline."""


@dataclass
class Decoded:
    """An image prepared for the model: ``image`` is RGB (size, size); ``thumbnail`` fits in the
    requested side (None when not asked for); ``original_size`` is the (width, height) in the file."""

    image: Image.Image
    thumbnail: Image.Image | None
    original_size: tuple[int, int]


def decode_for_model(
    data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None, thumbnail_side: int = 0
) -> Decoded:
    """Bytes -> :class:`Decoded` in this process (what each worker runs). Raises ImageError."""
    img = load_image(data, max_pixels=max_pixels, draft_size=draft_size)
    original = img.info.get("original_size", img.size)
    thumb = None
    if thumbnail_side:
        thumb = img.copy()
        thumb.thumbnail((thumbnail_side, thumbnail_side), Image.BICUBIC)
    return Decoded(resize_square(img, size), thumb, original)


# ---------------------------------------------------------------- wire format
def _pack(header: dict, payload: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(4, "big") + head + bytes(payload)


def _unpack(message: bytes) -> tuple[dict, memoryview]:
    n = int.from_bytes(message[:4], "big")
    return json.loads(message[4 : 4 + n]), memoryview(message)[4 + n :]


# ---------------------------------------------------------------- the worker process
def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def worker_main(fd: int, memory_mb: int) -> None:
    """Serve decode requests on the connection ``fd`` until it closes (run by :data:`_BOOTSTRAP`)."""
    import resource

    conn = Connection(fd)
    if memory_mb > 0 and os.path.exists("/proc/self/statm"):
        limit = _address_space_bytes() + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        conn.send_bytes(_pack({"ready": True, "pid": os.getpid()}))
    except OSError:  # the pool closed while this worker started
        return
    while True:
        try:
            header, _ = _unpack(conn.recv_bytes())
            data = conn.recv_bytes()  # the upload, as its own message (no concatenated copy in the caller)
        except (EOFError, OSError):
            return
        try:
            out = decode_for_model(
                data, header["size"], header["max_pixels"], header["draft_size"], header["thumbnail_side"]
            )
            thumb = out.thumbnail
            reply = {
                "ok": True,
                "original_size": list(out.original_size),
                "thumbnail": list(thumb.size) if thumb is not None else None,
            }
            message = _pack(reply, out.image.tobytes() + (thumb.tobytes() if thumb is not None else b""))
            del out, thumb
        except ImageError as exc:
            message = _pack({"ok": False, "code": exc.code, "message": str(exc)})
        except MemoryError:  # outside load_image (resizing): the same answer
            message = _pack({"ok": False, "code": "too_large", "message": "image needs more memory to decode"})
        try:
            conn.send_bytes(message)
        except OSError:  # the caller is gone
            return
        del data


class _Worker:
    """One worker process and the parent's end of its connection."""

    def __init__(self, memory_mb: int) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        package = str(Path(__file__).resolve().parent)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, package, str(child.fileno()), str(memory_mb)],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.ready = False

    def wait_ready(self) -> None:
        if not self.ready:
            if not self.conn.poll(START_TIMEOUT_S):
                raise PoolBusy("the image decoder did not start")
            header, _ = _unpack(self.conn.recv_bytes())
            self.ready = bool(header.get("ready"))

    def kill(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.conn.close()

    def stop(self) -> None:
        self.conn.close()  # the worker sees EOF and exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.kill()


class _Waiter:
    __slots__ = ("event", "worker")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.worker: _Worker | None = None


class DecodePool:
    """``workers`` decode processes, each capped at ``memory_mb`` above its start-up size and
    ``timeout_s`` per image. Thread-safe; slots are handed out in arrival order."""

    def __init__(self, workers: int, timeout_s: float, memory_mb: int) -> None:
        if workers < 1:
            raise ValueError("a decode pool needs at least one worker")
        self.size = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self.busy = 0  # workers decoding now
        self.peak_busy = 0
        self.restarts = 0

    def start(self) -> DecodePool:
        """Start the workers (before the first request, so that requests never start processes)."""
        workers = [_Worker(self.memory_mb) for _ in range(self.size)]
        for w in workers:
            w.wait_ready()
        with self._lock:
            self._idle.extend(workers)
        return self

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _acquire(self, deadline: float) -> _Worker:
        with self._lock:
            if self._closed:
                raise PoolBusy("the decode pool is closed")
            if self._idle and not self._waiters:
                worker = self._idle.pop()
                self._mark_busy()
                return worker
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if waiter.worker is None:  # timed out (or closed) before a worker was handed over
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise PoolBusy("no decode slot became free in time")
            return waiter.worker

    def _mark_busy(self) -> None:
        self.busy += 1
        self.peak_busy = max(self.peak_busy, self.busy)

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            self.busy -= 1
            if self._closed:
                worker.stop()
                return
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.worker = worker
                self._mark_busy()
                waiter.event.set()
            else:
                self._idle.append(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self.restarts += 1
        return _Worker(self.memory_mb)

    def decode(
        self,
        data: bytes,
        size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_size: int | None = None,
        thumbnail_side: int = 0,
        deadline: float | None = None,
    ) -> Decoded:
        """Decode in a worker. ``deadline`` (``time.monotonic()``) bounds the wait for a free worker.

        Raises:
            PoolBusy: no worker became free before ``deadline``.
            ImageError: ``undecodable``, ``too_large`` (pixel limit or memory cap), ``too_slow`` (time cap).
        """
        worker = self._acquire(time.monotonic() + self.timeout_s if deadline is None else deadline)
        try:
            try:
                worker.wait_ready()
            except (EOFError, OSError, ValueError):
                worker = self._replace(worker)
                raise PoolBusy("the image decoder did not start") from None
            header = {
                "size": size,
                "max_pixels": max_pixels,
                "draft_size": draft_size,
                "thumbnail_side": thumbnail_side,
            }
            try:
                worker.conn.send_bytes(_pack(header))
                worker.conn.send_bytes(data)
                answered = worker.conn.poll(self.timeout_s)
                message = worker.conn.recv_bytes() if answered else None
            except (EOFError, OSError):  # the worker died: a crash in a decoder, or killed from outside
                worker = self._replace(worker)
                raise ImageError("the image decoder failed on this image") from None
            if message is None:
                worker = self._replace(worker)
                raise ImageError(f"the image took longer than {self.timeout_s:g} s to decode", code="too_slow")
            try:
                reply, payload = _unpack(message)
            except ValueError:
                raise ImageError("the image decoder sent a malformed reply") from None
            return _result(reply, payload, size)
        finally:
            self._release(worker)

    def close(self) -> None:
        """Stop the workers; waiting callers get PoolBusy."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            waiter.event.set()
        for worker in idle:
            worker.stop()


def _result(reply: dict, payload: memoryview, size: int) -> Decoded:
    """A worker's reply -> Decoded, checking every size against the payload (a worker is not trusted)."""
    if not reply.get("ok"):
        code = reply.get("code") if reply.get("code") in ("undecodable", "too_large", "too_slow") else "undecodable"
        raise ImageError(str(reply.get("message", "cannot decode image")), code=code)
    thumb_size = tuple(reply["thumbnail"]) if reply.get("thumbnail") else None
    n_main = size * size * 3
    n_thumb = thumb_size[0] * thumb_size[1] * 3 if thumb_size else 0
    if len(payload) != n_main + n_thumb:
        raise ImageError("the image decoder sent a malformed reply")
    image = Image.frombytes("RGB", (size, size), bytes(payload[:n_main]))
    thumb = Image.frombytes("RGB", thumb_size, bytes(payload[n_main:])) if thumb_size else None
    w, h = reply["original_size"]
    return Decoded(image, thumb, (int(w), int(h)))


__all__ = ["DecodePool", "Decoded", "PoolBusy", "decode_for_model", "worker_main"]
