"""Caption file readers, all producing :class:`CaptionRecord` lists.

- Flickr8k/30k ``*.token.txt`` (``<image>#<n>\\t<caption>``) plus split lists ``*_{train,dev,test}Images.txt``;
- Karpathy JSON ``dataset_*.json`` (``images[].filename``, ``.split``, ``.sentences``);
- COCO captions JSON (``images`` with ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``);
- CSV or JSONL tables with ``image`` and ``caption`` (optional ``split``) columns.

Which files a dataset is read from is decided in :mod:`.annotations`; :mod:`.loading` reads a split.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = ("flickr8k", "flickr30k", "coco", "karpathy", "custom")
SPLITS = ("train", "dev", "test", "all")
#: The splits a model is trained, validated and tested on, in that order.
EVAL_SPLITS = ("train", "dev", "test")
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


def split_order(splits: set[str]) -> list[str]:
    """``splits`` for reports: train, dev, test first, then any others by name."""
    return [s for s in EVAL_SPLITS if s in splits] + sorted(s for s in splits if s not in EVAL_SPLITS)


def read_flickr_tokens(
    token_file: str | Path, split_lists: dict[str, Path], image_root: str | Path
) -> list[CaptionRecord]:
    """Flickr8k/30k ``Flickr8k.token.txt`` + split lists -> records (images in no list get split ``none``)."""
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
    for split, path in split_lists.items():
        for name in path.read_text(encoding="utf-8").split():
            split_of.setdefault(name, split)
            order.append(name)
    root = Path(image_root)
    # split-listed images first, in the lists' order (so --limit takes "the first N of a split")
    names = list(OrderedDict.fromkeys(order + list(captions)))
    return [
        CaptionRecord(image_id=n, path=str(root / n), captions=captions.get(n, []), split=split_of.get(n, "none"))
        for n in names
    ]


def _json_images(path: Path, kind: str) -> tuple[dict, list[dict]]:
    """A caption JSON's top level and its ``images`` list, or a DatasetError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: no 'images' list at the top level; a {kind} file needs one")
    if not all(isinstance(img, dict) for img in data["images"]):
        raise DatasetError(f"{path}: every entry of 'images' must be an object")
    return data, data["images"]


def _no_duplicates(path: Path, what: str, values: list) -> None:
    dupes = sorted({str(v) for v, n in Counter(values).items() if n > 1})
    if dupes:
        raise DatasetError(
            f"{path}: {len(dupes)} duplicate {what} in 'images', e.g. {', '.join(dupes[:3])}; "
            "each image must be listed once"
        )


def read_karpathy(path: str | Path, image_root: str | Path, split: str | None = None) -> list[CaptionRecord]:
    """Karpathy ``dataset_{flickr8k,flickr30k,coco}.json`` -> records (restval counts as train).

    ``split`` puts every image in that split instead of its own ``split`` field.
    """
    path, image_root = Path(path), Path(image_root)
    data, images = _json_images(path, "Karpathy JSON (images[].filename, .split, .sentences)")
    if "annotations" in data or (images and "file_name" in images[0] and "filename" not in images[0]):
        raise DatasetError(
            f"{path} is a COCO captions file ('images' + 'annotations'), not Karpathy JSON: "
            f"use --dataset coco --annotations SPLIT={path}"
        )
    bad = [i for i, img in enumerate(images) if not isinstance(img.get("filename"), str)]
    if bad:
        raise DatasetError(f"{path}: images[{bad[0]}] has no 'filename' ({len(bad)} entries without one)")
    _no_duplicates(path, "file names", [str(Path(img.get("filepath", "")) / img["filename"]) for img in images])
    records = []
    for img in images:
        rel = Path(img.get("filepath", "")) / img["filename"]
        captions = [
            s.get("raw") or " ".join(s.get("tokens", [])) for s in img.get("sentences", []) if isinstance(s, dict)
        ]
        own = str(img.get("split", "train"))
        records.append(
            CaptionRecord(
                image_id=img["filename"],
                path=str(image_root / rel),
                captions=captions,
                split=split or _SPLIT_ALIASES.get(own, own),
            )
        )
    return records


def read_coco(path: str | Path, image_dir: str | Path, split: str | None) -> list[CaptionRecord]:
    """COCO captions JSON (``images``: ``id``/``file_name``; ``annotations``: ``image_id``/``caption``) -> records.

    Every image gets ``split`` (``all`` when None: a COCO file names no split). ``file_name`` is
    looked up under ``image_dir``.
    """
    path, image_dir = Path(path), Path(image_dir)
    data, images = _json_images(path, "COCO captions")
    if "annotations" not in data and images and "sentences" in images[0]:
        raise DatasetError(
            f"{path} is Karpathy-style JSON (images[].sentences), not a COCO captions file: "
            f"use --dataset karpathy --annotations {path}"
        )
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: no 'annotations' list; a COCO captions file has 'images' and 'annotations'")
    bad = [i for i, img in enumerate(images) if "id" not in img or not isinstance(img.get("file_name"), str)]
    if bad:
        raise DatasetError(f"{path}: images[{bad[0]}] needs 'id' and 'file_name' ({len(bad)} entries lack them)")
    _no_duplicates(path, "image ids", [img["id"] for img in images])
    files = {img["id"]: img["file_name"] for img in images}
    caps: OrderedDict[object, list[str]] = OrderedDict((i, []) for i in files)
    orphans = []
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str):
            raise DatasetError(f"{path}: annotations[{k}] needs 'image_id' and a 'caption' string")
        if a.get("image_id") not in files:
            orphans.append(a.get("image_id"))
            continue
        caps[a["image_id"]].append(a["caption"].strip())
    if orphans:
        raise DatasetError(
            f"{path}: {len(orphans)} captions refer to image ids that are not in 'images' "
            f"(e.g. {orphans[0]!r}); add those images or remove their captions"
        )
    return [
        CaptionRecord(image_id=files[i], path=str(image_dir / files[i]), captions=c, split=split or "all")
        for i, c in caps.items()
    ]


def parse_jsonl(text: str, path: str | Path) -> list:
    """The JSON value of every non-blank line of ``text`` (read from ``path``, named in errors)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    return rows


def read_table(path: str | Path, split: str | None = None) -> list[CaptionRecord]:
    """CSV (header with ``image``, ``caption``[, ``split``]) or JSONL with the same keys.

    Image paths are taken relative to the table's folder; several rows may share an image.
    ``split`` puts every image in that split instead of the ``split`` column.
    """
    path = Path(path)
    root = path.parent
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json" and '"images"' in text[:10000]:
            raise DatasetError(
                f"{path} looks like a COCO or Karpathy JSON file ('images'), not a CSV/JSONL table: "
                f"use --dataset coco --annotations SPLIT={path}, or --dataset karpathy"
            )
        rows = parse_jsonl(text, path)
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    by_image: OrderedDict[str, CaptionRecord] = OrderedDict()
    for i, row in enumerate(rows, 1):
        image, caption = (row.get("image"), row.get("caption")) if isinstance(row, dict) else (None, None)
        if not image or caption is None:
            raise DatasetError(f"{path}: row {i} needs 'image' and 'caption'")
        rec = by_image.get(image)
        if rec is None:
            p = Path(image)
            rec = CaptionRecord(
                image_id=image,
                path=str(p if p.is_absolute() else root / p),
                split=split or normalise_split(row.get("split") or "train"),
            )
            by_image[image] = rec
        if str(caption).strip():
            rec.captions.append(str(caption).strip())
    return list(by_image.values())
