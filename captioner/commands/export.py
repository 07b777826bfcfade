"""``captioner export``: copy a checkpoint for shipping."""

from __future__ import annotations

import argparse
import json

from ..settings import CALIBRATION_METHODS, ONNX_PRECISIONS
from .common import HelpFormatter, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner export``."""
    x = sub.add_parser(
        "export",
        formatter_class=HelpFormatter,
        help="copy a checkpoint for shipping: fp16 weights, tuned decoding defaults, no trainer state",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="checkpoint folder, e.g. runs/NAME/best; several folders of one run are averaged weight by weight",
    )
    x.add_argument("--output", required=True, help="destination folder, e.g. models/NAME")
    x.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16 storage)")
    x.add_argument("--beam-size", type=positive_int, help="default beam size to store (default: the checkpoint's)")
    x.add_argument(
        "--length-alpha", type=float, help="default length penalty exponent to store (default: the checkpoint's)"
    )
    x.add_argument(
        "--max-length", type=positive_int, help="default maximum caption length to store (default: the checkpoint's)"
    )
    x.add_argument("--name", help="model name to store (default: the checkpoint's)")
    x.add_argument("--model-version", help="model version to store (default: the checkpoint's)")
    x.add_argument(
        "--onnx",
        action="store_true",
        help="also build the encoder for ONNX Runtime (captioner[onnx]) at --precision, with its recipe",
    )
    add_onnx_options(x)
    x.set_defaults(func=run)


def add_onnx_options(parser: argparse.ArgumentParser) -> None:
    """The exported encoder's precision and (int8) calibration options: here and ``python -m captioner.onnx_export``."""
    parser.add_argument(
        "--precision", choices=ONNX_PRECISIONS, default="fp32", help="the exported encoder's precision (with --onnx)"
    )
    parser.add_argument(
        "--calibration-data",
        metavar="DIR",
        help="int8: the Flickr8k folder (images/, Flickr_8k.trainImages.txt) whose train photos calibrate it",
    )
    parser.add_argument(
        "--calibration-images", type=positive_int, default=64, help="int8: the first N train photos calibrate it"
    )
    parser.add_argument(
        "--calibration-method", choices=CALIBRATION_METHODS, default="minmax", help="int8: the activation range method"
    )
    parser.add_argument(
        "--keep-fp32",
        nargs="*",
        metavar="NODE",
        help="int8: ONNX nodes left in fp32 (default: the stem and first block; give none to quantise every node)",
    )


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint

    calibration = None
    if args.onnx or args.precision != "fp32":  # checked before the copy: a missing data folder fails at once
        from ..onnx_export import calibration_from, check_request

        calibration = calibration_from(args)
        check_request(args.precision, calibration)
    overrides = {"beam_size": args.beam_size, "length_alpha": args.length_alpha, "max_length": args.max_length}
    out = checkpoint.export(
        args.checkpoint,
        args.output,
        half=not args.fp32,
        inference=overrides,
        name=args.name,
        version=args.model_version,
    )
    if args.onnx or args.precision != "fp32":
        from ..onnx_export import build_onnx

        build_onnx(out, args.precision, calibration)
    size = (out / checkpoint.WEIGHTS).stat().st_size / 1e6
    inference = checkpoint.read_config(out)["inference"]
    print(json.dumps({"output": str(out), "weights_mb": round(size, 1), "inference": inference}))
    return 0
