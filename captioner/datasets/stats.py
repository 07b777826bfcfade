"""``captioner data stats``: images and captions per split, caption lengths, vocabulary size and OOV share."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ..vocab import SPECIALS, Vocabulary, tokenize
from .loading import load_records
from .records import CaptionRecord, DatasetError, split_order


def _lengths(captions: list[str]) -> list[int]:
    return [len(tokenize(c)) for c in captions]


def _describe(lengths: list[int]) -> dict[str, float | int | None]:
    import numpy as np

    if not lengths:
        return {"mean": None, "median": None, "p95": None, "max": None}
    arr = np.asarray(lengths)
    return {
        "mean": round(float(arr.mean()), 2),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def dataset_stats(
    dataset: str,
    data_dir: str | Path,
    annotations: str | Path | list[str] | None = None,
    min_counts: tuple[int, ...] = (1, 3, 5, 10),
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Figures for ``captioner data stats`` and the caption lengths per split (for the plot)."""
    records = load_records(dataset, data_dir, "all", None, annotations, require_images=False)
    if not records:
        raise DatasetError(f"no captioned images in {data_dir}")
    by_split: dict[str, list[CaptionRecord]] = defaultdict(list)
    for r in records:
        by_split[r.split].append(r)
    order = split_order(set(by_split))
    lengths = {s: _lengths([c for r in by_split[s] for c in r.captions]) for s in order}
    splits = {
        s: {
            "images": len(by_split[s]),
            "images_on_disk": sum(1 for r in by_split[s] if Path(r.path).is_file()),
            "captions": len(lengths[s]),
            "captions_per_image": round(len(lengths[s]) / len(by_split[s]), 2),
            "length": _describe(lengths[s]),
        }
        for s in order
    }
    train_caps = [c for r in by_split.get("train", []) for c in r.captions]
    eval_tokens = {
        s: [t for r in by_split[s] for c in r.captions for t in tokenize(c)] for s in ("dev", "test") if s in by_split
    }
    vocab_rows = []
    for m in min_counts:
        vocab = Vocabulary.build(train_caps, min_count=m)
        row: dict[str, Any] = {"min_count": m, "words": len(vocab) - len(SPECIALS), "vocab_size": len(vocab)}
        for s, toks in eval_tokens.items():
            row[f"{s}_oov"] = round(sum(t not in vocab.stoi for t in toks) / len(toks), 4) if toks else None
        vocab_rows.append(row)
    all_lengths = [n for s in order for n in lengths[s]]
    figures = {
        "dataset": dataset,
        "data_dir": str(Path(data_dir).resolve()),
        "images": len(records),
        "captions": len(all_lengths),
        "length": _describe(all_lengths),
        "splits": splits,
        "train_tokens": sum(lengths.get("train", [])),
        "vocabulary": vocab_rows,
    }
    return figures, lengths


def format_stats(f: dict[str, Any]) -> str:
    """The stats as readable tables."""

    def num(x: Any) -> str:
        return "-" if x is None else (f"{x:g}" if isinstance(x, float) else str(x))

    lines = [
        f"dataset {f['dataset']} in {f['data_dir']}: {f['images']} images, {f['captions']} captions",
        "",
        "caption length in words (captioner.vocab.tokenize)",
        f"{'split':<8}{'images':>8}{'on disk':>9}{'captions':>10}{'per img':>9}"
        f"{'mean':>8}{'median':>8}{'p95':>7}{'max':>6}",
    ]
    rows = [
        *f["splits"].items(),
        (
            "all",
            {
                "images": f["images"],
                "images_on_disk": None,
                "captions": f["captions"],
                "captions_per_image": None,
                "length": f["length"],
            },
        ),
    ]
    for s, d in rows:
        L = d["length"]
        lines.append(
            f"{s:<8}{num(d['images']):>8}{num(d['images_on_disk']):>9}{num(d['captions']):>10}"
            f"{num(d['captions_per_image']):>9}{num(L['mean']):>8}{num(L['median']):>8}{num(L['p95']):>7}{num(L['max']):>6}"
        )
    oov_cols = [k for k in ("test_oov", "dev_oov") if f["vocabulary"] and k in f["vocabulary"][0]]
    lines += [
        "",
        f"vocabulary built from {f['train_tokens']} train tokens (words, without the {len(SPECIALS)} special tokens)",
        f"{'min count':>9}{'words':>8}" + "".join(f"{c.replace('_oov', ' OOV'):>10}" for c in oov_cols),
    ]
    for row in f["vocabulary"]:
        lines.append(
            f"{row['min_count']:>9}{row['words']:>8}"
            + "".join(f"{'-' if row[c] is None else format(row[c], '.2%'):>10}" for c in oov_cols)
        )
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
                ax.hist(
                    values,
                    bins=bins,
                    histtype="step",
                    linewidth=1.6,
                    density=True,
                    label=f"{split} ({len(values)} captions, median {np.median(values):g})",
                )
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
