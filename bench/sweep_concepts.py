"""Concept-guidance settings on both dev sets at once: coco_mini and Flickr8k dev, from cached encoder outputs.

    python bench/sweep_concepts.py cache [--cache /tmp/concept-sweep]      # encode once (a few minutes)
    python bench/sweep_concepts.py run KEY=VALUE ... [--label NAME]         # decode and score one setting

``cache`` runs the ``captioner caption`` path's encoder (the shipped model, CPU speed-ups on) over
coco_mini's 130 photos and Flickr8k's 1000 dev photos and keeps each image's annotation grid and
ImageNet class probabilities. ``run`` overrides the model's inference defaults (``concept_weight=12``,
``guidance=none``; ``null`` removes a key's value), decodes both sets through ``Captioner.decode`` as
the CLI does, and prints coco_mini object recall / CIDEr-D / METEOR (bench_coco_mini's synonym table)
and Flickr8k dev BLEU-4 / METEOR / CIDEr-D; ``--output`` appends the figures and captions as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_coco_mini import recall
from captioner.api import CONCEPT_MIN_PROB, CONCEPTS_SHOWN, Captioner
from captioner.datasets import load_records
from captioner.metrics import score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def coco_sets(data: Path) -> tuple[list[Path], dict[str, list[str]], dict[str, list[str]]]:
    """coco_mini's image paths, references (file name -> captions) and objects (file name -> categories)."""
    coco = json.loads((data / "captions.json").read_text())
    file_of = {im["id"]: im["file_name"] for im in coco["images"]}
    refs: dict[str, list[str]] = {}
    for a in coco["annotations"]:
        refs.setdefault(file_of[a["image_id"]], []).append(a["caption"])
    objects = json.loads((data / "objects.json").read_text())
    return sorted(data / "images" / f for f in refs), refs, objects


@torch.inference_mode()
def encode(cap: Captioner, paths: list[Path], batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """paths -> annotations (N, L, D) and ImageNet class probabilities (N, 1000), as ``captioner caption`` sees them."""
    feats, probs = [], []
    for i in range(0, len(paths), batch):
        images = torch.stack([cap.preprocess(p)[0] for p in paths[i : i + batch]])  # (b, 3, S, S)
        annotations, class_probs = cap.encoder(images)  # (b, L, D), (b, 1000)
        feats.append(annotations.float().cpu())
        probs.append(class_probs.float().cpu())
    return torch.cat(feats), torch.cat(probs)


def cache(args: argparse.Namespace) -> None:
    cap = Captioner.load(device="cpu")
    out = Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    coco_paths, _, _ = coco_sets(SHARED / "coco_mini")
    dev = load_records("flickr8k", SHARED / "flickr8k", "dev")
    for name, paths in (("coco_mini", coco_paths), ("flickr8k_dev", [Path(r.path) for r in dev])):
        t = time.perf_counter()
        feats, probs = encode(cap, paths)
        torch.save({"names": [p.name for p in paths], "feats": feats, "probs": probs}, out / f"{name}.pt")
        print(f"{name}: {len(paths)} images in {time.perf_counter() - t:.0f} s")


def decode_all(cap: Captioner, data: dict, batch: int = 50) -> dict[str, str]:
    """Every cached image's caption (file name -> text) with the captioner's current defaults."""
    texts: dict[str, str] = {}
    for i in range(0, len(data["names"]), batch):
        probs = data["probs"][i : i + batch]  # (b, 1000)
        concepts = cap.concept_map.concepts(probs, CONCEPTS_SHOWN, CONCEPT_MIN_PROB)
        caps = cap.decode(data["feats"][i : i + batch], concepts=concepts)
        texts |= {n: c.text for n, c in zip(data["names"][i : i + batch], caps)}
    return texts


def parse_value(text: str) -> object:
    """A setting's value: JSON (12, 0.5, null, true), else the text itself (each, none)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def run(args: argparse.Namespace) -> None:
    cap = Captioner.load(device="cpu")
    cap.defaults.update({k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.settings)})
    folder = Path(args.cache)
    _, coco_refs, objects = coco_sets(SHARED / "coco_mini")
    dev_refs = {Path(r.path).name: r.captions for r in load_records("flickr8k", SHARED / "flickr8k", "dev")}
    row: dict[str, object] = {"label": args.label or " ".join(args.settings) or "defaults"}
    t = time.perf_counter()
    coco = decode_all(cap, torch.load(folder / "coco_mini.pt"))
    hit, n = recall(coco, objects)
    m = score(coco, coco_refs)
    row |= {"recall": round(100 * hit / n, 1), "hits": hit, "coco_cider_d": round(m["cider"], 1)}
    row |= {"coco_meteor": round(m["meteor"] or 0, 2)}
    if not args.coco_only:
        dev = decode_all(cap, torch.load(folder / "flickr8k_dev.pt"))
        d = score(dev, dev_refs)
        row |= {"dev_bleu4": round(d["bleu4"], 2), "dev_meteor": round(d["meteor"] or 0, 2)}
        row |= {"dev_cider_d": round(d["cider"], 2)}
    else:
        dev = {}
    row["seconds"] = round(time.perf_counter() - t)
    print(json.dumps(row))
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(row | {"settings": cap.defaults, "coco": coco, "dev": dev}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["cache", "run"])
    ap.add_argument("settings", nargs="*", help="inference defaults to override, KEY=VALUE (JSON values)")
    ap.add_argument("--cache", default="/tmp/concept-sweep", help="folder of the cached encoder outputs")
    ap.add_argument("--label", help="the row's name")
    ap.add_argument("--coco-only", action="store_true", help="skip Flickr8k dev (a quick look)")
    ap.add_argument("--output", help="append the row, settings and captions to this JSON-lines file")
    args = ap.parse_intermixed_args()
    cache(args) if args.step == "cache" else run(args)


if __name__ == "__main__":
    main()
