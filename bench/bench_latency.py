"""Single-image latency of ``Captioner.caption`` at beam 1/3/5, split into preprocess/encoder/decoder.

Each beam is timed with the default concept guidance and with ``guidance=none`` (the plain search),
interleaved image by image so both see the same machine load (``beamK`` and ``beamK_none``);
``encoder_without_head_ms`` times the caption encoder alone (no ImageNet head) in the same loop.

    .venv/bin/python bench/bench_latency.py [--checkpoint DIR] [--images FOLDER] [--runs 40] [--threads N]

Each image is a JPEG byte string (as an upload arrives: the file's bytes with ``--images``,
else scikit-image's sample photos encoded at quality 90); the timing covers decode + resize,
the encoder forward and the beam search, in one process with torch's default threads
(all cores) unless ``--threads`` is given. Target: p50 <= 100 ms at beam 3 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import LEVERS_HELP, load_captioner, machine, parse_levers, percentiles, sample_uploads, set_threads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--images", help="folder of photos (default: scikit-image samples)")
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--beams", default="1,3,5")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--levers", help=LEVERS_HELP)
    args = p.parse_args()
    parse_levers(args.levers)
    set_threads(args.threads)
    cap, levers = load_captioner(args.checkpoint, args.levers, device="cpu")
    uploads = sample_uploads(args.images, 8)
    out = {
        "threads": torch.get_num_threads(),
        "model": cap.name,
        "image_size": cap.encoder_cfg.image_size,
        "images": len(uploads),
        "runs": args.runs,
        "levers": levers,
        "machine": machine(),
    }
    inner = getattr(cap.encoder, "inner", cap.encoder)  # under the fast path's chunking
    caption_encoder = getattr(inner, "encoder", inner)  # a ConceptEncoder's caption part
    for beam in [int(b) for b in args.beams.split(",")]:
        cap.caption(uploads[0], beam_size=beam)  # warm-up
        times: dict[str, dict[str, list[float]]] = {
            g: {"pre": [], "enc": [], "dec": [], "total": []} for g in ("concepts", "none")
        }
        no_head: list[float] = []
        for i in range(args.runs):
            data = uploads[i % len(uploads)]
            x, _ = cap.preprocess(data)
            with torch.inference_mode():
                t0 = time.perf_counter()
                caption_encoder(x[None].contiguous(memory_format=torch.channels_last))
                no_head.append((time.perf_counter() - t0) * 1e3)
            for guidance, t in times.items():
                t0 = time.perf_counter()
                x, _ = cap.preprocess(data)
                t1 = time.perf_counter()
                grid, concepts = cap.see(x[None])
                t2 = time.perf_counter()
                cap.decode(grid, beam_size=beam, concepts=concepts, guidance=guidance)
                t3 = time.perf_counter()
                t["pre"].append((t1 - t0) * 1e3)
                t["enc"].append((t2 - t1) * 1e3)
                t["dec"].append((t3 - t2) * 1e3)
                t["total"].append((t3 - t0) * 1e3)
        for guidance, t in times.items():
            key = f"beam{beam}" + ("" if guidance == "concepts" else "_none")
            out[key] = {
                "total_ms": percentiles(t["total"]),
                "preprocess_ms": percentiles(t["pre"])["p50"],
                "encoder_ms": percentiles(t["enc"])["p50"],
                "decoder_ms": percentiles(t["dec"])["p50"],
            }
            print(json.dumps({key: out[key]}), flush=True)
        out[f"beam{beam}_encoder_without_head_ms"] = percentiles(no_head)["p50"]
        out[f"beam{beam}_ratio_p50"] = round(
            out[f"beam{beam}"]["total_ms"]["p50"] / out[f"beam{beam}_none"]["total_ms"]["p50"], 3
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
