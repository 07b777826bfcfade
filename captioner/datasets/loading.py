"""``load_records``: one split of a dataset, read from the files :func:`find_annotations` names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .annotations import CaptionFile, DatasetFiles, find_annotations
from .records import (
    CaptionRecord,
    DatasetError,
    normalise_split,
    read_coco,
    read_flickr_tokens,
    read_karpathy,
    read_table,
)


def read_caption_file(f: CaptionFile, split_lists: dict[str, Path] | None = None) -> list[CaptionRecord]:
    """Every record of one caption file (all splits, images on disk or not)."""
    if f.format == "flickr-tokens":
        return read_flickr_tokens(f.path, split_lists or {}, f.image_root)
    if f.format == "karpathy":
        return read_karpathy(f.path, f.image_root, f.split)
    if f.format == "coco":
        return read_coco(f.path, f.image_root, f.split)
    return read_table(f.path, f.split)


def read_dataset(files: DatasetFiles) -> list[CaptionRecord]:
    """Every record of every caption file; a file given as ``SPLIT=FILE`` must hold at least one image."""
    records: list[CaptionRecord] = []
    for f in files.captions:
        recs = read_caption_file(f, files.split_lists)
        if f.split is not None and not recs:
            raise DatasetError(f"{f.path}: no images, so split {f.split!r} would be empty")
        records += recs
    return records


def load_records(
    dataset: str,
    data_dir: str | Path,
    split: str = "train",
    limit: int | None = None,
    annotations: str | Path | Sequence | None = None,
    require_images: bool = True,
) -> list[CaptionRecord]:
    """Read one split of a dataset. ``limit`` keeps the first N images; ``split='all'`` keeps every split.

    ``annotations``: one file, or ``[SPLIT=]FILE`` strings (see :mod:`captioner.datasets.annotations`).
    With ``require_images`` a split whose images are all missing is an error that says where they
    were looked for.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data directory not found: {data_dir}")
    split = normalise_split(split)
    files = find_annotations(dataset, data_dir, annotations)
    records = read_dataset(files)
    if split != "all":
        if records and all(r.split == "all" for r in records):
            names = " ".join(f"--annotations {split}={f.path}" for f in files.captions)
            raise DatasetError(
                f"{', '.join(str(f.path) for f in files.captions)} name no split (a COCO captions "
                f"file has none), so split {split!r} is empty; give each file its split, e.g. {names}"
            )
        records = [r for r in records if r.split == split]
    if require_images:
        _check_found(records, files, split)
        records = [r for r in records if Path(r.path).is_file()]
    records = [r for r in records if r.captions]
    if limit is not None:
        records = records[:limit]
    return records


def _check_found(records: list[CaptionRecord], files: DatasetFiles, split: str) -> None:
    """Raise when a split names images but none of them is on disk: the image folder is wrong."""
    if not records or any(Path(r.path).is_file() for r in records):
        return
    roots = sorted({str(f.image_root) for f in files.captions})
    names = ", ".join(str(f.path) for f in files.captions)
    raise DatasetError(
        f"split {split!r}: none of the {len(records)} images named in {names} was found; looked under "
        f"{' and '.join(roots)} (e.g. {records[0].path}). Pass --data-dir the folder that holds the images' "
        "file names (for CSV/JSONL tables image paths are relative to the table's folder)"
    )
