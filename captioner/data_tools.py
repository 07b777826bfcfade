"""``captioner data``: verify, download, describe and prepare caption datasets.

- ``verify``: every listed image exists and decodes, captions are non-empty, splits are
  disjoint; duplicates, caption entries without images and images in no split are reported;
  a small manifest JSON is written (``captioner train --manifest`` records it).
- ``download``: fetch the public archives of a dataset (sha256, HTTP Range resume, progress),
  then unpack them safely; datasets behind a request form print instructions instead.
- ``stats``: images/captions per split, caption lengths, vocabulary size and test OOV share
  at several minimum counts, a PNG histogram of caption lengths.
- ``prepare``: COCO 2017 images + the Karpathy split -> a ``captions.csv`` the ``custom`` reader takes.

The datasets are read with :func:`captioner.datasets.load_records`; images with
:func:`captioner.images.load_image`; words with :func:`captioner.vocab.tokenize`.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from .commands.common import HelpFormatter, add_dataset_args
from .datasets import CaptionRecord, DatasetError, find_annotations, load_records, read_dataset
from .datasets.records import normalise_split, read_karpathy
from .images import ImageError, is_image_path, load_image
from .progress import bar_disabled
from .vocab import SPECIALS, Vocabulary, tokenize

EVAL_SPLITS = ("train", "dev", "test")
MAX_EXAMPLES = 20  # examples kept per problem in the manifest
EXIT_MANUAL = 3  # `data download` of a dataset that needs a manual step


# ====================================================================== verify
@dataclass
class Problem:
    """One kind of problem found in a dataset, with a few examples."""

    kind: str
    severity: str  # "fatal" | "warning"
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    problems: list[Problem] = []

    def problem(kind: str, severity: str, message: str, items: list[str]) -> None:
        if items:
            problems.append(Problem(kind, severity, message, len(items), sorted(items)[:MAX_EXAMPLES]))

    manifest: dict[str, Any] = {
        "format": "captioner-data-manifest/1",
        "dataset": dataset,
        "data_dir": str(data_dir.resolve()),
        "annotations": ([str(annotations)] if isinstance(annotations, (str, Path)) else [str(a) for a in annotations])
                       if annotations else None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images_decoded": bool(decode),
    }
    try:
        dataset_files = find_annotations(dataset, data_dir, annotations)  # the files training reads
        records = [r for r in read_dataset(dataset_files) if r.captions]
    except (DatasetError, OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("unreadable", "fatal", f"cannot read the dataset: {exc}", 1))
        return _finish(manifest, problems, {}, {})

    # --- caption files and their checksums
    files = dataset_files.paths
    manifest["caption_file"] = dataset_files.names()[0]
    manifest["caption_file_sha256"] = sha256_file(files[0])
    manifest["annotation_files"] = {name: sha256_file(f) for name, f in zip(dataset_files.names(), files)}
    if dataset in ("flickr8k", "flickr30k"):
        tokens = sorted(data_dir.glob("*.token.txt")) + sorted(data_dir.glob("*.token"))
        if len(tokens) > 1 and files and files[0] in tokens:
            others = [t.name for t in tokens if t != files[0]]
            problem("several_token_files", "warning",
                    f"several token files; reading {files[0].name} (pass --annotations to choose)", others)

    # --- split lists (flickr): overlaps and listed names without captions
    captioned = {r.image_id for r in records}
    if dataset_files.split_lists:
        listed: dict[str, list[str]] = defaultdict(list)
        for split, path in dataset_files.split_lists.items():
            names = path.read_text(encoding="utf-8").split()
            problem("repeated_in_split_list", "warning", f"names listed twice in {path.name}",
                    [n for n, c in Counter(names).items() if c > 1])
            for n in dict.fromkeys(names):
                listed[n].append(split)
        problem("split_overlap", "fatal", "images listed in more than one split",
                [f"{n} ({'+'.join(s)})" for n, s in listed.items() if len(s) > 1])
        problem("listed_without_captions", "warning", "images in a split list with no caption entry",
                [n for n in listed if n not in captioned])

    # --- the records themselves
    by_path: dict[str, list[CaptionRecord]] = defaultdict(list)
    for r in records:
        by_path[os.path.abspath(r.path)].append(r)
    problem("split_overlap", "fatal", "images listed in more than one split",
            [f"{recs[0].image_id} ({'+'.join(sorted({r.split for r in recs}))})"
             for recs in by_path.values() if len({r.split for r in recs}) > 1])
    problem("repeated_entries", "warning", "images with more than one entry in the caption file",
            [recs[0].image_id for recs in by_path.values() if len(recs) > 1 and len({r.split for r in recs}) == 1])
    problem("empty_captions", "warning", "images with an empty caption",
            [r.image_id for r in records if any(not c.strip() for c in r.captions)])
    problem("duplicate_captions", "warning", "the same caption twice for one image (ignoring case and spacing)",
            [f"{r.image_id}: {c!r}" for r in records
             for c, n in Counter(_norm_caption(c) for c in r.captions if c.strip()).items() if n > 1])
    if dataset == "custom" and files:
        rows = _table_rows(files[0])
        problem("empty_captions", "warning", "rows with an empty caption (ignored by the reader)",
                [f"row {i}: {row.get('image')}" for i, row in enumerate(rows, 1)
                 if isinstance(row, dict) and row.get("image") and not str(row.get("caption") or "").strip()])
        splits_of: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            if isinstance(row, dict) and row.get("image"):
                try:
                    splits_of[str(row["image"])].add(normalise_split(str(row.get("split") or "train")))
                except DatasetError:
                    splits_of[str(row["image"])].add(str(row.get("split")))
        problem("split_overlap", "fatal", "images given different splits on different rows",
                [f"{img} ({'+'.join(sorted(s))})" for img, s in splits_of.items() if len(s) > 1])

    present = {p: recs for p, recs in by_path.items() if Path(p).is_file()}
    missing = [recs[0].image_id for p, recs in by_path.items() if p not in present]
    problem("caption_entry_without_image", "warning", "caption entries whose image file is missing", missing)
    problem("images_in_no_split", "warning", "images with captions that are in no train/dev/test split (for a caption "
            "file given without SPLIT=, name its split: --annotations train=FILE --annotations dev=FILE)",
            [recs[0].image_id for recs in present.values() if recs[0].split not in EVAL_SPLITS])

    # image files next to the listed ones that no caption entry mentions (only inside --data-dir: a
    # folder that absolute paths point into is not the dataset's to report on)
    root = data_dir.resolve()
    folders = {str(Path(p).parent) for p in by_path if Path(p).parent.resolve().is_relative_to(root)}
    unlisted = [_rel(f, data_dir) for d in sorted(folders) if Path(d).is_dir()
                for f in Path(d).iterdir() if f.is_file() and is_image_path(f) and not f.name.startswith("._")
                and os.path.abspath(f) not in by_path]
    problem("images_without_captions", "warning", "image files that no caption entry mentions", unlisted)

    # --- read every present image once: sha256, and decode
    digests: dict[str, str] = {}
    undecodable: dict[str, str] = {}  # path -> error
    too_large: dict[str, str] = {}
    for path in tqdm(sorted(present), desc="verifying images", unit="img", disable=bar_disabled(progress)):
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            undecodable[path] = str(exc)
            continue
        digests[path] = hashlib.sha256(data).hexdigest()
        if decode:
            try:
                load_image(data)
            except ImageError as exc:
                (too_large if exc.code == "too_large" else undecodable)[path] = str(exc)
    problem("undecodable_images", "warning", "image files that do not decode",
            [f"{present[p][0].image_id}: {e}" for p, e in undecodable.items()])
    problem("too_large_images", "warning", "images above the pixel limit",
            [f"{present[p][0].image_id}: {e}" for p, e in too_large.items()])
    groups: dict[str, list[str]] = defaultdict(list)
    for path, digest in digests.items():
        groups[digest].append(path)
    dupes = [sorted(g) for g in groups.values() if len(g) > 1]
    problem("duplicate_images", "warning", "byte-identical image files",
            [" = ".join(present[p][0].image_id for p in g) for g in dupes])
    problem("duplicate_images_across_splits", "warning", "byte-identical images in different splits (leakage)",
            [" = ".join(f"{present[p][0].image_id} ({present[p][0].split})" for p in g)
             for g in dupes if len({present[p][0].split for p in g}) > 1])

    # --- split sizes and the fatal checks
    usable = set(present) - set(undecodable) - set(too_large)
    splits: dict[str, dict[str, int]] = {}
    for split in _split_order({r.split for r in records}):
        recs = [r for r in records if r.split == split]
        ok = [r for r in recs if os.path.abspath(r.path) in usable]
        splits[split] = {"images": len(recs), "usable_images": len(ok), "captions": sum(len(r.captions) for r in recs)}
    in_splits = [r for r in records if r.split in EVAL_SPLITS]
    bad = sum(1 for r in in_splits if os.path.abspath(r.path) not in usable)
    if not splits.get("train", {}).get("usable_images"):
        problems.append(Problem("no_train_images", "fatal", "no usable train image with captions (training needs a "
                                "train split: --annotations train=FILE, or split lists/fields in the caption file)", 1))
    if not splits.get("dev", {}).get("usable_images"):
        problems.append(Problem("no_dev_split", "warning", "no dev images: training cannot validate", 1))
    if in_splits and bad / len(in_splits) > max_bad_fraction:
        problems.append(Problem("too_many_bad_images", "fatal",
                                f"{bad} of {len(in_splits)} split images are missing or undecodable "
                                f"(more than {max_bad_fraction:.0%})", bad))
    fingerprint = hashlib.sha256("".join(f"{_rel(p, data_dir)}\t{d}\n" for p, d in sorted(digests.items())).encode())
    counts = {
        "caption_entries": len(records),
        "images_found": len(present),
        "images_decoded": len(present) - len(undecodable) - len(too_large) if decode else None,
        "captions": sum(len(r.captions) for r in records),
        "images_in_splits": len(in_splits),
        "images_in_no_split": sum(1 for recs in present.values() if recs[0].split not in EVAL_SPLITS),
        "missing_images": len(missing),
        "duplicate_image_groups": len(dupes),
    }
    manifest["images_sha256"] = fingerprint.hexdigest()
    return _finish(manifest, problems, counts, splits)


def _split_order(splits: set[str]) -> list[str]:
    return [s for s in EVAL_SPLITS if s in splits] + sorted(s for s in splits if s not in EVAL_SPLITS)


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
        lines.append(f"{c['caption_entries']} caption entries, {c['captions']} captions, {c['images_found']} images found"
                     + (f", {c['images_decoded']} decoded" if c.get("images_decoded") is not None else " (not decoded)"))
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


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = verify_dataset(args.dataset, args.data_dir, args.annotations, decode=not args.no_decode,
                              progress=not args.quiet, max_bad_fraction=args.max_bad_fraction)
    out = Path(args.output or f"manifest-{args.dataset}.json")
    print(format_verify(manifest))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"manifest written to {out}")
    except OSError as exc:
        print(f"captioner data verify: error: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    return 0 if manifest["usable"] else 1


# ====================================================================== stats
def _lengths(captions: list[str]) -> list[int]:
    return [len(tokenize(c)) for c in captions]


def _describe(lengths: list[int]) -> dict[str, float | int | None]:
    import numpy as np

    if not lengths:
        return {"mean": None, "median": None, "p95": None, "max": None}
    arr = np.asarray(lengths)
    return {"mean": round(float(arr.mean()), 2), "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


def dataset_stats(
    dataset: str, data_dir: str | Path, annotations: str | Path | list[str] | None = None, min_counts: tuple[int, ...] = (1, 3, 5, 10),
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Figures for ``captioner data stats`` and the caption lengths per split (for the plot)."""
    records = load_records(dataset, data_dir, "all", None, annotations, require_images=False)
    if not records:
        raise DatasetError(f"no captioned images in {data_dir}")
    by_split: dict[str, list[CaptionRecord]] = defaultdict(list)
    for r in records:
        by_split[r.split].append(r)
    order = _split_order(set(by_split))
    lengths = {s: _lengths([c for r in by_split[s] for c in r.captions]) for s in order}
    splits = {
        s: {"images": len(by_split[s]), "images_on_disk": sum(1 for r in by_split[s] if Path(r.path).is_file()),
            "captions": len(lengths[s]), "captions_per_image": round(len(lengths[s]) / len(by_split[s]), 2),
            "length": _describe(lengths[s])}
        for s in order
    }
    train_caps = [c for r in by_split.get("train", []) for c in r.captions]
    eval_tokens = {s: [t for r in by_split[s] for c in r.captions for t in tokenize(c)] for s in ("dev", "test") if s in by_split}
    vocab_rows = []
    for m in min_counts:
        vocab = Vocabulary.build(train_caps, min_count=m)
        row: dict[str, Any] = {"min_count": m, "words": len(vocab) - len(SPECIALS), "vocab_size": len(vocab)}
        for s, toks in eval_tokens.items():
            row[f"{s}_oov"] = round(sum(t not in vocab.stoi for t in toks) / len(toks), 4) if toks else None
        vocab_rows.append(row)
    all_lengths = [n for s in order for n in lengths[s]]
    figures = {
        "dataset": dataset, "data_dir": str(Path(data_dir).resolve()),
        "images": len(records), "captions": len(all_lengths),
        "length": _describe(all_lengths), "splits": splits,
        "train_tokens": sum(lengths.get("train", [])),
        "vocabulary": vocab_rows,
    }
    return figures, lengths


