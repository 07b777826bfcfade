"""The decoder step of the beam searches (:mod:`captioner.search`), run only on the beams still running."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decoder import AttentionDecoder, Memory, State

#: The search's word bans: log-probs (n, V), previous words (n,), step -> log-probs (n, V).
Mask = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class LiveRows:
    """The decoder step of a beam search, run only for the rows that can still change its result.

    A row is idle once it has emitted ``<end>`` (it may only continue with ``<pad>``, at no cost) or while
    its score is -inf (an empty beam slot, e.g. a constrained search's state 1 for an image without a
    constraint). Idle rows get that ``<pad>``-only distribution without a decoder step. The live rows run
    as a smaller batch, which gives the same numbers (every decoder operation is row-wise, and
    :class:`~captioner.perf.Int8Linear` scales each row on its own: captions, log-probs and attention were
    bit-identical on 256 dev photos, BENCHMARKS.md). The batch is rebuilt when a row comes alive or a quarter
    of it is idle, not at every change, since each rebuild copies the rows' annotation memory.
    """

    def __init__(self, decoder: AttentionDecoder, memory: Memory, image: torch.Tensor, pad_id: int, mask: Mask) -> None:
        self.decoder, self.images, self.image = decoder, memory, image  # image: (R,) the image of each row
        self.pad_id, self.mask = pad_id, mask  # mask: the search's banned words (log-probs, prev, step) -> log-probs
        # no row runs before the first step, whose live rows (one beam per image) are gathered then: copying every
        # row's memory up front would be wasted work the size of the whole (R, L, .) grid
        self.rows = image.new_empty(0)  # (n,) the rows the decoder runs on
        self.running = torch.zeros(len(image), dtype=torch.bool, device=image.device)  # (R,) the same as a mask
        self.memory = memory  # (n, L, .) their memory, gathered at the first step
        self.idle: torch.Tensor | None = None  # (V,) an idle row's next-word log-probs, once V is known

    def step(
        self, t: int, prev: torch.Tensor, state: State, done: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, State, torch.Tensor] | None:
        """prev (R,), state, done (R,), scores (R,) -> masked log-probs (R, V), new state, alpha (R, L); None when
        every row is idle (the search is over)."""
        R = len(self.image)
        live = ~done & torch.isfinite(scores)  # (R,)
        n_live, n_new = torch.stack([live.sum(), (live & ~self.running).sum()]).tolist()  # the step's one host sync
        if n_live == 0:
            return None
        if n_new or n_live < 0.75 * len(self.rows):  # a row came alive (beams filling up at t = 1), or many ended
            self.running = live
            self.rows = live.nonzero().squeeze(1)  # (n,)
            self.memory = self.images.index_select(self.image.index_select(0, self.rows))  # (n, L, .)
        every = len(self.rows) == R
        rows_prev = prev if every else prev.index_select(0, self.rows)  # (n,)
        rows_state = state if every else state.index_select(self.rows)
        logits, new, alpha = self.decoder.step(rows_prev, rows_state, self.memory)  # (n, V), (n, H), (n, L)
        logp = self.mask(torch.log_softmax(logits.float(), dim=-1), rows_prev, t)  # (n, V)
        if self.idle is None:
            self.idle = torch.full_like(logp[0], float("-inf"))  # (V,)
            self.idle[self.pad_id] = 0.0
        if not every:
            logp = self.idle.repeat(R, 1).index_copy_(0, self.rows, logp)  # (R, V)
            new = State(*(old.index_copy(0, self.rows, part) for old, part in zip(state, new)))  # (R, H) each
            alpha = alpha.new_zeros(R, alpha.shape[1]).index_copy_(0, self.rows, alpha)  # (R, L)
        # a finished beam can only continue with <pad>, at log-prob 0
        return torch.where(done.unsqueeze(1), self.idle, logp), new, alpha  # (R, V)
