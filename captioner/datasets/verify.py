"""``captioner data verify``: check a dataset folder and describe it in a manifest JSON.

Every listed image exists and decodes, captions are non-empty, splits are disjoint; duplicates,
caption entries without images and images in no split are reported. The files checked are the
ones training reads (:func:`~captioner.datasets.annotations.find_annotations`), and the manifest
names them, so ``captioner train --manifest`` records what was verified.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..images import ImageError, is_image_path, load_image
from ..progress import bar_disabled
from .annotations import DatasetFiles, find_annotations
from .download import sha256_file
from .loading import read_dataset
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


def _rel(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


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


def verify_dataset(
    dataset: str,
    data_dir: str | Path,
    annotations: str | Path | list[str] | None = None,
    decode: bool = True,
    progress: bool = True,
    max_bad_fraction: float = 0.05,
) -> dict[str, Any]:
    """Check a dataset folder and return its manifest (``manifest["usable"]`` is False on fatal problems).

    Fatal: the captions cannot be read; no train image with captions; an image in two splits;
    more than ``max_bad_fraction`` of the split images missing or undecodable.
    Everything else (a caption entry without its image, byte-identical images, images in no
    split, duplicate captions, ...) is a warning.
    """
    data_dir = Path(data_dir)
    problems = Problems()
    manifest: dict[str, Any] = {
        "format": "captioner-data-manifest/1",
        "dataset": dataset,
        "data_dir": str(data_dir.resolve()),
        "annotations": ([str(annotations)] if isinstance(annotations, (str, Path)) else [str(a) for a in annotations])
        if annotations
        else None,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "images_decoded": bool(decode),
    }
    try:
        dataset_files = find_annotations(dataset, data_dir, annotations)  # the files training reads
        records = [r for r in read_dataset(dataset_files) if r.captions]
    except (DatasetError, OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("unreadable", "fatal", f"cannot read the dataset: {exc}", 1))
        return _finish(manifest, problems, {}, {})

    manifest |= _caption_files(dataset, data_dir, dataset_files, problems)
    _check_split_lists(dataset_files, {r.image_id for r in records}, problems)
    by_path: dict[str, list[CaptionRecord]] = defaultdict(list)
    for r in records:
        by_path[os.path.abspath(r.path)].append(r)
    _check_records(records, by_path, problems)
    if dataset == "custom" and dataset_files.paths:
        _check_table_rows(dataset_files.paths[0], problems)
    present = {p: recs for p, recs in by_path.items() if Path(p).is_file()}
    missing = [recs[0].image_id for p, recs in by_path.items() if p not in present]
    problems.add("caption_entry_without_image", "warning", "caption entries whose image file is missing", missing)
    problems.add(
        "images_in_no_split",
        "warning",
        "images with captions that are in no train/dev/test split (for a "
        "caption file given without SPLIT=, name its split: --annotations train=FILE --annotations dev=FILE)",
        [recs[0].image_id for recs in present.values() if recs[0].split not in EVAL_SPLITS],
    )
    problems.add(
        "images_without_captions",
        "warning",
        "image files that no caption entry mentions",
        _unlisted_images(by_path, data_dir),
    )
    images = _read_images(present, decode, progress)
    dupes = _image_problems(images, present, problems)
    splits = _check_splits(records, images.usable(set(present)), problems, max_bad_fraction)
    counts = {
        "caption_entries": len(records),
        "images_found": len(present),
        "images_decoded": len(present) - len(images.undecodable) - len(images.too_large) if decode else None,
        "captions": sum(len(r.captions) for r in records),
        "images_in_splits": sum(1 for r in records if r.split in EVAL_SPLITS),
        "images_in_no_split": sum(1 for recs in present.values() if recs[0].split not in EVAL_SPLITS),
        "missing_images": len(missing),
        "duplicate_image_groups": len(dupes),
    }
    fingerprint = "".join(f"{_rel(p, data_dir)}\t{d}\n" for p, d in sorted(images.digests.items()))
    manifest["images_sha256"] = hashlib.sha256(fingerprint.encode()).hexdigest()
    return _finish(manifest, problems, counts, splits)


def _caption_files(dataset: str, data_dir: Path, files: DatasetFiles, problems: Problems) -> dict[str, Any]:
    """The manifest's caption-file entries (names and sha256); a warning when several token files lie there."""
    paths = files.paths
    entries = {
        "caption_file": files.names()[0],
        "caption_file_sha256": sha256_file(paths[0]),
        "annotation_files": {name: sha256_file(f) for name, f in zip(files.names(), paths, strict=True)},
    }
    if dataset in ("flickr8k", "flickr30k"):
        tokens = sorted(data_dir.glob("*.token.txt")) + sorted(data_dir.glob("*.token"))
        if len(tokens) > 1 and paths and paths[0] in tokens:
            others = [t.name for t in tokens if t != paths[0]]
            problems.add(
                "several_token_files",
                "warning",
                f"several token files; reading {paths[0].name} (pass --annotations to choose)",
                others,
            )
    return entries