def format_stats(f: dict[str, Any]) -> str:
    """The stats as readable tables."""
    def num(x: Any) -> str:
        return "-" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))

    lines = [f"dataset {f['dataset']} in {f['data_dir']}: {f['images']} images, {f['captions']} captions",
             "", "caption length in words (captioner.vocab.tokenize)",
             f"{'split':<8}{'images':>8}{'on disk':>9}{'captions':>10}{'per img':>9}{'mean':>8}{'median':>8}{'p95':>7}{'max':>6}"]
    rows = list(f["splits"].items()) + [("all", {"images": f["images"], "images_on_disk": None,
                                                  "captions": f["captions"], "captions_per_image": None, "length": f["length"]})]
    for s, d in rows:
        L = d["length"]
        lines.append(f"{s:<8}{num(d['images']):>8}{num(d['images_on_disk']):>9}{num(d['captions']):>10}"
                     f"{num(d['captions_per_image']):>9}{num(L['mean']):>8}{num(L['median']):>8}{num(L['p95']):>7}{num(L['max']):>6}")
    oov_cols = [k for k in ("test_oov", "dev_oov") if f["vocabulary"] and k in f["vocabulary"][0]]
    lines += ["", f"vocabulary built from {f['train_tokens']} train tokens (words, without the {len(SPECIALS)} special tokens)",
              f"{'min count':>9}{'words':>8}" + "".join(f"{c.replace('_oov', ' OOV'):>10}" for c in oov_cols)]
    for row in f["vocabulary"]:
        lines.append(f"{row['min_count']:>9}{row['words']:>8}"
                     + "".join(f"{'-' if row[c] is None else format(row[c], '.2%'):>10}" for c in oov_cols))
    if oov_cols:
        lines.append("OOV: share of that split's caption tokens missing from the train vocabulary")
    return "\n".join(lines)


