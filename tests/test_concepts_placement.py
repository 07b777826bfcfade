"""Concept placement: novel words through proxies, articles and plurals, disjunctive constraints and the
lift over a word's class share."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.concepts import MAPPING_FILE, Concept, ConceptMap, indefinite_article, plural, show_placed
from captioner.constrained import constrained_beam_search
from captioner.decoder import AttentionDecoder, DecoderConfig

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_VOCAB = ROOT / "models" / "flickr8k-lite2" / "vocab.json"
IDS = dict(start_id=1, end_id=2, pad_id=0)


def test_mapping_file_gives_novel_words_in_vocabulary_proxies() -> None:
    data = json.loads(resources.files("captioner.resources").joinpath(MAPPING_FILE).read_text())
    vocab = set(json.loads(SHIPPED_VOCAB.read_text())["itos"])
    proxies = data["proxies"]
    assert proxies["zebra"] == "horse" and proxies["sink"] in vocab
    assert not set(proxies) & vocab and set(proxies.values()) <= vocab
    novel = {c["name"]: c["novel"] for c in data["classes"] if "novel" in c}
    assert novel["zebra"] == ["zebra"] and novel["microwave oven"] == ["microwave"]
    assert {w for ws in novel.values() for w in ws} <= set(proxies)
    cmap = ConceptMap.load(sorted(vocab))
    assert "zebra" in cmap.words and cmap.forms["zebra"] == ["horse", "horses"]
    assert cmap.shown["zebra"] == {"horse": "zebra", "horses": "zebras"}
    assert cmap.shown["cat"] == {"cat": "cat", "cats": "cats"}


def test_a_proxy_only_stands_in_for_a_word_the_vocabulary_lacks() -> None:
    cmap = ConceptMap(
        [["zebra"], ["dog"], ["gnu"]],
        ["<pad>", "horse", "horses", "dog", "dogs", "zebra"],
        {"zebra": "horse", "dog": "horse", "gnu": "wildebeest"},
    )
    assert cmap.words == ["dog", "zebra"]  # zebra is a vocabulary word here; gnu's proxy is not
    assert cmap.forms["zebra"] == ["zebra"] and cmap.forms["dog"] == ["dog", "dogs"]
    assert cmap.proxies == {}


def test_english_articles_and_plurals() -> None:
    assert [
        indefinite_article(w) for w in ("elephant", "umbrella", "horse", "unicorn", "hour", "oven", "european")
    ] == ["an", "an", "a", "a", "an", "an", "a"]
    assert [plural(w) for w in ("zebra", "bus", "sandwich", "box", "parking meter", "strawberry", "toy")] == [
        "zebras",
        "buses",
        "sandwiches",
        "boxes",
        "parking meters",
        "strawberries",
        "toys",
    ]
    words = ["a", "man", "feeds", "a", "horse", "next", "to", "an", "dog"]
    assert show_placed(words, {"horse": "elephant"}) == [
        "a",
        "man",
        "feeds",
        "an",
        "elephant",
        "next",
        "to",
        "an",
        "dog",
    ]
    assert show_placed(words, {"dog": "dog"}) == ["a", "man", "feeds", "a", "horse", "next", "to", "a", "dog"]
    assert show_placed(["two", "horses"], {"horses": "zebras"}) == ["two", "zebras"]


def tiny_decoder(seed: int = 0, vocab_size: int = 12) -> AttentionDecoder:
    torch.manual_seed(seed)
    decoder = AttentionDecoder(DecoderConfig(vocab_size, 16, 16, 16, 16, 16, 0.0, tie_embeddings=False)).eval()
    with torch.no_grad():
        decoder.out.bias[2] += 2.0  # captions end within a few words
    return decoder


def test_a_disjunctive_constraint_is_satisfied_by_either_word() -> None:
    annotations = torch.randn(2, 6, 16)
    required = torch.zeros(2, 12, dtype=torch.bool)
    required[:, [5, 9]] = True  # word 5 or word 9, once
    for banned, wanted in ((5, 9), (9, 5)):
        decoder = tiny_decoder(seed=3)
        with torch.no_grad():
            decoder.out.bias[banned] -= 30.0  # the model all but never says this one
        for hyps in constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS):
            assert hyps[0].ids.count(wanted) == 1 and banned not in hyps[0].ids, hyps[0].ids


@pytest.fixture
def tiny_cap(tiny_checkpoint: Path) -> Captioner:
    cap = Captioner.load(tiny_checkpoint, device="cpu")
    cap.defaults["concept_weight"] = None  # place the concept whatever it costs the untrained decoder
    return cap


def annotations_of(cap: Captioner, n: int = 3) -> torch.Tensor:
    from conftest import make_image

    return cap.see(torch.stack([cap.preprocess(make_image(i))[0] for i in range(n)]))[0]


def test_a_novel_word_is_placed_through_its_proxy_and_shown(tiny_cap: Captioner) -> None:
    cap = tiny_cap
    cap.concept_map = ConceptMap([["elephant"]] + [[]] * 999, cap.vocab.itos, {"elephant": "ball"})
    annotations = annotations_of(cap)
    plain = cap.decode(annotations, guidance="none")
    for got in cap.decode(annotations, concepts=[[Concept("elephant", 0.9)]] * 3):
        assert got.tokens.count("elephant") + got.tokens.count("elephants") == 1, got.text
        assert "ball" not in got.tokens and "balls" not in got.tokens
        assert got.text == " ".join(got.tokens) and got.attention.shape[0] == len(got.tokens)
        i = next(i for i, t in enumerate(got.tokens) if t.startswith("elephant"))
        if i > 0 and got.tokens[i - 1] in ("a", "an"):
            assert got.tokens[i - 1] == "an"  # the model wrote "a" for its proxy
        assert got.to_dict()["concepts"] == [{"word": "elephant", "probability": 0.9}]
    # guidance=none keeps the plain model
    assert [c.text for c in cap.decode(annotations, concepts=[[Concept("elephant", 0.9)]] * 3, guidance="none")] == [
        c.text for c in plain
    ]


def test_top_two_concepts_either_placed_and_the_lift_over_a_word_class_share(tiny_cap: Captioner) -> None:
    cap = tiny_cap
    annotations = annotations_of(cap)
    assert cap.concept_map is not None and cap.concept_map.share["dog"] == pytest.approx(0.121)
    two = [[Concept("cat", 0.5), Concept("ball", 0.3)]] * 3
    cap.defaults["concept_top"] = 2
    for got in cap.decode(annotations, concepts=two):
        assert sum(t in ("cat", "ball") for t in got.tokens) == 1, got.text
    cap.defaults["concept_top"] = 1
    for got in cap.decode(annotations, concepts=two):
        assert got.tokens.count("cat") == 1, got.text
    # "dog" is named by 121 of 1000 classes: at lift 2 a 0.2 "dog" is no evidence and leaves the caption alone
    dog = [[Concept("dog", 0.2)]] * 3
    plain = [c.text for c in cap.decode(annotations, concepts=dog, guidance="none")]
    cap.defaults["concept_lift"] = 0.0
    assert all(c.tokens.count("dog") == 1 for c in cap.decode(annotations, concepts=dog))
    cap.defaults["concept_lift"] = 2.0
    assert [c.text for c in cap.decode(annotations, concepts=dog)] == plain
