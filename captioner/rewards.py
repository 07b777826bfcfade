"""Per-caption rewards for self-critical sequence training, against each image's references.

:class:`CaptionReward` weights three scores: :class:`CiderD` (the coco-caption formula,
document frequencies taken once from the training references, as is usual for SCST),
:class:`SentenceBleu` and :class:`MeteorLite`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Ngrams = list[Counter]  # one Counter per n = 1..4


def _ngrams(words: Sequence[str], n_max: int = 4) -> Ngrams:
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, n_max + 1)]


class CiderD:
    """CIDEr-D of candidate captions against the references of their image.

    ``references[i]`` holds image ``i``'s reference captions as word lists. Document
    frequencies count, for every n-gram, the images whose references contain it.
    """

    sigma = 6.0

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], n_max: int = 4) -> None:
        self.n_max = n_max
        df: Counter = Counter()
        grams = [[_ngrams(ref, n_max) for ref in refs] for refs in references]
        for refs in grams:
            df.update({g for ref in refs for counts in ref for g in counts})
        self.log_n = math.log(float(max(1, len(references))))
        self.log_df = {g: math.log(max(1.0, float(c))) for g, c in df.items()}
        # every reference as (tf-idf vectors per n, norms per n, length), computed once
        self.refs = [
            [(*self._vector(ref), len(words)) for ref, words in zip(refs_g, refs)]
            for refs_g, refs in zip(grams, references)
        ]

    def _vector(self, counts: Ngrams) -> tuple[list[dict], list[float]]:
        vecs, norms = [], []
        for c in counts:
            v = {g: tf * (self.log_n - self.log_df.get(g, 0.0)) for g, tf in c.items()}
            vecs.append(v)
            norms.append(math.sqrt(sum(x * x for x in v.values())))
        return vecs, norms

    def score(self, candidate: Sequence[str], image: int) -> float:
        """CIDEr-D (0..10 scale, as coco-caption computes it) of one caption for image ``image``."""
        vec, norm = self._vector(_ngrams(candidate, self.n_max))
        refs = self.refs[image]
        total = 0.0
        for r_vec, r_norm, r_len in refs:
            delta = len(candidate) - r_len
            sims = 0.0
            for n in range(self.n_max):
                if norm[n] == 0.0 or r_norm[n] == 0.0:
                    continue
                rv = r_vec[n]
                dot = sum(min(x, rv[g]) * rv[g] for g, x in vec[n].items() if g in rv)  # clipped counts
                sims += dot / (norm[n] * r_norm[n])
            total += sims / self.n_max * math.exp(-(delta * delta) / (2 * self.sigma**2))
        return 10.0 * total / max(1, len(refs))


class SentenceBleu:
    """Sentence BLEU-4 against an image's references (0..1), add-one smoothing for n >= 2.

    The brevity penalty uses the closest reference length, as corpus BLEU does; it is what
    stops the policy from drifting to short captions that CIDEr-D alone tolerates.
    """

    def __init__(self, references: Sequence[Sequence[Sequence[str]]], n_max: int = 4) -> None:
        self.n_max = n_max
        self.refs = []
        for refs in references:
            clip: list[Counter] = [Counter() for _ in range(n_max)]
            for ref in refs:
                for n, counts in enumerate(_ngrams(ref, n_max)):
                    clip[n] |= counts  # max count of every n-gram over the references
            self.refs.append((clip, sorted(len(r) for r in refs)))

    def score(self, candidate: Sequence[str], image: int) -> float:
        if not candidate:
            return 0.0
        clip, lengths = self.refs[image]
        c = len(candidate)
        log_p = 0.0
        for n, counts in enumerate(_ngrams(candidate, self.n_max)):
            total = max(1, c - n)  # as nltk: an order longer than the caption counts as 0 of 1
            match = sum(min(k, clip[n][g]) for g, k in counts.items())
            if n == 0:
                if match == 0:
                    return 0.0
                log_p += math.log(match / total)
            else:
                log_p += math.log((match + 1) / (total + 1))
        r = min(lengths, key=lambda x: (abs(x - c), x))
        bp = 1.0 if c > r else math.exp(1 - r / c)
        return bp * math.exp(log_p / self.n_max)


def _meteor_function_words() -> frozenset[str]:
    """METEOR 1.5's English function-word list, read from the jar that pycocoevalcap ships."""
    import zipfile
    from importlib.util import find_spec

    spec = find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    try:
        with zipfile.ZipFile(jar) as zf:
            return frozenset(zf.read("function/english.words").decode("utf-8").split())
    except (OSError, KeyError, zipfile.BadZipFile):
        return frozenset()


