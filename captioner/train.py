"""Training: teacher-forced cross-entropy + doubly stochastic attention, validated by decoding.

``train(args)`` is what ``captioner train`` runs. With a frozen encoder the images are
encoded once into a feature cache and the decoder trains from it; with ``--finetune-blocks N``
the cache holds the map before the encoder's last N blocks, which then train with the
decoder (batch norms frozen). Each epoch ends with a real
decode of the dev split (BLEU-4 / CIDEr-D), a metrics-log line, an atomic ``last``
checkpoint (with optimiser/scheduler/RNG state for ``--resume``) and, when the
validation score improves, an atomic ``best`` checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from .api import load_state
from .datasets import (CaptionPairs, CaptionRecord, FeatureCache, ImageGroupedBatches, cache_identity, cache_key,
                       collate_pairs, find_annotations, load_records)
from .decoder import AttentionDecoder, DecoderConfig
from .encoder import Encoder, EncoderConfig, TrunkRows
from .metrics import score as score_metrics
from .progress import bar_disabled
from .search import beam_search, greedy_search
from .settings import default_cache_dir
from .vocab import Vocabulary

log = logging.getLogger("captioner.train")


DEFAULT_BEAM = 3  # stored when --beam-size is not given and decoding is not tuned


def length_alpha(args: argparse.Namespace) -> float:
    """--length-alpha, 0.0 when not given (then tuned on dev at the end of training)."""
    return 0.0 if args.length_alpha is None else float(args.length_alpha)


def warmup_steps(args: argparse.Namespace, steps_per_epoch: int, total_steps: int) -> int:
    """--warmup-steps if given (at most a tenth of the run), else --warmup-epochs x the steps of one epoch."""
    if args.warmup_steps is not None:
        return max(1, min(args.warmup_steps, total_steps // 10))
    return max(1, min(total_steps, round(args.warmup_epochs * steps_per_epoch)))


# ------------------------------------------------------------------ features
def cached_features(
    records: list[CaptionRecord], enc_cfg: EncoderConfig, cache_dir: Path, device: torch.device,
    batch_size: int = 32, num_workers: int = 1, encoder: Encoder | None = None, trunk_blocks: int = 0,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Encode ``records``' images once (resumable) and return (features (N, L, D) fp16, path -> row).

    With ``trunk_blocks`` n > 0 the rows are the map before the encoder's last n blocks,
    (N, H*W, C), for :meth:`Encoder.top` to finish (encoder fine-tuning).
    """
    paths = sorted({os.path.abspath(r.path) for r in records})
    identity = cache_identity(enc_cfg, trunk_blocks)
    cache = FeatureCache(cache_dir / f"features-{cache_key(paths, enc_cfg, trunk_blocks)}")
    if not cache.complete():
        # a complete cache of the same encoder that already holds every image will do (e.g. the
        # train+dev cache when evaluating on dev)
        for other in sorted(cache_dir.glob("features-*")):
            candidate = FeatureCache(other)
            idx = candidate.index
            if candidate.complete() and idx.get("encoder") == identity and set(paths) <= set(idx["paths"]):
                return candidate.load()
    if not cache.complete():
        encoder = encoder or Encoder(enc_cfg)
        row_shape = None
        module: torch.nn.Module = encoder
        if trunk_blocks:
            c, h, w = encoder.trunk_shape(trunk_blocks)
            row_shape, module = (h * w, c), TrunkRows(encoder, trunk_blocks)
        if torch.device(device).type == "cpu":  # folded BN + channels-last + chunks of 2: same features, faster
            from .perf import fast_encoder

            module = fast_encoder(module)
        cache.build(paths, module, batch_size=batch_size, num_workers=num_workers, device=device,
                    trunk_blocks=trunk_blocks, row_shape=row_shape)
    return cache.load()


