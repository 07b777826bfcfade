"""ONNX Runtime sessions for the exported encoder, without torch, so the CLI can open one while torch imports.

    sessions.prefetch(folder, threads)            # the CLI, before ``import torch``: a thread creates the session
    sessions.take(path, sha256, threads)          # runtime.OnnxEncoder.open: that session, or None
    sessions.create(model_bytes, threads)         # the one way a session is made

ONNX Runtime builds a session (graph optimisation, kernel choice) in C++ without holding the GIL, so
on a 2-core machine it overlaps with ``import torch`` (BENCHMARKS.md, "Round 3"). A prefetched session
is only handed out for the same file bytes (sha256 from the recipe) and thread count; anything else
(stale files, another runtime, a guessed thread count that torch does not use) falls back to
:func:`create` in :mod:`captioner.runtime`, which also reports the errors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any

#: config.json's key of the exported encoder's recipe (format: :mod:`captioner.runtime`).
RECIPE_KEY = "encoder_onnx"


def create(model: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session on the serialised ``model`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class Prefetch(threading.Thread):
    """Creates the session for (``path``, ``sha256``, ``threads``) in a thread; :meth:`session` waits for it.

    Not a daemon: an interpreter that exits early still lets ONNX Runtime finish, never tearing it down mid-build.
    """

    def __init__(self, path: Path, sha256: str, threads: int) -> None:
        super().__init__(name="onnx-session-prefetch")
        self.path, self.sha256, self.threads = path, sha256, threads
        self.result: Any = None

    def run(self) -> None:
        try:
            model = self.path.read_bytes()
            if hashlib.sha256(model).hexdigest() == self.sha256:
                self.result = create(model, self.threads)
        except Exception:  # noqa: BLE001  the main path retries and reports the error itself
            self.result = None

    def session(self) -> Any:
        self.join()
        return self.result


PENDING: dict[tuple[str, str, int], Prefetch] = {}


def key(path: Path, sha256: str, threads: int) -> tuple[str, str, int]:
    return (os.path.realpath(path), sha256, threads)


def default_threads() -> int:
    """The intra-op thread count torch will most likely pick: ``$OMP_NUM_THREADS``, else the usable cores."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))


def prefetch(folder: Path, threads: int | None = None) -> None:
    """Start building the session of ``folder``'s exported encoder, if it has one and onnxruntime is installed."""
    try:
        recipe = json.loads((folder / "config.json").read_text()).get(RECIPE_KEY)
        path, sha256 = folder / recipe["file"], recipe["onnx_sha256"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return  # no or no usable recipe: Captioner.load decides and explains
    if importlib.util.find_spec("onnxruntime") is None:
        return
    threads = threads or default_threads()
    job = Prefetch(path, sha256, threads)
    PENDING[key(path, sha256, threads)] = job
    job.start()


def take(path: Path, sha256: str, threads: int) -> Any:
    """The prefetched session for exactly these file bytes and threads (waiting for it), else None."""
    job = PENDING.pop(key(path, sha256, threads), None)
    return None if job is None else job.session()
