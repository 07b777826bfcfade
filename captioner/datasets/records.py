"""Readers for caption datasets, all producing :class:`CaptionRecord` lists.

Supported layouts:

- ``flickr8k`` / ``flickr30k``: ``*.token.txt`` (``<image>#<n>\\t<caption>``) plus split
  lists ``*_{train,dev,test}Images.txt``; or a Karpathy ``dataset_flickr*.json``.
- ``coco``: Karpathy ``dataset_coco.json`` or the official ``captions_{train,val}{2014,2017}.json``.
- ``karpathy``: any Karpathy ``dataset_*.json`` (``--annotations`` or found in the folder).
- ``custom``: a CSV or JSONL file with ``image`` and ``caption`` (optional ``split``) columns.
"""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = ("flickr8k", "flickr30k", "coco", "karpathy", "custom")
SPLITS = ("train", "dev", "test", "all")
_SPLIT_ALIASES = {"val": "dev", "validation": "dev", "restval": "train", "valid": "dev"}


class DatasetError(ValueError):
    """The dataset folder or annotation file is missing or malformed."""


@dataclass
class CaptionRecord:
    """One image and its reference captions."""

    image_id: str
    path: str
    captions: list[str] = field(default_factory=list)
    split: str = "train"


def normalise_split(split: str) -> str:
    s = split.lower()
    s = _SPLIT_ALIASES.get(s, s)
    if s not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return s


