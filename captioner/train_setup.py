"""Setting a training phase up, in the order it runs: the process (torchrun), the records and vocabulary,
the feature cache and the models, the optimiser and schedule, and what ``resume`` restores.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import checkpoint
from .datasets import CaptionRecord, DatasetFiles, find_annotations, load_records
from .datasets.features import cached_features, top_features
from .decoder import AttentionDecoder, DecoderConfig
from .distributed import Distributed
from .encoder import Encoder, EncoderConfig
from .rewards import CaptionReward
from .schedule import lr_factor, seed_everything, set_rng_state, warmup_steps
from .settings import default_cache_dir
from .train_config import TrainConfig
from .vocab import Vocabulary, tokenize

log = logging.getLogger("captioner.train")


@dataclass
class Session:
    """One process's training phase: what it runs, where, and where it writes."""

    config: TrainConfig
    scst: bool  # SCST from init_from, else cross-entropy
    rank: int
    world: int
    main: bool  # rank 0: validates, saves and logs
    device: torch.device
    out: Path


@dataclass
class Data:
    """The records, vocabulary and model configs a phase trains with."""

    files: DatasetFiles
    train: list[CaptionRecord]
    dev: list[CaptionRecord]
    vocab: Vocabulary
    enc_cfg: EncoderConfig
    dec_cfg: DecoderConfig
    source: Path | None  # the checkpoint they come from: OUTPUT/last when resuming, init_from for SCST
    frozen_top: int  # SCST from a fine-tuned checkpoint: its last blocks, kept as trained


@dataclass
class Models:
    """The decoder (``model``: it, or its DDP wrapper), the encoder and the cached features they train from."""

    decoder: AttentionDecoder
    model: torch.nn.Module
    encoder: Encoder | None  # its last n_top blocks train (fine-tuning), else None
    saved_encoder: Encoder | None  # saved with every checkpoint, not trained
    n_top: int  # the cache holds the map before the encoder's last n_top blocks
    feats: torch.Tensor  # (N, L, D) annotations, or (N, H*W, C) trunk maps
    rows: dict[str, int]  # absolute image path -> row of feats


@dataclass
class Progress:
    """Where the epochs stand: restored by ``resume``."""

    start_epoch: int = 1
    best: float = float("-inf")
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False


def start_session(config: TrainConfig, scst: bool) -> Session:
    """Join torchrun's process group (if any), pick the device, create the run folder, seed."""
    ddp = Distributed()  # joins torchrun's process group when WORLD_SIZE > 1
    rank, world = ddp.rank, ddp.world
    if scst and world > 1:
        raise SystemExit("SCST runs in one process; start it without torchrun")
    if config.finetune_blocks and world > 1:
        raise SystemExit("--finetune-blocks runs in one process; start it without torchrun")
    main_proc = rank == 0
    device = ddp.device(config.device)
    out = Path(config.output)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    return Session(config, scst, rank, world, main_proc, device, out)


def read_resume_state(s: Session) -> dict | None:
    """OUTPUT/last's trainer state when ``resume`` is asked and there is one."""
    if not s.config.resume:
        return None
    try:
        state = checkpoint.load_trainer_state(s.out / "last")
    except checkpoint.CheckpointError:
        state = None
    if state is None:
        log.warning("no resumable checkpoint in %s; starting from scratch", s.out)
    return state


def load_data(s: Session, resume_state: dict | None) -> Data:
    """The train and dev records, and the vocabulary and model configs: OUTPUT/last's when resuming,
    ``init_from``'s for SCST, else new ones."""
    c = s.config
    files = find_annotations(c.dataset, c.data_dir, c.annotations)  # as 'data verify' names them
    train_recs = load_records(c.dataset, c.data_dir, "train", c.limit, c.annotations)
    dev_recs = load_records(c.dataset, c.data_dir, "dev", c.val_limit or c.limit, c.annotations)
    if not train_recs:
        raise SystemExit(
            f"no training images in {', '.join(map(str, files.paths))}: name the train split "
            "(--annotations train=FILE, a split column, or a split list)"
        )
    config: dict[str, Any] = {}
    source = s.out / "last" if resume_state is not None else Path(str(c.init_from)) if s.scst else None
    if source is not None:
        try:
            config = checkpoint.read_config(source)
            vocab = Vocabulary.load(checkpoint.resolve(source) / checkpoint.VOCAB)
        except (checkpoint.CheckpointError, OSError) as exc:
            if resume_state is not None:
                raise
            raise SystemExit(f"cannot start SCST from {source}: {exc}") from exc
        enc_cfg, dec_cfg = EncoderConfig(**config["encoder"]), DecoderConfig(**config["decoder"])
    else:
        vocab = Vocabulary.build((t for r in train_recs for t in r.captions), min_count=c.min_count)
        enc_cfg = EncoderConfig(c.encoder, c.image_size, c.stage, c.encoder_weights)
        dec_cfg = DecoderConfig(
            len(vocab),
            enc_cfg.feature_dim,
            c.embed_dim,
            c.hidden_dim,
            c.attention_dim,
            c.proj_dim,
            c.dropout,
            not c.no_tie,
        )
    # SCST from a fine-tuned checkpoint keeps its encoder as trained: annotations come from the
    # trunk cache through that encoder's last blocks, once
    frozen_top = 0
    if s.scst and config.get("encoder_finetuned"):
        frozen_top = int(config.get("finetune_blocks") or 0)
        if not frozen_top:
            raise SystemExit(
                "the starting checkpoint has a fine-tuned encoder but does not record how many "
                "blocks were fine-tuned (finetune_blocks in config.json); cannot start SCST from it"
            )
    if s.main:
        log.info(
            "%d train / %d dev images, vocabulary %d words, grid %s x %d-d",
            len(train_recs),
            len(dev_recs),
            len(vocab),
            enc_cfg.grid,
            enc_cfg.feature_dim,
        )
    return Data(files, train_recs, dev_recs, vocab, enc_cfg, dec_cfg, source, frozen_top)


