"""The learning-rate schedule and the label-smoothed cross-entropy, against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from captioner.schedule import lr_factor
from captioner.xe import caption_loss


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    warmup, total = 4, 14
    assert [lr_factor(s, warmup, total) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, warmup, total) == pytest.approx(1.0)  # the peak, where the decay starts
    assert lr_factor(9, warmup, total) == pytest.approx(0.05 + 0.95 * 0.5)  # half way down the cosine
    assert lr_factor(14, warmup, total) == pytest.approx(0.05)
    assert lr_factor(30, warmup, total) == pytest.approx(0.05)  # past the end: stays at the floor
    assert lr_factor(9, warmup, total, floor=0.0) == pytest.approx(0.5)


def test_label_smoothing_spreads_eps_over_the_vocabulary() -> None:
    """(1 - eps) * -log p(target) + eps * mean_k -log p(k), averaged over the unpadded steps."""
    logits = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.0, 3.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])  # (1, 3, V=4)
    captions = torch.tensor([[1, 3, 1, 0]])  # <start>, then targets 3, 1 and <pad>
    eps = 0.2
    expected = []
    for t, target in [(0, 3), (1, 1)]:
        logp = [x - math.log(sum(math.exp(y) for y in logits[0, t].tolist())) for x in logits[0, t].tolist()]
        expected.append((1 - eps) * -logp[target] + eps * -sum(logp) / 4)
    _, ce = caption_loss(logits, torch.zeros(1, 3, 2), captions, 0, eps, 0.0)
    assert float(ce) == pytest.approx(sum(expected) / 2, abs=1e-6)