def top_features(
    encoder: Encoder, trunk_feats: torch.Tensor, n_top: int, device: torch.device | str, batch_size: int = 64,
) -> torch.Tensor:
    """Trunk-cache rows (N, H*W, C) -> annotations (N, L, D) fp16 through the encoder's last ``n_top`` blocks."""
    c, h, w = encoder.trunk_shape(n_top)
    out = []
    with torch.inference_mode():
        for i in range(0, len(trunk_feats), batch_size):
            x = trunk_feats[i : i + batch_size].to(device).float()  # (b, H*W, C)
            out.append(encoder.top(x.transpose(1, 2).reshape(-1, c, h, w), n_top).cpu().half())
    return torch.cat(out)


def records_from_trunk(
    encoder: Encoder, trunk: torch.Tensor, trunk_rows: dict[str, int], records: list[CaptionRecord], n_top: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, dict[str, int]]:
    """``records``' trunk-cache rows through the encoder's last ``n_top`` blocks: (annotations (N, L, D), path -> row)."""
    paths = [os.path.abspath(r.path) for r in records]
    feats = top_features(encoder, trunk[torch.tensor([trunk_rows[p] for p in paths])], n_top, device)
    return feats, {p: i for i, p in enumerate(paths)}


# ------------------------------------------------------------------ decoding for validation/evaluation
@torch.inference_mode()
def generate(
    decoder: AttentionDecoder, feats: torch.Tensor, vocab: Vocabulary, beam_size: int = 1,
    max_length: int = 30, length_alpha: float = 0.0, batch_size: int = 100, device: torch.device | str = "cpu",
    block_repeats: bool = True, progress: bool = False,
) -> list[str]:
    """Captions for annotation grids feats (N, L, D), decoded in batches."""
    decoder.eval()
    texts: list[str] = []
    common = dict(start_id=vocab.start_id, end_id=vocab.end_id, pad_id=vocab.pad_id,
                  max_length=max_length, block_repeats=block_repeats, unk_id=vocab.unk_id)
    for i in tqdm(range(0, len(feats), batch_size), desc="decoding", disable=bar_disabled(progress), unit="batch"):
        batch = feats[i : i + batch_size].to(device).float()  # (b, L, D)
        if beam_size == 1:
            hyps = greedy_search(decoder, batch, **common)
        else:
            hyps = [h[0] for h in beam_search(decoder, batch, beam_size=beam_size, length_alpha=length_alpha, **common)]
        texts += [" ".join(vocab.itos[j] for j in h.ids) for h in hyps]
    return texts


