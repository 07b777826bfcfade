"""The int8 encoder against fp32 and the exact model: dev-split quality, concepts on coco_mini, encoder speed.

    cp -r models/flickr8k-lite2 /tmp/m-fp32 && python -m captioner.onnx_export /tmp/m-fp32   # the fp32 reference
    cp -r models/flickr8k-lite2 /tmp/m8 && python -m captioner.onnx_export /tmp/m8 --precision int8 \
        --calibration-data ../shared/data/flickr8k                                           # or any other export
    .venv/bin/python bench/bench_int8.py --data ../shared/data/flickr8k --model int8=/tmp/m8 --dev 0 > dev.json
    .venv/bin/python bench/bench_int8.py --model int8=/tmp/m8 --coco ../shared/data/coco_mini > coco.json
    .venv/bin/python bench/bench_int8.py --data ../shared/data/flickr8k --model int8=/tmp/m8 --speed 32 > speed.json

Add ``--checkpoint /tmp/m-fp32`` to each command (the shipped folder's export is int8 since session 11).
Systems: ``exact`` (the ``--checkpoint`` folder's weights, ``fast=False``: torch, fp32 decoder), ``fp32`` (that
folder on the fast path: its fp32 encoder.onnx + the int8 decoder) and each ``--model NAME=FOLDER``
(a copy of the model whose recipe is another export, e.g. int8; fast path). All in this one process.

- ``--dev N``: the first N Flickr8k dev photos (0: the whole split), beam 3 and the checkpoint's defaults,
  BLEU-4 / METEOR (with Java) per system, the difference to ``exact`` and the captions changed against ``fp32``;
- ``--coco DIR``: coco_mini's photos through ``see``: how often each system's top concept (and top-5 set)
  equals ``fp32``'s and ``exact``'s;
- ``--speed N``: the encoder alone (``see``: grid + concepts) on N test photos at batch 1 and 8, ms/image,
  systems interleaved for ``--rounds`` rounds, plus torch's fast path (``runtime="torch"``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fp32_export, machine
from captioner.api import Captioner


def log(msg: dict) -> None:
    print(json.dumps(msg), file=sys.stderr, flush=True)


def systems(args: argparse.Namespace, speed: bool = False) -> dict[str, Captioner]:
    base = fp32_export(args.checkpoint)
    caps = {"exact": Captioner.load(base, device="cpu", fast=False)} if not speed else {}
    if speed:
        caps["torch"] = Captioner.load(base, device="cpu", runtime="torch")
    caps["fp32"] = Captioner.load(base, device="cpu", runtime="onnx")
    for spec in args.model:
        name, _, folder = spec.partition("=")
        caps[name] = Captioner.load(folder, device="cpu", runtime="onnx")
    log({name: cap.runtime for name, cap in caps.items()})
    return caps


def dev(args: argparse.Namespace, caps: dict[str, Captioner]) -> dict:
    from captioner.datasets import load_records
    from captioner.metrics import score

    records = load_records("flickr8k", args.data, "dev", limit=args.dev or None)
    refs = {r.image_id: r.captions for r in records}
    out: dict = {"images": len(records), "systems": {}}
    texts: dict[str, list[str]] = {}
    for name, cap in caps.items():
        t0 = time.perf_counter()
        texts[name] = []
        for i in range(0, len(records), 160):
            texts[name] += [c.text for c in cap.caption([r.path for r in records[i : i + 160]], batch_size=16)]
            log({"dev": name, "done": len(texts[name]), "seconds": round(time.perf_counter() - t0, 1)})
        metrics = score({r.image_id: t for r, t in zip(records, texts[name])}, refs)
        out["systems"][name] = {
            "runtime": cap.runtime,
            "seconds": round(time.perf_counter() - t0, 1),
            "bleu4": round(metrics["bleu4"], 2),
            "meteor": None if metrics.get("meteor") is None else round(metrics["meteor"], 2),
            "cider": round(metrics["cider"], 2) if "cider" in metrics else None,
            "changed_vs_fp32": sum(a != b for a, b in zip(texts[name], texts["fp32"])) if "fp32" in texts else None,
            "load1": round(os.getloadavg()[0], 2),
        }
        log({"dev": name, **out["systems"][name]})
    exact = out["systems"]["exact"]
    for s in out["systems"].values():
        s["delta_bleu4"] = round(s["bleu4"] - exact["bleu4"], 2)
        if s["meteor"] is not None and exact["meteor"] is not None:
            s["delta_meteor"] = round(s["meteor"] - exact["meteor"], 2)
    out["captions"] = {r.image_id: {n: t[i] for n, t in texts.items()} for i, r in enumerate(records)}
    return out


def coco(folder: Path, caps: dict[str, Captioner]) -> dict:
    photos = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    any_cap = next(iter(caps.values()))
    tops: dict[str, list[list[str]]] = {}
    for i in range(0, len(photos), 16):
        pixels = torch.stack([any_cap.preprocess(p)[0] for p in photos[i : i + 16]])  # (b, 3, S, S)
        for name, cap in caps.items():
            tops.setdefault(name, []).extend([c.word for c in cs] for cs in cap.see(pixels)[1])
    out: dict = {"photos": len(photos)}
    for name, got in tops.items():
        for ref in ("fp32", "exact"):
            if ref in tops and ref != name:
                same_top = sum(bool(a) == bool(b) and (not a or a[0] == b[0]) for a, b in zip(got, tops[ref]))
                same_set = sum(set(a) == set(b) for a, b in zip(got, tops[ref]))
                out[f"{name}_vs_{ref}"] = {"top_concept_same": same_top, "concept_set_same": same_set}
        out[f"{name}_with_concepts"] = sum(bool(a) for a in got)
    return out


def speed(args: argparse.Namespace, caps: dict[str, Captioner]) -> dict:
    names = (Path(args.data) / "Flickr_8k.testImages.txt").read_text().split()[: args.speed]
    cap0 = next(iter(caps.values()))
    pixels = torch.stack([cap0.preprocess(Path(args.data) / "images" / n)[0] for n in names])  # (N, 3, S, S)
    out: dict = {}
    for batch in (1, 8):
        chunks = [pixels[i : i + batch] for i in range(0, len(pixels), batch)]
        for cap in caps.values():
            cap.see(chunks[0])  # warm-up
        rounds = []
        for _ in range(args.rounds):
            ms = {}
            for name, cap in caps.items():
                t0 = time.perf_counter()
                for c in chunks:
                    cap.see(c)
                ms[name] = round(1000 * (time.perf_counter() - t0) / len(pixels), 2)
            rounds.append(ms | {"load1": round(os.getloadavg()[0], 2)})
            log({"batch": batch, **rounds[-1]})
        out[f"batch{batch}"] = {
            "rounds": rounds,
            "median_ms": {n: statistics.median(r[n] for r in rounds) for n in caps},
            "speedup_vs_torch": {n: round(statistics.median(r["torch"] / r[n] for r in rounds), 2) for n in caps},
            "speedup_vs_fp32": {n: round(statistics.median(r["fp32"] / r[n] for r in rounds), 2) for n in caps},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="the Flickr8k folder (dev and speed)")
    ap.add_argument("--checkpoint", help="a model folder with an fp32 encoder.onnx (default: shipped, if it has one)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="another export to compare")
    ap.add_argument("--dev", type=int, default=-1, help="dev photos to score (0: the whole split; -1: skip)")
    ap.add_argument("--coco", help="coco_mini's folder: concept agreement")
    ap.add_argument("--speed", type=int, default=0, help="test photos for the encoder timing (0: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    result: dict = {"bench": "int8", "machine": machine(), "load1_start": round(os.getloadavg()[0], 2)}
    if args.dev >= 0:
        result["dev"] = dev(args, systems(args))
    if args.coco:
        result["coco"] = coco(Path(args.coco), systems(args))
    if args.speed:
        result["speed"] = speed(args, systems(args, speed=True))
    result["load1_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
