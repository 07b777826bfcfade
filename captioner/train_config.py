"""``TrainConfig``: everything a training run depends on, as ``captioner train``'s options."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BEAM = 3  # stored when beam_size is not given and decoding is not tuned


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on; the fields and defaults are ``captioner train``'s options."""

    dataset: str = "flickr8k"
    data_dir: str
    annotations: list[str] | None = None  # [SPLIT=]FILE, as --annotations
    limit: int | None = None  # images per split
    cache_dir: str | None = None  # default: default_cache_dir()
    output: str  # run folder: best/, last/, metrics.jsonl
    epochs: int = 20
    resume: bool = False
    val_limit: int | None = None  # dev images used for validation (default: limit)
    encoder: str = "efficientnet-lite2"
    image_size: int = 260
    stage: str = "head"
    encoder_weights: str | None = None
    finetune_blocks: int = 0
    encoder_lr: float = 1e-4
    min_count: int = 5
    max_words: int = 30
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    proj_dim: int = 512
    dropout: float = 0.5
    no_tie: bool = False
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    warmup_steps: int | None = None
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    alpha_c: float = 1.0
    monitor: str = "cider"
    patience: int = 4
    keep_epochs: bool = False
    scst_epochs: int = 0
    init_from: str | None = None
    scst_lr: float = 5e-5
    scst_samples: int = 5
    scst_max_length: int = 20
    scst_cider_weight: float = 1.0
    scst_bleu_weight: float = 0.0
    scst_meteor_weight: float = 0.0
    scst_candidates: str = "sample"
    scst_no_dropout: bool = False
    val_beam_size: int = 1
    beam_size: int | None = None  # default: tuned on dev
    length_alpha: float | None = None  # default: tuned on dev (0.0 during training)
    tune_decoding: bool = True
    max_length: int = 30
    encode_batch_size: int = 32
    workers: int = 1
    device: str | None = None
    threads: int | None = None
    seed: int = 1234
    name: str = "captioner"
    model_version: str = "1.0"
    manifest: str | None = None  # default: DATA_DIR/manifest.json if present
    quiet: bool = False


def length_alpha(config: TrainConfig) -> float:
    """The length alpha used during training (SCST beams, validation): ``length_alpha``, 0.0 when not given."""
    return 0.0 if config.length_alpha is None else float(config.length_alpha)
