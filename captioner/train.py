"""Training: ``fit(TrainConfig(...))`` is what ``captioner train`` runs.

A run has one or two phases. Cross-entropy (:mod:`captioner.xe`): teacher-forced cross-entropy
plus doubly stochastic attention. With a frozen encoder the images are encoded once into a
feature cache and the decoder trains from it; with ``finetune_blocks`` n the cache holds the map
before the encoder's last n blocks, which then train with the decoder (batch norms frozen).
With ``scst_epochs`` N, N epochs of self-critical sequence training (:mod:`captioner.scst`)
follow, from the cross-entropy phase's best checkpoint (or ``init_from``).

Each epoch ends with a real decode of the dev split (BLEU-4 / CIDEr-D), a metrics-log line, an
atomic ``last`` checkpoint (with optimiser/scheduler/RNG state for ``resume``) and, when the
validation score improves, an atomic ``best`` checkpoint. At the end the ``best`` checkpoint's
beam size and length alpha are tuned on dev and stored as its inference defaults.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import checkpoint
from .datasets import CaptionPairs, ImageGroupedBatches, collate_pairs
from .datasets.features import records_from_trunk
from .evaluate import evaluate_split
from .schedule import rng_state
from .scst import ScstOptions, scst_one_epoch
from .train_config import DEFAULT_BEAM, TrainConfig, length_alpha
from .train_setup import (
    Data,
    Models,
    Optimization,
    Progress,
    ScstReward,
    Session,
    build_models,
    load_data,
    make_optimizer,
    read_manifest,
    read_resume_state,
    restore,
    scst_reward,
    start_session,
)
from .vocab import Vocabulary
from .xe import XeOptions, train_one_epoch

log = logging.getLogger("captioner.train")

__all__ = ["TrainConfig", "fit", "fit_phase"]


def fit(config: TrainConfig) -> dict[str, Any]:
    """Train as configured. Returns the summary: best metric, epochs, output (and the decoding tuned on dev).

    With ``scst_epochs`` N: cross-entropy training into OUTPUT/xe, then N SCST epochs into OUTPUT,
    from OUTPUT/xe/best (or ``init_from``, which skips the first phase). Each phase keeps its own
    ``last`` checkpoint, so ``resume`` continues whichever phase was interrupted; a finished
    phase is not repeated.
    """
    if config.init_from and not config.scst_epochs:
        raise SystemExit("--init-from starts the SCST epochs: give --scst-epochs N too")
    if config.threads:
        torch.set_num_threads(config.threads)
    if not config.scst_epochs:
        return fit_phase(config)
    out = Path(config.output)
    if config.init_from and config.finetune_blocks:
        raise SystemExit(
            "SCST trains the decoder only: --finetune-blocks applies to the cross-entropy phase, "
            "which --init-from skips"
        )
    xe_summary = None
    init = Path(config.init_from) if config.init_from else out / "xe" / "best"
    if not config.init_from:
        xe_summary = fit_phase(replace(config, output=str(out / "xe")), tune=False)
    summary = fit_phase(
        replace(
            config, init_from=str(init), finetune_blocks=0, epochs=config.scst_epochs, lr=config.scst_lr, warmup_steps=0
        ),
        scst=True,
    )
    if xe_summary is not None:
        summary["xe"] = xe_summary
    return summary


# ------------------------------------------------------------------ one phase, in the order it runs
def fit_phase(config: TrainConfig, scst: bool = False, tune: bool = True) -> dict[str, Any]:
    """One phase: cross-entropy epochs, or (``scst``) SCST epochs from ``config.init_from``.

    ``tune``: tune the ``best`` checkpoint's decoding on dev at the end (when ``config.tune_decoding``).
    """
    s = start_session(config, scst)
    resume_state = read_resume_state(s)
    data = load_data(s, resume_state)
    m = build_models(s, data)
    pairs = CaptionPairs(data.train, data.vocab, config.max_words, m.rows)
    opt = make_optimizer(s, m, len({path for path, _ in pairs.items}))
    reward = scst_reward(config, data.train, m.rows) if scst else None
    progress = restore(s, data, m, opt, resume_state)
    metrics_log = s.out / "metrics.jsonl"
    if resume_state is not None and s.main:  # the log matches the checkpoint (a kill may have cut it short)
        metrics_log.write_text("".join(json.dumps(r) + "\n" for r in progress.history))
    manifest = read_manifest(config) if s.main else None
    if scst and resume_state is None and s.main and data.dev:
        scst_start(s, data, m, progress, manifest)
    for epoch in range(progress.start_epoch, config.epochs + 1):
        if progress.bad_epochs >= config.patience:
            progress.stopped_early = True
            break
        stats = one_epoch(s, m, opt, pairs, reward, data.vocab, epoch)
        if s.main:
            end_epoch(
                s, data, m, opt, progress, manifest, {"epoch": epoch, **stats, "lr": opt.scheduler.get_last_lr()[0]}
            )
        if s.world > 1:
            flag = torch.tensor([progress.bad_epochs], device=s.device)
            dist.broadcast(flag, 0)
            progress.bad_epochs = int(flag)
    if s.world > 1:
        # the DDP wrapper's reducer holds the gloo group and its worker threads: free it while the
        # interpreter is whole, or the process can abort at exit ("terminate called without an active exception")
        m.model = m.decoder
        gc.collect()
        dist.destroy_process_group()
    summary = {
        "best_" + config.monitor: progress.best,
        "epochs": sum(1 for r in progress.history if r["epoch"] >= 1),
        "stopped_early": progress.stopped_early,
        "output": str(s.out),
        "rank": s.rank,
    }
    if s.main and data.dev and tune and config.tune_decoding and (s.out / "best").is_dir():
        summary["decoding"] = tune_best(s, data, m)
    return summary


def one_epoch(
    s: Session,
    m: Models,
    opt: Optimization,
    pairs: CaptionPairs,
    reward: ScstReward | None,
    vocab: Vocabulary,
    epoch: int,
) -> dict[str, float]:
    """One epoch of the phase's objective: SCST with ``reward``, else cross-entropy over ``pairs``."""
    c = s.config
    # each epoch's shuffling and dropout derive from (seed, epoch): a resumed run repeats them exactly
    torch.manual_seed(c.seed * 1000 + epoch)
    gen = torch.Generator().manual_seed(c.seed * 1000 + epoch)
    show = s.main and not c.quiet
    if reward is not None:
        return scst_one_epoch(
            m.decoder,
            reward.rows,
            m.feats,
            reward.reward,
            vocab,
            *opt,
            scst_options(c),
            s.device,
            epoch,
            gen,
            show=show,
        )
    batches = ImageGroupedBatches(pairs, c.batch_size, gen, s.rank, s.world)
    loader = DataLoader(pairs, batch_sampler=batches, collate_fn=collate_pairs)
    return train_one_epoch(m.model, m.encoder, loader, m.feats, *opt, xe_options(c), s.device, epoch, show=show)


