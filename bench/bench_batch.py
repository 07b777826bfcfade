"""Batch captioning throughput vs. the bare encoder on the same images.

    .venv/bin/python bench/bench_batch.py --images photos/ --checkpoint models/flickr8k-lite2
    .venv/bin/python bench/bench_batch.py --samples 200                # scikit-image photos, cropped/flipped copies
    .venv/bin/python bench/bench_batch.py --generate 20 --checkpoint runs/demo/best   # smoke run

Prints images/s of the whole ``captioner caption`` pipeline (worker decoding + batched encoder +
batched beam search, as :func:`captioner.batch.iter_captions` runs it; no output file, no model
load) and images/s of the encoder forward alone on already-preprocessed batches of the same
size, and their ratio (target >= 0.6). One warm-up batch runs first; the bare encoder is timed
once before and once after the pipeline and the faster pass is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LEVERS_HELP, load_captioner, machine, parse_levers, write_sample_jpegs
from captioner.batch import expand, iter_captions
from captioner.images import ImageError
from captioner.settings import default_workers


def generate(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    """``n`` synthetic photo-sized JPEGs (gradients, blocks and noise)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w, h = size
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        img = torch.stack([xx, yy, torch.full_like(xx, (i * 0.13) % 1)], -1) * 200  # (h, w, 3)
        x0, y0 = int(torch.randint(0, w // 2, (1,), generator=g)), int(torch.randint(0, h // 2, (1,), generator=g))
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = torch.rand(3, generator=g) * 255
        img += torch.rand(h, w, 3, generator=g) * 40
        Image.fromarray(img.clamp(0, 255).to(torch.uint8).numpy(), "RGB").save(folder / f"gen{i:04d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder (or glob) of images to caption")
    src.add_argument("--samples", type=int, metavar="N", help="caption N JPEG copies of scikit-image's sample photos")
    src.add_argument("--generate", type=int, metavar="N", help="caption N generated 640x480 JPEGs instead")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the shipped model)")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch threads in the main process")
    p.add_argument("--levers", help=LEVERS_HELP)
    args = p.parse_args()
    parse_levers(args.levers)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = None
    if args.generate or args.samples:
        tmp = tempfile.TemporaryDirectory(prefix="bench_batch_")
        if args.samples:
            write_sample_jpegs(Path(tmp.name), args.samples)
        else:
            generate(Path(tmp.name), args.generate)
        args.images = tmp.name
    paths = expand([args.images], recursive=args.recursive)[: args.limit]
    if not paths:
        sys.exit(f"no images in {args.images}")
    cap, levers = load_captioner(args.checkpoint, args.levers, device=args.device)
    bs = args.batch_size
    sync = torch.cuda.synchronize if cap.device.type == "cuda" else (lambda: None)

    # the bare encoder's input: the same images, already decoded and preprocessed, same batch size
    tensors = []
    for path in paths:
        with contextlib.suppress(ImageError):
            tensors.append(cap.preprocess(path)[0])  # (3, S, S)
    batches = [torch.stack(tensors[i : i + bs]) for i in range(0, len(tensors), bs)]  # (b, 3, S, S)
    if not batches:
        sys.exit("no image could be decoded")

    def encoder_pass() -> float:
        sync()
        t0 = time.perf_counter()
        for b in batches:
            cap.encode(b)
        sync()
        return time.perf_counter() - t0

    # warm-up (kernel selection, allocator); the bare encoder is timed before and after the pipeline and
    # the faster pass counts, so that load from other processes during one pass cannot flatter the ratio
    list(iter_captions(cap, paths[:bs], bs, 0, args.beam_size))
    encoder_runs = [encoder_pass()]
    t0 = time.perf_counter()
    results = list(iter_captions(cap, paths, bs, args.workers, args.beam_size))
    sync()
    pipeline_s = time.perf_counter() - t0
    failed = sum(r.error is not None for r in results)
    encoder_runs.append(encoder_pass())
    encoder_s = min(encoder_runs)

    pipe_rate = len(paths) / pipeline_s
    enc_rate = len(tensors) / encoder_s
    print(
        f"images: {len(paths)} ({failed} failed), batch size {bs}, beam {args.beam_size}, "
        f"workers {args.workers}, device {cap.device}, torch threads {torch.get_num_threads()}"
    )
    print(f"pipeline (decode + encode + beam search): {pipe_rate:8.2f} images/s")
    print(f"bare encoder forward:                     {enc_rate:8.2f} images/s")
    print(f"pipeline / encoder:                       {pipe_rate / enc_rate:8.2f}")
    print(
        json.dumps(
            {
                "images": len(paths),
                "failed": failed,
                "batch_size": bs,
                "beam_size": args.beam_size,
                "workers": args.workers,
                "device": str(cap.device),
                "pipeline_images_per_s": round(pipe_rate, 3),
                "encoder_images_per_s": round(enc_rate, 3),
                "encoder_passes_images_per_s": [round(len(tensors) / t, 3) for t in encoder_runs],
                "ratio": round(pipe_rate / enc_rate, 3),
                "model": cap.name,
                "levers": levers,
                "machine": machine(),
            }
        )
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
