"""Training speed: decoder tokens/s from a feature cache, and the one-time feature extraction.

    .venv/bin/python bench/bench_train.py [--checkpoint DIR] [--cache DIR] [--steps 16] [--extract-images 96]
    .venv/bin/python bench/bench_train.py --steps 3 --extract-images 8 --checkpoint runs/demo/best   # smoke run

1. **Decoder training** runs the real training step (``captioner.xe.train_one_epoch``:
   image-grouped batches of ``--batch-size`` images with all their captions, teacher forcing,
   cross-entropy + doubly stochastic attention, AdamW, gradient clipping) on ``--steps`` batches
   after ``--warmup-steps`` untimed ones. Features are synthetic fp16 grids of the model's shape
   (L = H*W = 81, D = 1280 for efficientnet-lite2 at 260 px), or the first ``--rows`` rows of a
   real cache (``--cache .cache/captioner/features-XXXX``). Captions are random words whose
   lengths follow Flickr8k's training captions (the histogram below), 5 per image.
   Tokens counted as the trainer counts them (``sum(length - 1)``: every predicted word incl.
   ``<end>``); minutes per Flickr8k epoch = Flickr8k's 30,000 training captions' tokens / tokens/s
   (the per-epoch validation decode is not included).
2. **Feature extraction** runs the real cache builder (``FeatureCache.build``: one decoding worker
   process, ``load_and_preprocess`` of each JPEG, encoder forward in batches of 32) over
   ``--extract-images`` photos (scikit-image samples as JPEGs, or ``--images``), after one
   untimed batch; reported as ms per image and minutes for Flickr8k's 7,000 train + dev images.
   By default the encoder is the one the cache builder uses (``captioner.perf.fast_encoder``:
   fold_bn, channels_last, encode_chunk2); ``--levers none`` measures the plain encoder, and a
   list such as ``--levers fold_bn,channels_last`` applies just those options.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import encode_chunk, machine, parse_levers, set_threads, write_sample_jpegs
from captioner import (
    checkpoint,
    perf,
)
from captioner.datasets import FeatureCache, ImageGroupedBatches, collate_pairs
from captioner.decoder import AttentionDecoder, DecoderConfig
from captioner.encoder import Encoder, EncoderConfig
from captioner.xe import XeOptions, train_one_epoch

#: Flickr8k training captions (30,000) by token count incl. <start>/<end>, words cut at 30 as in training.
FLICKR8K_LENGTHS = {
    4: 15,
    5: 126,
    6: 346,
    7: 862,
    8: 1958,
    9: 2537,
    10: 2927,
    11: 3319,
    12: 3319,
    13: 3132,
    14: 2778,
    15: 2320,
    16: 1848,
    17: 1329,
    18: 977,
    19: 662,
    20: 513,
    21: 365,
    22: 204,
    23: 136,
    24: 110,
    25: 74,
    26: 52,
    27: 33,
    28: 20,
    29: 11,
    30: 7,
    31: 9,
    32: 11,
}
FLICKR8K_EPOCH_TOKENS = sum((n - 1) * c for n, c in FLICKR8K_LENGTHS.items())  # predicted tokens per epoch
FLICKR8K_TRAIN_DEV_IMAGES = 7000
DEFAULT_VOCAB = 2540  # Flickr8k train vocabulary at min_count 5


class SyntheticPairs(Dataset):
    """(feature row, caption ids) items, shaped like ``CaptionPairs`` built on a feature cache."""

    def __init__(self, n_images: int, vocab_size: int, per_image: int = 5, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        lengths = np.array(list(FLICKR8K_LENGTHS))
        probs = np.array(list(FLICKR8K_LENGTHS.values()), dtype=np.float64)
        self.items: list[tuple[str, list[int]]] = []
        for img in range(n_images):
            for n in g.choice(lengths, size=per_image, p=probs / probs.sum()):
                words = g.integers(4, vocab_size, size=int(n) - 2).tolist()  # ids 0..3 are the specials
                self.items.append((f"img{img}", [1, *words, 2]))  # <start> .. <end>

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        path, ids = self.items[i]
        return int(path[3:]), torch.tensor(ids, dtype=torch.long)


def load_features(cache: str | None, n: int, shape: tuple[int, int]) -> torch.Tensor:
    """(n, L, D) fp16: the first ``n`` rows of a real cache, or random grids like the encoder's (>= 0, sparse-ish)."""
    if cache:
        arr = np.load(Path(cache) / "features.npy", mmap_mode="r")
        if tuple(arr.shape[1:]) != shape:
            raise SystemExit(f"cache grids are {arr.shape[1:]}, the model expects {shape}")
        return torch.from_numpy(np.ascontiguousarray(arr[:n]))
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(n, *shape, generator=g)).half()  # (n, L, D)