def _check_split_lists(files: DatasetFiles, captioned: set[str], problems: Problems) -> None:
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


def _check_records(records: list[CaptionRecord], by_path: dict[str, list[CaptionRecord]], problems: Problems) -> None:
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


def _check_table_rows(path: Path, problems: Problems) -> None:
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


def _unlisted_images(by_path: dict[str, list[CaptionRecord]], data_dir: Path) -> list[str]:
    """Image files next to the listed ones that no caption entry mentions (only inside ``data_dir``: a
    folder that absolute paths point into is not the dataset's to report on)."""
    root = data_dir.resolve()
    folders = {str(Path(p).parent) for p in by_path if Path(p).parent.resolve().is_relative_to(root)}
    return [
        _rel(f, data_dir)
        for d in sorted(folders)
        if Path(d).is_dir()
        for f in Path(d).iterdir()
        if f.is_file() and is_image_path(f) and not f.name.startswith("._") and os.path.abspath(f) not in by_path
    ]


def _read_images(present: dict[str, list[CaptionRecord]], decode: bool, progress: bool) -> ImageCheck:
    """Read every present image once: its sha256 and, with ``decode``, whether it decodes."""
    check = ImageCheck()
    for path in tqdm(sorted(present), desc="verifying images", unit="img", disable=bar_disabled(progress)):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            check.undecodable[path] = str(exc)
            continue
        check.digests[path] = hashlib.sha256(data).hexdigest()
        if decode:
            try:
                load_image(data)
            except ImageError as exc:
                (check.too_large if exc.code == "too_large" else check.undecodable)[path] = str(exc)
    return check


def _image_problems(images: ImageCheck, present: dict[str, list[CaptionRecord]], problems: Problems) -> list[list[str]]:
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


def _check_splits(
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


def _finish(manifest: dict, problems: list[Problem], counts: dict, splits: dict) -> dict:
    manifest["counts"] = counts
    manifest["splits"] = splits
    manifest["problems"] = [asdict(p) for p in problems]
    manifest["usable"] = not any(p.severity == "fatal" for p in problems)
    return manifest


def format_verify(manifest: dict) -> str:
    """Human-readable summary of a verify manifest."""
    lines = [f"dataset {manifest['dataset']} in {manifest['data_dir']}"]
    if manifest.get("caption_file"):
        lines.append(f"caption file {manifest['caption_file']}  sha256 {manifest['caption_file_sha256']}")
    c = manifest["counts"]
    if c:
        lines.append(
            f"{c['caption_entries']} caption entries, {c['captions']} captions, {c['images_found']} images found"
            + (f", {c['images_decoded']} decoded" if c.get("images_decoded") is not None else " (not decoded)")
        )
    if manifest["splits"]:
        lines.append(f"{'split':<8}{'images':>9}{'usable':>9}{'captions':>10}")
        for split, s in manifest["splits"].items():
            lines.append(f"{split:<8}{s['images']:>9}{s['usable_images']:>9}{s['captions']:>10}")
    for p in manifest["problems"]:
        lines.append(f"{p['severity'].upper():<8}{p['kind']}: {p['message']} ({p['count']})")
        for ex in p["examples"][:5]:
            lines.append(f"          {ex}")
        if p["count"] > 5 and p["examples"]:
            lines.append(f"          ... {p['count'] - 5} more")
    lines.append("usable: yes" if manifest["usable"] else "usable: NO (fatal problems above)")
    return "\n".join(lines)
