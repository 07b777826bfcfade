"""Constrained beam search: captions that use each of an image's required words (its visual concepts) once.

The search of Anderson et al. (2017), "Guided Open Vocabulary Image Captioning with Constrained Beam Search",
on the decoder and bookkeeping of :mod:`captioner.search` (same word bans, same live-row decoding, same
hypotheses); :meth:`captioner.api.Captioner.decode` calls it for images with confident concepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .decoder import AttentionDecoder
from .live_rows import LiveRows
from .search import Beams, Hypothesis, mask_logprobs


@dataclass(frozen=True)
class Places:
    """Constraint words that say where (kitchen, table): placed only as the noun of a place phrase, right after
    an article that follows a preposition ("in a kitchen", "at the table"), never "eating a table"."""

    words: torch.Tensor  # (B, V) bool: each image's constraint words that are places
    prepositions: torch.Tensor  # (V,) bool
    articles: torch.Tensor  # (V,) bool

    def allowed(self, ids: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """ids (R, T) histories, prev (R,) last words -> (R,) bool: may the next word be a place."""
        if ids.shape[1] < 2:
            return torch.zeros_like(prev, dtype=torch.bool)  # (R,)
        return self.prepositions[ids[:, -2]] & self.articles[prev]  # (R,)

    def to(self, device: torch.device) -> Places:
        return Places(self.words.to(device), self.prepositions.to(device), self.articles.to(device))


@torch.inference_mode()
def constrained_beam_search(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    required: torch.Tensor,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    beam_size: int = 3,
    max_length: int = 30,
    length_alpha: float = 0.0,
    n_best: int = 1,
    block_repeats: bool = True,
    unk_id: int | None = None,
    allowance: torch.Tensor | None = None,
    apart: bool = False,
    margin: float | None = None,
    places: Places | None = None,
) -> list[list[Hypothesis]]:
    """Beam search in which a caption may satisfy each of an image's constraints, each exactly once.

    required (B, C, V) bool, or (B, V) for one constraint: C sets of words per image (the forms of one
    concept, "cat", "cats"); a word set is used at most once, and an all-False set is never satisfied.
    The constrained beam search of Anderson et al. (2017): every image keeps K beams for each subset
    of its constraints satisfied so far (2^C states, as a bit mask); a word of constraint c moves a beam
    from state s to s | 2^c, and may not come again there. Scores stay the model's own log-probabilities,
    so the search places a word where the model finds it most likely. The result comes from the state
    whose best score plus its constraints' ``allowance`` (B, C), or (B,) for one constraint, is highest
    (ties: the higher state); no allowance: the alive state satisfying most. No constraints: :func:`beam_search`'s
    result. ``apart``: no constraint's word right after another's. ``margin``: a constraint's word is placed only
    where its log-probability is within ``margin`` of the step's likeliest word (not "a man is microwave"); a
    constraint with no such place stays unsatisfied. ``places``: words that say where come only in a place phrase
    (:class:`Places`). Runs as one (B*2^C*K) batch.
    """
    required, allowance = _as_constraints(required, allowance, annotations.device)  # (B, C, V), (B, C) | None
    K, S = beam_size, 1 << required.shape[1]
    n_best = max(1, min(n_best, K))
    B, device = annotations.shape[0], annotations.device
    memory, state = decoder.prepare(annotations)
    expand = torch.arange(B, device=device).repeat_interleave(S * K)  # (B*S*K,) rows: image, state, beam
    state = state.index_select(expand)
    mask = partial(
        mask_logprobs, end_id=end_id, pad_id=pad_id, start_id=start_id, block_repeats=block_repeats, unk_id=unk_id
    )
    rows = LiveRows(decoder, memory, expand, pad_id, mask)
    dest = _next_state(required)  # (B, S, V)
    # apart: no constraint's word right after another's ("a kitchen microwave"), so each is a noun of its own
    words = required.any(1).repeat_interleave(S * K, dim=0)  # (B*S*K, V) any constraint's word, per row
    placed = words if apart and S > 2 else None  # (B*S*K, V)
    places = None if places is None else places.to(device)
    where = None if places is None else places.words.repeat_interleave(S * K, dim=0)  # (B*S*K, V)

    scores = torch.full((B, S, K), float("-inf"), device=device)
    scores[:, 0, 0] = 0.0  # one live beam, with nothing satisfied, at t = 0
    beams = Beams.start(B * S * K, memory.feats.shape[1], start_id, device)
    base = (torch.arange(B, device=device) * S * K).unsqueeze(1)  # (B, 1)

    for t in range(max_length):
        stepped = rows.step(t, beams.prev, state, beams.done, scores.view(-1))
        if stepped is None:  # every beam has ended or is empty
            break
        logp, state, alpha = stepped  # (B*S*K, V), ..., (B*S*K, L)
        V = logp.shape[-1]
        if placed is not None:  # (B*S*K, 1) & (B*S*K, V): after a constraint's word, none of theirs
            logp.masked_fill_(placed.gather(1, beams.prev.unsqueeze(1)) & placed, float("-inf"))
        if where is not None:  # (B*S*K, V) & (B*S*K, 1): a place word only right after "in a", "at the"
            logp.masked_fill_(where & ~places.allowed(beams.ids, beams.prev).unsqueeze(1), float("-inf"))
        if margin is not None:  # (B*S*K, V): a constraint's word only where the model finds it plausible
            logp.masked_fill_(words & (logp < logp.max(dim=1, keepdim=True).values - margin), float("-inf"))
        scores, flat = _subset_topk(scores, logp.view(B, S, K, V), dest)  # (B, S, K), (B, S*K)
        origin = (flat // V + base).view(-1)  # (B*S*K,) row each new beam comes from
        word = (flat % V).view(-1)  # (B*S*K,)
        word_lp = logp[origin, word]  # (B*S*K,)

        state = state.index_select(origin)
        beams.advance(origin, word, word_lp, alpha, end_id)

    final = beams.normalised(scores, length_alpha)  # (B*S*K,)
    rows = _best_state(final.view(B, S, K), allowance, n_best) + base  # (B, n_best) history rows, best first
    return beams.hypotheses(rows, final, end_id, pad_id)


def _as_constraints(
    required: torch.Tensor, allowance: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """required (B, C, V) or (B, V), allowance (B, C) or (B,) or None -> (B, C, V), (B, C) or None on ``device``."""
    required = required.to(device)
    required = required.unsqueeze(1) if required.dim() == 2 else required  # (B, C, V)
    return required, None if allowance is None else allowance.to(device).view(required.shape[0], -1)  # (B, C)


def _next_state(required: torch.Tensor) -> torch.Tensor:
    """required (B, C, V) -> (B, 2^C, V): the state a beam in state s moves to with word v, -1 where v is banned
    (its constraint is already satisfied in s)."""
    C = required.shape[1]
    bits = (required.long() << torch.arange(C, device=required.device).view(1, C, 1)).sum(1)  # (B, V)
    states = torch.arange(1 << C, device=required.device).view(1, -1, 1)  # (1, S, 1)
    dest = states | bits.unsqueeze(1)  # (B, S, V)
    return dest.masked_fill((states & bits.unsqueeze(1)) != 0, -1)  # (B, S, V)


def _subset_topk(scores: torch.Tensor, logp: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the constrained search's selection: the K best continuations that land in each state.

    scores (B, S, K) beam scores so far, logp (B, S, K, V) next-word log-probs, dest (B, S, V) from
    :func:`_next_state` -> new scores (B, S, K) and flat (B, S*K) indices into each image's (S*K*V)
    candidates, state-major: the K beams of state s are columns s*K .. s*K + K - 1.
    """
    B, S, K, V = logp.shape
    total = scores.unsqueeze(3) + logp  # (B, S, K, V)
    best, flat = [], []
    for s in range(S):
        into = total.masked_fill((dest != s).unsqueeze(2), float("-inf"))  # (B, S, K, V) continuations landing in s
        top, index = into.view(B, S * K * V).topk(K, dim=1)  # (B, K)
        best.append(top)
        flat.append(index)
    return torch.stack(best, 1), torch.cat(flat, 1)  # (B, S, K), (B, S*K)


