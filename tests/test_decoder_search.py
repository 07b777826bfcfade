"""Decoder (teacher forcing, attention, masking) and search (greedy/beam) on tiny synthetic data."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.decoder import AttentionDecoder, DecoderConfig, Memory, State
from captioner.search import beam_search, greedy_search
from captioner.vocab import Vocabulary
from captioner.xe import caption_loss

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


class TableDecoder:
    """A stub decoder whose next-word probabilities are a fixed table keyed by the words so far.

    ``state.h[:, 0]`` holds the index of a row's word prefix in ``self.prefixes``; prefixes
    missing from the table (finished beams) get a uniform row, which the search masks anyway.
    """

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab_size: int, start_id: int) -> None:
        self.table, self.V, self.start_id = table, vocab_size, start_id
        self.prefixes: list[tuple[int, ...]] = [()]

    def prepare(self, annotations: torch.Tensor) -> tuple[Memory, State]:
        B = annotations.shape[0]
        return Memory(annotations, annotations), State(torch.zeros(B, 1), torch.zeros(B, 1))

    def step(self, prev: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor]:
        rows, index = [], []
        for word, at in zip(prev.tolist(), state.h[:, 0].long().tolist()):
            prefix = () if word == self.start_id else self.prefixes[at] + (word,)
            if prefix not in self.prefixes:
                self.prefixes.append(prefix)
            index.append(self.prefixes.index(prefix))
            probs = torch.full((self.V,), 1.0 / self.V)
            if prefix in self.table:
                assert sum(self.table[prefix].values()) == pytest.approx(1.0)
                probs = torch.tensor([self.table[prefix].get(w, 0.0) for w in range(self.V)])
            rows.append(probs.log())
        B, L = memory.feats.shape[:2]
        h = torch.tensor(index, dtype=torch.float32).unsqueeze(1)
        return torch.stack(rows), State(h, h.clone()), torch.full((B, L), 1.0 / L)


# <pad> 0, <start> 1, <end> 2, <unk> 3, then words 4..8
PAD, START, END, UNK, A, B_, C, D_, E = range(9)
SHORT, LONG = [A], [B_, C, D_, E, C]
RANKING_TABLE = {
    (): {A: 0.5, B_: 0.4, C: 0.1},
    (A,): {END: 0.75, C: 0.25},
    (B_,): {C: 0.95, END: 0.05},
    (B_, C): {D_: 0.95, END: 0.05},
    (B_, C, D_): {E: 0.95, END: 0.05},
    (B_, C, D_, E): {C: 0.95, END: 0.05},
    (B_, C, D_, E, C): {END: 0.9, A: 0.1},
}


def table_score(words: list[int], alpha: float) -> float:
    """The documented score: sum of log-probs of the words and <end>, over ((5 + len) / 6) ** alpha."""
    seq = [*words, END]
    total = sum(math.log(RANKING_TABLE[tuple(seq[:i])][w]) for i, w in enumerate(seq))
    return total / ((5 + len(seq)) / 6) ** alpha


def test_length_penalty_ranks_hypotheses_by_the_documented_score() -> None:
    """SHORT has the higher total log-prob, LONG the higher per-length score: alpha decides."""
    assert table_score(SHORT, 0) > table_score(LONG, 0) and table_score(LONG, 1) > table_score(SHORT, 1)
    feats = torch.zeros(2, L, D)  # two images: the batch dimension must not mix them
    common = dict(start_id=START, end_id=END, pad_id=PAD, beam_size=3, n_best=2, max_length=10, block_repeats=False)
    for alpha, ranked in [(0.0, [SHORT, LONG]), (1.0, [LONG, SHORT]), (0.5, None), (2.0, [LONG, SHORT])]:
        results = beam_search(TableDecoder(RANKING_TABLE, 9, START), feats, length_alpha=alpha, **common)
        for hyps in results:
            # alpha 0.5 (ranked None): whichever the formula prefers
            order = ranked or sorted([SHORT, LONG], key=lambda w: table_score(w, alpha), reverse=True)
            assert [h.ids for h in hyps] == order, alpha
            assert all(h.finished for h in hyps)
            for h in hyps:
                assert h.score == pytest.approx(table_score(h.ids, alpha), abs=1e-5)
                seq = [*h.ids, END]
                expected = [math.log(RANKING_TABLE[tuple(seq[:i])][w]) for i, w in enumerate(h.ids)]
                assert h.logprobs == pytest.approx(expected, abs=1e-6)


def test_a_finished_beam_stays_finished_among_running_ones() -> None:
    """5 beams start with the 5 words; only "A <end>" ends at step 2 and 4 run on, too many for the search to stop
    computing the finished row. That row must continue only with <pad> at no cost: its score stays log 0.4 and it
    stays best."""
    table = {
        (): {A: 0.4, B_: 0.25, C: 0.15, D_: 0.1, E: 0.1},
        (A,): {END: 1.0},
        (B_,): {C: 0.5, D_: 0.5},
        (C,): {D_: 0.5, E: 0.5},
        (D_,): {E: 1.0},
    }  # longer prefixes: uniform, so the running beams fall far below log 0.4
    feats = torch.zeros(1, L, D)
    common = dict(start_id=START, end_id=END, pad_id=PAD, max_length=6, block_repeats=False)
    best = beam_search(TableDecoder(table, 9, START), feats, beam_size=5, **common)[0][0]
    assert best.ids == [A] and best.finished
    assert best.score == pytest.approx(math.log(0.4), abs=1e-6)


def test_greedy_and_beam_one_score_is_the_total_log_prob() -> None:
    """Greedy takes A then <end>; its score is the plain sum of the two log-probs."""
    feats = torch.zeros(1, L, D)
    greedy = greedy_search(TableDecoder(RANKING_TABLE, 9, START), feats, START, END, PAD, max_length=10)[0]
    assert greedy.ids == SHORT and greedy.score == pytest.approx(math.log(0.5) + math.log(0.75), abs=1e-6)
    beam1 = beam_search(TableDecoder(RANKING_TABLE, 9, START), feats, START, END, PAD, beam_size=1, max_length=10)[0][0]
    assert beam1.ids == SHORT and beam1.score == pytest.approx(greedy.score, abs=1e-6)


def test_unk_is_never_emitted_when_masked() -> None:
    """<unk> is the most likely word at every step; with unk_id the search takes the next best word."""
    table = {(): {UNK: 0.6, A: 0.3, C: 0.1}, (A,): {UNK: 0.7, END: 0.2, C: 0.1}, (UNK,): {END: 1.0}}
    feats = torch.zeros(1, L, D)
    common = dict(start_id=START, end_id=END, pad_id=PAD, max_length=5)
    assert greedy_search(TableDecoder(table, 9, START), feats, **common)[0].ids == [UNK]
    assert greedy_search(TableDecoder(table, 9, START), feats, unk_id=UNK, **common)[0].ids == [A]
    hyp = beam_search(TableDecoder(table, 9, START), feats, beam_size=3, unk_id=UNK, **common)[0][0]
    assert hyp.ids == [A] and hyp.score == pytest.approx(math.log(0.3) + math.log(0.2), abs=1e-6)


def test_special_tokens_and_immediate_repeats_are_never_emitted() -> None:
    """<pad>, <start> and <unk> outweigh every word, and A's likeliest successor is A again."""
    table = {
        (): {PAD: 0.3, START: 0.25, UNK: 0.2, A: 0.15, C: 0.1},
        (A,): {A: 0.6, END: 0.3, C: 0.1},
        (A, A): {END: 1.0},
        (A, C): {END: 1.0},
    }
    feats = torch.zeros(2, L, D)
    common = dict(start_id=START, end_id=END, pad_id=PAD, max_length=5, unk_id=UNK)
    for search in (
        lambda dec, **k: greedy_search(dec, feats, **k),
        lambda dec, **k: [h[0] for h in beam_search(dec, feats, beam_size=3, **k)],
    ):
        assert [h.ids for h in search(TableDecoder(table, 9, START), **common)] == [[A], [A]]
        assert [h.ids for h in search(TableDecoder(table, 9, START), block_repeats=False, **common)] == [[A, A]] * 2


def test_end_cannot_be_the_first_word() -> None:
    """<end> is the likeliest first word; the caption must still have one, the best after <end>."""
    table = {(): {END: 0.5, A: 0.3, C: 0.2}, (A,): {END: 0.9, C: 0.1}, (C,): {END: 1.0}}
    feats = torch.zeros(1, L, D)
    common = dict(start_id=START, end_id=END, pad_id=PAD, max_length=5)
    greedy = greedy_search(TableDecoder(table, 9, START), feats, **common)[0]
    assert greedy.ids == [A] and greedy.finished
    beam = beam_search(TableDecoder(table, 9, START), feats, beam_size=3, n_best=2, **common)[0]
    assert [h.ids for h in beam] == [[A], [C]]
    assert [h.score for h in beam] == pytest.approx([math.log(0.3 * 0.9), math.log(0.2)], abs=1e-6)


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
    hyps = (
        [h[0] for h in beam_search(dec, feats, beam_size=beam_size, **common)]
        if beam_size > 1
        else greedy_search(dec, feats, **common)
    )
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
