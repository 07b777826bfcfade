"""``captioner score``: score a file of captions against a dataset split's references (see :mod:`captioner.scoring`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import scoring
from ..datasets import DatasetError, load_records
from .common import HelpFormatter, add_dataset_args, add_split_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner score``."""
    p = sub.add_parser(
        "score",
        help="score a file of captions (JSONL/CSV) against a dataset split's references",
        description=scoring.__doc__.split("\n\n")[1],
        formatter_class=HelpFormatter,
    )
    add_dataset_args(p, default=None)
    add_split_arg(p)
    p.add_argument(
        "--captions",
        required=True,
        metavar="FILE",
        help="captions to score: JSONL or CSV with image and caption (as 'captioner caption' writes "
        "it), or the JSON 'evaluate' writes",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="score only the split's images that have a caption instead of failing when some have none",
    )
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    p.add_argument("--output", help="also write the scores to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score ``--captions`` and print the metrics JSON; 1 when ``--output`` cannot be written."""
    records = load_records(args.dataset, args.data_dir, args.split, None, args.annotations, require_images=False)
    if not records:
        raise DatasetError(f"split {args.split!r} of {args.data_dir} has no images with captions")
    result = scoring.score_captions_file(
        records, args.captions, [Path(args.data_dir)], args.allow_missing, meteor=not args.no_meteor
    )
    result |= {"split": args.split, "dataset": args.dataset, "captions_file": str(args.captions)}
    print(json.dumps(result))
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
        except OSError as exc:
            print(f"captioner score: error: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    return 0
