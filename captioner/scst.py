"""Self-critical sequence training (Rennie et al. 2017): candidates, loss and one epoch.

After cross-entropy training, the decoder is fine-tuned to maximise the reward of its own
captions. For every image ``K`` candidates are drawn (random samples, or the ``K`` best
beams of the search); each one's advantage is its reward minus the mean reward of the
image's other ``K - 1`` candidates (the baseline of Luo 2020, "A better variant of SCST").
The reward is :class:`~captioner.rewards.CaptionReward`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .decoder import AttentionDecoder
from .progress import bar_disabled
from .rewards import CaptionReward
from .search import beam_search, sample
from .vocab import Vocabulary


class ScstOptions(NamedTuple):
    """How one SCST epoch draws and weighs its candidates (``captioner train --scst-*``)."""

    batch_size: int  # images per step
    samples: int  # candidates per image (>= 2)
    max_length: int  # longest candidate, in words
    candidates: str  # "sample" or "beam"
    length_alpha: float  # length penalty of the beam candidates
    dropout: bool  # sample with dropout on (the original recipe)
    grad_clip: float  # gradient norm clipping threshold


def beam_candidates(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    beams: int,
    max_length: int,
    start_id: int,
    end_id: int,
    pad_id: int,
    unk_id: int | None = None,
    length_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``beams`` best beam-search captions per image, re-scored with gradients.

    This is the variant of Cornia et al. (2020): the candidates are what the search will
    actually output, so the reward improves the decoded captions directly rather than
    first sharpening a flat sampling distribution. annotations (B, L, D) -> ids, log-probs
    and mask, each (B*K, T), in the layout of :func:`sample`.
    """
    training = decoder.training
    decoder.eval()  # the search runs without dropout, as at inference
    hyps = beam_search(
        decoder,
        annotations.detach(),
        start_id,
        end_id,
        pad_id,
        beam_size=beams,
        max_length=max_length,
        length_alpha=length_alpha,
        n_best=beams,
        block_repeats=True,
        unk_id=unk_id,
    )
    decoder.train(training)
    seqs = [[start_id] + h.ids + ([end_id] if h.finished else []) for per_image in hyps for h in per_image]
    T = max(len(q) for q in seqs)
    captions = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=annotations.device)  # (B*K, T)
    for i, q in enumerate(seqs):
        captions[i, : len(q)] = torch.tensor(q)
    lengths = torch.tensor([len(q) for q in seqs], device=annotations.device)
    image_index = torch.arange(annotations.shape[0], device=annotations.device).repeat_interleave(beams)
    logits, _ = decoder(annotations, captions, lengths, image_index)  # (B*K, T-1, V)
    targets = captions[:, 1:]  # (B*K, T-1)
    mask = targets != pad_id
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2) * mask  # (B*K, T-1)
    return targets, logp, mask


def scst_loss(
    decoder: AttentionDecoder,
    annotations: torch.Tensor,
    images: Sequence[int],
    reward: CaptionReward,
    vocab: Vocabulary,
    samples: int,
    max_length: int,
    candidates: str = "sample",
    length_alpha: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """Policy-gradient loss for one batch. annotations (B, L, D); images[b] is the reward index of row b.

    ``candidates`` is "sample" (``samples`` captions drawn per image) or "beam" (the
    ``samples`` best beam-search captions). Returns (loss, mean reward of the candidates).
    """
    if samples < 2:
        raise ValueError("SCST needs at least 2 samples per image for its baseline")
    special = (vocab.start_id, vocab.end_id, vocab.pad_id, vocab.unk_id)
    if candidates == "beam":
        ids, logp, mask = beam_candidates(decoder, annotations, samples, max_length, *special, length_alpha)
    elif candidates == "sample":
        ids, logp, mask = sample(decoder, annotations, samples, max_length, *special)
    else:
        raise ValueError(f"unknown SCST candidates {candidates!r} (sample or beam)")
    B = annotations.shape[0]
    per_row = [img for img in images for _ in range(samples)]
    r = torch.from_numpy(reward.batch([vocab.decode(row) for row in ids.tolist()], per_row)).view(B, samples)  # (B, S)
    baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)  # (B, S): mean of the image's other samples
    advantage = (r - baseline).view(-1, 1).to(logp.device)  # (B*S, 1)
    mask_f = mask.float()
    loss = -(advantage * logp * mask_f).sum() / mask_f.sum().clamp(min=1.0)
    return loss, float(r.mean())


def scst_one_epoch(
    decoder: AttentionDecoder,
    feature_rows: list[int],
    feats: torch.Tensor,
    reward: CaptionReward,
    vocab: Vocabulary,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    options: ScstOptions,
    device: torch.device,
    epoch: int,
    gen: torch.Generator,
    show: bool,
) -> dict[str, float]:
    """One SCST pass over the training images (``options.batch_size`` images, ``options.samples`` captions each).

    ``feature_rows[i]`` is the feature-cache row of the image whose references are ``reward``'s entry i.
    """
    # by default samples are drawn with dropout on, as in the original recipe; --scst-no-dropout
    # samples from the deterministic decoder that the search will use
    decoder.train(options.dropout)
    order = torch.randperm(len(feature_rows), generator=gen).tolist()
    total, total_reward, n_batches, tokens = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    batches = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    bar = tqdm(batches, desc=f"scst {epoch}", disable=bar_disabled(show), unit="batch", leave=False)
    for batch in bar:
        annotations = feats[torch.tensor([feature_rows[i] for i in batch])].to(device).float()  # (B, L, D)
        loss, mean_reward = scst_loss(
            decoder,
            annotations,
            batch,
            reward,
            vocab,
            options.samples,
            options.max_length,
            options.candidates,
            options.length_alpha,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), options.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        total_reward += mean_reward
        n_batches += 1
        tokens += len(batch) * options.samples
        if show:
            bar.set_postfix(reward=f"{100 * total_reward / n_batches:.1f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    secs = time.perf_counter() - start
    return {
        "loss": total / max(1, n_batches),
        "reward": 100 * total_reward / max(1, n_batches),
        "samples_per_s": tokens / max(secs, 1e-9),
        "epoch_seconds": secs,
    }
