"""Helpers shared by the benchmark scripts: test photos, JPEG uploads, percentiles, threads.

The default photos are scikit-image's bundled sample photos (read from the installed
package's data folder, so they work offline); ``--images FOLDER`` uses real photos instead.
"""

from __future__ import annotations

import io
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

#: Colour/greyscale *photos* that ship inside scikit-image (no download needed).
SAMPLE_FILES = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "camera.png",
    "ihc.png",
)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def fp32_export(folder: str | None) -> Path:
    """A model folder whose exported encoder is the fp32 graph (the int8 benchmarks' reference); exits with the
    command that makes one when it is not (the shipped folder's is int8 since session 11)."""
    import sys

    from captioner.checkpoint import read_config
    from captioner.ort_session import RECIPE_KEY
    from captioner.settings import default_model_path

    path = Path(folder) if folder else default_model_path()
    recipe = read_config(path).get(RECIPE_KEY) or {}
    if recipe.get("precision") != "fp32":
        sys.exit(
            f"{path} has no fp32 encoder.onnx (its export is {recipe.get('precision')!r}); make a copy with one,\n"
            f"  cp -r {path} /tmp/m-fp32 && python -m captioner.onnx_export /tmp/m-fp32\n"
            "and pass --checkpoint /tmp/m-fp32"
        )
    return path


def _skimage_photos() -> list[Image.Image]:
    from skimage import data

    folder = Path(data.data_dir)
    photos = []
    for name in SAMPLE_FILES:
        path = folder / name
        if path.is_file():
            with Image.open(path) as img:
                photos.append(img.convert("RGB"))
    if not photos:
        raise SystemExit(f"no scikit-image sample photos found in {folder}")
    return photos


def sample_photos(folder: str | None, limit: int) -> list[Image.Image]:
    """``limit`` RGB photos: the first ones in ``folder`` if given, else scikit-image's samples (repeats varied)."""
    if folder:
        from captioner.batch import expand
        from captioner.images import load_image

        paths = expand([folder])[:limit]
        if not paths:
            raise SystemExit(f"no images in {folder}")
        return [load_image(p) for p in paths]
    photos = _skimage_photos()
    return [variant(photos[i % len(photos)], i // len(photos)) for i in range(limit)]


def variant(img: Image.Image, k: int) -> Image.Image:
    """The ``k``-th copy of a photo: 0 is the photo itself, later ones slightly cropped and every other one mirrored."""
    if k == 0:
        return img
    w, h = img.size
    box = (k * 7 % max(1, w // 8), k * 5 % max(1, h // 8), w - k * 3 % max(1, w // 8), h - k * 11 % max(1, h // 8))
    out = img.crop(box)
    return ImageOps.mirror(out) if k % 2 else out


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_uploads(folder: str | None, limit: int) -> list[bytes]:
    """``limit`` photos as JPEG byte strings, as uploads arrive at the service."""
    if folder:  # real files: send the bytes as they are on disk
        from captioner.batch import expand

        paths = expand([folder])[:limit]
        if not paths:
            raise SystemExit(f"no images in {folder}")
        return [Path(p).read_bytes() for p in paths]
    return [jpeg_bytes(p) for p in sample_photos(None, limit)]


def write_sample_jpegs(folder: Path, n: int) -> list[Path]:
    """``n`` JPEG photos in ``folder``: the scikit-image samples, repeats cropped/mirrored (see :func:`variant`)."""
    out = []
    for i, img in enumerate(sample_photos(None, n)):
        path = folder / f"sample{i:04d}.jpg"
        img.save(path, format="JPEG", quality=90)
        out.append(path)
    return out


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest rank) of a list of milliseconds."""
    s = sorted(values_ms)
    q = lambda p: s[min(len(s) - 1, round(p * (len(s) - 1)))]  # noqa: E731
    return {"p50": round(statistics.median(s), 1), "p90": round(q(0.9), 1), "p99": round(q(0.99), 1)}


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` when ``n`` is given (0/None: PyTorch's default, all cores)."""
    import torch

    if n:
        torch.set_num_threads(n)


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


LEVERS = ("fold_bn", "channels_last", "int8_decoder", "encode_chunkN")


LEVERS_HELP = (
    "captioner.perf options: omitted = the shipped default (Captioner.load's fast path on CPU), "
    "'none' = the fp32 model exactly as trained, or a list such as fold_bn,channels_last,encode_chunk2,int8_decoder"
)


def parse_levers(spec: str | None) -> list[str]:
    """Names in a comma-separated ``--levers`` value (e.g. ``fold_bn,channels_last,encode_chunk2``).

    SystemExit on unknown ones. ``encode_chunkN`` runs the encoder on at most N images at a time;
    ``none`` (or an empty value) means no lever.
    """
    names = [n.strip() for n in (spec or "").split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in LEVERS[:3] and not re.fullmatch(r"encode_chunk[1-9]\d*", n)]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; choose from {', '.join(LEVERS)}")
    return names


def encode_chunk(names: list[str]) -> int | None:
    """N of an ``encode_chunkN`` lever in ``names``, else None."""
    return next((int(n[len("encode_chunk") :]) for n in names if n.startswith("encode_chunk")), None)


def load_captioner(checkpoint: str | None, spec: str | None, device: str | None = "cpu") -> tuple[Any, list[str]]:
    """The model as a benchmark variant: ``spec`` None = as shipped (``Captioner.load`` defaults),
    else the exact fp32 model with the ``--levers`` in ``spec`` applied. Returns (captioner, levers applied)."""
    from captioner.api import Captioner

    if spec is None:
        cap = Captioner.load(checkpoint, device=device)
        return cap, list(cap.optimizations)
    cap = Captioner.load(checkpoint, device=device, fast=False)
    return cap, apply_levers(cap, parse_levers(spec))


def apply_levers(cap: object, names: list[str]) -> list[str]:
    """Apply the ``captioner.perf`` options ``names`` to a loaded Captioner; returns ``names``."""
    if names:
        from captioner.perf import optimize

        optimize(
            cap,
            fold_bn="fold_bn" in names,
            channels_last="channels_last" in names,
            int8_decoder="int8_decoder" in names,
            encode_chunk=encode_chunk(names),
        )
    return names
