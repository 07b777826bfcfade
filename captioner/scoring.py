"""Scoring a file of captions against a dataset split's references (``captioner score``).

The captions file is JSONL or CSV with ``image`` and ``caption`` (as ``captioner caption``
writes it; rows with an ``error`` are treated as missing), or the JSON ``evaluate`` writes
(``captions``: image id -> caption). An ``image`` may be the dataset's image id (the file name
in the caption file), or a path to the image (absolute, or relative to the current folder,
the captions file's folder or ``--data-dir``). Scores come from :func:`captioner.metrics.score`,
the scorer ``evaluate`` uses, and are printed as the same JSON.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .datasets import CaptionRecord, DatasetError
from .datasets.records import parse_jsonl


def metrics_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as ``evaluate`` and ``score`` print them: floats rounded to 2 decimals."""
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()}


def read_captions(path: str | Path) -> list[tuple[str, str | None]]:
    """(image, caption or None when the row failed or is empty) per row of a captions file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read captions file {path}: {exc}") from exc
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))  # quoted fields may hold newlines
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON ({exc.msg})") from exc
        if isinstance(data, dict) and isinstance(data.get("captions"), dict):  # evaluate's output
            return [(str(k), v if isinstance(v, str) and v.strip() else None) for k, v in data["captions"].items()]
        rows = data if isinstance(data, list) else []
    else:
        rows = parse_jsonl(text, path)
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("image"):
            raise DatasetError(f"{path}: row {i} has no 'image' (captions files need 'image' and 'caption')")
        caption = row.get("caption")
        ok = isinstance(caption, str) and caption.strip() and not row.get("error")
        out.append((str(row["image"]), caption if ok else None))
    if not out:
        raise DatasetError(f"{path}: no captions (JSONL or CSV rows with 'image' and 'caption')")
    return out


def match_captions(
    records: list[CaptionRecord],
    rows: list[tuple[str, str | None]],
    folders: list[Path],
) -> tuple[dict[str, str], list[str]]:
    """Captions by record image id, and the ``image`` values that match no record of the split.

    A row matches a record by image id, by path (tried under each of ``folders``), or by file
    name when only one record has it. The first caption of an image wins.
    """
    by_id = {r.image_id: r.image_id for r in records}
    by_path = {os.path.abspath(r.path): r.image_id for r in records}
    names: dict[str, list[str]] = {}
    for r in records:
        names.setdefault(Path(r.path).name, []).append(r.image_id)
    captions: dict[str, str] = {}
    unmatched: list[str] = []
    for image, caption in rows:
        key = by_id.get(image)
        if key is None:
            candidates = [image] if os.path.isabs(image) else [str(f / image) for f in folders]
            key = next((by_path[p] for p in map(os.path.abspath, candidates) if p in by_path), None)
        if key is None and len(names.get(Path(image).name, [])) == 1:
            key = names[Path(image).name][0]
        if key is None:
            unmatched.append(image)
        elif caption is not None:
            captions.setdefault(key, caption)
    return captions, unmatched


def score_captions_file(
    records: list[CaptionRecord],
    captions_file: str | Path,
    folders: list[Path],
    allow_missing: bool = False,
    meteor: bool = True,
) -> dict[str, Any]:
    """Score ``captions_file`` against ``records``' references; raises DatasetError on missing captions."""
    rows = read_captions(captions_file)
    captions, unmatched = match_captions(records, rows, [Path.cwd(), Path(captions_file).parent, *folders])
    missing = [r.image_id for r in records if r.image_id not in captions]
    if not captions:
        raise DatasetError(
            f"none of the {len(rows)} captions in {captions_file} belongs to an image of this split "
            f"({len(records)} images, e.g. {records[0].image_id}; rows name e.g. {rows[0][0]})"
        )
    if missing and not allow_missing:
        raise DatasetError(
            f"{len(missing)} of {len(records)} images of the split have no caption in "
            f"{captions_file} (e.g. {', '.join(missing[:3])}); caption them, or pass --allow-missing "
            "to score only the images that have one"
        )
    from .metrics import score as score_metrics  # the [train] extra: imported when a score is asked for

    refs = {r.image_id: r.captions for r in records}
    metrics = score_metrics(captions, refs, meteor=meteor)
    metrics["distinct_captions"] = len(set(captions.values()))
    metrics["images"] = len(captions)
    report = metrics_report(metrics) | {"missing_captions": len(missing), "unmatched_captions": len(unmatched)}
    return report
