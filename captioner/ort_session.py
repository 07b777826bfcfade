"""ONNX Runtime sessions on a checkpoint's exported encoder, and building one early (torch-free).

:mod:`captioner.runtime` opens every session through :func:`open_session`. ``captioner caption`` calls
:func:`prefetch` before it imports torch, which takes 1.2-1.8 s on 2 cores: the session (import
onnxruntime, read and hash the file, optimise the graph: 0.15-0.3 s) is then built on the other core
meanwhile, and :func:`open_session` takes it over when it asks for the same file, digest and thread
count. Anything else (another thread count, a failed build) is dropped and built as usual, so a
prefetch changes when the work happens, never what is built or which error is raised.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .settings import requested_runtime

#: config.json key of the exported encoder's recipe (documented in :mod:`captioner.runtime`)
RECIPE_KEY = "encoder_onnx"

_lock = threading.Lock()
_pending: dict[tuple[str, str], tuple[int, Future]] = {}  # (file, onnx_sha256) -> (threads, the session)


class DigestMismatch(ValueError):
    """The ONNX file's bytes are not those its recipe names."""


def open_session(folder: Path, recipe: dict, threads: int) -> Any:
    """An ONNX Runtime session on ``folder``'s exported encoder with ``threads`` intra-op threads, its bytes
    checked against the recipe's sha256 (:class:`DigestMismatch`); a matching :func:`prefetch` is taken over."""
    key = _key(folder, recipe)
    with _lock:
        early = _pending.pop(key, None)
    if early is not None and early[0] == threads:
        try:
            return early[1].result()
        except Exception:  # noqa: BLE001 - built again below, so the caller sees the usual error
            pass
    return _build(folder, recipe, threads)


def prefetch(folder: str | os.PathLike, threads: int | None = None) -> None:
    """Start building ``folder``'s exported-encoder session in a background thread, if it has one.

    ``threads`` defaults to what torch will pick: ``$OMP_NUM_THREADS``, else the CPUs this process may use
    (on a machine with hyper-threads torch takes the physical cores instead, and the early session is dropped).
    Does nothing when ``$CAPTIONER_RUNTIME`` is ``torch`` (or unknown), onnxruntime is missing or the folder has no
    recipe.
    """
    try:
        if requested_runtime() == "torch" or not onnxruntime_installed():
            return
    except ValueError:  # an unknown CAPTIONER_RUNTIME: the load reports it
        return
    try:
        recipe = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))[RECIPE_KEY]
        key = _key(Path(folder), recipe)
    except (OSError, ValueError, KeyError, TypeError):
        return
    n = threads or _default_threads()
    future: Future = Future()
    with _lock:
        if key in _pending:
            return
        _pending[key] = (n, future)

    def build() -> None:
        try:
            future.set_result(_build(Path(folder), recipe, n))
        except BaseException as exc:  # noqa: BLE001 - handed to open_session, which builds again
            future.set_exception(exc)

    # not a daemon: an exit during the build (a bad checkpoint, Ctrl-C) waits for it instead of tearing
    # ONNX Runtime down under a thread that is still inside it
    threading.Thread(target=build, name="captioner-ort-prefetch").start()


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _key(folder: Path, recipe: dict) -> tuple[str, str]:
    return str((folder / recipe["file"]).resolve()), str(recipe["onnx_sha256"])


def _default_threads() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _build(folder: Path, recipe: dict, threads: int) -> Any:
    import onnxruntime as ort

    path = folder / recipe["file"]
    model = path.read_bytes()
    if hashlib.sha256(model).hexdigest() != recipe["onnx_sha256"]:
        raise DigestMismatch(f"{path} does not match its recipe (onnx_sha256)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
