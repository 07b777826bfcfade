"""Captioning metrics: BLEU-1..4 (nltk), METEOR, ROUGE-L and CIDEr-D (pycocoevalcap).

All scores are reported on a 0-100 scale. Captions are tokenised with
:func:`captioner.vocab.tokenize` (lower-cased words, punctuation dropped) for every
metric. METEOR needs Java; when it is missing METEOR is reported as ``None`` with a
warning and the other metrics still work.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence

from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

from .vocab import tokenize

log = logging.getLogger(__name__)


def bleu(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    keys = list(hypotheses)
    hyps = [tokenize(hypotheses[k]) for k in keys]
    refs = [[tokenize(r) for r in references[k]] for k in keys]
    out = {}
    smooth = SmoothingFunction().method0
    with warnings.catch_warnings():  # nltk warns (and scores 0) when no n-gram matches at all
        warnings.simplefilter("ignore", UserWarning)
        for n in range(1, 5):
            weights = tuple([1.0 / n] * n)
            out[f"bleu{n}"] = 100.0 * corpus_bleu(refs, hyps, weights=weights, smoothing_function=smooth)
    return out


def score(
    hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], meteor: bool = True
) -> dict[str, float | None]:
    """hypotheses: id -> caption; references: id -> captions. Returns the metric dict."""
    if not hypotheses:
        raise ValueError("no captions to score")
    missing = [k for k in hypotheses if k not in references or not references[k]]
    if missing:
        raise ValueError(f"{len(missing)} captions have no references, e.g. {missing[0]!r}")
    result: dict[str, float | None] = dict(bleu(hypotheses, references))
    res = {k: [" ".join(tokenize(v)) or "empty"] for k, v in hypotheses.items()}
    gts = {k: [" ".join(tokenize(r)) for r in references[k]] for k in hypotheses}
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    result["rouge_l"] = 100.0 * Rouge().compute_score(gts, res)[0]
    result["cider"] = 100.0 * Cider().compute_score(gts, res)[0]
    result["meteor"] = meteor_score(gts, res) if meteor else None
    return result


def meteor_score(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float | None:
    """METEOR 1.5 through pycocoevalcap's bundled jar, or None without Java."""
    if shutil.which("java") is None:
        log.warning("java not found: METEOR skipped (the other metrics are unaffected)")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        scorer = Meteor()
    except OSError as exc:
        log.warning("METEOR could not start (%s); reported as null", exc)
        return None
    try:
        return 100.0 * scorer.compute_score(gts, res)[0]
    except (OSError, ValueError) as exc:  # a broken JVM must not lose the other metrics
        log.warning("METEOR failed (%s); reported as null", exc)
        return None
    finally:
        scorer.meteor_p.kill()
