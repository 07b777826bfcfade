"""Argument helpers shared by the command parsers: number types, dataset options and a help formatter."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..datasets import ANNOTATIONS_HELP, DATASETS, SPLITS


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}" if hi else f"must be >= {lo}")
        return value

    return parse


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default once: appended unless its help already names one, left out when None or False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.nargs == 0
            or action.default is None
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_split_arg(p: argparse.ArgumentParser) -> None:
    """--split: train, dev (or val), test."""
    p.add_argument(
        "--split",
        choices=[s for s in SPLITS if s != "all"] + ["val"],
        default="test",
        help="dataset split to score (default: test)",
    )


def add_dataset_args(p: argparse.ArgumentParser, default: str | None) -> None:
    """--dataset, --data-dir and the repeatable --annotations [SPLIT=]FILE (every command that reads a dataset)."""
    layouts = (
        "dataset layout: flickr8k/flickr30k (token file + split lists, or Karpathy JSON), coco (COCO captions "
        "JSON), karpathy (Karpathy JSON), custom (CSV/JSONL); see data/README.md"
    )
    if default is None:
        p.add_argument("--dataset", choices=DATASETS, required=True, help=layouts)
    else:
        p.add_argument("--dataset", choices=DATASETS, default=default, help=f"{layouts} (default: {default})")
    p.add_argument(
        "--data-dir",
        required=True,
        help="folder holding the dataset's images (COCO file_name and Karpathy filename are looked up "
        "here) and, unless --annotations is given, its caption files",
    )
    p.add_argument("--annotations", action="append", metavar="[SPLIT=]FILE", help=ANNOTATIONS_HELP)


def add_data_args(p: argparse.ArgumentParser, split: bool = False) -> None:
    """Dataset options plus --limit and --cache-dir (train and evaluate)."""
    add_dataset_args(p, default="flickr8k")
    p.add_argument("--limit", type=positive_int, help="use only the first N images of each split (quick runs)")
    p.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE or .cache/captioner)")
    if split:
        add_split_arg(p)
