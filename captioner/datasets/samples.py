"""Torch datasets of (image, caption) pairs for teacher-forced training."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset, Sampler

from ..vocab import Vocabulary
from .records import CaptionRecord


class CaptionPairs(Dataset):
    """One item per reference caption: ``(feature-cache row, caption ids)``.

    ``rows`` maps each image path to its row in the feature cache (annotations, or the
    trunk maps when the encoder's last blocks are fine-tuned).
    """

    def __init__(self, records: list[CaptionRecord], vocab: Vocabulary, max_words: int, rows: dict[str, int]) -> None:
        self.items: list[tuple[str, list[int]]] = []
        for r in records:
            for c in r.captions:
                ids = vocab.encode(c, max_len=max_words)
                if len(ids) > 2:
                    self.items.append((os.path.abspath(r.path), ids))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        path, ids = self.items[i]
        return self.rows[path], torch.tensor(ids, dtype=torch.long)


class ImageGroupedBatches(Sampler[list[int]]):
    """Batches of whole images: ``images_per_batch`` random images with all their captions.

    The encoder grid of an image is then projected once per batch instead of once per
    caption (five times fewer of the most expensive operations on Flickr/COCO).
    """

    def __init__(
        self,
        pairs: CaptionPairs,
        images_per_batch: int,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        by_image: dict[str, list[int]] = {}
        for i, (path, _) in enumerate(pairs.items):
            by_image.setdefault(path, []).append(i)
        self.groups = list(by_image.values())
        self.images_per_batch = images_per_batch
        self.generator = generator
        self.rank, self.world = rank, world

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.groups), generator=self.generator).tolist()
        order = order[self.rank :: self.world]
        return [
            [i for g in order[k : k + self.images_per_batch] for i in self.groups[g]]
            for k in range(0, len(order), self.images_per_batch)
        ]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(range(self.rank, len(self.groups), self.world))
        return -(-n // self.images_per_batch)  # noqa: PLE0303  ceil(n / images_per_batch) by floor division, never negative


def collate_pairs(
    batch: list[tuple[int, torch.Tensor]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> cache rows (B,), captions (B, T) padded, lengths (B,)."""
    sources, caps = zip(*batch)
    lengths = torch.tensor([len(c) for c in caps], dtype=torch.long)
    padded = torch.full((len(caps), int(lengths.max())), pad_id, dtype=torch.long)
    for i, c in enumerate(caps):
        padded[i, : len(c)] = c
    return torch.tensor(sources, dtype=torch.long), padded, lengths