def plot_lengths(lengths: dict[str, list[int]], path: str | Path, title: str = "") -> Path:
    """Write a PNG histogram of caption lengths per split (share of the split's captions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = np.arange(0, top + 2) - 0.5
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for split, values in lengths.items():
            if values:
                ax.hist(values, bins=bins, histtype="step", linewidth=1.6, density=True,
                        label=f"{split} ({len(values)} captions, median {np.median(values):g})")
        ax.set_xlabel("caption length (words)")
        ax.set_ylabel("share of captions")
        ax.set_title(title or "caption lengths")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def _min_counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("min counts must be integers >= 1")
    return values


def cmd_stats(args: argparse.Namespace) -> int:
    figures, lengths = dataset_stats(args.dataset, args.data_dir, args.annotations, args.min_counts)
    if args.plot:
        figures["plot"] = str(plot_lengths(lengths, args.plot, f"{args.dataset}: caption lengths"))
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        print(format_stats(figures))
        if args.plot:
            print(f"\nhistogram written to {args.plot}")
    return 0


# ====================================================================== download
class DownloadError(RuntimeError):
    """A download or unpack step failed (the message says how to resume)."""


@dataclass(frozen=True)
class RemoteFile:
    """One archive of a dataset. ``url`` None: only reachable with ``--url-base`` (manual datasets)."""

    name: str
    url: str | None
    # None: no published checksum (the Flickr archives, which have no public URL either): such an archive is
    # downloaded only with --sha256 NAME=HEX or an explicit --allow-unverified.
    sha256: str | None = None
    members: tuple[str, ...] = ()  # fnmatch patterns of archive members to extract (empty: all)
    into: str = ""  # sub-folder of DEST to unpack into
    flatten: bool = False  # drop the members' folders
    size: str = ""


KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
# Published checksums: TensorFlow Datasets' url_checksums/coco_captions.txt (the same archives and sizes).
KARPATHY_SHA256 = "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"
COCO = "https://images.cocodataset.org"


def _karpathy(which: str, into: str = "") -> RemoteFile:
    return RemoteFile("caption_datasets.zip", KARPATHY_URL, sha256=KARPATHY_SHA256, members=(f"*dataset_{which}.json",), into=into, flatten=True)


@dataclass(frozen=True)
class DatasetSource:
    files: tuple[RemoteFile, ...]
    reader: str  # --dataset value for verify/train
    manual: str = ""  # instructions when some archives need a request form
    after: str = ""  # extra step after unpacking


SOURCES: dict[str, DatasetSource] = {
    "flickr8k": DatasetSource(
        files=(RemoteFile("Flickr8k_Dataset.zip", None, size="1.1 GB"),
               RemoteFile("Flickr8k_text.zip", None, members=("*Flickr8k.token.txt", "*Flickr_8k.*Images.txt"), flatten=True)),
        reader="flickr8k",
        manual=("Flickr8k is distributed by the University of Illinois after a request form "
                "(https://hockenmaier.cs.illinois.edu/8k-pictures.html); there is no public direct link. "
                "Request it, then either unpack Flickr8k_Dataset.zip and Flickr8k_text.zip into DEST yourself, or "
                "serve both archives from a folder/web server you control and rerun with --url-base URL."),
    ),
    "flickr30k": DatasetSource(
        files=(RemoteFile("flickr30k-images.tar.gz", None, size="4.4 GB"), _karpathy("flickr30k")),
        reader="flickr30k",
        manual=("Flickr30k images are distributed by the University of Illinois after a request form "
                "(https://shannon.cs.illinois.edu/DenotationGraph/); there is no public direct link. "
                "Request them, unpack the images into DEST/flickr30k-images/ and put dataset_flickr30k.json "
                f"(from {KARPATHY_URL}) in DEST, or serve flickr30k-images.tar.gz and caption_datasets.zip "
                "yourself and rerun with --url-base URL."),
    ),
    "coco2014": DatasetSource(
        files=(RemoteFile("annotations_trainval2014.zip", f"{COCO}/annotations/annotations_trainval2014.zip",
                          members=("annotations/captions_*.json",), sha256="031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009", size="241 MB"),
               _karpathy("coco"),
               RemoteFile("val2014.zip", f"{COCO}/zips/val2014.zip", sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0", size="6.2 GB"),
               RemoteFile("train2014.zip", f"{COCO}/zips/train2014.zip", sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775", size="13 GB")),
        reader="coco",
    ),
    "coco2017": DatasetSource(
        files=(RemoteFile("annotations_trainval2017.zip", f"{COCO}/annotations/annotations_trainval2017.zip",
                          members=("annotations/captions_*.json",), sha256="113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268", size="241 MB"),
               _karpathy("coco", into="karpathy"),
               RemoteFile("val2017.zip", f"{COCO}/zips/val2017.zip", sha256="4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05", size="0.8 GB"),
               RemoteFile("train2017.zip", f"{COCO}/zips/train2017.zip", sha256="69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929", size="18 GB")),
        reader="custom",
        after="prepare",
    ),
}


def _url(f: RemoteFile, url_base: str | None) -> str | None:
    return f"{url_base.rstrip('/')}/{f.name}" if url_base else f.url


def download_file(
    url: str, dest: str | Path, sha256: str | None = None, retries: int = 3, backoff: float = 2.0,
    timeout: float = 60.0, progress: bool = True,
) -> str:
    """Download ``url`` to ``dest`` and return its sha256.

    Data goes to ``dest.part`` first; an interrupted transfer (in this call, retried
    ``retries`` times, or in an earlier run) resumes with an HTTP Range request. A server that
    ignores Range restarts the file. ``sha256`` given: a mismatch raises and keeps nothing.
    """
    dest = Path(dest)
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"only http(s) URLs are supported: {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file():
        digest = sha256_file(dest)
        if sha256 is None or digest == sha256:
            return digest
        dest.rename(dest.with_name(dest.name + ".bad"))
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
            if attempt == retries:
                raise DownloadError(f"{url}: {exc}; the partial file {part} is kept, rerun to resume") from exc
            print(f"{dest.name}: {exc}; resuming ({attempt + 1}/{retries})", file=sys.stderr)
            time.sleep(backoff * (attempt + 1))
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise DownloadError(f"{dest.name}: sha256 {digest} does not match the expected {sha256}; file removed")
    part.replace(dest)
    return digest


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One HTTP attempt, appending to ``part`` when the server honours Range."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "captioner-data/1"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete
            return
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            if not (have and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                part.unlink(missing_ok=True)  # a range we did not ask for: start again
                raise ConnectionError(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the whole file (a server that ignores Range restarts it)
            mode, have = "wb", 0
        total = have + int(length) if length and length.isdigit() else None
        with part.open(mode) as fh, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=part.name[: -len(".part")], disable=not progress) as bar:
            while block := resp.read(1 << 20):
                fh.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _safe_target(dest: Path, name: str, flatten: bool) -> Path | None:
    """Where archive member ``name`` goes under ``dest``; None for junk; raises on path traversal."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return None
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise DownloadError(f"unsafe path in archive: {name!r}")
    target = dest.joinpath(parts[-1] if flatten else Path(*parts))
    root = dest.resolve()
    if not target.resolve().is_relative_to(root):
        raise DownloadError(f"unsafe path in archive: {name!r}")
    return target


