"""Argument helpers shared by the command-line parsers: dataset options and a help formatter."""
from __future__ import annotations

import argparse

from .datasets import ANNOTATIONS_HELP, DATASETS, SPLITS


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default once: appended unless its help already names one, left out when None or False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.nargs == 0 or action.default is None \
                or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_split_arg(p: argparse.ArgumentParser) -> None:
    """--split: train, dev (or val), test."""
    p.add_argument("--split", choices=[s for s in SPLITS if s != "all"] + ["val"], default="test",
                   help="dataset split to score (default: test)")


def add_dataset_args(p: argparse.ArgumentParser, default: str | None) -> None:
    """--dataset, --data-dir and the repeatable --annotations [SPLIT=]FILE (every command that reads a dataset)."""
    layouts = ("dataset layout: flickr8k/flickr30k (token file + split lists, or Karpathy JSON), coco (COCO captions "
               "JSON), karpathy (Karpathy JSON), custom (CSV/JSONL); see data/README.md")
    if default is None:
        p.add_argument("--dataset", choices=DATASETS, required=True, help=layouts)
    else:
        p.add_argument("--dataset", choices=DATASETS, default=default, help=f"{layouts} (default: {default})")
    p.add_argument("--data-dir", required=True,
                   help="folder holding the dataset's images (COCO file_name and Karpathy filename are looked up "
                        "here) and, unless --annotations is given, its caption files")
    p.add_argument("--annotations", action="append", metavar="[SPLIT=]FILE", help=ANNOTATIONS_HELP)