def bench_decoder(args: argparse.Namespace, dec_cfg: DecoderConfig, shape: tuple[int, int]) -> dict:
    feats = load_features(args.cache, args.rows, shape)
    pairs = SyntheticPairs(len(feats), dec_cfg.vocab_size)
    torch.manual_seed(0)
    decoder = AttentionDecoder(dec_cfg)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train_args = XeOptions(label_smoothing=0.1, alpha_c=1.0, grad_clip=5.0, finetune_blocks=0)
    batches = list(ImageGroupedBatches(pairs, args.batch_size, torch.Generator().manual_seed(0)))
    need = args.warmup_steps + args.steps
    if len(batches) < need:
        raise SystemExit(f"--rows {args.rows} gives {len(batches)} batches; need {need}")

    def run(sel: list[list[int]]) -> dict:
        loader = DataLoader(pairs, batch_sampler=sel, collate_fn=collate_pairs)
        return train_one_epoch(
            decoder, None, loader, feats, optimizer, scheduler, train_args, torch.device("cpu"), 0, show=False
        )

    run(batches[: args.warmup_steps])
    stats = run(batches[args.warmup_steps : need])
    tps = stats["tokens_per_s"]
    return {
        "features": "cache " + args.cache if args.cache else "synthetic",
        "grid": list(shape),
        "vocab": dec_cfg.vocab_size,
        "images_per_batch": args.batch_size,
        "captions_per_batch": 5 * args.batch_size,
        "steps": args.steps,
        "seconds_per_step": round(stats["epoch_seconds"] / args.steps, 3),
        "tokens_per_s": round(tps),
        "flickr8k_epoch_tokens": FLICKR8K_EPOCH_TOKENS,
        "flickr8k_epoch_minutes": round(FLICKR8K_EPOCH_TOKENS / tps / 60, 1),
    }


def bench_extraction(args: argparse.Namespace, enc_cfg: EncoderConfig) -> dict:
    encoder = Encoder(enc_cfg)
    if args.levers is None:  # as shipped: captioner.datasets.features.cached_features builds caches with this copy
        encoder, levers = perf.fast_encoder(encoder), ["fold_bn", "channels_last", "encode_chunk2"]
    else:
        levers = parse_levers(args.levers)
        if "fold_bn" in levers:
            perf.fold_batchnorm(encoder)
        if "channels_last" in levers:
            perf.use_channels_last(encoder)
        chunk = encode_chunk(levers)
        if chunk:
            encoder = perf.ChunkedEncoder(encoder, chunk)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        if args.images:
            from captioner.batch import expand

            paths = expand([args.images])[: args.extract_images + 32]
        else:
            (root / "img").mkdir()
            paths = [str(p) for p in write_sample_jpegs(root / "img", args.extract_images + 32)]
        warm, timed = paths[:32], paths[32:]
        if not timed:
            raise SystemExit("not enough images for the extraction benchmark")
        FeatureCache(root / "warm").build(warm, encoder, batch_size=32, num_workers=1, progress=False)
        t0 = time.perf_counter()
        FeatureCache(root / "timed").build(timed, encoder, batch_size=32, num_workers=1, progress=False)
        secs = time.perf_counter() - t0
    per_image = secs / len(timed)
    return {
        "backbone": enc_cfg.backbone,
        "image_size": enc_cfg.image_size,
        "batch_size": 32,
        "images": len(timed),
        "source": args.images or "scikit-image samples (JPEG)",
        "levers": levers,
        "ms_per_image": round(per_image * 1e3, 1),
        "images_per_s": round(1 / per_image, 2),
        "flickr8k_train_dev_minutes": round(FLICKR8K_TRAIN_DEV_IMAGES * per_image / 60, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        help="take the encoder/decoder configuration from this model (default: "
        "efficientnet-lite2 at 260 px and the default decoder with a Flickr8k-sized vocabulary)",
    )
    p.add_argument("--cache", help="real feature cache folder (features.npy) instead of synthetic features")
    p.add_argument("--rows", type=int, default=768, help="feature rows (images) to train on")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (x5 captions), as in training")
    p.add_argument("--steps", type=int, default=16, help="timed training steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--extract-images", type=int, default=96, help="timed images for the extraction benchmark (0: skip)")
    p.add_argument("--images", help="photos for the extraction benchmark (default: scikit-image samples)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument(
        "--levers",
        help="extraction encoder: omitted = as shipped (fast_encoder), none = plain, "
        "or a list of fold_bn, channels_last, encode_chunkN",
    )
    p.add_argument("--skip-decoder", action="store_true")
    args = p.parse_args()
    if "int8_decoder" in parse_levers(args.levers):
        p.error("--levers here applies to the extraction encoder only")
    set_threads(args.threads)
    if args.checkpoint:
        config = checkpoint.read_config(checkpoint.resolve(args.checkpoint))
        enc_cfg, dec_cfg = EncoderConfig(**config["encoder"]), DecoderConfig(**config["decoder"])
    else:
        enc_cfg = EncoderConfig()
        dec_cfg = DecoderConfig(DEFAULT_VOCAB, enc_cfg.feature_dim)
    H, W = enc_cfg.grid
    out: dict = {"machine": machine()}
    if not args.skip_decoder:
        out["decoder_training"] = bench_decoder(args, dec_cfg, (H * W, enc_cfg.feature_dim))
        print(json.dumps({"decoder_training": out["decoder_training"]}), file=sys.stderr, flush=True)
    if args.extract_images > 0:
        out["feature_extraction"] = bench_extraction(args, enc_cfg)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