def evaluate_split(
    decoder: AttentionDecoder, feats: torch.Tensor, rows: dict[str, int], records: list[CaptionRecord],
    vocab: Vocabulary, beam_size: int, max_length: int = 30, length_alpha: float = 0.0,
    device: torch.device | str = "cpu", meteor: bool = False, block_repeats: bool = True, progress: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Decode every record's image and score against its references. Returns (metrics, id -> caption)."""
    index = torch.tensor([rows[os.path.abspath(r.path)] for r in records])
    texts = generate(decoder, feats[index], vocab, beam_size, max_length, length_alpha, device=device,
                     block_repeats=block_repeats, progress=progress)
    hyps = {r.image_id: t for r, t in zip(records, texts)}
    refs = {r.image_id: r.captions for r in records}
    metrics = score_metrics(hyps, refs, meteor=meteor)
    metrics["distinct_captions"] = len(set(texts))
    metrics["images"] = len(texts)
    return metrics, hyps


# ------------------------------------------------------------------ loss
def caption_loss(
    logits: torch.Tensor, alphas: torch.Tensor, captions: torch.Tensor, pad_id: int,
    label_smoothing: float, alpha_c: float,
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


# ------------------------------------------------------------------ schedule / state
def lr_factor(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor`` x the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ distributed
def setup_distributed() -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device) under torchrun; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, world, device


# ------------------------------------------------------------------ training
def train_one_epoch(
    model: torch.nn.Module, encoder: Encoder | None, loader: DataLoader, feats: torch.Tensor | None,
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, args: argparse.Namespace,
    device: torch.device, epoch: int, show: bool,
) -> dict[str, float]:
    """One pass over the caption pairs. Returns mean loss, mean CE, tokens/s."""
    model.train()
    use_amp = device.type == "cuda"
    total, total_ce, n_batches, tokens = 0.0, 0.0, 0, 0
    trunk_shape = encoder.trunk_shape(args.finetune_blocks) if encoder is not None else None
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=bar_disabled(show), unit="batch", leave=False)
    for sources, captions, lengths in bar:
        captions, lengths = captions.to(device), lengths.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            rows, image_index = sources.unique(return_inverse=True)
            annotations = feats[rows].to(device).float()  # (N, L, D) from the cache, one per image
            image_index = image_index.to(device)  # (B,) caption -> image
            if encoder is not None:  # the cache holds trunk maps (N, H*W, C); the last blocks train
                c, h, w = trunk_shape
                annotations = encoder.top(annotations.transpose(1, 2).reshape(-1, c, h, w), args.finetune_blocks)
            logits, alphas = model(annotations, captions, lengths, image_index)
            loss, ce = caption_loss(logits.float(), alphas.float(), captions, 0, args.label_smoothing, args.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        total_ce += ce.item()
        n_batches += 1
        tokens += int((lengths - 1).sum())
        if show:
            bar.set_postfix(loss=f"{total / n_batches:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    secs = time.perf_counter() - start
    return {"loss": total / max(1, n_batches), "ce": total_ce / max(1, n_batches),
            "tokens_per_s": tokens / max(secs, 1e-9), "epoch_seconds": secs}


def scst_one_epoch(
    decoder: AttentionDecoder, feature_rows: list[int], feats: torch.Tensor, reward: Any,
    vocab: Vocabulary, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    args: argparse.Namespace, device: torch.device, epoch: int, gen: torch.Generator, show: bool,
) -> dict[str, float]:
    """One SCST pass over the training images (``--batch-size`` images, ``--scst-samples`` captions each).

    ``feature_rows[i]`` is the feature-cache row of the image whose references are ``reward``'s entry i.
    """
    from .scst import scst_loss

    # by default samples are drawn with dropout on, as in the original recipe; --scst-no-dropout
    # samples from the deterministic decoder that the search will use
    decoder.train(not args.scst_no_dropout)
    order = torch.randperm(len(feature_rows), generator=gen).tolist()
    total, total_reward, n_batches, tokens = 0.0, 0.0, 0, 0
    start = time.perf_counter()
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    bar = tqdm(batches, desc=f"scst {epoch}", disable=bar_disabled(show), unit="batch", leave=False)
    for batch in bar:
        annotations = feats[torch.tensor([feature_rows[i] for i in batch])].to(device).float()  # (B, L, D)
        loss, mean_reward = scst_loss(decoder, annotations, batch, reward, vocab, args.scst_samples,
                                      args.scst_max_length, args.scst_candidates, length_alpha(args))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        total += loss.item()
        total_reward += mean_reward
        n_batches += 1
        tokens += len(batch) * args.scst_samples
        if show:
            bar.set_postfix(reward=f"{100 * total_reward / n_batches:.1f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    secs = time.perf_counter() - start
    return {"loss": total / max(1, n_batches), "reward": 100 * total_reward / max(1, n_batches),
            "samples_per_s": tokens / max(secs, 1e-9), "epoch_seconds": secs}


def model_config(args: argparse.Namespace, enc_cfg: EncoderConfig, dec_cfg: DecoderConfig, extra: dict | None = None,
                 finetune_blocks: int = 0) -> dict:
    return {
        "name": args.name,
        "version": args.model_version,
        "encoder": enc_cfg.to_dict(),
        "encoder_finetuned": bool(finetune_blocks),
        "finetune_blocks": finetune_blocks,
        "decoder": dec_cfg.to_dict(),
        "inference": {"beam_size": args.beam_size or DEFAULT_BEAM, "max_length": args.max_length,
                      "length_alpha": length_alpha(args), "block_repeats": True},
        "training": {"dataset": args.dataset, "min_count": args.min_count, **(extra or {})},
    }


def weights_to_save(decoder: AttentionDecoder, encoder: Encoder | None) -> dict[str, torch.Tensor]:
    state = {f"decoder.{k}": v for k, v in decoder.state_dict(keep_vars=False).items()}
    if encoder is not None:
        state |= {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    return state


def train_then_scst(args: argparse.Namespace) -> dict[str, Any]:
    """``--scst-epochs N``: cross-entropy training into OUTPUT/xe, then N SCST epochs into OUTPUT.

    The SCST phase starts from OUTPUT/xe/best (or ``--init-from``, which skips the first
    phase). Each phase keeps its own ``last`` checkpoint, so ``--resume`` continues
    whichever phase was interrupted; a finished phase is not repeated.
    """
    out = Path(args.output)
    if args.init_from and args.finetune_blocks:
        raise SystemExit("SCST trains the decoder only: --finetune-blocks applies to the cross-entropy phase, "
                         "which --init-from skips")
    xe_summary = None
    init = Path(args.init_from) if args.init_from else out / "xe" / "best"
    if not args.init_from:
        xe_args = argparse.Namespace(**{**vars(args), "output": str(out / "xe"), "phase": "xe"})
        xe_summary = train(xe_args)
    scst_args = argparse.Namespace(**{**vars(args), "phase": "scst", "init_from": str(init), "finetune_blocks": 0,
                                      "epochs": args.scst_epochs, "lr": args.scst_lr, "warmup_steps": 0})
    summary = train(scst_args)
    if xe_summary is not None:
        summary["xe"] = xe_summary
    return summary


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as configured by ``captioner train``'s arguments. Returns the best metrics."""
    if getattr(args, "scst_epochs", 0) and getattr(args, "phase", None) is None:
        return train_then_scst(args)
    scst = getattr(args, "phase", None) == "scst"
    init_from = Path(args.init_from) if scst else None
    rank, world, dist_device = setup_distributed()
    if scst and world > 1:
        raise SystemExit("SCST runs in one process; start it without torchrun")
    if args.finetune_blocks and world > 1:
        raise SystemExit("--finetune-blocks runs in one process; start it without torchrun")
    main_proc = rank == 0
    device = dist_device or torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.output)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)

    resume_state = None
    if args.resume:
        try:
            resume_state = checkpoint.load_trainer_state(out / "last")
        except checkpoint.CheckpointError:
            resume_state = None
        if resume_state is None:
            log.warning("no resumable checkpoint in %s; starting from scratch", out)

    dataset_files = find_annotations(args.dataset, args.data_dir, args.annotations)  # as 'data verify' names them
    train_recs = load_records(args.dataset, args.data_dir, "train", args.limit, args.annotations)
    dev_recs = load_records(args.dataset, args.data_dir, "dev", args.val_limit or args.limit, args.annotations)
    if not train_recs:
        raise SystemExit(f"no training images in {', '.join(map(str, dataset_files.paths))}: name the train split "
                         "(--annotations train=FILE, a split column, or a split list)")
    if resume_state is not None:
        vocab = Vocabulary.load(checkpoint.resolve(out / "last") / checkpoint.VOCAB)
        config = checkpoint.read_config(out / "last")
        enc_cfg, dec_cfg = EncoderConfig(**config["encoder"]), DecoderConfig(**config["decoder"])
    elif init_from is not None:
        try:
            config = init_config = checkpoint.read_config(init_from)
            vocab = Vocabulary.load(checkpoint.resolve(init_from) / checkpoint.VOCAB)
        except (checkpoint.CheckpointError, OSError) as exc:
            raise SystemExit(f"cannot start SCST from {init_from}: {exc}") from exc
        enc_cfg, dec_cfg = EncoderConfig(**config["encoder"]), DecoderConfig(**config["decoder"])
    else:
        vocab = Vocabulary.build((c for r in train_recs for c in r.captions), min_count=args.min_count)
        enc_cfg = EncoderConfig(args.encoder, args.image_size, args.stage, args.encoder_weights)
        dec_cfg = DecoderConfig(len(vocab), enc_cfg.feature_dim, args.embed_dim, args.hidden_dim,
                                args.attention_dim, args.proj_dim, args.dropout, not args.no_tie)
    # SCST from a fine-tuned checkpoint keeps its encoder as trained: annotations come from the
    # trunk cache through that encoder's last blocks, once
    frozen_top = 0
    if scst and config.get("encoder_finetuned"):
        frozen_top = int(config.get("finetune_blocks") or 0)
        if not frozen_top:
            raise SystemExit("the starting checkpoint has a fine-tuned encoder but does not record how many "
                             "blocks were fine-tuned (finetune_blocks in config.json); cannot start SCST from it")
    if main_proc:
        log.info("%d train / %d dev images, vocabulary %d words, grid %s x %d-d",
                 len(train_recs), len(dev_recs), len(vocab), enc_cfg.grid, enc_cfg.feature_dim)

    encoder: Encoder | None = Encoder(enc_cfg)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    n_top = args.finetune_blocks or frozen_top
    try:
        encoder.trunk_shape(n_top)
    except ValueError as exc:  # e.g. --finetune-blocks larger than the backbone's block count
        raise SystemExit(f"--finetune-blocks {n_top}: {exc}") from exc
    if world > 1 and not main_proc:
        dist.barrier()  # rank 0 builds the cache alone; the others then read it
    # frozen encoder: the decoder trains from cached annotations; fine-tuning the last n blocks:
    # from the cached map before them (batch norms keep their ImageNet statistics, so it is fixed)
    feats, rows = cached_features(train_recs + dev_recs, enc_cfg, cache_dir, device,
                                  args.encode_batch_size, args.workers, encoder, trunk_blocks=n_top)
    if world > 1 and main_proc:
        dist.barrier()
    saved_encoder: Encoder | None = None  # saved with every checkpoint, not trained
    if frozen_top:
        source = out / "last" if resume_state is not None else init_from
        load_state(encoder, checkpoint.read_weights(source), "encoder.", {})
        encoder = encoder.to(device)
        feats = top_features(encoder, feats, frozen_top, device)  # (N, L, D) fp16, same rows
        saved_encoder, encoder = encoder, None
    elif not n_top:
        encoder = None
    seed_everything(args.seed)  # initial weights must not depend on whether the cache had to be built
    decoder = AttentionDecoder(dec_cfg).to(device)
    params = [{"params": [p for p in decoder.parameters()], "lr": args.lr}]
    if encoder is not None:
        encoder = encoder.to(device)
        enc_params = encoder.unfreeze_last(n_top)
        params.append({"params": enc_params, "lr": args.encoder_lr})
    model: torch.nn.Module = decoder
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(decoder, device_ids=[device.index] if device.type == "cuda" else None)

    pairs = CaptionPairs(train_recs, vocab, args.max_words, rows)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    n_images = len({path for path, _ in pairs.items})
    steps_per_epoch = math.ceil(n_images / (args.batch_size * world))
    total_steps = steps_per_epoch * args.epochs
    warmup = warmup_steps(args, steps_per_epoch, total_steps)
    if main_proc:
        log.info("%d steps per epoch, %d in all; learning-rate warm-up over the first %d", steps_per_epoch,
                 total_steps, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps))

    start_epoch, best, bad_epochs, history = 1, float("-inf"), 0, []
    reward = None
    if scst:
        from .scst import CaptionReward
        from .vocab import tokenize

        train_rows = sorted({rows[os.path.abspath(r.path)] for r in train_recs})
        refs_by_row: dict[int, list[list[str]]] = {}
        for r in train_recs:
            refs_by_row.setdefault(rows[os.path.abspath(r.path)], []).extend(tokenize(c) for c in r.captions)
        reward = CaptionReward([refs_by_row[row] for row in train_rows], args.scst_cider_weight,
                               args.scst_bleu_weight, args.scst_meteor_weight)
    if resume_state is None and init_from is not None:
        weights = checkpoint.read_weights(init_from, device=device)
        load_state(decoder, weights, "decoder.", init_config.get("tied_weights", {}))
    if resume_state is not None:
        weights = checkpoint.read_weights(out / "last", device=device)
        load_state(decoder, weights, "decoder.", checkpoint.read_config(out / "last").get("tied_weights", {}))
        if encoder is not None:
            load_state(encoder, weights, "encoder.", {})
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        set_rng_state(resume_state["rng"])
        start_epoch = int(resume_state["epoch"]) + 1
        best, bad_epochs = float(resume_state["best"]), int(resume_state["bad_epochs"])
        history = list(resume_state.get("history", []))
        if main_proc:
            log.info("resumed from epoch %d (best %s %.2f)", start_epoch - 1, args.monitor, best)

    metrics_log = out / "metrics.jsonl"
    if resume_state is not None and main_proc:  # the log matches the checkpoint (a kill may have cut it short)
        metrics_log.write_text("".join(json.dumps(r) + "\n" for r in history))
    stopped_early = False
    manifest = _manifest(args) if main_proc else None
    if scst and resume_state is None and main_proc and dev_recs:
        # the starting point is the score to beat: OUTPUT/best stays the cross-entropy model
        # unless an SCST epoch improves on it
        val, _ = evaluate_split(decoder, feats, rows, dev_recs, vocab, args.val_beam_size,
                                args.max_length, length_alpha(args), device)
        best = float(val[args.monitor])
        record = {"epoch": 0, "phase": "scst-start", "init_from": str(init_from), **{f"dev_{k}": v for k, v in val.items()},
                  "best": best}
        history.append(record)
        cfg = model_config(args, enc_cfg, dec_cfg, {"epochs_trained": 0, "best_" + args.monitor: best,
                                                   "train_images": len(train_recs), "manifest": manifest,
                                                   "annotation_files": dataset_files.names()}, n_top)
        checkpoint.save(out / "best", weights_to_save(decoder, saved_encoder), cfg, vocab.to_json())
        metrics_log.write_text(json.dumps(record) + "\n")
        if not args.quiet:
            _print_record(record)
    for epoch in range(start_epoch, args.epochs + 1):
        if bad_epochs >= args.patience:
            stopped_early = True
            break
        # each epoch's shuffling and dropout derive from (seed, epoch): a resumed run repeats them exactly
        torch.manual_seed(args.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        if scst:
            stats = scst_one_epoch(decoder, train_rows, feats, reward, vocab, optimizer, scheduler, args, device,
                                   epoch, gen, show=main_proc and not args.quiet)
        else:
            batches = ImageGroupedBatches(pairs, args.batch_size, gen, rank, world)
            loader = DataLoader(pairs, batch_sampler=batches, collate_fn=collate_pairs)
            stats = train_one_epoch(model, encoder, loader, feats, optimizer, scheduler, args, device, epoch,
                                    show=main_proc and not args.quiet)
        record: dict[str, Any] = {"epoch": epoch, **stats, "lr": scheduler.get_last_lr()[0]}
        if main_proc:
            t0 = time.perf_counter()
            if dev_recs:
                if encoder is not None:  # fine-tuned encoder: its features change every epoch
                    val_feats, val_rows = records_from_trunk(encoder, feats, rows, dev_recs, n_top, device)
                else:
                    val_feats, val_rows = feats, rows
                val, _ = evaluate_split(decoder, val_feats, val_rows, dev_recs, vocab, args.val_beam_size,
                                        args.max_length, length_alpha(args), device)
                record |= {f"dev_{k}": v for k, v in val.items()}
                score = float(val[args.monitor])
            else:
                score = -stats["loss"]
            record["val_seconds"] = time.perf_counter() - t0
            improved = score > best
            if improved:
                best, bad_epochs = score, 0
            else:
                bad_epochs += 1
            record["best"] = best
            history.append(record)
            extra = {"epochs_trained": epoch, "best_" + args.monitor: best, "train_images": len(train_recs),
                     "manifest": manifest, "annotation_files": dataset_files.names()}
            if scst:
                extra |= {"objective": "scst", "scst_reward": {"cider_d": args.scst_cider_weight, "bleu4": args.scst_bleu_weight,
                                                               "meteor_lite": args.scst_meteor_weight},
                          "scst_epochs": epoch, "init_from": str(init_from)}
            cfg = model_config(args, enc_cfg, dec_cfg, extra, n_top)
            weights = weights_to_save(decoder, encoder if encoder is not None else saved_encoder)
            if improved:
                checkpoint.save(out / "best", weights, dict(cfg), vocab.to_json())
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                     "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "history": history,
                     "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}}
            checkpoint.save(out / "last", weights, dict(cfg), vocab.to_json(), trainer_state=state)
            if getattr(args, "keep_epochs", False):
                checkpoint.save(out / f"epoch-{epoch:02d}", weights, dict(cfg), vocab.to_json())
            with metrics_log.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if not args.quiet:
                _print_record(record)
        if world > 1:
            flag = torch.tensor([bad_epochs], device=device)
            dist.broadcast(flag, 0)
            bad_epochs = int(flag)
    if world > 1:
        dist.destroy_process_group()
    summary = {"best_" + args.monitor: best, "epochs": sum(1 for r in history if r["epoch"] >= 1),
               "stopped_early": stopped_early, "output": str(out), "rank": rank}
    if main_proc and dev_recs and getattr(args, "phase", None) != "xe" and getattr(args, "tune_decoding", True) \
            and (out / "best").is_dir():
        summary["decoding"] = _tune_best(args, out / "best", decoder, encoder, n_top, feats, rows, dev_recs, vocab,
                                         device)
    return summary


def _tune_best(
    args: argparse.Namespace, best: Path, decoder: AttentionDecoder, encoder: Encoder | None, n_top: int,
    feats: torch.Tensor, rows: dict[str, int], dev_recs: list[CaptionRecord], vocab: Vocabulary, device: torch.device,
) -> dict[str, Any]:
    """Tune beam size and length alpha of the ``best`` checkpoint on dev; store them as its inference defaults.

    A --beam-size or --length-alpha given on the command line is kept as it is.
    """
    from .tuning import ALPHAS, BEAMS, tune_decoding

    weights = checkpoint.read_weights(best, device=device)
    load_state(decoder, weights, "decoder.", checkpoint.read_config(best).get("tied_weights", {}))
    if encoder is not None:  # fine-tuned encoder: dev annotations from the best epoch's blocks
        load_state(encoder, weights, "encoder.", {})
        feats, rows = records_from_trunk(encoder, feats, rows, dev_recs, n_top, device)
    beams = BEAMS if args.beam_size is None else (args.beam_size,)
    alphas = ALPHAS if args.length_alpha is None else (args.length_alpha,)
    chosen, table = tune_decoding(
        lambda b, a: evaluate_split(decoder, feats, rows, dev_recs, vocab, b, args.max_length, a, device)[0],
        args.monitor, beams, alphas)
    config = checkpoint.update_config(best, {"inference": chosen, "training": {"decoding_tuned": {
        "split": "dev", "images": len(dev_recs), "monitor": args.monitor, "grid": table}}})
    log.info("decoding tuned on %d dev images: beam %d, length alpha %.1f (stored in %s)", len(dev_recs),
             chosen["beam_size"], chosen["length_alpha"], best / checkpoint.CONFIG)
    return config["inference"]


def _print_record(record: dict[str, Any]) -> None:
    """One metrics-log record on stdout, floats rounded."""
    print(json.dumps({k: _short(k, v) for k, v in record.items()}), flush=True)


def _short(key: str, value: Any) -> Any:
    """Floats to 3 decimals; learning rates (1e-3 ... 1e-6) to 3 significant digits."""
    if not isinstance(value, float):
        return value
    return float(f"{value:.3g}") if key == "lr" else round(value, 3)


def _manifest(args: argparse.Namespace) -> dict | None:
    """The dataset manifest written by ``captioner data verify`` (``--manifest``, or manifest.json in the data folder)."""
    path = Path(args.manifest) if getattr(args, "manifest", None) else Path(args.data_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