def _best_state(final: torch.Tensor, allowance: torch.Tensor | None, n_best: int) -> torch.Tensor:
    """final (B, S, K) normalised scores -> (B, n_best) rows within each image (state * K + beam), best first.

    The rows come from the state with the highest best score plus the ``allowance`` (B, C) of the constraints
    it satisfies (ties: the higher state, which satisfies more); without an allowance, from the alive state
    that satisfies most constraints (ties: the higher best score).
    """
    B, S, K = final.shape
    C = S.bit_length() - 1
    best = final.max(dim=2).values  # (B, S) best score per state
    alive = torch.isfinite(best)  # (B, S)
    member = ((torch.arange(S, device=final.device).unsqueeze(1) >> torch.arange(C, device=final.device)) & 1).float()
    if allowance is None:  # member (S, C): which constraints each state satisfies
        count = torch.where(alive, member.sum(1), -1.0)  # (B, S)
        rank = torch.where(count == count.max(dim=1, keepdim=True).values, best, float("-inf"))  # (B, S)
    else:
        rank = torch.where(alive, best + allowance.to(final.device).float() @ member.T, float("-inf"))  # (B, S)
    pool = S - 1 - rank.flip(1).argmax(dim=1)  # (B,) the state the result comes from: the last best one
    ranked = final[torch.arange(B, device=final.device), pool]  # (B, K)
    return ranked.argsort(dim=1, descending=True)[:, :n_best] + (pool * K).unsqueeze(1)  # (B, n_best)
