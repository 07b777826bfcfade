"""Soft attention feeds the context, the beta gate scales it, and the doubly stochastic loss term."""

from __future__ import annotations

import pytest
import torch

from captioner.attention import SoftAttention
from captioner.decoder import AttentionDecoder, DecoderConfig, Memory
from captioner.xe import caption_loss

B, L, D, H, A = 3, 7, 10, 12, 8


def test_context_is_the_alpha_weighted_sum_of_the_annotations() -> None:
    torch.manual_seed(0)
    att = SoftAttention(D, H, A)
    feats, hidden = torch.randn(B, L, D), torch.randn(B, H)
    context, alpha = att(feats, att.project(feats), hidden)
    assert context.shape == (B, D) and alpha.shape == (B, L)
    torch.testing.assert_close(alpha.sum(1), torch.ones(B))
    torch.testing.assert_close(context, (alpha[..., None] * feats).sum(1))
    # the weights depend on the hidden state: another state, another context
    context2, alpha2 = att(feats, att.project(feats), torch.randn(B, H))
    assert not torch.allclose(alpha, alpha2, atol=1e-3) and not torch.allclose(context, context2, atol=1e-3)


@pytest.mark.parametrize("cell", [0, 4, L - 1])
def test_one_hot_attention_returns_that_cells_annotation(cell: int) -> None:
    """Channel 0 marks one cell (+5, the others -5); the score weighs only that channel, 1000-fold."""
    att = SoftAttention(D, H, A)
    with torch.no_grad():
        att.feat_proj.weight.zero_()
        att.feat_proj.bias.zero_()
        att.feat_proj.weight[0, 0] = 1.0
        att.hidden_proj.weight.zero_()
        att.score.weight.zero_()
        att.score.weight[0, 0] = 1000.0
        att.score.bias.zero_()
    feats = torch.randn(B, L, D)
    feats[:, :, 0] = -5.0
    feats[:, cell, 0] = 5.0
    context, alpha = att(feats, att.project(feats), torch.randn(B, H))
    expected_alpha = torch.zeros(B, L)
    expected_alpha[:, cell] = 1.0
    torch.testing.assert_close(alpha, expected_alpha)
    torch.testing.assert_close(context, feats[:, cell])


def small_decoder(seed: int = 0) -> AttentionDecoder:
    torch.manual_seed(seed)
    dec = AttentionDecoder(DecoderConfig(20, D, 16, H, A, 0, 0.0)).double().eval()  # proj_dim 0: feats = annotations
    with torch.no_grad():
        dec.attention.score.weight.mul_(4.0)  # sharper attention: the cells' weights differ clearly
    return dec


def test_decoder_step_follows_the_show_attend_tell_equations() -> None:
    """z = sigmoid(f_beta(h_prev)) * sum_i alpha_i a_i feeds the LSTM and the deep output."""
    dec = small_decoder()
    ann = torch.randn(B, L, D, dtype=torch.float64)
    memory, state = dec.prepare(ann)
    torch.testing.assert_close(state.h, torch.tanh(dec.init_h(ann.mean(1))))
    torch.testing.assert_close(state.c, torch.tanh(dec.init_c(ann.mean(1))))
    prev = torch.tensor([1, 5, 7])
    logits, new, alpha = dec.step(prev, state, memory)
    e = dec.attention.score(
        torch.tanh(dec.attention.feat_proj(ann) + dec.attention.hidden_proj(state.h)[:, None])
    ).squeeze(2)
    torch.testing.assert_close(alpha, torch.softmax(e, 1))
    z = torch.sigmoid(dec.f_beta(state.h)) * (alpha[..., None] * ann).sum(1)  # (B, D)
    emb = dec.embed(prev)
    h, c = dec.lstm(torch.cat([emb, z], 1), (state.h, state.c))
    torch.testing.assert_close(new.h, h)
    torch.testing.assert_close(new.c, c)
    torch.testing.assert_close(logits, dec.out(emb + dec.out_h(h) + dec.out_z(z)))


def test_next_word_distribution_responds_to_a_cell_in_proportion_to_its_attention() -> None:
    """Nudging annotation i by delta moves the context by alpha_i * delta, so the change in the
    next-word log-probs divided by alpha_i is the same for every cell (to first order)."""
    dec = small_decoder(1).requires_grad_(False)
    ann = torch.randn(1, L, D, dtype=torch.float64)
    memory, state = dec.prepare(ann)
    prev = torch.tensor([1])
    _, _, alpha = dec.step(prev, state, memory)
    alpha = alpha[0]
    assert float(alpha.max() / alpha.min()) > 3, "the test needs cells with clearly different weights"
    delta = 1e-5 * torch.randn(D, dtype=torch.float64)
    per_unit = []
    for i in range(L):
        moved = []
        for sign in (1, -1):  # a central difference: the second-order terms cancel
            feats = memory.feats.clone()
            feats[0, i] += sign * delta  # the annotation moves; its attention score (feats_att) is held fixed
            logits, _, _ = dec.step(prev, state, Memory(feats, memory.feats_att))
            moved.append(torch.log_softmax(logits, -1)[0])
        per_unit.append((moved[0] - moved[1]) / 2 / alpha[i])  # (V,)
    for i in range(1, L):
        torch.testing.assert_close(per_unit[i], per_unit[0], rtol=1e-4, atol=1e-12)
    assert per_unit[0].abs().max() > 1e-7  # the change is real, not zero everywhere


def test_doubly_stochastic_term_penalises_unequal_total_attention() -> None:
    """lambda * mean_i (1 - sum_t alpha_ti)^2, computed by hand for a two-step, two-cell caption."""
    captions = torch.tensor([[1, 4, 2]])  # <start> w <end>: two predicted steps
    logits = torch.zeros(1, 2, 6)  # uniform: cross-entropy log 6
    on_one_cell = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # sums over time: [2, 0] -> ((1-2)^2 + 1^2) / 2 = 1
    spread = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]])  # sums [1, 1] -> 0
    for alphas, reg in [(on_one_cell, 1.0), (spread, 0.0)]:
        loss, ce = caption_loss(logits, alphas, captions, 0, 0.0, 3.0)
        assert float(ce) == pytest.approx(torch.log(torch.tensor(6.0)).item(), abs=1e-6)
        assert float(loss - ce) == pytest.approx(3.0 * reg, abs=1e-6)


def test_padded_targets_are_masked_out_of_the_cross_entropy() -> None:
    captions = torch.tensor([[1, 4, 2, 0]])  # the last target is <pad>
    logits = torch.zeros(1, 3, 6)
    logits[0, 2, 0] = 50.0  # a confident prediction at the padded step must not count
    logits[0, 0, 4] = 50.0  # a perfect first word
    _, ce = caption_loss(logits, torch.zeros(1, 3, 2), captions, 0, 0.0, 0.0)
    assert float(ce) == pytest.approx(torch.log(torch.tensor(6.0)).item() / 2, abs=1e-5)
