"""Decoder (teacher forcing, attention, masking) and search (greedy/beam) on tiny synthetic data."""
from __future__ import annotations

import pytest
import torch

from captioner.decoder import AttentionDecoder, DecoderConfig, State
from captioner.search import beam_search, greedy_search
from captioner.train import caption_loss
from captioner.vocab import Vocabulary
from conftest import TINY_CAPTIONS

L, D = 6, 16


def make_decoder(vocab_size: int, dropout: float = 0.0, seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    return AttentionDecoder(DecoderConfig(vocab_size, D, 24, 32, 16, 16, dropout))


def batch(vocab: Vocabulary, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [vocab.encode(c) for c in captions]
    lengths = torch.tensor([len(i) for i in ids])
    padded = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for k, i in enumerate(ids):
        padded[k, : len(i)] = torch.tensor(i)
    return padded, lengths


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.build(TINY_CAPTIONS, min_count=1)


def test_attention_is_a_distribution_at_every_step(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab))
    caps, lengths = batch(vocab, TINY_CAPTIONS)
    logits, alphas = dec(torch.randn(4, L, D), caps, lengths)
    assert logits.shape == (4, caps.shape[1] - 1, len(vocab))
    assert alphas.shape == (4, caps.shape[1] - 1, L)
    for b in range(4):
        steps = int(lengths[b]) - 1
        torch.testing.assert_close(alphas[b, :steps].sum(-1), torch.ones(steps))
        assert (alphas[b, :steps] >= 0).all()
        assert alphas[b, steps:].abs().sum() == 0  # padded steps carry no attention


def test_teacher_forcing_matches_step_by_step_decoding(vocab: Vocabulary) -> None:
    """The batched (sorted, shrinking) unroll computes exactly what single steps compute."""
    dec = make_decoder(len(vocab)).eval()
    feats = torch.randn(4, L, D)
    caps, lengths = batch(vocab, TINY_CAPTIONS)
    logits, alphas = dec(feats, caps, lengths)
    for b in range(4):
        memory, state = dec.prepare(feats[b : b + 1])
        for t in range(int(lengths[b]) - 1):
            step_logits, state, alpha = dec.step(caps[b : b + 1, t], state, memory)
            torch.testing.assert_close(step_logits[0], logits[b, t], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(alpha[0], alphas[b, t], atol=1e-6, rtol=1e-4)


def test_image_index_shares_one_image_between_captions(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab)).eval()
    feats = torch.randn(2, L, D)
    caps, lengths = batch(vocab, TINY_CAPTIONS)
    index = torch.tensor([0, 1, 1, 0])
    shared, _ = dec(feats, caps, lengths, index)
    copied, _ = dec(feats[index], caps, lengths)
    torch.testing.assert_close(shared, copied)


def test_padded_steps_do_not_contribute(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab)).eval()
    feats = torch.randn(4, L, D)
    caps, lengths = batch(vocab, TINY_CAPTIONS)
    loss1, _ = caption_loss(*dec(feats, caps, lengths), caps, 0, 0.1, 1.0)
    longer = torch.cat([caps, torch.zeros(4, 3, dtype=torch.long)], 1)  # more padding columns
    loss2, _ = caption_loss(*dec(feats, longer, lengths), longer, 0, 0.1, 1.0)
    torch.testing.assert_close(loss1, loss2)


