"""Which caption files a dataset is read from: the one lookup shared by the reader and ``data verify``.

``--annotations`` takes ``[SPLIT=]FILE`` and may be repeated. ``SPLIT=FILE`` puts every image
of FILE in SPLIT (COCO ships one caption file per split); a FILE without ``SPLIT=`` keeps the
splits it names itself (Karpathy ``images[].split``, a CSV ``split`` column, a Flickr token
file's split lists). Without ``--annotations`` the files are looked up in ``--data-dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .records import SPLITS, DatasetError, normalise_split

ANNOTATIONS_HELP = (
    "caption file, as [SPLIT=]FILE; repeat it for one file per split (train=T.json dev=D.json "
    "test=E.json). SPLIT= puts every image of FILE in that split; without it the file's own splits "
    "are used. FILE: Flickr token file, COCO captions JSON, Karpathy JSON, or CSV/JSONL "
    "(default: looked up in --data-dir)"
)
# an image folder a Flickr/Karpathy folder may hold its images in, tried in this order
_IMAGE_FOLDERS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images")


@dataclass(frozen=True)
class CaptionFile:
    """One caption file and how to read it."""

    path: Path
    format: str  # "flickr-tokens" | "karpathy" | "coco" | "table"
    image_root: Path  # relative image names in the file are looked up here
    split: str | None = None  # every image of the file is in this split; None: the file's own splits


@dataclass(frozen=True)
class DatasetFiles:
    """Everything a dataset is read from: caption files (the main one first) and Flickr split lists."""

    dataset: str
    data_dir: Path
    captions: list[CaptionFile]
    split_lists: dict[str, Path] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        """Every file read, in reading order (for manifests and checksums)."""
        return [c.path for c in self.captions] + list(self.split_lists.values())

    def names(self) -> list[str]:
        """:attr:`paths` relative to ``data_dir`` where they lie inside it (as manifests and checkpoints name them)."""
        root = self.data_dir.resolve()
        out = []
        for p in self.paths:
            try:
                out.append(str(p.resolve().relative_to(root)))
            except ValueError:
                out.append(str(p))
        return out


def annotation_arg(text: str) -> tuple[str | None, str]:
    """``[SPLIT=]FILE`` -> (split or None, file); argparse ``type=`` for ``--annotations``."""
    split, sep, name = text.partition("=")
    if sep and split.lower() in (*SPLITS, "val", "validation", "valid") and name:
        return normalise_split(split), name
    return None, text


def _as_specs(annotations: str | Path | Sequence | None) -> list[tuple[str | None, str]]:
    """Normalise the ``annotations`` argument (one file, ``[SPLIT=]FILE`` strings, or parsed pairs)."""
    if annotations is None:
        return []
    if isinstance(annotations, (str, Path)):
        annotations = [annotations]
    specs = []
    for item in annotations:
        if isinstance(item, tuple):
            specs.append((item[0], str(item[1])))
        else:
            specs.append(annotation_arg(str(item)) if isinstance(item, str) else (None, str(item)))
    return specs


def _resolve(data_dir: Path, name: str) -> Path:
    """A relative FILE is taken from the current folder, else from --data-dir."""
    path = Path(name)
    if not path.is_absolute() and not path.exists() and (data_dir / path).exists():
        return data_dir / path
    return path


def first_match(folder: Path, *patterns: str) -> Path | None:
    """The first file (by name) matching the first pattern that matches anything."""
    for pattern in patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    return None


def token_file(data_dir: Path) -> Path | None:
    """The raw Flickr captions file; Flickr8k also ships a lemmatised ``*.lemma.token.txt`` that must not be used."""
    hits = [p for p in sorted(data_dir.glob("*.token*")) if "lemma" not in p.name and p.suffix in (".txt", ".token")]
    return hits[0] if hits else None


def split_lists(data_dir: Path) -> dict[str, Path]:
    """Flickr split lists (``*_trainImages.txt`` ...) in ``data_dir``, by split."""
    found = {}
    for split in ("train", "dev", "test"):
        hit = first_match(data_dir, f"*{split}Images.txt", f"*_{split}.txt")
        if hit is not None:
            found[split] = hit
    return found


def image_root(data_dir: Path) -> Path:
    """The folder a Flickr/Karpathy dataset keeps its images in (``--data-dir`` itself if none of the usual)."""
    for name in _IMAGE_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def find_annotations(
    dataset: str,
    data_dir: str | Path,
    annotations: str | Path | Sequence | None = None,
) -> DatasetFiles:
    """The caption files ``dataset`` is read from, given ``--data-dir`` and ``--annotations``; raises DatasetError."""
    from .records import DATASETS

    data_dir = Path(data_dir)
    specs = [(split, _resolve(data_dir, name)) for split, name in _as_specs(annotations)]
    for _, path in specs:
        if not path.is_file():
            raise DatasetError(
                f"annotation file not found: {path} (relative names are looked up in the current "
                f"folder, then in --data-dir {data_dir})"
            )
    if dataset in ("flickr8k", "flickr30k"):
        return _flickr(dataset, data_dir, specs)
    if dataset == "coco":
        return _coco(data_dir, specs)
    if dataset == "karpathy":
        if not specs:
            found = first_match(data_dir, "dataset_*.json")
            if found is None:
                raise DatasetError(
                    f"no dataset_*.json in {data_dir}; pass --annotations FILE (Karpathy JSON with "
                    "images[].filename, .split and .sentences)"
                )
            specs = [(None, found)]
        root = image_root(data_dir)
        return DatasetFiles(dataset, data_dir, [CaptionFile(p, "karpathy", root, s) for s, p in specs])
    if dataset == "custom":
        if not specs:
            found = first_match(data_dir, "captions.csv", "captions.jsonl", "*.csv", "*.jsonl")
            if found is None:
                raise DatasetError(
                    f"no captions CSV/JSONL in {data_dir}; pass --annotations FILE (columns image, caption[, split])"
                )
            specs = [(None, found)]
        return DatasetFiles(dataset, data_dir, [CaptionFile(p, "table", p.parent, s) for s, p in specs])
    raise DatasetError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def _flickr(dataset: str, data_dir: Path, specs: list[tuple[str | None, Path]]) -> DatasetFiles:
    if len(specs) > 1 or any(split for split, _ in specs):
        raise DatasetError(
            f"--dataset {dataset} reads one caption file (its splits come from the split lists); "
            "for one caption file per split use --dataset coco, karpathy or custom"
        )
    given = specs[0][1] if specs else None
    root = image_root(data_dir)
    if given is not None and given.suffix == ".json":
        return DatasetFiles(dataset, data_dir, [CaptionFile(given, "karpathy", root)])
    token = given or token_file(data_dir)
    lists = split_lists(data_dir)
    if token is not None and lists:
        return DatasetFiles(dataset, data_dir, [CaptionFile(token, "flickr-tokens", root)], lists)
    karpathy = first_match(data_dir, f"dataset_{dataset}.json")
    if karpathy is not None:
        return DatasetFiles(dataset, data_dir, [CaptionFile(karpathy, "karpathy", root)])
    raise DatasetError(
        f"no {dataset} caption files in {data_dir}: looked for *.token.txt with *_trainImages.txt split lists, "
        f"or dataset_{dataset}.json. 'train' and 'evaluate' default to --dataset flickr8k; for other data pass "
        "--dataset coco, karpathy or custom with --annotations (see 'Your own data' in data/README.md)"
    )


def _coco(data_dir: Path, specs: list[tuple[str | None, Path]]) -> DatasetFiles:
    if specs:
        files = [CaptionFile(p, "karpathy" if p.name.startswith("dataset_") else "coco", data_dir, s) for s, p in specs]
        return DatasetFiles("coco", data_dir, files)
    karpathy = first_match(data_dir, "dataset_coco.json")
    if karpathy is not None:
        return DatasetFiles("coco", data_dir, [CaptionFile(karpathy, "karpathy", data_dir)])
    ann_dir = data_dir / "annotations" if (data_dir / "annotations").is_dir() else data_dir
    found = sorted(ann_dir.glob("captions_*.json"))
    if not found:
        raise DatasetError(
            f"no dataset_coco.json or annotations/captions_*.json in {data_dir}; pass one COCO "
            "captions file per split: --annotations train=T.json --annotations dev=D.json "
            "--annotations test=E.json (file_name is looked up under --data-dir)"
        )
    files = []
    for f in found:
        part = f.stem.split("_", 1)[1]  # e.g. train2014: its images are in DATA_DIR/train2014
        split = "train" if part.startswith("train") else "test" if part.startswith("test") else "dev"
        files.append(CaptionFile(f, "coco", data_dir / part, split))
    return DatasetFiles("coco", data_dir, files)
