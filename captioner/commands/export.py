"""``captioner export``: copy a checkpoint for shipping."""

from __future__ import annotations

import argparse
import json

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
        help="also build encoder.onnx, the encoder for ONNX Runtime (captioner[onnx]), with its recipe",
    )
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint

    overrides = {"beam_size": args.beam_size, "length_alpha": args.length_alpha, "max_length": args.max_length}
    out = checkpoint.export(
        args.checkpoint,
        args.output,
        half=not args.fp32,
        inference=overrides,
        name=args.name,
        version=args.model_version,
    )
    if args.onnx:
        from ..onnx_export import build_onnx

        build_onnx(out)
    size = (out / checkpoint.WEIGHTS).stat().st_size / 1e6
    inference = checkpoint.read_config(out)["inference"]
    print(json.dumps({"output": str(out), "weights_mb": round(size, 1), "inference": inference}))
    return 0
