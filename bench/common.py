"""Helpers shared by the benchmark scripts: photos to test on and percentile summaries."""
from __future__ import annotations

import statistics
from pathlib import Path

from PIL import Image


def sample_photos(folder: str | None, limit: int) -> list[Image.Image]:
    """Real photos: from ``folder`` if given, else scikit-image's bundled samples (offline)."""
    if folder:
        from captioner.batch import expand

        paths = expand([folder])[:limit]
        return [Image.open(p).convert("RGB") for p in paths]
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "motorcycle_left"]
    photos = []
    for n in names:
        arr = getattr(data, n)()
        photos.append(Image.fromarray(arr).convert("RGB"))
    return (photos * (limit // len(photos) + 1))[:limit]


def percentiles(values_ms: list[float]) -> dict[str, float]:
    s = sorted(values_ms)
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
    return {"p50": round(statistics.median(s), 1), "p90": round(q(0.9), 1), "p99": round(q(0.99), 1)}


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