def _wanted(name: str, members: tuple[str, ...]) -> bool:
    return not members or any(fnmatch.fnmatch(name, m) for m in members)


def safe_extract(archive: str | Path, dest: str | Path, members: tuple[str, ...] = (), flatten: bool = False,
                 progress: bool = True) -> list[Path]:
    """Unpack a zip or tar archive under ``dest``, refusing absolute paths, ``..``, links and devices."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and _wanted(i.filename, members)]
            for info in infos:
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"refusing symbolic link in archive: {info.filename!r}")
            targets = [(i, _safe_target(dest, i.filename, flatten)) for i in infos]
            _check_space(dest, sum(i.file_size for i, t in targets if t is not None))
            for info, target in tqdm(targets, desc=f"unpacking {archive.name}", unit="file", disable=not progress):
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".unpacking")
                with zf.open(info) as src, tmp.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.replace(target)
                written.append(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            infos = [m for m in tf.getmembers() if not m.isdir() and _wanted(m.name, members)]
            for m in infos:
                if not m.isfile():
                    raise DownloadError(f"refusing link or special file in archive: {m.name!r}")
            targets = [(m, _safe_target(dest, m.name, flatten)) for m in infos]
            _check_space(dest, sum(m.size for m, t in targets if t is not None))
            for m, target in tqdm(targets, desc=f"unpacking {archive.name}", unit="file", disable=not progress):
                if target is None:
                    continue
                m.name = str(target.relative_to(dest))
                tf.extract(m, dest, filter="data")
                written.append(target)
    else:
        raise DownloadError(f"{archive} is neither a zip nor a tar archive")
    return written


def _check_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DownloadError(f"unpacking needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free in {dest}")


def download_dataset(
    dataset: str, dest: str | Path, url_base: str | None = None, checksums: dict[str, str] | None = None,
    remove_archives: bool = False, progress: bool = True, retries: int = 3, backoff: float = 2.0,
    allow_unverified: bool = False,
) -> dict[str, str]:
    """Download and unpack a dataset's archives into ``dest``; returns archive name -> sha256.

    Archives are kept in ``dest/archives`` (resumable; a rerun skips finished steps) unless
    ``remove_archives``. Every archive must have an expected sha256 (pinned in :data:`SOURCES` or
    given in ``checksums``) unless ``allow_unverified``. Raises :class:`DownloadError` when a file
    has no URL (manual datasets) or no checksum, before anything is downloaded.
    """
    source = SOURCES[dataset]
    dest = Path(dest)
    missing = [f.name for f in source.files if _url(f, url_base) is None]
    if missing:
        raise DownloadError(source.manual)
    unverified = [f.name for f in source.files if not ({f.name: f.sha256} | (checksums or {})).get(f.name)]
    if unverified and not allow_unverified:
        raise DownloadError(
            f"no published sha256 for {', '.join(unverified)}: give each one as --sha256 NAME=HEX (from a source you "
            "trust), or pass --allow-unverified to download without a check (the computed checksums are printed)")
    archives = dest / "archives"
    marker = dest / ".captioner-unpacked.json"
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    digests: dict[str, str] = {}
    known = {f.name: f.sha256 for f in source.files} | (checksums or {})
    for f in source.files:
        url = _url(f, url_base)
        assert url is not None
        key = f"{f.name}:{f.into}"
        if key in done and not (archives / f.name).exists():
            digests[f.name] = done[key]
            continue
        print(f"{f.name}{f' ({f.size})' if f.size else ''} <- {url}", file=sys.stderr)
        digest = download_file(url, archives / f.name, known.get(f.name), retries=retries, backoff=backoff, progress=progress)
        digests[f.name] = digest
        if done.get(key) != digest:
            safe_extract(archives / f.name, dest / f.into if f.into else dest, f.members, f.flatten, progress)
            done[key] = digest
            marker.write_text(json.dumps(done, indent=1))
        if remove_archives:
            (archives / f.name).unlink()
    if archives.is_dir():
        with (archives / "SHA256SUMS").open("w") as fh:
            fh.writelines(f"{d}  {n}\n" for n, d in digests.items())
    if source.after == "prepare":
        karpathy = dest / "karpathy" / "dataset_coco.json"
        coco2017_table(karpathy, dest, dest / "captions.csv")
    return digests


def _parse_checksums(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, digest = item.partition("=")
        if not sep or len(digest) != 64:
            raise DownloadError(f"--sha256 expects NAME=<64 hex digits>, got {item!r}")
        out[name] = digest.lower()
    return out


def cmd_download(args: argparse.Namespace) -> int:
    source = SOURCES[args.dataset]
    try:
        digests = download_dataset(args.dataset, args.dest, args.url_base, _parse_checksums(args.sha256),
                                   args.remove_archives, progress=not args.quiet,
                                   allow_unverified=args.allow_unverified)
    except DownloadError as exc:
        if source.manual and not args.url_base:
            print(f"{args.dataset} needs a manual download.\n\n{source.manual}\n\n"
                  f"Folder layout and terms: data/README.md.\nThen: captioner data verify --dataset {source.reader} "
                  f"--data-dir {args.dest}")
            return EXIT_MANUAL
        print(f"captioner data download: error: {exc}", file=sys.stderr)
        return 1
    known = {f.name: f.sha256 for f in source.files} | _parse_checksums(args.sha256)
    for name, digest in digests.items():
        note = "verified" if known.get(name) else "computed (no published checksum to compare with)"
        print(f"{name}  sha256 {digest}  {note}")
    print(f"\nnext:\n  captioner data verify --dataset {source.reader} --data-dir {args.dest} --output manifest.json\n"
          f"  captioner train --dataset {source.reader} --data-dir {args.dest} --manifest manifest.json --output runs/{args.dataset}")
    return 0


# ====================================================================== prepare (COCO 2017 + Karpathy)
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
            path = next((data_dir / d / name for d in ("train2017", "val2017") if (data_dir / d / name).is_file()), None)
            if path is None:
                counts["missing"] += 1
                path = data_dir / "train2017" / name
            rel = os.path.relpath(path, output.parent.resolve() if path.is_absolute() else output.parent)
            counts[r.split] += 1
            for caption in r.captions:
                writer.writerow([Path(rel).as_posix(), caption, r.split])
    tmp.replace(output)
    return dict(counts)


def cmd_prepare(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    karpathy = Path(args.karpathy) if args.karpathy else (data_dir / "karpathy" / "dataset_coco.json")
    if not karpathy.is_file() and (data_dir / "dataset_coco.json").is_file():
        karpathy = data_dir / "dataset_coco.json"
    out = Path(args.output) if args.output else data_dir / "captions.csv"
    counts = coco2017_table(karpathy, data_dir, out)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"next: captioner data verify --dataset custom --data-dir {data_dir} --annotations {out}")
    return 0


# ====================================================================== argparse
def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner data {verify,download,stats,prepare}``."""
    d = sub.add_parser("data", help="verify, download and describe caption datasets (see data/README.md)")
    dsub = d.add_subparsers(dest="data_command", required=True)

    v = dsub.add_parser("verify", help="check a dataset folder and write a manifest JSON", formatter_class=HelpFormatter)
    add_dataset_args(v, default=None)
    v.add_argument("--output", help="manifest path (default: ./manifest-<dataset>.json; not in the data folder)")
    v.add_argument("--no-decode", action="store_true", help="hash the images but do not decode them (faster)")
    v.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fatal when more than this share of split images is missing or undecodable (default 0.05)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)

    g = dsub.add_parser("download", help="download and unpack a dataset (or print how to get it)")
    g.add_argument("--dataset", choices=sorted(SOURCES), required=True)
    g.add_argument("--dest", required=True, help="folder to fill (archives are kept in DEST/archives)")
    g.add_argument("--url-base", help="fetch every archive as URL/<archive name> (a mirror you control)")
    g.add_argument("--sha256", action="append", metavar="NAME=HEX", help="expected checksum of an archive (repeatable)")
    g.add_argument("--allow-unverified", action="store_true",
                   help="download archives that have no pinned or given sha256 (the Flickr archives, which have no "
                        "public URL; without this flag, or --sha256 for each, nothing is downloaded)")
    g.add_argument("--remove-archives", action="store_true", help="delete each archive once unpacked")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_download)

    s = dsub.add_parser("stats", help="caption lengths, vocabulary size and OOV share per split", formatter_class=HelpFormatter)
    add_dataset_args(s, default=None)
    s.add_argument("--min-counts", type=_min_counts, default=(1, 3, 5, 10), help="vocabulary thresholds (default 1,3,5,10)")
    s.add_argument("--plot", help="write a PNG histogram of caption lengths here")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_stats)

    p = dsub.add_parser("prepare", help="COCO 2017 + Karpathy split -> captions.csv for --dataset custom", formatter_class=HelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with train2017/ and val2017/")
    p.add_argument("--karpathy", help="dataset_coco.json (default: DATA_DIR/karpathy/ or DATA_DIR/)")
    p.add_argument("--output", help="CSV to write (default: DATA_DIR/captions.csv)")
    p.set_defaults(func=cmd_prepare)

