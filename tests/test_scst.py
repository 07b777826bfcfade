"""Self-critical sequence training: the CIDEr-D reward, sampling, the policy gradient and the two-phase CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from pycocoevalcap.cider.cider import Cider

from captioner.commands.main import main
from captioner.decoder import AttentionDecoder, DecoderConfig
from captioner.rewards import CaptionReward, CiderD, MeteorLite, SentenceBleu
from captioner.scst import scst_loss
from captioner.search import sample
from captioner.vocab import Vocabulary

START, END, PAD, UNK = 1, 2, 0, 3


def test_cider_d_matches_pycocoevalcap() -> None:
    words = [
        "a",
        "dog",
        "man",
        "runs",
        "in",
        "the",
        "park",
        "on",
        "grass",
        "black",
        "white",
        "two",
        "people",
        "street",
        "ball",
        "red",
    ]
    rng = random.Random(0)
    refs = {str(i): [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(5)] for i in range(40)}
    hyps = {k: [" ".join(rng.choices(words, k=rng.randint(3, 12)))] for k in refs}
    expected, per_image = Cider().compute_score(refs, hyps)
    reward = CiderD([[r.split() for r in refs[k]] for k in refs])
    got = np.array([reward.score(hyps[k][0].split(), i) for i, k in enumerate(refs)])
    np.testing.assert_allclose(got, per_image, rtol=1e-6)
    assert float(got.mean()) == pytest.approx(expected, rel=1e-6)


def test_cider_d_prefers_the_right_image() -> None:
    refs = [
        [["a", "dog", "runs", "on", "grass"], ["a", "brown", "dog", "runs"]],
        [["two", "men", "ride", "bikes"], ["men", "on", "bikes", "in", "a", "street"]],
    ]
    reward = CiderD(refs)
    dog = ["a", "dog", "runs", "on", "grass"]
    assert reward.score(dog, 0) > 1.0 > reward.score(dog, 1)
    assert reward.score([], 0) == 0.0


def test_sentence_bleu_matches_nltk_and_penalises_short_captions() -> None:
    words = [
        "a",
        "dog",
        "man",
        "runs",
        "in",
        "the",
        "park",
        "on",
        "grass",
        "black",
        "white",
        "two",
        "people",
        "street",
        "ball",
        "red",
    ]
    rng = random.Random(1)
    refs = [[rng.choices(words, k=rng.randint(4, 12)) for _ in range(5)] for _ in range(60)]
    bleu = SentenceBleu(refs)
    for i in range(60):
        cand = rng.choices(words, k=rng.randint(1, 12))
        expected = sentence_bleu(refs[i], cand, smoothing_function=SmoothingFunction().method2)
        assert bleu.score(cand, i) == pytest.approx(expected, abs=1e-12)
    ref = ["a", "black", "dog", "runs", "on", "the", "green", "grass"]
    short = SentenceBleu([[ref]])
    assert short.score(ref, 0) == pytest.approx(1.0)
    assert short.score(ref[:4], 0) < 0.5 < short.score(ref[:7], 0) < 1.0  # brevity penalty
    assert short.score([], 0) == 0.0


def test_meteor_lite_rewards_recall_and_order() -> None:
    ref = ["a", "black", "dog", "runs", "on", "the", "green", "grass"]
    meteor = MeteorLite([[ref, ["a", "dog"]]])
    full = meteor.score(ref, 0)
    assert full == pytest.approx(1.0 - 0.6 * (1 / len(ref)) ** 0.2)  # one chunk, every word matched
    assert meteor.score(ref[:4], 0) < full  # less of the reference covered
    assert meteor.score(ref[::-1], 0) < meteor.score(ref, 0)  # same words, more chunks
    assert meteor.score(["cat"], 0) == meteor.score([], 0) == 0.0
    # stems match at a lower weight than exact words; content words count more than function words
    assert 0 < meteor.score(["a", "black", "dogs", "running"], 0) < meteor.score(["a", "black", "dog", "runs"], 0)
    assert meteor.score(["a", "on", "the", "green"], 0) < meteor.score(["a", "dog", "the", "green"], 0)
    assert {"a", "the", "on"} <= meteor.function_words
    # the best reference counts: "a dog" is matched perfectly by the second one
    assert meteor.score(["a", "dog"], 0) == pytest.approx(1.0 - 0.6 * 0.5**0.2)


def test_caption_reward_mixes_the_scores() -> None:
    refs = [
        [["a", "dog", "runs", "on", "grass"], ["a", "brown", "dog", "runs"]],
        [["two", "men", "ride", "bikes"], ["men", "on", "bikes", "in", "a", "street"]],
    ]
    cand = ["a", "dog", "runs"]
    mixed = CaptionReward(refs, cider_weight=1.0, bleu_weight=2.0, meteor_weight=3.0)
    assert mixed.score(cand, 0) == pytest.approx(
        CiderD(refs).score(cand, 0) + 2.0 * SentenceBleu(refs).score(cand, 0) + 3.0 * MeteorLite(refs).score(cand, 0)
    )
    assert CaptionReward(refs).score(cand, 0) == pytest.approx(CiderD(refs).score(cand, 0))


def tiny_decoder(vocab: int = 12, seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(
        DecoderConfig(vocab, feature_dim=8, embed_dim=16, hidden_dim=16, attention_dim=8, proj_dim=8, dropout=0.0)
    )


def test_sample_shapes_masks_and_banned_words() -> None:
    decoder = tiny_decoder()
    feats = torch.randn(3, 4, 8)  # (B, L, D)
    torch.manual_seed(1)
    ids, logp, mask = sample(
        decoder, feats, samples=4, max_length=7, start_id=START, end_id=END, pad_id=PAD, unk_id=UNK
    )
    assert ids.shape == logp.shape == mask.shape and ids.shape[0] == 12 and ids.shape[1] <= 7
    assert logp.requires_grad
    assert not torch.isin(ids, torch.tensor([START, UNK])).any()
    assert (ids[:, 0] != END).all(), "no empty captions"
    for row, lp, m in zip(ids.tolist(), logp, mask):
        n = row.index(END) + 1 if END in row else len(row)
        assert m.tolist() == [True] * n + [False] * (len(row) - n)  # <end> counts, the padding after it does not
        assert all(i == PAD for i in row[n:])
        assert (lp[n:] == 0).all() and (lp[:n] < 0).all()
    vocab = Vocabulary([f"w{i}" for i in range(4, 12)])  # ids 0-3 are the specials, as in the decoder
    words = [vocab.decode(row) for row in ids.tolist()]
    assert all(len(w) <= 7 and "<end>" not in w for w in words)


@pytest.mark.parametrize("candidates", ["sample", "beam"])
def test_scst_raises_the_reward_of_a_tiny_decoder(candidates: str) -> None:
    """Four images, each with its own two-word caption: policy-gradient steps must raise the sampled CIDEr-D."""
    vocab = Vocabulary([f"w{i}" for i in range(8)])
    refs = [[[f"w{2 * i}", f"w{2 * i + 1}"]] * 3 for i in range(4)]
    reward = CaptionReward(refs)  # CIDEr-D only
    decoder = tiny_decoder(len(vocab))
    torch.manual_seed(0)
    feats = torch.randn(4, 4, 8)  # one distinct grid per image
    opt = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    rewards = []
    for _ in range(100):
        loss, mean_reward = scst_loss(
            decoder, feats, [0, 1, 2, 3], reward, vocab, samples=6, max_length=5, candidates=candidates
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(mean_reward)
    assert np.mean(rewards[-10:]) > 2.5 * np.mean(rewards[:10]), rewards


def test_beam_candidates_are_the_search_output_with_gradients() -> None:
    from captioner.scst import beam_candidates
    from captioner.search import beam_search

    decoder = tiny_decoder()
    decoder.train()  # the search inside must still run without dropout, and leave the mode as it was
    feats = torch.randn(2, 4, 8)  # (B, L, D)
    ids, logp, mask = beam_candidates(decoder, feats, 3, 6, START, END, PAD, UNK)
    assert decoder.training and logp.requires_grad
    assert ids.shape == logp.shape == mask.shape and ids.shape[0] == 6
    decoder.eval()
    expected = beam_search(decoder, feats, START, END, PAD, beam_size=3, max_length=6, n_best=3, unk_id=UNK)
    for row, hyp in zip(ids.tolist(), [h for per_image in expected for h in per_image]):
        assert row[: len(hyp.ids)] == hyp.ids
    # re-scored log-probs equal the search's own per-word log-probs (<end> included)
    hyp = expected[0][0]
    n = len(hyp.ids) + int(hyp.finished)
    assert logp[0, : len(hyp.ids)].tolist() == pytest.approx(hyp.logprobs, abs=1e-5)
    assert mask[0].sum() == n
    with pytest.raises(ValueError, match="unknown SCST candidates"):
        scst_loss(
            decoder,
            feats,
            [0, 0],
            CaptionReward([[["a"]]]),
            Vocabulary([f"w{i}" for i in range(8)]),
            samples=2,
            max_length=3,
            candidates="greedy",
        )


def test_scst_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="2 samples"):
        scst_loss(
            tiny_decoder(),
            torch.randn(1, 4, 8),
            [0],
            CaptionReward([[["a"]]]),
            Vocabulary([f"w{i}" for i in range(8)]),
            samples=1,
            max_length=3,
        )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_caption_dataset
    from test_train import CAPTIONS

    return write_caption_dataset(tmp_path_factory.mktemp("data"), CAPTIONS, dev={i for i in CAPTIONS if i >= 4})


def test_train_with_scst_epochs_runs_both_phases_and_resumes(dataset: Path, tmp_path: Path) -> None:
    from test_train import log_lines, train_args

    out = tmp_path / "run"
    args = train_args(
        dataset,
        out,
        3,
        "--scst-epochs",
        "2",
        "--scst-samples",
        "3",
        "--scst-max-length",
        "8",
        "--scst-bleu-weight",
        "1",
        "--scst-meteor-weight",
        "2",
        "--scst-candidates",
        "beam",
    )
    assert main(args) == 0
    assert [r["epoch"] for r in log_lines(out / "xe")] == [1, 2, 3]
    log = log_lines(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    start = log[0]
    assert start["phase"] == "scst-start" and start["init_from"] == str(out / "xe" / "best")
    assert all("reward" in r and "dev_cider" in r for r in log[1:])
    # OUTPUT/best is never worse on dev than the cross-entropy model it started from
    assert log[-1]["best"] == max(r["dev_cider"] for r in log)
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["training"]["objective"] == "scst" and config["training"]["scst_epochs"] == 2
    assert config["training"]["scst_reward"] == {"cider_d": 1.0, "bleu4": 1.0, "meteor_lite": 2.0}
    # a finished run resumed does no more epochs in either phase
    before = (out / "last" / "model.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in log_lines(out)] == [0, 1, 2]
    assert (out / "last" / "model.safetensors").read_bytes() == before
    # --init-from skips the cross-entropy phase and fine-tunes an existing checkpoint
    again = tmp_path / "again"
    assert (
        main(
            train_args(
                dataset, again, 1, "--init-from", str(out / "xe" / "best"), "--scst-epochs", "1", "--scst-samples", "2"
            )
        )
        == 0
    )
    assert not (again / "xe").exists()
    assert [r["epoch"] for r in log_lines(again)] == [0, 1]
    assert log_lines(again)[0]["dev_cider"] == pytest.approx(start["dev_cider"])  # same starting weights


def test_init_from_needs_scst_epochs_and_a_checkpoint(dataset: Path, tmp_path: Path) -> None:
    from test_train import train_args

    with pytest.raises(SystemExit, match="--scst-epochs"):
        main(train_args(dataset, tmp_path / "a", 1, "--init-from", str(tmp_path)))
    with pytest.raises(SystemExit, match="cannot start SCST"):
        main(train_args(dataset, tmp_path / "b", 1, "--init-from", str(tmp_path / "missing"), "--scst-epochs", "1"))


def test_scst_after_finetuning_keeps_the_fine_tuned_encoder(dataset: Path, tmp_path: Path) -> None:
    from captioner.checkpoint import read_weights

    from test_train import log_lines, train_args

    out = tmp_path / "ft"
    assert (
        main(
            train_args(
                dataset,
                out,
                2,
                "--finetune-blocks",
                "1",
                "--encoder-lr",
                "1e-3",
                "--scst-epochs",
                "1",
                "--scst-samples",
                "2",
                "--scst-max-length",
                "6",
            )
        )
        == 0
    )
    xe, final = read_weights(out / "xe" / "best"), read_weights(out / "last")
    encoder_keys = {k for k in xe if k.startswith("encoder.")}
    assert encoder_keys and encoder_keys == {k for k in final if k.startswith("encoder.")}
    assert all(torch.equal(xe[k], final[k]) for k in encoder_keys), "SCST trains the decoder only"
    config = json.loads((out / "last" / "config.json").read_text())
    assert config["encoder_finetuned"] is True and config["finetune_blocks"] == 1
    # SCST starts from the fine-tuned features: its starting score is the cross-entropy model's best
    xe_best = max(r["dev_cider"] for r in log_lines(out / "xe"))
    assert log_lines(out)[0]["dev_cider"] == pytest.approx(xe_best)
    with pytest.raises(SystemExit, match="cross-entropy phase"):
        main(
            train_args(
                dataset,
                tmp_path / "b",
                1,
                "--init-from",
                str(out / "xe" / "best"),
                "--scst-epochs",
                "1",
                "--finetune-blocks",
                "1",
            )
        )


def test_advantage_is_the_reward_minus_the_mean_of_the_other_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three candidates with rewards 1, 2, 6: leave-one-out baselines 4, 3.5, 1.5, advantages -3, -1.5, 4.5."""
    from captioner import scst

    ids = torch.tensor([[4, 5], [5, 6], [6, 4]])  # (S, T) candidate words
    logp = torch.tensor([[-0.5, -1.0], [-2.0, -0.25], [-1.5, -3.0]], requires_grad=True)  # (S, T)
    mask = torch.tensor([[True, True], [True, False], [True, True]])  # the second candidate is one word long
    monkeypatch.setattr(scst, "sample", lambda *a, **k: (ids, logp, mask))

    class FixedReward:
        def batch(self, captions, rows):
            assert captions == [["w4", "w5"], ["w5", "w6"], ["w6", "w4"]] and rows == [7, 7, 7]
            return np.array([1.0, 2.0, 6.0])

    vocab = Vocabulary([f"w{i}" for i in range(4, 8)])
    loss, mean_reward = scst_loss(None, torch.zeros(1, 4, 8), [7], FixedReward(), vocab, samples=3, max_length=2)
    advantage = [-3.0, -1.5, 4.5]
    expected = -(advantage[0] * -1.5 + advantage[1] * -2.0 + advantage[2] * -4.5) / 5  # 5 unmasked words
    assert float(loss.detach()) == pytest.approx(expected) and mean_reward == pytest.approx(3.0)
    loss.backward()
    grad = torch.tensor([[3.0, 3.0], [1.5, 0.0], [-4.5, -4.5]]) / 5  # -advantage / words, zero where masked
    torch.testing.assert_close(logp.grad, grad)
