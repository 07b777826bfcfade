"""Tokenisation and the word vocabulary (saved as JSON beside the weights)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Words with inner apostrophes or hyphens stay whole ("t-shirt", "man's"); punctuation is dropped.
# A plain regular expression: no tokenizer data to download (unlike nltk's word_tokenize/punkt).
_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; the same function is used for training and for metrics."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Bidirectional word <-> id map with the four special tokens at ids 0..3."""

    def __init__(self, words: Sequence[str]) -> None:
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for c in captions for tok in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>`` ids; words beyond ``max_len`` are cut (the ``<end>`` kept)."""
        ids = [self.stoi.get(t, self.unk_id) for t in tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at ``<end>`` and skipping ``<start>``/``<pad>``."""
        words = []
        for i in ids:
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.itos[i])
        return words

    def to_json(self) -> dict:
        return {"itos": self.itos}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        itos = data["itos"]
        if list(itos[:4]) != list(SPECIALS):
            raise ValueError("vocabulary JSON must start with " + ", ".join(SPECIALS))
        return cls(itos[4:])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(json.loads(Path(path).read_text()))
