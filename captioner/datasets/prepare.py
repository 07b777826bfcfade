"""``captioner data prepare``: COCO 2017 images + the Karpathy split -> a ``captions.csv`` for ``--dataset custom``."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from .records import DatasetError, read_karpathy

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


def coco2017_table(karpathy_json: str | Path, data_dir: str | Path, output: str | Path) -> dict[str, int]:
    """Write a custom-format CSV (image, caption, split) mapping the Karpathy COCO split onto 2017 file names.

    COCO 2017 holds the 2014 images renamed to ``<12-digit id>.jpg`` and regrouped into
    train2017/val2017; the id is the number in the 2014 name. Image paths are written relative
    to the CSV's folder. Returns images per split (and ``missing``: images found in neither folder).
    """
    karpathy_json, data_dir, output = Path(karpathy_json), Path(data_dir), Path(output)
    if not karpathy_json.is_file():
        raise DatasetError(f"Karpathy split file not found: {karpathy_json} (dataset_coco.json from {KARPATHY_URL})")
    records = read_karpathy(karpathy_json, data_dir)
    counts: Counter[str] = Counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "split"])
        for r in records:
            stem = Path(r.image_id).stem
            try:
                cocoid = int(stem.rsplit("_", 1)[-1])
            except ValueError:
                raise DatasetError(f"{karpathy_json}: unexpected COCO file name {r.image_id!r}") from None
            name = f"{cocoid:012d}.jpg"
            path = next(
                (data_dir / d / name for d in ("train2017", "val2017") if (data_dir / d / name).is_file()), None
            )
            if path is None:
                counts["missing"] += 1
                path = data_dir / "train2017" / name
            rel = os.path.relpath(path, output.parent.resolve() if path.is_absolute() else output.parent)
            counts[r.split] += 1
            for caption in r.captions:
                writer.writerow([Path(rel).as_posix(), caption, r.split])
    tmp.replace(output)
    return dict(counts)
