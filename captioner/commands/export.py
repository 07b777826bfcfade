"""``captioner export``: copy a checkpoint for shipping."""
from __future__ import annotations

import argparse
import json

from .common import HelpFormatter, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner export``."""
    x = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="copy a checkpoint for shipping: fp16 weights, tuned decoding defaults, no trainer state")
    x.add_argument("--checkpoint", required=True, nargs="+",
                   help="checkpoint folder, e.g. runs/NAME/best; several folders of one run are averaged weight by weight")
    x.add_argument("--output", required=True, help="destination folder, e.g. models/NAME")
    x.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16 storage)")
    x.add_argument("--beam-size", type=positive_int, help="default beam size to store (default: the checkpoint's)")
    x.add_argument("--length-alpha", type=float,
                   help="default length penalty exponent to store (default: the checkpoint's)")
    x.add_argument("--max-length", type=positive_int,
                   help="default maximum caption length to store (default: the checkpoint's)")
    x.add_argument("--name", help="model name to store (default: the checkpoint's)")
    x.add_argument("--model-version", help="model version to store (default: the checkpoint's)")
    x.add_argument("--onnx", action="store_true",
                   help="also build encoder.onnx, the encoder for ONNX Runtime (captioner[onnx]), with its recipe")
    x.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint

    sources = [checkpoint.resolve(c) for c in args.checkpoint]
    src = sources[0]
    config = checkpoint.read_config(src)
    config.pop("format_version", None)
    tied = config.pop("tied_weights", {})
    if len(sources) > 1:
        weights = checkpoint.average_weights(sources)
        config["averaged_from"] = [str(s) for s in sources]
    else:
        weights = checkpoint.read_weights(src)
    for name, target in tied.items():  # re-create the shared entries so save() can detect the ties
        weights[name] = weights[target]
    inference = config.setdefault("inference", {})
    for key in ("beam_size", "length_alpha", "max_length"):
        value = getattr(args, key)
        if value is not None:
            inference[key] = value
    if args.name:
        config["name"] = args.name
    if args.model_version:
        config["version"] = args.model_version
    vocab = json.loads((src / checkpoint.VOCAB).read_text())
    out = checkpoint.save(args.output, weights, config, vocab, half=not args.fp32)
    if args.onnx:
        from ..onnx_export import build_onnx

        build_onnx(out)
    size = (out / checkpoint.WEIGHTS).stat().st_size / 1e6
    print(json.dumps({"output": str(out), "weights_mb": round(size, 1), "inference": inference}))
    return 0
