import shutil

import pytest

from captioner.metrics import bleu, score

REFS = {
    "1": ["a dog runs on the grass", "a brown dog is running", "the dog runs outside"],
    "2": ["two people sit on a bench", "a couple sitting on a bench", "people on a bench"],
}


def test_perfect_captions_score_100_bleu() -> None:
    hyps = {"1": "a dog runs on the grass", "2": "two people sit on a bench"}
    assert bleu(hyps, REFS)["bleu4"] == pytest.approx(100.0)


def test_known_partial_example() -> None:
    # unigram precision 3/5 and bigram 2/4 for "a dog runs in snow" vs refs of image 1
    b = bleu({"1": "a dog runs in snow"}, {"1": REFS["1"]})
    assert b["bleu1"] == pytest.approx(60.0, rel=1e-6)  # no brevity penalty: closest ref has 5 words
    assert b["bleu2"] == pytest.approx(100 * (0.6 * 0.5) ** 0.5, rel=1e-6)


def test_all_metrics_order_good_above_bad() -> None:
    good = score({"1": "a dog runs on the grass", "2": "people sit on a bench"}, REFS, meteor=False)
    bad = score({"1": "a cat sleeps", "2": "a red car"}, REFS, meteor=False)
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert good[key] > bad[key]
    assert good["meteor"] is None


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_runs_offline() -> None:
    good = score({"1": "a dog runs on the grass", "2": "people sit on a bench"}, REFS)
    bad = score({"1": "a cat sleeps", "2": "a red car"}, REFS)
    perfect = score({"1": "a dog runs on the grass", "2": "two people sit on a bench"}, REFS)
    disjoint = score({"1": "zebra xylophone", "2": "quantum umbrella"}, REFS)
    assert perfect["meteor"] == pytest.approx(100.0, abs=1.0)  # METEOR on the 0-100 scale of the other metrics
    assert disjoint["meteor"] == 0.0
    assert 100.0 > good["meteor"] > bad["meteor"] > 0.0  # "a cat sleeps" still matches "a"


def test_missing_references_is_an_error() -> None:
    with pytest.raises(ValueError):
        score({"x": "a dog"}, REFS)
