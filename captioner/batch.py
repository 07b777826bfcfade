"""Batch captioning, the library behind ``captioner caption``: inputs -> image files -> captions.

Flow::

    inputs (files, folders, globs, stdin)  --expand-->  sorted, de-duplicated paths
      --DataLoader workers: ImageFiles (images.load_image + images.preprocess)-->  batches (B, 3, S, S)
      --Captioner.see / Captioner.decode (batched beam search)-->  one Result per image, in input order

Writing the results (JSONL/CSV/JSON, resume, attention files) is :mod:`captioner.outputs`;
the command itself (device, torchrun, signals, the summary line) is :mod:`captioner.commands.caption`.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TextIO

import numpy as np

from .images import DEFAULT_MAX_PIXELS, ImageError, is_image_path, load_image, preprocess
from .outputs import path_key
from .settings import CAPTION_BATCH, OVERLAP_RUNTIMES

if TYPE_CHECKING:
    import torch

    from .api import Caption, Captioner
    from .encoder import EncoderConfig

THUMB_SIDE = 384  # overlays are drawn on images scaled to at most this many pixels


# ---------------------------------------------------------------------------- inputs
def folder_images(folder: str, recursive: bool) -> list[str]:
    """Image files in ``folder`` (sorted; hidden names skipped; symlinked folders not followed)."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and is_image_path(f)]
    return sorted(found)


def expand(inputs: list[str], recursive: bool = False, stdin: TextIO | None = None) -> list[str]:
    """Files, folders, glob patterns and ``-`` (one path per stdin line) -> image paths in input order.

    Folders and globs contribute only image files, sorted; a file named
    explicitly is always taken (and fails later if it is not an image); a
    missing path or a glob matching nothing is kept so it gets an error record.
    Duplicates keep their first position.
    """
    paths: list[str] = []
    for item in inputs:
        if item == "-":
            lines = [line.strip() for line in (stdin or sys.stdin)]
            for line in filter(None, lines):
                paths += folder_images(line, recursive) if os.path.isdir(line) else [line]
        elif os.path.isdir(item):
            paths += folder_images(item, recursive)
        elif not os.path.lexists(item) and glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            for m in matches:
                paths += folder_images(m, recursive) if os.path.isdir(m) else [m] if is_image_path(m) else []
            if not matches:
                paths.append(item)
        else:
            paths.append(item)
    seen: set[str] = set()
    unique = []
    for p in paths:
        if path_key(p) not in seen:
            seen.add(path_key(p))
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------- decoding images (worker processes)
class Item(NamedTuple):
    """One image file, decoded: the model's input, or why there is none."""

    path: str
    image: torch.Tensor | None  # (3, S, S), normalised for the encoder; None when the file failed
    thumb: np.ndarray | None  # (h, w, 3) uint8 at most THUMB_SIDE on a side, when asked for
    error: tuple[str, str] | None  # (message, code), e.g. ImageError's code


class ImageFiles:
    """Map-style dataset of image paths -> :class:`Item`, the one image-files dataset.

    Each file is decoded once with :func:`~captioner.images.load_image` and turned into the
    encoder's input by :func:`~captioner.images.preprocess` (what ``Captioner.preprocess`` runs);
    the thumbnail for attention overlays comes from that same decode. It holds only the encoder
    config, so DataLoader worker processes never receive the model.
    """

    def __init__(self, paths: list[str], cfg: EncoderConfig, thumbs: bool = False) -> None:
        self.paths, self.cfg, self.thumbs = paths, cfg, thumbs

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        path = self.paths[i]
        try:
            img = load_image(path, max_pixels=DEFAULT_MAX_PIXELS, draft_size=self.cfg.image_size)
            tensor = preprocess(img, self.cfg.image_size, self.cfg.norm)  # (3, S, S); img itself is unchanged
            thumb = None
            if self.thumbs:
                img.thumbnail((THUMB_SIDE, THUMB_SIDE))
                thumb = np.asarray(img, dtype=np.uint8)  # (h, w, 3)
            return Item(path, tensor, thumb, None)
        except ImageError as exc:
            return Item(path, None, None, (str(exc), exc.code))
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the run
            return Item(path, None, None, (f"{type(exc).__name__}: {exc}", "error"))


