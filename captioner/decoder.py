"""The Show, Attend and Tell decoder: an LSTM that attends to the grid at every step."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SoftAttention


@dataclass
class DecoderConfig:
    vocab_size: int
    feature_dim: int
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    proj_dim: int = 512  # annotations are projected D -> proj_dim once per image (0 = keep D)
    dropout: float = 0.5
    tie_embeddings: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Memory(NamedTuple):
    """Per-image tensors computed once and reused at every decoding step."""

    feats: torch.Tensor  # (B, L, P) annotation vectors after the projection
    feats_att: torch.Tensor  # (B, L, A) attention projection of the annotations

    def index_select(self, index: torch.Tensor) -> Memory:
        return Memory(self.feats.index_select(0, index), self.feats_att.index_select(0, index))


class State(NamedTuple):
    h: torch.Tensor  # (B, H)
    c: torch.Tensor  # (B, H)

    def index_select(self, index: torch.Tensor) -> State:
        return State(self.h.index_select(0, index), self.c.index_select(0, index))


class AttentionDecoder(nn.Module):
    """LSTM decoder with soft attention, a beta gate on the context and a deep output layer."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        P = cfg.proj_dim or cfg.feature_dim
        self.proj = (
            nn.Sequential(nn.Linear(cfg.feature_dim, P), nn.ReLU(), nn.Dropout(cfg.dropout))
            if cfg.proj_dim
            else nn.Identity()
        )
        self.attention = SoftAttention(P, cfg.hidden_dim, cfg.attention_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_h = nn.Linear(P, cfg.hidden_dim)
        self.init_c = nn.Linear(P, cfg.hidden_dim)
        self.f_beta = nn.Linear(cfg.hidden_dim, P)  # gate: beta_t = sigmoid(f_beta(h_{t-1}))
        self.lstm = nn.LSTMCell(cfg.embed_dim + P, cfg.hidden_dim)
        # deep output: logits = L_o(E y_{t-1} + L_h h_t + L_z z_t)
        self.out_h = nn.Linear(cfg.hidden_dim, cfg.embed_dim)
        self.out_z = nn.Linear(P, cfg.embed_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.out.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def prepare(self, annotations: torch.Tensor) -> tuple[Memory, State]:
        """annotations (B, L, D) -> per-image memory and the initial state from the mean annotation."""
        feats = self.proj(annotations)  # (B, L, P)
        mean = feats.mean(dim=1)  # (B, P)
        state = State(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))
        return Memory(feats, self.attention.project(feats)), state

    def advance(self, prev: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One word up to the output layer. prev (B,) -> deep-output features (B, E), new state, alpha (B, L)."""
        emb = self.embed(prev)  # (B, E)
        context, alpha = self.attention(memory.feats, memory.feats_att, state.h)  # (B, P), (B, L)
        context = torch.sigmoid(self.f_beta(state.h)) * context  # (B, P)
        h, c = self.lstm(torch.cat([emb, context], dim=1), (state.h, state.c))  # (B, H)
        return emb + self.out_h(h) + self.out_z(context), State(h, c), alpha  # (B, E)

    def step(self, prev: torch.Tensor, state: State, memory: Memory) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One word. prev (B,) ids -> logits (B, V), new state, alpha (B, L)."""
        pre, state, alpha = self.advance(prev, state, memory)
        return self.out(self.dropout(pre)), state, alpha  # (B, V)

    def forward(
        self,
        annotations: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced unroll.

        annotations (N, L, D) for N images; captions (B, T) = ``<start> w.. <end> <pad>..``;
        lengths (B,) counts ``<start>`` .. ``<end>``; image_index (B,) is the image row of each
        caption (default: caption i describes image i). Each image's memory is computed once
        however many of its captions are in the batch. Returns logits (B, T-1, V) predicting
        captions[:, 1:] and alphas (B, T-1, L); alphas are zero at padded steps and the logits
        there are masked out by the loss.
        """
        B, T = captions.shape
        if image_index is None:
            image_index = torch.arange(B, device=captions.device)
        lengths, order = lengths.sort(descending=True)  # longest first: finished rows gather at the end
        captions = captions[order]
        memory, state = self.prepare(annotations)  # per image
        rows = image_index[order]
        memory, state = memory.index_select(rows), state.index_select(rows)  # per caption
        steps = int(lengths[0]) - 1
        running = torch.arange(steps, device=captions.device)[None, :] < (lengths[:, None] - 1)  # (B, steps)
        pres, alphas = [], []
        n = B
        for t in range(steps):
            still = int(running[:, t].sum())
            # drop finished rows only when a quarter of the batch is done: every slice of the
            # memory costs a full-size zero-filled gradient, so slicing at each step is slower
            if still < 0.75 * n:
                n = still
                memory = Memory(memory.feats[:n], memory.feats_att[:n])
                state = State(state.h[:n], state.c[:n])
            pre, state, alpha = self.advance(captions[:n, t], state, memory)  # (n, E), (n, L)
            pres.append(F.pad(pre, (0, 0, 0, B - n)))
            alphas.append(F.pad(alpha, (0, 0, 0, B - n)))
        logits = self.out(self.dropout(torch.stack(pres, 1)))  # (B, steps, V): one matmul for all steps
        alpha_all = torch.stack(alphas, 1) * running.unsqueeze(2)  # (B, steps, L), zero after <end>
        pad = T - 1 - steps
        inverse = order.argsort()
        return F.pad(logits, (0, 0, 0, pad))[inverse], F.pad(alpha_all, (0, 0, 0, pad))[inverse]
