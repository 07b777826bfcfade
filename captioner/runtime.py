"""Encoder runtimes: the checkpoint's encoder exported to ONNX and run by ONNX Runtime, torch as the fallback.

    python -m captioner.onnx_export models/flickr8k-lite2 [--precision int8 --calibration-data DIR]
                                                 # writes encoder[-int8].onnx + its recipe in config.json
    Captioner.load("models/flickr8k-lite2")      # runs it when onnxruntime is installed and the file is fresh

The exported graph is exactly the encoder ``Captioner`` runs on the CPU: the trunk, the caption
encoder's last blocks and head, and (EfficientNet-Lite) the ImageNet concept head on the shared
trunk, with batch norms folded; images (B, 3, S, S) -> annotations (B, L, D) [, class_probs (B, 1000)].
It is stored in fp32 (``encoder.onnx``) or statically quantised to int8 (``encoder-int8.onnx``,
QDQ); a folder holds one, described by its recipe under ``"encoder_onnx"`` in config.json::

    file            "encoder.onnx" or "encoder-int8.onnx", next to model.safetensors
    precision       "fp32" or "int8"
    outputs         ["annotations", "class_probs"] (or just ["annotations"] without a concept head)
    weights_sha256  sha256 of the model.safetensors it was built from
    onnx_sha256     sha256 of the ONNX file itself
    encoder         the encoder config and finetune_blocks it was built for
    opset, built_with   ONNX opset and the versions of captioner, torch, onnx, the packaged ImageNet
                    weights and (int8) onnxruntime, whose quantiser runs the graph to calibrate it
    quantization    (int8) the pre-processing step, format, per_channel, weights/activations types,
                    calibration method, exclude (node names kept in fp32)
    calibration     (int8) dataset, split, images, photos (file names, in order), photos_sha256 (sha256
                    over the photos' own sha256 digests, in order)

A file whose recipe does not match the folder (other weights, another encoder, edited bytes) is
*stale*: ``Captioner.load`` then runs torch and warns. ``$CAPTIONER_RUNTIME`` (``auto``, ``torch``,
``onnx``) or ``Captioner.load(runtime=...)`` picks the runtime; ``auto`` takes ONNX Runtime for the
fast CPU path whenever it can. Static graphs (int8 included: its activation scales are fixed at
calibration) have no batch-dependent state, so an image's grid is bit-identical alone and in a
batch (tests/test_runtime.py).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, ort_session, settings
from .encoder import EncoderConfig
from .ort_session import onnxruntime_installed
from .settings import ONNX_PRECISIONS as PRECISIONS

ONNX_FILE = "encoder.onnx"
RECIPE_KEY = ort_session.RECIPE_KEY
OPSET = 17
TORCH = "torch"


class RuntimeUnavailable(checkpoint.CheckpointError):
    """An unknown runtime name, or ``onnx`` asked for where it cannot run (no onnxruntime, no or stale encoder.onnx)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def onnx_file(precision: str) -> str:
    """The exported encoder's file name at ``precision``: ``encoder.onnx`` (fp32) or ``encoder-int8.onnx``."""
    return ONNX_FILE if precision == "fp32" else f"encoder-{precision}.onnx"


def requested_runtime(runtime: str | None = None) -> str:
    """``runtime``, else ``$CAPTIONER_RUNTIME``, else ``auto``; RuntimeUnavailable for an unknown name."""
    try:
        return settings.requested_runtime(runtime)
    except ValueError as exc:
        raise RuntimeUnavailable(str(exc)) from exc


def expected_encoder(config: dict) -> dict:
    """The part of a checkpoint's config that the exported graph depends on (besides the weights)."""
    return {"config": config["encoder"], "finetune_blocks": int(config.get("finetune_blocks") or 0)}


def stale_reason(folder: Path, config: dict) -> str | None:
    """Why ``folder``'s exported encoder cannot stand for its weights (None: it is fresh). Hashes model.safetensors."""
    recipe = config.get(RECIPE_KEY)
    if not recipe:
        return f"{folder} has no {ONNX_FILE} recipe in {checkpoint.CONFIG}"
    name = recipe.get("file", ONNX_FILE)
    if recipe.get("precision") not in PRECISIONS:
        return f"{name} has an unknown precision {recipe.get('precision')!r}"
    if not (folder / name).is_file():
        return f"{folder / name} is missing"
    if recipe.get("encoder") != expected_encoder(config):
        return f"{name} was built for another encoder configuration"
    if recipe.get("weights_sha256") != file_sha256(folder / checkpoint.WEIGHTS):
        return f"{name} was built from other weights than {checkpoint.WEIGHTS}"
    return None


