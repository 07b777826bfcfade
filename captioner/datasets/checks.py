"""The checks ``captioner data verify`` runs on what it has read, each adding to a :class:`Problems` list.

Split lists, caption records, a custom table's raw rows, the images read once (:class:`ImageCheck`)
and the per-split counts; :mod:`captioner.datasets.verify` reads the files and writes the manifest.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .annotations import DatasetFiles
from .records import EVAL_SPLITS, CaptionRecord, DatasetError, normalise_split, split_order

MAX_EXAMPLES = 20  # examples kept per problem in the manifest


@dataclass
class Problem:
    """One kind of problem found in a dataset, with a few examples."""

    kind: str
    severity: str  # "fatal" | "warning"
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


class Problems(list[Problem]):
    """The problems found so far, in the order the checks ran."""

    def add(self, kind: str, severity: str, message: str, items: list[str]) -> None:
        """Record a problem when ``items`` (its instances) is not empty, with the first few as examples."""
        if items:
            self.append(Problem(kind, severity, message, len(items), sorted(items)[:MAX_EXAMPLES]))


@dataclass
class ImageCheck:
    """What reading every present image once found: sha256 per path, and the ones that failed."""

    digests: dict[str, str] = field(default_factory=dict)
    undecodable: dict[str, str] = field(default_factory=dict)  # path -> error
    too_large: dict[str, str] = field(default_factory=dict)

    def usable(self, present: set[str]) -> set[str]:
        return present - set(self.undecodable) - set(self.too_large)


def _norm_caption(text: str) -> str:
    return " ".join(text.lower().split())


def _table_rows(path: Path) -> list[dict]:
    """Raw rows of a custom CSV/JSONL (only for checks the reader cannot see: empty captions, split conflicts)."""
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, ValueError):
        return []


def check_split_lists(files: DatasetFiles, captioned: set[str], problems: Problems) -> None:
    """Flickr split lists: names listed twice, in two lists, or without captions."""
    if not files.split_lists:
        return
    listed: dict[str, list[str]] = defaultdict(list)
    for split, path in files.split_lists.items():
        names = path.read_text(encoding="utf-8").split()
        problems.add(
            "repeated_in_split_list",
            "warning",
            f"names listed twice in {path.name}",
            [n for n, c in Counter(names).items() if c > 1],
        )
        for n in dict.fromkeys(names):
            listed[n].append(split)
    problems.add(
        "split_overlap",
        "fatal",
        "images listed in more than one split",
        [f"{n} ({'+'.join(s)})" for n, s in listed.items() if len(s) > 1],
    )
    problems.add(
        "listed_without_captions",
        "warning",
        "images in a split list with no caption entry",
        [n for n in listed if n not in captioned],
    )


def check_records(records: list[CaptionRecord], by_path: dict[str, list[CaptionRecord]], problems: Problems) -> None:
    """The records as read: an image in two splits or entered twice, empty or repeated captions."""
    problems.add(
        "split_overlap",
        "fatal",
        "images listed in more than one split",
        [
            f"{recs[0].image_id} ({'+'.join(sorted({r.split for r in recs}))})"
            for recs in by_path.values()
            if len({r.split for r in recs}) > 1
        ],
    )
    problems.add(
        "repeated_entries",
        "warning",
        "images with more than one entry in the caption file",
        [recs[0].image_id for recs in by_path.values() if len(recs) > 1 and len({r.split for r in recs}) == 1],
    )
    problems.add(
        "empty_captions",
        "warning",
        "images with an empty caption",
        [r.image_id for r in records if any(not c.strip() for c in r.captions)],
    )
    problems.add(
        "duplicate_captions",
        "warning",
        "the same caption twice for one image (ignoring case and spacing)",
        [
            f"{r.image_id}: {c!r}"
            for r in records
            for c, n in Counter(_norm_caption(c) for c in r.captions if c.strip()).items()
            if n > 1
        ],
    )


def check_table_rows(path: Path, problems: Problems) -> None:
    """A custom CSV/JSONL's raw rows: empty captions and an image given different splits (the reader hides both)."""
    rows = _table_rows(path)
    problems.add(
        "empty_captions",
        "warning",
        "rows with an empty caption (ignored by the reader)",
        [
            f"row {i}: {row.get('image')}"
            for i, row in enumerate(rows, 1)
            if isinstance(row, dict) and row.get("image") and not str(row.get("caption") or "").strip()
        ],
    )
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        if isinstance(row, dict) and row.get("image"):
            try:
                splits_of[str(row["image"])].add(normalise_split(str(row.get("split") or "train")))
            except DatasetError:
                splits_of[str(row["image"])].add(str(row.get("split")))
    problems.add(
        "split_overlap",
        "fatal",
        "images given different splits on different rows",
        [f"{img} ({'+'.join(sorted(s))})" for img, s in splits_of.items() if len(s) > 1],
    )


def image_problems(images: ImageCheck, present: dict[str, list[CaptionRecord]], problems: Problems) -> list[list[str]]:
    """Undecodable, too large and byte-identical images; returns the groups of identical files."""
    problems.add(
        "undecodable_images",
        "warning",
        "image files that do not decode",
        [f"{present[p][0].image_id}: {e}" for p, e in images.undecodable.items()],
    )
    problems.add(
        "too_large_images",
        "warning",
        "images above the pixel limit",
        [f"{present[p][0].image_id}: {e}" for p, e in images.too_large.items()],
    )
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in images.digests.items():
        groups[digest].append(path)
    dupes = [sorted(g) for g in groups.values() if len(g) > 1]
    problems.add(
        "duplicate_images",
        "warning",
        "byte-identical image files",
        [" = ".join(present[p][0].image_id for p in g) for g in dupes],
    )
    problems.add(
        "duplicate_images_across_splits",
        "warning",
        "byte-identical images in different splits (leakage)",
        [
            " = ".join(f"{present[p][0].image_id} ({present[p][0].split})" for p in g)
            for g in dupes
            if len({present[p][0].split for p in g}) > 1
        ],
    )
    return dupes


def check_splits(
    records: list[CaptionRecord], usable: set[str], problems: Problems, max_bad_fraction: float
) -> dict[str, dict[str, int]]:
    """Images, usable images and captions per split, and the fatal checks on them."""
    splits: dict[str, dict[str, int]] = {}
    for split in split_order({r.split for r in records}):
        recs = [r for r in records if r.split == split]
        ok = [r for r in recs if os.path.abspath(r.path) in usable]
        splits[split] = {"images": len(recs), "usable_images": len(ok), "captions": sum(len(r.captions) for r in recs)}
    in_splits = [r for r in records if r.split in EVAL_SPLITS]
    bad = sum(1 for r in in_splits if os.path.abspath(r.path) not in usable)
    if not splits.get("train", {}).get("usable_images"):
        problems.append(
            Problem(
                "no_train_images",
                "fatal",
                "no usable train image with captions (training needs a "
                "train split: --annotations train=FILE, or split lists/fields in the caption file)",
                1,
            )
        )
    if not splits.get("dev", {}).get("usable_images"):
        problems.append(Problem("no_dev_split", "warning", "no dev images: training cannot validate", 1))
    if in_splits and bad / len(in_splits) > max_bad_fraction:
        problems.append(
            Problem(
                "too_many_bad_images",
                "fatal",
                f"{bad} of {len(in_splits)} split images are missing or undecodable (more than {max_bad_fraction:.0%})",
                bad,
            )
        )
    return splits
