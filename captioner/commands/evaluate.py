"""``captioner evaluate``: score a checkpoint on a dataset split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..datasets import DatasetError
from .common import HelpFormatter, add_data_args, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner evaluate``."""
    from ..settings import GUIDANCE

    e = sub.add_parser("evaluate", help="score a checkpoint on a dataset split", formatter_class=HelpFormatter)
    add_data_args(e, split=True)
    e.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    e.add_argument("--beam-size", type=positive_int, help="beam size (default: the checkpoint's)")
    e.add_argument("--max-length", type=positive_int, help="longest caption in words (default: the checkpoint's)")
    e.add_argument("--length-alpha", type=float, help="length penalty exponent (default: the checkpoint's)")
    e.add_argument(
        "--guidance",
        choices=GUIDANCE,
        help="concepts or none, as in 'captioner caption' (default: the checkpoint's, concepts)",
    )
    e.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    e.add_argument("--output", help="metrics JSON path (default: next to the checkpoint)")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument(
        "--exact",
        action="store_true",
        help="score the fp32 model exactly as trained, without the CPU speed-ups (int8 encoder and decoder, ...)",
    )
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint
    from ..api import Captioner
    from ..datasets import load_records
    from ..evaluate import evaluate_checkpoint
    from ..scoring import metrics_report
    from ..settings import default_cache_dir, default_model_path

    ckpt = checkpoint.resolve(args.checkpoint or default_model_path())
    # the encoder runtime as for captioner caption ($CAPTIONER_RUNTIME, else auto): what ships is what is scored
    cap = Captioner.load(ckpt, device=args.device, fast=False if args.exact else None)
    records = load_records(args.dataset, args.data_dir, args.split, args.limit, args.annotations)
    if not records:
        raise DatasetError(f"no images with captions in split {args.split!r} of {args.data_dir}")
    beam = args.beam_size or int(cap.defaults["beam_size"])
    max_len = args.max_length or cap.defaults["max_length"]
    alpha = cap.defaults["length_alpha"] if args.length_alpha is None else args.length_alpha
    guidance = args.guidance or str(cap.defaults["guidance"])
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    metrics, hyps = evaluate_checkpoint(
        cap, ckpt, records, cache_dir, beam, max_len, alpha, guidance, meteor=not args.no_meteor
    )
    result = metrics_report(metrics)
    result |= {
        "split": args.split,
        "dataset": args.dataset,
        "beam_size": beam,
        "length_alpha": alpha,
        "guidance": guidance,
        "checkpoint": str(ckpt),
        "model": cap.name,
        "runtime": cap.runtime,
        "optimizations": cap.optimizations,
    }
    print(json.dumps(result))
    limit, exact = f"-limit{args.limit}" if args.limit else "", "-exact" if args.exact else ""
    tag = f"{args.dataset}-{args.split}{limit}-beam{beam}{exact}"
    target = Path(args.output) if args.output else ckpt / f"eval-{tag}.json"
    try:
        target.write_text(json.dumps(result | {"captions": hyps}, indent=1) + "\n")
    except OSError as exc:
        print(f"warning: could not write {target}: {exc}", file=sys.stderr)
    return 0
