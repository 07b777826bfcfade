"""``captioner data verify``: check a dataset folder and describe it in a manifest JSON.

Every listed image exists and decodes, captions are non-empty, splits are disjoint; duplicates,
caption entries without images and images in no split are reported. The files checked are the
ones training reads (:func:`~captioner.datasets.annotations.find_annotations`), and the manifest
names them, so ``captioner train --manifest`` records what was verified.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..images import ImageError, is_image_path, load_image
from ..progress import bar_disabled
from .annotations import DatasetFiles, find_annotations
from .checks import (
    ImageCheck,
    Problem,
    Problems,
    check_records,
    check_split_lists,
    check_splits,
    check_table_rows,
    image_problems,
)
from .download import sha256_file
from .loading import read_dataset
from .records import EVAL_SPLITS, CaptionRecord, DatasetError


def _rel(path: str | Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


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
    check_split_lists(dataset_files, {r.image_id for r in records}, problems)
    by_path: dict[str, list[CaptionRecord]] = defaultdict(list)
    for r in records:
        by_path[os.path.abspath(r.path)].append(r)
    check_records(records, by_path, problems)
    if dataset == "custom" and dataset_files.paths:
        check_table_rows(dataset_files.paths[0], problems)
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
    dupes = image_problems(images, present, problems)
    splits = check_splits(records, images.usable(set(present)), problems, max_bad_fraction)
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