def xe_options(config: TrainConfig) -> XeOptions:
    """What one cross-entropy epoch needs of the run's configuration."""
    return XeOptions(config.label_smoothing, config.alpha_c, config.grad_clip, config.finetune_blocks)


def scst_options(config: TrainConfig) -> ScstOptions:
    """What one SCST epoch needs of the run's configuration."""
    return ScstOptions(
        config.batch_size,
        config.scst_samples,
        config.scst_max_length,
        config.scst_candidates,
        length_alpha(config),
        not config.scst_no_dropout,
        config.grad_clip,
    )


def validate(s: Session, data: Data, m: Models) -> dict[str, Any]:
    """Decode the dev split with the validation beam and score it."""
    feats, rows = m.feats, m.rows
    if m.encoder is not None:  # fine-tuned encoder: its features change every epoch
        feats, rows = records_from_trunk(m.encoder, m.feats, m.rows, data.dev, m.n_top, s.device)
    return evaluate_split(
        m.decoder,
        feats,
        rows,
        data.dev,
        data.vocab,
        s.config.val_beam_size,
        s.config.max_length,
        length_alpha(s.config),
        s.device,
    )[0]


def scst_start(s: Session, data: Data, m: Models, progress: Progress, manifest: dict | None) -> None:
    """Score the SCST starting point on dev: the score to beat. OUTPUT/best stays the cross-entropy model
    unless an SCST epoch improves on it."""
    c = s.config
    val = validate(s, data, m)
    progress.best = float(val[c.monitor])
    record = {
        "epoch": 0,
        "phase": "scst-start",
        "init_from": str(c.init_from),
        **{f"dev_{k}": v for k, v in val.items()},
        "best": progress.best,
    }
    progress.history.append(record)
    cfg = model_config(
        c,
        data,
        {
            "epochs_trained": 0,
            "best_" + c.monitor: progress.best,
            "train_images": len(data.train),
            "manifest": manifest,
            "annotation_files": data.files.names(),
        },
        m.n_top,
    )
    checkpoint.save(s.out / "best", checkpoint.model_weights(m.decoder, m.saved_encoder), cfg, data.vocab.to_json())
    (s.out / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    if not c.quiet:
        _print_record(record)


def end_epoch(
    s: Session,
    data: Data,
    m: Models,
    opt: Optimization,
    progress: Progress,
    manifest: dict | None,
    record: dict[str, Any],
) -> None:
    """Rank 0 after an epoch: validate, keep score, save ``best`` (if improved) and ``last``, log ``record``."""
    c = s.config
    t0 = time.perf_counter()
    if data.dev:
        val = validate(s, data, m)
        record |= {f"dev_{k}": v for k, v in val.items()}
        score = float(val[c.monitor])
    else:
        score = -record["loss"]
    record["val_seconds"] = time.perf_counter() - t0
    improved = score > progress.best
    if improved:
        progress.best, progress.bad_epochs = score, 0
    else:
        progress.bad_epochs += 1
    record["best"] = progress.best
    progress.history.append(record)
    epoch = record["epoch"]
    extra = {
        "epochs_trained": epoch,
        "best_" + c.monitor: progress.best,
        "train_images": len(data.train),
        "manifest": manifest,
        "annotation_files": data.files.names(),
    }
    if s.scst:
        extra |= {
            "objective": "scst",
            "scst_reward": {
                "cider_d": c.scst_cider_weight,
                "bleu4": c.scst_bleu_weight,
                "meteor_lite": c.scst_meteor_weight,
            },
            "scst_epochs": epoch,
            "init_from": str(c.init_from),
        }
    cfg = model_config(c, data, extra, m.n_top)
    weights = checkpoint.model_weights(m.decoder, m.encoder if m.encoder is not None else m.saved_encoder)
    if improved:
        checkpoint.save(s.out / "best", weights, dict(cfg), data.vocab.to_json())
    state = {
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch,
        "best": progress.best,
        "bad_epochs": progress.bad_epochs,
        "history": progress.history,
        "args": {k: v for k, v in asdict(c).items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    checkpoint.save(s.out / "last", weights, dict(cfg), data.vocab.to_json(), trainer_state=state)
    if c.keep_epochs:
        checkpoint.save(s.out / f"epoch-{epoch:02d}", weights, dict(cfg), data.vocab.to_json())
    with (s.out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if not c.quiet:
        _print_record(record)


def model_config(config: TrainConfig, data: Data, training: dict, finetune_blocks: int) -> dict:
    """This run's checkpoint config: model, inference defaults (as given, else the stored ones), training record."""
    inference = {
        "beam_size": config.beam_size or DEFAULT_BEAM,
        "max_length": config.max_length,
        "length_alpha": length_alpha(config),
        "block_repeats": True,
    }
    return checkpoint.model_config(
        config.name,
        config.model_version,
        data.enc_cfg.to_dict(),
        data.dec_cfg.to_dict(),
        inference,
        {"dataset": config.dataset, "min_count": config.min_count, **training},
        finetune_blocks,
    )


def tune_best(s: Session, data: Data, m: Models) -> dict[str, Any]:
    """Tune beam size and length alpha of the ``best`` checkpoint on dev; store them as its inference defaults.

    A beam size or length alpha given in the configuration is kept as it is.
    """
    from .tuning import ALPHAS, BEAMS, tune_decoding

    c, best = s.config, s.out / "best"
    weights = checkpoint.read_weights(best, device=s.device)
    checkpoint.load_decoder(m.decoder, weights, checkpoint.read_config(best))
    feats, rows = m.feats, m.rows
    if m.encoder is not None:  # fine-tuned encoder: dev annotations from the best epoch's blocks
        checkpoint.load_encoder(m.encoder, weights, m.n_top)
        feats, rows = records_from_trunk(m.encoder, m.feats, m.rows, data.dev, m.n_top, s.device)
    beams = BEAMS if c.beam_size is None else (c.beam_size,)
    alphas = ALPHAS if c.length_alpha is None else (c.length_alpha,)
    chosen, table = tune_decoding(
        lambda b, a: evaluate_split(m.decoder, feats, rows, data.dev, data.vocab, b, c.max_length, a, s.device)[0],
        c.monitor,
        beams,
        alphas,
    )
    config = checkpoint.update_config(
        best,
        {
            "inference": chosen,
            "training": {
                "decoding_tuned": {"split": "dev", "images": len(data.dev), "monitor": c.monitor, "grid": table}
            },
        },
    )
    log.info(
        "decoding tuned on %d dev images: beam %d, length alpha %.1f (stored in %s)",
        len(data.dev),
        chosen["beam_size"],
        chosen["length_alpha"],
        best / checkpoint.CONFIG,
    )
    return config["inference"]


def _print_record(record: dict[str, Any]) -> None:
    """One metrics-log record on stdout, floats rounded."""
    print(json.dumps({k: _short(k, v) for k, v in record.items()}), flush=True)


def _short(key: str, value: Any) -> Any:
    """Floats to 3 decimals; learning rates (1e-3 ... 1e-6) to 3 significant digits."""
    if not isinstance(value, float):
        return value
    return float(f"{value:.3g}") if key == "lr" else round(value, 3)