def build_models(s: Session, data: Data) -> Models:
    """Build (or reuse) the feature cache, then the decoder, and the encoder blocks that train or are kept."""
    c = s.config
    encoder: Encoder | None = Encoder(data.enc_cfg)
    n_top = c.finetune_blocks or data.frozen_top
    try:
        encoder.trunk_shape(n_top)
    except ValueError as exc:  # e.g. --finetune-blocks larger than the backbone's block count
        raise SystemExit(f"--finetune-blocks {n_top}: {exc}") from exc
    if s.world > 1 and not s.main:
        dist.barrier()  # rank 0 builds the cache alone; the others then read it
    # frozen encoder: the decoder trains from cached annotations; fine-tuning the last n blocks:
    # from the cached map before them (batch norms keep their ImageNet statistics, so it is fixed)
    cache_dir = Path(c.cache_dir) if c.cache_dir else default_cache_dir()
    feats, rows = cached_features(
        data.train + data.dev,
        data.enc_cfg,
        cache_dir,
        s.device,
        c.encode_batch_size,
        c.workers,
        encoder,
        trunk_blocks=n_top,
    )
    if s.world > 1 and s.main:
        dist.barrier()
    saved_encoder: Encoder | None = None
    if data.frozen_top:
        checkpoint.load_encoder(encoder, checkpoint.read_weights(data.source), data.frozen_top)
        encoder = encoder.to(s.device)
        feats = top_features(encoder, feats, data.frozen_top, s.device)  # (N, L, D) fp16, same rows
        saved_encoder, encoder = encoder, None
    elif not n_top:
        encoder = None
    seed_everything(c.seed)  # initial weights must not depend on whether the cache had to be built
    decoder = AttentionDecoder(data.dec_cfg).to(s.device)
    model: torch.nn.Module = decoder
    if encoder is not None:
        encoder = encoder.to(s.device)
    if s.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            decoder, device_ids=[s.device.index] if s.device.type == "cuda" else None
        )
    return Models(decoder, model, encoder, saved_encoder, n_top, feats, rows)


class Optimization(NamedTuple):
    """The optimiser and its per-step learning-rate schedule."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


class ScstReward(NamedTuple):
    """The SCST reward, and the feature row of each of its entries (one per training image)."""

    reward: CaptionReward
    rows: list[int]


def make_optimizer(s: Session, m: Models, n_images: int) -> Optimization:
    """AdamW over the decoder (and the fine-tuned encoder blocks); linear warm-up, then cosine decay per step."""
    c = s.config
    params = [{"params": list(m.decoder.parameters()), "lr": c.lr}]
    if m.encoder is not None:
        params.append({"params": m.encoder.unfreeze_last(m.n_top), "lr": c.encoder_lr})
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    steps_per_epoch = math.ceil(n_images / (c.batch_size * s.world))
    total_steps = steps_per_epoch * c.epochs
    warmup = warmup_steps(c.warmup_steps, c.warmup_epochs, steps_per_epoch, total_steps)
    if s.main:
        log.info(
            "%d steps per epoch, %d in all; learning-rate warm-up over the first %d",
            steps_per_epoch,
            total_steps,
            warmup,
        )
    return Optimization(
        optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, warmup, total_steps))
    )


def scst_reward(config: TrainConfig, train_recs: list[CaptionRecord], rows: dict[str, int]) -> ScstReward:
    """The SCST reward over the training images' references, and each reward entry's feature row."""
    train_rows = sorted({rows[os.path.abspath(r.path)] for r in train_recs})
    refs_by_row: dict[int, list[list[str]]] = {}
    for r in train_recs:
        refs_by_row.setdefault(rows[os.path.abspath(r.path)], []).extend(tokenize(t) for t in r.captions)
    reward = CaptionReward(
        [refs_by_row[row] for row in train_rows],
        config.scst_cider_weight,
        config.scst_bleu_weight,
        config.scst_meteor_weight,
    )
    return ScstReward(reward, train_rows)


def restore(s: Session, data: Data, m: Models, opt: Optimization, resume_state: dict | None) -> Progress:
    """Load the starting weights (``init_from`` for SCST; OUTPUT/last with its optimiser, schedule and RNG
    state when resuming) and return where the epochs stand."""
    progress = Progress()
    if data.source is None:
        return progress
    weights = checkpoint.read_weights(data.source, device=s.device)
    checkpoint.load_decoder(m.decoder, weights, checkpoint.read_config(data.source))
    if resume_state is None:
        return progress
    if m.encoder is not None:
        checkpoint.load_encoder(m.encoder, weights, m.n_top)
    opt.optimizer.load_state_dict(resume_state["optimizer"])
    opt.scheduler.load_state_dict(resume_state["scheduler"])
    set_rng_state(resume_state["rng"])
    progress.start_epoch = int(resume_state["epoch"]) + 1
    progress.best, progress.bad_epochs = float(resume_state["best"]), int(resume_state["bad_epochs"])
    progress.history = list(resume_state.get("history", []))
    if s.main:
        log.info("resumed from epoch %d (best %s %.2f)", progress.start_epoch - 1, s.config.monitor, progress.best)
    return progress


def read_manifest(config: TrainConfig) -> dict | None:
    """The dataset manifest written by ``captioner data verify`` (``manifest``, or manifest.json in the data folder)."""
    path = Path(config.manifest) if config.manifest else Path(config.data_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
