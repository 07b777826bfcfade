"""Single-image latency of ``Captioner.caption`` at beam 1/3/5, split into preprocess/encoder/decoder.

    .venv/bin/python bench/bench_latency.py [--checkpoint DIR] [--images FOLDER] [--runs 40]

Each image is a JPEG byte string (as an upload arrives); the timing covers decode + resize,
the encoder forward and the beam search, in one process with torch's default threads.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import percentiles, sample_photos  # noqa: E402
from captioner.api import Captioner  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--images", help="folder of photos (default: scikit-image samples)")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--beams", default="1,3,5")
    args = p.parse_args()
    cap = Captioner.load(args.checkpoint, device="cpu")
    uploads = []
    for img in sample_photos(args.images, 8):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        uploads.append(buf.getvalue())
    out = {"threads": torch.get_num_threads(), "model": cap.name, "image_size": cap.encoder_cfg.image_size}
    for beam in [int(b) for b in args.beams.split(",")]:
        cap.caption(uploads[0], beam_size=beam)  # warm-up
        pre, enc, dec, total = [], [], [], []
        for i in range(args.runs):
            data = uploads[i % len(uploads)]
            t0 = time.perf_counter()
            x, _ = cap.preprocess(data)
            t1 = time.perf_counter()
            grid = cap.encode(x[None])
            t2 = time.perf_counter()
            cap.decode(grid, beam_size=beam)
            t3 = time.perf_counter()
            pre.append((t1 - t0) * 1e3)
            enc.append((t2 - t1) * 1e3)
            dec.append((t3 - t2) * 1e3)
            total.append((t3 - t0) * 1e3)
        out[f"beam{beam}"] = {"total_ms": percentiles(total), "preprocess_ms": percentiles(pre)["p50"],
                              "encoder_ms": percentiles(enc)["p50"], "decoder_ms": percentiles(dec)["p50"]}
        print(json.dumps({f"beam{beam}": out[f"beam{beam}"]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
