"""``captioner data``: verify, download, describe and prepare caption datasets (see data/README.md).

- ``verify``: :mod:`captioner.datasets.verify`, writes a manifest JSON (``captioner train --manifest`` records it);
- ``download``: :mod:`captioner.datasets.download`; datasets behind a request form print instructions instead;
- ``stats``: :mod:`captioner.datasets.stats`, tables and a PNG histogram of caption lengths;
- ``prepare``: :mod:`captioner.datasets.prepare`, COCO 2017 + the Karpathy split -> a ``captions.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..datasets.download import SOURCES
from .common import HelpFormatter, add_dataset_args

EXIT_MANUAL = 3  # `data download` of a dataset that needs a manual step


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner data {verify,download,stats,prepare}``."""
    d = sub.add_parser("data", help="verify, download and describe caption datasets (see data/README.md)")
    dsub = d.add_subparsers(dest="data_command", required=True)
    _add_verify(dsub)
    _add_download(dsub)
    _add_stats(dsub)
    _add_prepare(dsub)


def _add_verify(dsub: argparse._SubParsersAction) -> None:
    v = dsub.add_parser(
        "verify", help="check a dataset folder and write a manifest JSON", formatter_class=HelpFormatter
    )
    add_dataset_args(v, default=None)
    v.add_argument("--output", help="manifest path (default: ./manifest-<dataset>.json; not in the data folder)")
    v.add_argument("--no-decode", action="store_true", help="hash the images but do not decode them (faster)")
    v.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="fatal when more than this share of split images is missing or undecodable (default 0.05)",
    )
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=run_verify)


def _add_download(dsub: argparse._SubParsersAction) -> None:
    g = dsub.add_parser("download", help="download and unpack a dataset (or print how to get it)")
    g.add_argument("--dataset", choices=sorted(SOURCES), required=True)
    g.add_argument("--dest", required=True, help="folder to fill (archives are kept in DEST/archives)")
    g.add_argument("--url-base", help="fetch every archive as URL/<archive name> (a mirror you control)")
    g.add_argument("--sha256", action="append", metavar="NAME=HEX", help="expected checksum of an archive (repeatable)")
    g.add_argument(
        "--allow-unverified",
        action="store_true",
        help="download archives that have no pinned or given sha256 (the Flickr archives, which have no "
        "public URL; without this flag, or --sha256 for each, nothing is downloaded)",
    )
    g.add_argument("--remove-archives", action="store_true", help="delete each archive once unpacked")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=run_download)


def min_counts(text: str) -> tuple[int, ...]:
    """argparse type of ``--min-counts``: comma-separated integers >= 1, sorted, without repeats."""
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("min counts must be integers >= 1")
    return values


def _add_stats(dsub: argparse._SubParsersAction) -> None:
    s = dsub.add_parser(
        "stats", help="caption lengths, vocabulary size and OOV share per split", formatter_class=HelpFormatter
    )
    add_dataset_args(s, default=None)
    s.add_argument(
        "--min-counts", type=min_counts, default=(1, 3, 5, 10), help="vocabulary thresholds (default 1,3,5,10)"
    )
    s.add_argument("--plot", help="write a PNG histogram of caption lengths here")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_stats)


def _add_prepare(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "prepare", help="COCO 2017 + Karpathy split -> captions.csv for --dataset custom", formatter_class=HelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder with train2017/ and val2017/")
    p.add_argument("--karpathy", help="dataset_coco.json (default: DATA_DIR/karpathy/ or DATA_DIR/)")
    p.add_argument("--output", help="CSV to write (default: DATA_DIR/captions.csv)")
    p.set_defaults(func=run_prepare)


def run_verify(args: argparse.Namespace) -> int:
    """Print the summary and write the manifest; 1 when the dataset is not usable or the manifest not written."""
    from ..datasets.verify import format_verify, verify_dataset

    manifest = verify_dataset(
        args.dataset,
        args.data_dir,
        args.annotations,
        decode=not args.no_decode,
        progress=not args.quiet,
        max_bad_fraction=args.max_bad_fraction,
    )
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


def run_download(args: argparse.Namespace) -> int:
    """Download and unpack; :data:`EXIT_MANUAL` with instructions for a dataset behind a request form."""
    from ..datasets.download import DownloadError, download_dataset, parse_checksums

    source = SOURCES[args.dataset]
    try:
        checksums = parse_checksums(args.sha256)
        digests = download_dataset(
            args.dataset,
            args.dest,
            args.url_base,
            checksums,
            args.remove_archives,
            progress=not args.quiet,
            allow_unverified=args.allow_unverified,
        )
    except DownloadError as exc:
        if source.manual and not args.url_base:
            print(
                f"{args.dataset} needs a manual download.\n\n{source.manual}\n\n"
                f"Folder layout and terms: data/README.md.\nThen: captioner data verify --dataset {source.reader} "
                f"--data-dir {args.dest}"
            )
            return EXIT_MANUAL
        print(f"captioner data download: error: {exc}", file=sys.stderr)
        return 1
    known = {f.name: f.sha256 for f in source.files} | checksums
    for name, digest in digests.items():
        note = "verified" if known.get(name) else "computed (no published checksum to compare with)"
        print(f"{name}  sha256 {digest}  {note}")
    print(
        f"\nnext:\n  captioner data verify --dataset {source.reader} --data-dir {args.dest} --output manifest.json\n"
        f"  captioner train --dataset {source.reader} --data-dir {args.dest} --manifest manifest.json "
        f"--output runs/{args.dataset}"
    )
    return 0


def run_stats(args: argparse.Namespace) -> int:
    """Print the stats (tables, or JSON with ``--json``) and write the histogram with ``--plot``."""
    from ..datasets.stats import dataset_stats, format_stats, plot_lengths

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


def run_prepare(args: argparse.Namespace) -> int:
    """Write the COCO 2017 captions table (``captions.csv``) for ``--dataset custom``."""
    from ..datasets.prepare import coco2017_table

    data_dir = Path(args.data_dir)
    karpathy = Path(args.karpathy) if args.karpathy else (data_dir / "karpathy" / "dataset_coco.json")
    if not karpathy.is_file() and (data_dir / "dataset_coco.json").is_file():
        karpathy = data_dir / "dataset_coco.json"
    out = Path(args.output) if args.output else data_dir / "captions.csv"
    counts = coco2017_table(karpathy, data_dir, out)
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"next: captioner data verify --dataset custom --data-dir {data_dir} --annotations {out}")
    return 0
