"""``captioner evaluate``: score a checkpoint on a dataset split."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..datasets import DatasetError
from .common import HelpFormatter, add_data_args, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``captioner evaluate``."""
    from ..api import GUIDANCE

    e = sub.add_parser("evaluate", help="score a checkpoint on a dataset split", formatter_class=HelpFormatter)
    add_data_args(e, split=True)
    e.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    e.add_argument("--beam-size", type=positive_int, help="beam size (default: the checkpoint's)")
    e.add_argument("--max-length", type=positive_int, help="longest caption in words (default: the checkpoint's)")
    e.add_argument("--length-alpha", type=float, help="length penalty exponent (default: the checkpoint's)")
    e.add_argument("--guidance", choices=GUIDANCE,
                   help="concepts or none, as in 'captioner caption' (default: the checkpoint's, concepts)")
    e.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    e.add_argument("--output", help="metrics JSON path (default: next to the checkpoint)")
    e.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    e.add_argument("--exact", action="store_true",
                   help="score the fp32 model exactly as trained, without the CPU speed-ups (int8 decoder, ...)")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import checkpoint
    from ..api import Captioner, default_model_path
    from ..datasets import load_records
    from ..scoring import metrics_report
    from ..train import cached_features, default_cache_dir, evaluate_split

    ckpt = checkpoint.resolve(args.checkpoint or default_model_path())
    cap = Captioner.load(ckpt, device=args.device, fast=False if args.exact else None, runtime="torch")  # torch heads
    records = load_records(args.dataset, args.data_dir, args.split, args.limit, args.annotations)
    if not records:
        raise DatasetError(f"no images with captions in split {args.split!r} of {args.data_dir}")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    n_top = int(cap.config.get("finetune_blocks") or 0)
    from ..encoder import Encoder

    if cap.config.get("encoder_finetuned") and n_top:
        # fine-tuning left the trunk at its ImageNet weights: cache the trunk's maps (reused by later
        # runs) and finish them with the checkpoint's own last blocks, as in training
        from ..api import load_state
        from ..train import records_from_trunk

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
        from ..metrics import score

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