def load_records(
    dataset: str,
    data_dir: str | Path,
    split: str = "train",
    limit: int | None = None,
    annotations: str | Path | None = None,
    require_images: bool = True,
) -> list[CaptionRecord]:
    """Read one split of a dataset. ``limit`` keeps the first N images; ``split='all'`` keeps every split."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data directory not found: {data_dir}")
    split = normalise_split(split)
    ann = Path(annotations) if annotations else None
    if ann is not None and not ann.is_absolute() and not ann.exists():
        ann = data_dir / ann
    if dataset in ("flickr8k", "flickr30k"):
        karpathy = ann if ann and ann.suffix == ".json" else _first(data_dir, f"dataset_{dataset}.json")
        token = ann if ann and ann.suffix != ".json" else _token_file(data_dir)
        if token is not None and _split_lists(data_dir):
            records = read_flickr_tokens(token, data_dir)
        elif karpathy is not None:
            records = read_karpathy(karpathy, _image_root(data_dir))
        else:
            raise DatasetError(f"no *.token.txt with split lists, or dataset_{dataset}.json, in {data_dir}")
    elif dataset == "coco":
        karpathy = ann if ann and ann.name.startswith("dataset_") else _first(data_dir, "dataset_coco.json")
        if karpathy is not None:
            records = read_karpathy(karpathy, data_dir)
        else:
            records = read_coco_dir(data_dir) if ann is None else read_coco(ann, data_dir, "all")
    elif dataset == "karpathy":
        karpathy = ann or _first(data_dir, "dataset_*.json")
        if karpathy is None:
            raise DatasetError(f"no dataset_*.json in {data_dir}; pass --annotations")
        records = read_karpathy(karpathy, _image_root(data_dir))
    elif dataset == "custom":
        if ann is None:
            ann = _first(data_dir, "captions.csv", "captions.jsonl", "*.csv", "*.jsonl")
        if ann is None:
            raise DatasetError(f"no captions CSV/JSONL in {data_dir}; pass --annotations")
        records = read_table(ann)
    else:
        raise DatasetError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if split != "all":
        records = [r for r in records if r.split == split]
    if require_images:
        records = [r for r in records if Path(r.path).is_file()]
    records = [r for r in records if r.captions]
    if limit is not None:
        records = records[:limit]
    return records


def _first(folder: Path, *patterns: str) -> Path | None:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def _token_file(data_dir: Path) -> Path | None:
    """The raw captions file; Flickr8k also ships a lemmatised ``*.lemma.token.txt`` that must not be used."""
    hits = [p for p in sorted(data_dir.glob("*.token*")) if "lemma" not in p.name and p.suffix in (".txt", ".token")]
    return hits[0] if hits else None


def _split_lists(data_dir: Path) -> dict[str, Path]:
    found = {}
    for split, key in (("train", "train"), ("dev", "dev"), ("test", "test")):
        hit = _first(data_dir, f"*{key}Images.txt", f"*_{key}.txt")
        if hit is not None:
            found[split] = hit
    return found


def _image_root(data_dir: Path) -> Path:
    for name in ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images"):
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def read_flickr_tokens(token_file: str | Path, data_dir: str | Path) -> list[CaptionRecord]:
    """Flickr8k/30k ``Flickr8k.token.txt`` + split lists -> records (images in no list get split ``none``)."""
    data_dir = Path(data_dir)
    token_file = Path(token_file)
    captions: OrderedDict[str, list[str]] = OrderedDict()
    for lineno, line in enumerate(token_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DatasetError(f"{token_file}:{lineno}: expected '<image>#<n><TAB><caption>'")
        key, caption = line.split("\t", 1)
        image = key.rsplit("#", 1)[0]
        captions.setdefault(image, []).append(caption.strip())
    split_of: dict[str, str] = {}
    order: list[str] = []
    for split, path in _split_lists(data_dir).items():
        for name in path.read_text(encoding="utf-8").split():
            split_of.setdefault(name, split)
            order.append(name)
    root = _image_root(data_dir)
    # split-listed images first, in the lists' order (so --limit takes "the first N of a split")
    names = list(OrderedDict.fromkeys(order + list(captions)))
    return [
        CaptionRecord(image_id=n, path=str(root / n), captions=captions.get(n, []), split=split_of.get(n, "none"))
        for n in names
    ]


def read_karpathy(path: str | Path, image_root: str | Path) -> list[CaptionRecord]:
    """Karpathy ``dataset_{flickr8k,flickr30k,coco}.json`` -> records (restval counts as train)."""
    path, image_root = Path(path), Path(image_root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a Karpathy split file ({exc})") from exc
    records = []
    for img in images:
        rel = Path(img.get("filepath", "")) / img["filename"]
        captions = [s.get("raw") or " ".join(s.get("tokens", [])) for s in img.get("sentences", [])]
        split = _SPLIT_ALIASES.get(img.get("split", "train"), img.get("split", "train"))
        records.append(CaptionRecord(image_id=img["filename"], path=str(image_root / rel), captions=captions, split=split))
    return records


def read_coco(path: str | Path, image_dir: str | Path, split: str) -> list[CaptionRecord]:
    """Official COCO ``captions_*.json`` -> records; every image gets ``split``."""
    path, image_dir = Path(path), Path(image_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {img["id"]: img["file_name"] for img in data["images"]}
        anns = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a COCO captions file ({exc})") from exc
    caps: OrderedDict[int, list[str]] = OrderedDict((i, []) for i in files)
    for a in anns:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    return [
        CaptionRecord(image_id=files[i], path=str(image_dir / files[i]), captions=c, split=split)
        for i, c in caps.items()
        if i in files
    ]


def read_coco_dir(data_dir: Path) -> list[CaptionRecord]:
    """COCO folder with ``annotations/captions_{train,val}YYYY.json`` and ``{train,val}YYYY/`` images."""
    records: list[CaptionRecord] = []
    ann_dir = data_dir / "annotations" if (data_dir / "annotations").is_dir() else data_dir
    files = sorted(ann_dir.glob("captions_*.json"))
    if not files:
        raise DatasetError(f"no dataset_coco.json or annotations/captions_*.json in {data_dir}")
    for f in files:
        part = f.stem.split("_", 1)[1]  # e.g. train2014
        split = "train" if part.startswith("train") else "dev"
        records += read_coco(f, data_dir / part, split)
    return records


def read_table(path: str | Path) -> list[CaptionRecord]:
    """CSV (header with ``image``, ``caption``[, ``split``]) or JSONL with the same keys.

    Image paths are taken relative to the table's folder; several rows may share an image.
    """
    path = Path(path)
    root = path.parent
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    by_image: OrderedDict[str, CaptionRecord] = OrderedDict()
    for i, row in enumerate(rows, 1):
        image, caption = row.get("image"), row.get("caption")
        if not image or caption is None:
            raise DatasetError(f"{path}: row {i} needs 'image' and 'caption'")
        rec = by_image.get(image)
        if rec is None:
            p = Path(image)
            rec = CaptionRecord(
                image_id=image,
                path=str(p if p.is_absolute() else root / p),
                split=normalise_split(row.get("split") or "train"),
            )
            by_image[image] = rec
        if str(caption).strip():
            rec.captions.append(str(caption).strip())
    return list(by_image.values())