class MeteorLite:
    """A fast METEOR 1.5 approximation (0..1), best over the references.

    Words are aligned by exact match, then by Snowball stem (weight 0.6); function words
    (METEOR's own list) count ``1 - delta`` and content words ``delta``. Fmean, the
    fragmentation penalty gamma (chunks / matches) ** beta and the parameters are METEOR
    1.5's English ones; synonyms and paraphrases are left out. It rewards covering what the
    references say (recall), which CIDEr-D and BLEU reward little.
    """

    alpha, beta, gamma, delta, stem_weight = 0.85, 0.2, 0.6, 0.75, 0.6

    def __init__(self, references: Sequence[Sequence[Sequence[str]]]) -> None:
        from nltk.stem.snowball import SnowballStemmer

        self._stem = SnowballStemmer("english").stem
        self._stems: dict[str, str] = {}
        self.function_words = _meteor_function_words()
        self.refs = [[(list(r), [self.stem(w) for w in r]) for r in refs if r] for refs in references]

    def stem(self, word: str) -> str:
        s = self._stems.get(word)
        if s is None:
            s = self._stems[word] = self._stem(word)
        return s

    def _weight(self, word: str) -> float:
        return 1 - self.delta if word in self.function_words else self.delta

    def _one(self, cand: Sequence[str], cand_stems: list[str], ref: list[str], ref_stems: list[str]) -> float:
        used = [False] * len(ref)
        aligned = [-1] * len(cand)  # reference position of each candidate word, -1 = unmatched
        module = [0.0] * len(cand)
        for words, others, weight in ((cand, ref, 1.0), (cand_stems, ref_stems, self.stem_weight)):
            for i, w in enumerate(words):  # greedy, continuing the previous chunk when it can
                if aligned[i] >= 0:
                    continue
                nxt = aligned[i - 1] + 1 if i and aligned[i - 1] >= 0 else -1
                if 0 <= nxt < len(others) and not used[nxt] and others[nxt] == w:
                    pos = nxt
                else:
                    pos = next((j for j, r in enumerate(others) if r == w and not used[j]), -1)
                if pos >= 0:
                    used[pos], aligned[i], module[i] = True, pos, weight
        m = sum(1 for j in aligned if j >= 0)
        if m == 0:
            return 0.0
        chunks, prev = 0, -1
        for j in aligned:
            if j >= 0 and (prev < 0 or j != prev + 1):
                chunks += 1
            prev = j
        p = sum(module[i] * self._weight(w) for i, w in enumerate(cand)) / sum(self._weight(w) for w in cand)
        r = sum(module[i] * self._weight(ref[j]) for i, j in enumerate(aligned) if j >= 0) / sum(
            self._weight(w) for w in ref
        )
        if p == 0.0 or r == 0.0:
            return 0.0
        fmean = p * r / (self.alpha * p + (1 - self.alpha) * r)
        return fmean * (1 - self.gamma * (chunks / m) ** self.beta)

    def score(self, candidate: Sequence[str], image: int) -> float:
        if not candidate:
            return 0.0
        stems = [self.stem(w) for w in candidate]
        return max((self._one(candidate, stems, ref, rs) for ref, rs in self.refs[image]), default=0.0)


class CaptionReward:
    """The SCST reward: a weighted sum of CIDEr-D, sentence BLEU-4 and the METEOR approximation."""

    def __init__(
        self,
        references: Sequence[Sequence[Sequence[str]]],
        cider_weight: float = 1.0,
        bleu_weight: float = 0.0,
        meteor_weight: float = 0.0,
    ) -> None:
        self.cider = CiderD(references) if cider_weight else None
        self.bleu = SentenceBleu(references) if bleu_weight else None
        self.meteor = MeteorLite(references) if meteor_weight else None
        self.cider_weight, self.bleu_weight, self.meteor_weight = cider_weight, bleu_weight, meteor_weight

    def score(self, candidate: Sequence[str], image: int) -> float:
        total = 0.0
        if self.cider is not None:
            total += self.cider_weight * self.cider.score(candidate, image)
        if self.bleu is not None:
            total += self.bleu_weight * self.bleu.score(candidate, image)
        if self.meteor is not None:
            total += self.meteor_weight * self.meteor.score(candidate, image)
        return total

    def batch(self, candidates: Sequence[Sequence[str]], images: Sequence[int]) -> np.ndarray:
        return np.array([self.score(c, i) for c, i in zip(candidates, images)], dtype=np.float32)
