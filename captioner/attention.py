"""Additive (Bahdanau) soft attention over the annotation grid."""

from __future__ import annotations

import torch
from torch import nn


class SoftAttention(nn.Module):
    """e_ti = w^T tanh(W_a a_i + W_h h_t);  alpha_t = softmax_i(e_ti).

    The projection of the annotations ``W_a a`` does not depend on the step, so it
    is computed once per image with :meth:`project` and reused at every step and beam.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.feat_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, L, D) -> projected annotations (B, L, A)."""
        return self.feat_proj(feats)

    def forward(
        self, feats: torch.Tensor, feats_proj: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the context (B, D) and the attention weights alpha (B, L) for one step."""
        e = self.score(torch.tanh(feats_proj + self.hidden_proj(hidden).unsqueeze(1))).squeeze(2)  # (B, L)
        alpha = torch.softmax(e, dim=1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), feats).squeeze(1)  # (B, D)
        return context, alpha