class OnnxEncoder(nn.Module):
    """The exported encoder in an ONNX Runtime session: images (B, 3, S, S) -> annotations (B, L, D)
    and, with a concept head, class probabilities (B, 1000), as torch tensors on the CPU.

    ``forward(images, threads=n)`` runs a session of the same verified file on ``n`` intra-op threads instead
    (built on first use, or ahead with :meth:`session_for`), for a caller that keeps the other cores busy
    meanwhile: the service encodes its next micro-batch on one thread while the last one decodes. Outputs are
    bit-identical on any thread count (tests/test_runtime.py).
    """

    def __init__(
        self,
        session: Any,
        config: EncoderConfig,
        precision: str,
        concepts: bool,
        source: tuple[Path, dict] | None = None,
    ) -> None:
        super().__init__()
        self.config, self.concepts = config, concepts
        self.runtime = f"onnxruntime-{precision}"
        self._sessions: dict[int | None, Any] = {None: session}  # intra-op threads (None: the default) -> session
        self._source = source  # (folder, recipe): where another thread count's session comes from
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, config: dict, threads: int | None = None) -> OnnxEncoder:
        """A session on ``folder``'s exported encoder with ``threads`` intra-op threads (default: torch's count)."""
        recipe = config[RECIPE_KEY]
        session = _session(folder, recipe, threads)
        return cls(
            session,
            EncoderConfig(**config["encoder"]),
            recipe["precision"],
            len(recipe["outputs"]) == 2,
            (folder, recipe),
        )

    def session_for(self, threads: int | None = None) -> Any:
        """The session that runs on ``threads`` intra-op threads (None: the one opened), built once on first use."""
        with self._lock:
            if threads not in self._sessions:
                if self._source is None:
                    raise RuntimeUnavailable("this encoder has no file to open another session from")
                self._sessions[threads] = _session(*self._source, threads)
            return self._sessions[threads]

    def forward(
        self, images: torch.Tensor, threads: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> annotations (B, L, D) [, class probabilities (B, 1000)], on ``threads`` threads."""
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()  # (B, 3, S, S)
        outs = [torch.from_numpy(o) for o in self.session_for(threads).run(None, {"images": pixels})]
        return (outs[0], outs[1]) if self.concepts else outs[0]


def _session(folder: Path, recipe: dict, threads: int | None) -> Any:
    """An ONNX Runtime session on ``folder``'s exported encoder (default threads: torch's count), its bytes
    checked against the recipe's sha256; one that :func:`captioner.ort_session.prefetch` started is taken over."""
    try:
        return ort_session.open_session(folder, recipe, threads or torch.get_num_threads())
    except ort_session.DigestMismatch as exc:
        raise RuntimeUnavailable(str(exc)) from exc


def open_encoder(
    folder: Path, config: dict, device: torch.device, fast: bool, runtime: str | None = None
) -> OnnxEncoder | None:
    """The ONNX encoder when it should run for this load, else None (torch).

    Only the fast CPU path uses ONNX (``fast=False`` is the model exactly as trained). ``auto`` falls
    back to torch, with a warning when the folder has an encoder.onnx that cannot be used;
    ``onnx`` raises RuntimeUnavailable instead.
    """
    wanted = requested_runtime(runtime)
    if wanted == TORCH:
        return None
    if device.type != "cpu" or not fast:
        problem = "ONNX Runtime runs the fast CPU path only (device cpu, fast on)"
    elif not onnxruntime_installed():
        problem = "onnxruntime is not installed (pip install 'captioner[onnx]')"
    else:
        problem = stale_reason(folder, config)
    if problem is None:
        try:
            return OnnxEncoder.open(folder, config)
        except RuntimeUnavailable as exc:
            problem = str(exc)
    if wanted == "onnx":
        raise RuntimeUnavailable(problem)
    if RECIPE_KEY in config and device.type == "cpu" and fast and onnxruntime_installed():
        warnings.warn(
            f"{problem}; the encoder runs with torch (rebuild: make onnx, or captioner export --onnx)", stacklevel=3
        )
    return None
