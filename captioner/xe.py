"""Cross-entropy training: the teacher-forced loss with doubly stochastic attention, and one epoch of it."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .encoder import Encoder
from .progress import bar_disabled


class XeOptions(NamedTuple):
    """How one cross-entropy epoch weighs and clips (``captioner train`` options)."""

    label_smoothing: float
    alpha_c: float  # weight lambda of the doubly stochastic attention term
    grad_clip: float  # gradient norm clipping threshold
    finetune_blocks: int  # the encoder's last blocks that train too (0: the decoder alone)


def caption_loss(
    logits: torch.Tensor,
    alphas: torch.Tensor,
    captions: torch.Tensor,
    pad_id: int,
    label_smoothing: float,
    alpha_c: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T-1, V), alphas (B, T-1, L), captions (B, T) -> (total loss, cross-entropy).

    Padded steps are masked out of the cross-entropy; their alphas are zero so they add
    nothing to the doubly stochastic term lambda * mean_i (1 - sum_t alpha_ti)^2.
    """
    targets = captions[:, 1:]  # (B, T-1)
    mask = targets != pad_id
    ce = F.cross_entropy(logits[mask], targets[mask], label_smoothing=label_smoothing)
    reg = ((1.0 - alphas.sum(dim=1)) ** 2).mean()  # (B, L) -> scalar
    return ce + alpha_c * reg, ce


def train_one_epoch(
    model: torch.nn.Module,
    encoder: Encoder | None,
    loader: DataLoader,
    feats: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    options: XeOptions,
    device: torch.device,
    epoch: int,
    show: bool,
) -> dict[str, float]:
    """One pass over the caption pairs. Returns mean loss, mean CE, tokens/s."""
    model.train()
    use_amp = device.type == "cuda"
    total, total_ce, n_batches, tokens = 0.0, 0.0, 0, 0
    trunk_shape = encoder.trunk_shape(options.finetune_blocks) if encoder is not None else None
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=bar_disabled(show), unit="batch", leave=False)
    for sources, batch_captions, batch_lengths in bar:
        captions, lengths = batch_captions.to(device), batch_lengths.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            rows, image_index = sources.unique(return_inverse=True)
            annotations = feats[rows].to(device).float()  # (N, L, D) from the cache, one per image
            image_index = image_index.to(device)  # (B,) caption -> image
            if encoder is not None:  # the cache holds trunk maps (N, H*W, C); the last blocks train
                c, h, w = trunk_shape
                annotations = encoder.top(annotations.transpose(1, 2).reshape(-1, c, h, w), options.finetune_blocks)
            logits, alphas = model(annotations, captions, lengths, image_index)
            loss, ce = caption_loss(
                logits.float(), alphas.float(), captions, 0, options.label_smoothing, options.alpha_c
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, options.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        total_ce += ce.item()
        n_batches += 1
        tokens += int((lengths - 1).sum())
        if show:
            bar.set_postfix(loss=f"{total / n_batches:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    secs = time.perf_counter() - start
    return {
        "loss": total / max(1, n_batches),
        "ce": total_ce / max(1, n_batches),
        "tokens_per_s": tokens / max(secs, 1e-9),
        "epoch_seconds": secs,
    }