def overfit(vocab: Vocabulary, steps: int = 150) -> tuple[AttentionDecoder, torch.Tensor, list[float]]:
    torch.manual_seed(0)
    dec = make_decoder(len(vocab), dropout=0.0)
    feats = torch.randn(4, L, D)
    caps, lengths = batch(vocab, TINY_CAPTIONS)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss, ce = caption_loss(*dec(feats, caps, lengths), caps, 0, 0.0, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    return dec.eval(), feats, losses


def test_overfits_and_greedy_reproduces_training_captions(vocab: Vocabulary) -> None:
    dec, feats, losses = overfit(vocab)
    assert losses[-1] < 0.1 * losses[0]
    hyps = greedy_search(dec, feats, vocab.start_id, vocab.end_id, vocab.pad_id, max_length=12)
    assert [" ".join(vocab.itos[i] for i in h.ids) for h in hyps] == TINY_CAPTIONS
    for h in hyps:
        assert h.finished and h.alphas.shape == (len(h.ids), L)
        torch.testing.assert_close(h.alphas.sum(-1), torch.ones(len(h.ids)))


def test_beam_one_equals_greedy_and_beams_are_ordered(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab), seed=3).eval()
    feats = torch.randn(5, L, D)
    common = dict(start_id=vocab.start_id, end_id=vocab.end_id, pad_id=vocab.pad_id, max_length=10)
    greedy = greedy_search(dec, feats, **common)
    beam1 = beam_search(dec, feats, beam_size=1, **common)
    assert [g.ids for g in greedy] == [b[0].ids for b in beam1]
    for g, b in zip(greedy, beam1):
        assert g.logprobs == pytest.approx(b[0].logprobs, abs=1e-5)
    nbest = beam_search(dec, feats, beam_size=4, n_best=3, **common)
    for hyps in nbest:
        assert len(hyps) == 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.ids) for h in hyps}) == 3


def test_beam_search_finds_better_or_equal_sequences(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab), seed=4).eval()
    feats = torch.randn(6, L, D)
    common = dict(start_id=vocab.start_id, end_id=vocab.end_id, pad_id=vocab.pad_id, max_length=10, block_repeats=False)
    greedy = greedy_search(dec, feats, **common)
    beam = beam_search(dec, feats, beam_size=5, **common)
    for g, b in zip(greedy, beam):
        if g.finished and b[0].finished:
            assert b[0].score >= g.score - 1e-4


class NeverEnds(AttentionDecoder):
    """A decoder that can never emit <end>: search must still stop at max_length."""

    def step(self, prev: torch.Tensor, state: State, memory):  # type: ignore[override]
        logits, state, alpha = super().step(prev, state, memory)
        logits[:, 2] = -1e9  # <end>
        return logits, state, alpha


@pytest.mark.parametrize("beam_size", [1, 3])
def test_search_terminates_without_end(vocab: Vocabulary, beam_size: int) -> None:
    torch.manual_seed(0)
    dec = NeverEnds(DecoderConfig(len(vocab), D, 24, 32, 16, 16, 0.0)).eval()
    feats = torch.randn(3, L, D)
    common = dict(start_id=vocab.start_id, end_id=vocab.end_id, pad_id=vocab.pad_id, max_length=7)
    hyps = [h[0] for h in beam_search(dec, feats, beam_size=beam_size, **common)] if beam_size > 1 \
        else greedy_search(dec, feats, **common)
    for h in hyps:
        assert not h.finished
        assert len(h.ids) == 7 and h.alphas.shape == (7, L)
        assert vocab.end_id not in h.ids and vocab.pad_id not in h.ids


def test_end_handling_and_no_empty_caption(vocab: Vocabulary) -> None:
    dec, feats, _ = overfit(vocab, steps=60)
    for hyps in beam_search(dec, feats, vocab.start_id, vocab.end_id, vocab.pad_id, beam_size=3, max_length=12):
        h = hyps[0]
        assert h.finished and len(h.ids) >= 1
        assert vocab.end_id not in h.ids and vocab.start_id not in h.ids
        assert len(h.logprobs) == len(h.ids) and all(lp <= 0 for lp in h.logprobs)


def test_block_repeats(vocab: Vocabulary) -> None:
    dec = make_decoder(len(vocab), seed=5).eval()
    feats = torch.randn(8, L, D)
    for h in greedy_search(dec, feats, vocab.start_id, vocab.end_id, vocab.pad_id, max_length=15):
        assert all(a != b for a, b in zip(h.ids, h.ids[1:]))
