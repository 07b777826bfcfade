"""Greedy and batched beam search over a batch of images, and sampling for SCST.

The searches run all images of a batch together (beam search: B images x K beams as one
(B*K) batch through the decoder), compute the attention projection of each
image's grid once, stop as soon as every hypothesis has emitted ``<end>``, and
always stop after ``max_length`` words even if ``<end>`` never comes. The beam searches
run the decoder only on the beams still running (:class:`~captioner.live_rows.LiveRows`). Every
decoding path bans the same tokens (:func:`mask_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .decoder import AttentionDecoder
from .live_rows import LiveRows


@dataclass
class Hypothesis:
    """One decoded word sequence (without ``<start>``/``<end>``)."""

    ids: list[int]
    logprobs: list[float]  # per word: log p(word | previous words, image)
    alphas: torch.Tensor  # (T, L) attention weights, one row per word
    score: float  # length-normalised total log-probability (``<end>`` included)
    finished: bool  # False when max_length was reached before <end>


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length normalisation ((5 + len) / 6) ** alpha; alpha = 0 ranks by total log-prob."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def mask_logprobs(
    logp: torch.Tensor,
    prev: torch.Tensor,
    step: int,
    end_id: int,
    pad_id: int,
    start_id: int,
    block_repeats: bool,
    unk_id: int | None = None,
) -> torch.Tensor:
    """Forbid impossible or degenerate words: <pad>, <start>, <unk>, an empty caption, and immediate repeats."""
    logp[:, pad_id] = float("-inf")
    logp[:, start_id] = float("-inf")
    if unk_id is not None:  # "a man in a <unk> shirt" tells the user nothing: take the next best word
        logp[:, unk_id] = float("-inf")
    if step == 0:
        logp[:, end_id] = float("-inf")
    if block_repeats and step > 0:
        logp.scatter_(1, prev.unsqueeze(1), float("-inf"))
    return logp


@torch.inference_mode()
def greedy_search(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    max_length: int = 30,
    block_repeats: bool = True,
    unk_id: int | None = None,
) -> list[Hypothesis]:
    """Arg-max decoding. annotations (B, L, D) -> one hypothesis per image."""
    B = annotations.shape[0]
    memory, state = decoder.prepare(annotations)
    prev = torch.full((B,), start_id, dtype=torch.long, device=annotations.device)
    done = torch.zeros(B, dtype=torch.bool, device=annotations.device)
    ids, lps, alphas = [], [], []
    for t in range(max_length):
        logits, state, alpha = decoder.step(prev, state, memory)
        logp = mask_logprobs(
            torch.log_softmax(logits.float(), dim=-1), prev, t, end_id, pad_id, start_id, block_repeats, unk_id
        )
        lp, word = logp.max(dim=-1)  # (B,)
        word = torch.where(done, torch.full_like(word, pad_id), word)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        ids.append(word)
        lps.append(lp)
        alphas.append(alpha)
        done = done | (word == end_id)
        prev = word
        if bool(done.all()):
            break
    ids_t = torch.stack(ids, 1).cpu()  # (B, T)
    lps_t = torch.stack(lps, 1).float().cpu()  # (B, T)
    alphas_t = torch.stack(alphas, 1).float().cpu()  # (B, T, L)
    return [_finish(ids_t[b], lps_t[b], alphas_t[b], end_id, pad_id, None) for b in range(B)]


@torch.inference_mode()
def beam_search(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    beam_size: int = 3,
    max_length: int = 30,
    length_alpha: float = 0.0,
    n_best: int = 1,
    block_repeats: bool = True,
    unk_id: int | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search. annotations (B, L, D) -> for each image its ``n_best`` hypotheses, best first.

    Finished beams stay in the beam and are extended only by ``<pad>`` at no cost,
    so the whole search is a handful of tensor operations per step for all images.
    Hypotheses are ranked by total log-probability divided by ``length_penalty``.
    """
    K = beam_size
    n_best = max(1, min(n_best, K))
    B = annotations.shape[0]
    device = annotations.device
    memory, state = decoder.prepare(annotations)
    # every image's memory is computed once and then shared by its K beams
    expand = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    state = state.index_select(expand)
    mask = partial(
        mask_logprobs, end_id=end_id, pad_id=pad_id, start_id=start_id, block_repeats=block_repeats, unk_id=unk_id
    )
    rows = LiveRows(decoder, memory, expand, pad_id, mask)

    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep only one alive at t = 0
    beams = Beams.start(B * K, memory.feats.shape[1], start_id, device)
    base = (torch.arange(B, device=device) * K).unsqueeze(1)  # (B, 1)

    for t in range(max_length):
        stepped = rows.step(t, beams.prev, state, beams.done, scores.view(-1))
        if stepped is None:  # every beam has ended
            break
        logp, state, alpha = stepped  # (B*K, V), ..., (B*K, L)
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # (B, K*V)
        scores, flat = cand.topk(K, dim=1)  # (B, K)
        origin = (flat // V + base).view(-1)  # (B*K,) row each new beam comes from
        word = (flat % V).view(-1)  # (B*K,)
        word_lp = logp[origin, word]  # (B*K,)

        state = state.index_select(origin)
        beams.advance(origin, word, word_lp, alpha, end_id)

    final = beams.normalised(scores, length_alpha)  # (B*K,)
    order = final.view(B, K).argsort(dim=1, descending=True)[:, :n_best]  # (B, n_best)
    return beams.hypotheses(order + base, final, end_id, pad_id)  # rows (B, n_best), best first


@dataclass
class Beams:
    """The bookkeeping both beam searches share, one row per beam: its last word, whether it has ended, its
    length and its history of words, log-probs and attention."""

    prev: torch.Tensor  # (R,) the last word
    done: torch.Tensor  # (R,) bool: <end> emitted
    lengths: torch.Tensor  # (R,) words so far, <end> included
    ids: torch.Tensor  # (R, T)
    logprobs: torch.Tensor  # (R, T)
    alphas: torch.Tensor  # (R, T, L)

    @classmethod
    def start(cls, rows: int, regions: int, start_id: int, device: torch.device) -> Beams:
        """``rows`` empty beams over ``regions`` attention regions, each about to follow ``<start>``."""
        return cls(
            prev=torch.full((rows,), start_id, dtype=torch.long, device=device),  # (R,)
            done=torch.zeros(rows, dtype=torch.bool, device=device),  # (R,)
            lengths=torch.zeros(rows, dtype=torch.long, device=device),  # (R,)
            ids=torch.zeros(rows, 0, dtype=torch.long, device=device),  # (R, 0)
            logprobs=torch.zeros(rows, 0, device=device),  # (R, 0)
            alphas=torch.zeros(rows, 0, regions, device=device),  # (R, 0, L)
        )

    def advance(
        self, origin: torch.Tensor, word: torch.Tensor, word_lp: torch.Tensor, alpha: torch.Tensor, end_id: int
    ) -> None:
        """Each new beam r continues row ``origin[r]`` with ``word[r]`` (log-prob ``word_lp[r]``); alpha (R, L)
        is the attention of the step, per old row."""
        was_done = self.done.index_select(0, origin)  # (R,)
        self.lengths = self.lengths.index_select(0, origin) + (~was_done).long()  # (R,)
        self.ids = torch.cat([self.ids.index_select(0, origin), word.unsqueeze(1)], 1)  # (R, T+1)
        self.logprobs = torch.cat([self.logprobs.index_select(0, origin), word_lp.unsqueeze(1)], 1)  # (R, T+1)
        self.alphas = torch.cat([self.alphas.index_select(0, origin), alpha.index_select(0, origin).unsqueeze(1)], 1)
        self.done = was_done | (word == end_id)  # (R,)
        self.prev = word  # (R,)

    def normalised(self, scores: torch.Tensor, length_alpha: float) -> torch.Tensor:
        """scores (..., K) summed log-probs -> (R,) divided by :func:`length_penalty`, -inf for empty beams."""
        final = scores.reshape(-1) / length_penalty(self.lengths, length_alpha)  # (R,)
        return torch.where(torch.isfinite(final), final, torch.full_like(final, float("-inf")))  # (R,)

    def hypotheses(self, rows: torch.Tensor, final: torch.Tensor, end_id: int, pad_id: int) -> list[list[Hypothesis]]:
        """rows (B, n) beams to return per image, best first -> their Hypotheses (scores from ``final`` (R,))."""
        ids_c, lp_c, al_c, fin_c = self.ids.cpu(), self.logprobs.float().cpu(), self.alphas.float().cpu(), final.cpu()
        return [
            [_finish(ids_c[r], lp_c[r], al_c[r], end_id, pad_id, float(fin_c[r])) for r in image_rows]
            for image_rows in rows.cpu().tolist()
        ]


def _finish(
    ids: torch.Tensor, lps: torch.Tensor, alphas: torch.Tensor, end_id: int, pad_id: int, score: float | None
) -> Hypothesis:
    """Cut a padded history row at ``<end>`` into a Hypothesis (words only); score None = total log-prob."""
    id_list = ids.tolist()
    finished = end_id in id_list
    n = id_list.index(end_id) if finished else len([i for i in id_list if i != pad_id])
    total = float(lps[: n + 1 if finished else n].sum())
    return Hypothesis(
        ids=id_list[:n],
        logprobs=lps[:n].tolist(),
        alphas=alphas[:n],
        score=total if score is None else score,
        finished=finished,
    )


@torch.inference_mode()
def best_hypotheses(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    start_id: int,
    end_id: int,
    pad_id: int = 0,
    beam_size: int = 3,
    max_length: int = 30,
    length_alpha: float = 0.0,
    n_best: int = 1,
    block_repeats: bool = True,
    unk_id: int | None = None,
) -> list[list[Hypothesis]]:
    """annotations (B, L, D) -> each image's ``n_best`` hypotheses: greedy for one beam and one hypothesis, else
    :func:`beam_search` with ``max(beam_size, n_best)`` beams."""
    common = dict(
        start_id=start_id,
        end_id=end_id,
        pad_id=pad_id,
        max_length=max_length,
        block_repeats=block_repeats,
        unk_id=unk_id,
    )
    if beam_size == 1 and n_best == 1:
        return [[h] for h in greedy_search(decoder, annotations, **common)]
    return beam_search(
        decoder, annotations, beam_size=max(beam_size, n_best), length_alpha=length_alpha, n_best=n_best, **common
    )


def sample(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    samples: int,
    max_length: int,
    start_id: int,
    end_id: int,
    pad_id: int,
    unk_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``samples`` captions per image from the decoder, keeping the graph (SCST's candidates).

    annotations (B, L, D) -> ids (B*S, T), their log-probs (B*S, T) with gradients and
    the mask (B*S, T) of real words (``<end>`` included, padding after it excluded).
    Row ``b * S + s`` is sample ``s`` of image ``b``. ``<pad>``, ``<start>``, ``<unk>``
    and an empty caption are never drawn, as in the searches (repeats may be).
    """
    B = annotations.shape[0]
    device = annotations.device
    memory, state = decoder.prepare(annotations)
    expand = torch.arange(B, device=device).repeat_interleave(samples)  # (B*S,)
    memory, state = memory.index_select(expand), state.index_select(expand)
    N = B * samples
    prev = torch.full((N,), start_id, dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    ids, lps, masks = [], [], []
    for t in range(max_length):
        logits, state, _ = decoder.step(prev, state, memory)  # (N, V)
        logits = mask_logprobs(logits.float(), prev, t, end_id, pad_id, start_id, False, unk_id)  # (N, V)
        logp = F.log_softmax(logits, dim=-1)  # (N, V): renormalised over the allowed words
        with torch.no_grad():
            word = torch.multinomial(logp.exp(), 1).squeeze(1)  # (N,)
        word = torch.where(done, torch.full_like(word, pad_id), word)  # (N,)
        lp = logp.gather(1, word.unsqueeze(1)).squeeze(1)  # (N,)
        masks.append(~done)
        lps.append(torch.where(done, torch.zeros_like(lp), lp))
        ids.append(word)
        done = done | (word == end_id)  # (N,)
        prev = word
        if bool(done.all()):
            break
    return torch.stack(ids, 1), torch.stack(lps, 1), torch.stack(masks, 1)  # (N, T) each
