"""Single-image encode + decode timed on the main thread and on a new thread, in one process.

    .venv/bin/python bench/bench_thread_spin.py [--images ../shared/data/coco_mini/images] [--rounds 2]

Captions the first 8 photos of the folder one at a time, 3 times, on the main thread and then on a fresh
``threading.Thread`` (as the service's micro-batcher does), ``--rounds`` times; prints the median encoder
and decoder ms of each. Session 8 ran it with ONNX Runtime's spin-waiting on (the shipped default) and off
(a scratch switch of ``session.intra_op.allow_spinning``); BENCHMARKS.md, "Session 8".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from captioner.api import Captioner

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "images"


def timed(cap: Captioner, pixels: list[torch.Tensor], out: list[tuple[float, float]]) -> None:
    """Appends (encoder s, decoder s) for each image, 3 passes."""
    for _ in range(3):
        for x in pixels:
            t0 = time.perf_counter()
            annotations, concepts = cap.see(x)
            t1 = time.perf_counter()
            cap.decode(annotations, concepts=concepts)
            out.append((t1 - t0, time.perf_counter() - t1))


def summary(where: str, times: list[tuple[float, float]]) -> dict:
    return {
        "where": where,
        "encoder_p50_ms": round(1000 * statistics.median(a for a, _ in times), 1),
        "decoder_p50_ms": round(1000 * statistics.median(b for _, b in times), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(IMAGES))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cap = Captioner.load(device="cpu")
    paths = sorted(Path(args.images).iterdir())[:8]
    pixels = [cap.preprocess(p)[0].unsqueeze(0) for p in paths]  # (1, 3, S, S) each
    for _ in range(args.rounds):
        main_times: list[tuple[float, float]] = []
        timed(cap, pixels, main_times)
        print(json.dumps(summary("main thread", main_times)))
        thread_times: list[tuple[float, float]] = []
        worker = threading.Thread(target=timed, args=(cap, pixels, thread_times))
        worker.start()
        worker.join()
        print(json.dumps(summary("new thread", thread_times)))


if __name__ == "__main__":
    main()