@dataclass
class Batch:
    """A collated batch: decoded images stacked, failures kept per position."""

    paths: list[str]
    images: torch.Tensor | None  # (b, 3, S, S) of the images that decoded, in order; None if none did
    ok: list[int]  # positions in ``paths`` of the rows of ``images``
    errors: dict[int, tuple[str, str]]  # position -> (message, code)
    thumbs: dict[int, np.ndarray]  # position -> (h, w, 3) uint8, only when thumbnails were asked for

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True) for CUDA
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: list[Item]) -> Batch:
    """DataLoader ``collate_fn``: stack the images that decoded, keep the failures by position."""
    import torch

    good = [k for k, it in enumerate(items) if it.image is not None]
    return Batch(
        paths=[it.path for it in items],
        images=torch.stack([items[k].image for k in good]) if good else None,  # (b, 3, S, S)
        ok=good,
        errors={k: it.error for k, it in enumerate(items) if it.error is not None},
        thumbs={k: it.thumb for k, it in enumerate(items) if it.thumb is not None},
    )


def single_thread_worker(_: int) -> None:
    """DataLoader ``worker_init_fn``: decoding workers need no intra-op threads (they would fight the model)."""
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------------------- captioning
@dataclass
class Result:
    """One input's outcome: its caption (and thumbnail), or an error message and code."""

    path: str
    caption: Caption | None = None
    thumb: np.ndarray | None = None
    error: str | None = None
    code: str | None = None


def encoded_ahead(cap: Captioner, batches: Iterable[Batch]) -> Iterator[tuple[Batch, Future]]:
    """Each batch with its encoder outputs to come (``Captioner.see`` on one ONNX Runtime thread): the next batch
    is already encoding while the caller decodes this one, on the other core. ONNX Runtime's outputs do not depend
    on its thread count, so neither do the captions."""
    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as pool:
        waiting: tuple[Batch, Future] | None = None
        for batch in batches:
            ready, waiting = waiting, (batch, pool.submit(see_batch, cap, batch))
            if ready is not None:
                yield ready
        if waiting is not None:
            yield waiting


def see_batch(cap: Captioner, batch: Batch) -> tuple[torch.Tensor, list | None] | None:
    """The encoder outputs of a batch's decoded images on one thread (None: no image decoded)."""
    return None if batch.images is None else cap.see(batch.images, threads=1)


def iter_captions(
    cap: Captioner,
    paths: list[str],
    batch_size: int = CAPTION_BATCH,
    workers: int = 0,
    beam_size: int | None = None,
    max_length: int | None = None,
    n_best: int = 1,
    length_alpha: float | None = None,
    thumbs: bool = False,
    guidance: str | None = None,
) -> Iterator[Result]:
    """Caption ``paths`` in order: decoding in ``workers`` processes overlaps batched encode + beam search."""
    from torch.utils.data import DataLoader

    from .perf import intra_op_threads

    if not paths:
        return
    if len(paths) <= batch_size:  # one batch: a decoding process would have nothing to overlap, only its start
        workers = 0
    loader = DataLoader(
        ImageFiles(paths, cap.encoder_cfg, thumbs),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=single_thread_worker if workers else None,
        pin_memory=cap.device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )

    def decode(seen: tuple[torch.Tensor, list | None]) -> list[Caption]:
        annotations, concepts = seen  # (b, L, D), b concept lists
        return cap.decode(annotations, beam_size, max_length, n_best, length_alpha, concepts, guidance)

    def run_model(images: torch.Tensor) -> list[Caption]:
        return decode(cap.see(images))

    ahead = cap.device.type == "cpu" and cap.runtime in OVERLAP_RUNTIMES
    for batch, encoding in encoded_ahead(cap, loader) if ahead else ((b, None) for b in loader):
        captions: dict[int, Caption] = {}
        if batch.images is not None:
            try:
                if encoding is None:
                    captions = dict(zip(batch.ok, run_model(batch.images), strict=True))
                else:  # encoded on one thread while the last batch decoded: decode on the other core
                    with intra_op_threads(1):
                        captions = dict(zip(batch.ok, decode(encoding.result()), strict=True))
            except (RuntimeError, MemoryError):  # e.g. out of GPU memory: retry one image at a time
                for row, k in enumerate(batch.ok):
                    try:
                        captions[k] = run_model(batch.images[row : row + 1])[0]
                    except (RuntimeError, MemoryError) as exc:
                        batch.errors[k] = (f"captioning failed: {exc}", "model_error")
        for k, path in enumerate(batch.paths):
            if k in captions:
                yield Result(path, captions[k], batch.thumbs.get(k))
            else:
                msg, code = batch.errors[k]
                yield Result(path, error=msg, code=code)
