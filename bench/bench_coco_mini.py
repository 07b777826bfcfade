"""Everyday photos beyond Flickr8k: object recall, CIDEr-D and METEOR on coco_mini.

    python bench/bench_coco_mini.py [--data ../shared/data/coco_mini] [--guidance concepts none]

Runs ``captioner caption`` with its defaults (and once per extra ``--guidance`` value) over the
folder's images, then reports
- object recall: over every (image, object) pair of ``objects.json`` other than "person", the
  share whose caption names the object (its COCO name, a plural, or a synonym from ``SYNONYMS``);
- coco-caption CIDEr-D and METEOR (captioner.metrics) against the 5 human captions;
- invented people: over the photos none of whose human captions names a person (a ``PEOPLE`` word),
  how many captions name one;
- human agreement: each image's first caption scored against the other four, for scale.
Writes bench/results/coco_mini.json (the captions included).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from captioner.concepts import plural
from captioner.metrics import score
from captioner.vocab import tokenize

# The benchmark's own synonym table (the product never sees it): COCO category -> words that name it.
SYNONYMS: dict[str, list[str]] = {
    "dining table": ["table", "desk"],
    "tv": ["tv", "television", "monitor", "screen"],
    "couch": ["couch", "sofa"],
    "cell phone": ["phone", "cellphone"],
    "motorcycle": ["motorcycle", "motorbike"],
    "teddy bear": ["teddy", "bear"],
    "airplane": ["airplane", "plane", "jet", "aircraft"],
    "bicycle": ["bicycle", "bike"],
    "laptop": ["laptop", "computer"],
    "refrigerator": ["refrigerator", "fridge"],
    "microwave": ["microwave"],
    "oven": ["oven", "stove"],
    "sink": ["sink"],
    "toilet": ["toilet"],
    "cup": ["cup", "mug"],
    "car": ["car", "taxi", "vehicle"],
    "truck": ["truck"],
    "boat": ["boat", "ship"],
    "train": ["train"],
    "bed": ["bed"],
    "cow": ["cow", "cattle", "bull", "calf"],
    "cat": ["cat", "kitten"],
    "dog": ["dog", "puppy"],
    "sheep": ["sheep", "lamb"],
    "bear": ["bear"],
    "giraffe": ["giraffe"],
    "zebra": ["zebra"],
    "elephant": ["elephant"],
    "banana": ["banana"],
    "sandwich": ["sandwich"],
    "pizza": ["pizza"],
    "cake": ["cake"],
    "bowl": ["bowl"],
    "book": ["book"],
    "umbrella": ["umbrella"],
    "suitcase": ["suitcase", "luggage"],
    "chair": ["chair"],
    "keyboard": ["keyboard"],
    "fire hydrant": ["hydrant"],
    "parking meter": ["meter"],
    "toothbrush": ["toothbrush"],
    "baseball bat": ["bat"],
}


# Words that put a person in a caption: for the photos none of whose five human captions uses one, how often
# the model invents a person (Flickr8k's captions nearly all start with one).
PEOPLE = frozenset(
    {
        "man", "men", "woman", "women", "person", "people", "persons", "child", "children", "kid", "kids", "boy",
        "boys", "girl", "girls", "baby", "guy", "lady", "player", "players", "skateboarder", "snowboarder", "skier",
        "surfer", "rider", "someone", "chef", "cook",
    }
)  # fmt: skip


def names(category: str, text: str) -> bool:
    """Does the caption name this COCO category (a synonym or its plural; multi-word names as a phrase)?"""
    words = tokenize(text)
    joined = " " + " ".join(words) + " "
    for name in SYNONYMS.get(category, [category]):
        for form in (name, plural(name)):
            if f" {form} " in joined:
                return True
    return False


def recall(captions: dict[str, str], objects: dict[str, list[str]]) -> tuple[int, int]:
    pairs = [(img, obj) for img, objs in objects.items() for obj in objs if obj != "person" and img in captions]
    return sum(names(obj, captions[img]) for img, obj in pairs), len(pairs)


def invented_people(captions: dict[str, str], refs: dict[str, list[str]]) -> tuple[int, int]:
    """(captions that name a person, photos) over the photos whose human captions name none."""
    empty = [f for f, rs in refs.items() if f in captions and not any(PEOPLE & set(tokenize(r)) for r in rs)]
    return sum(bool(PEOPLE & set(tokenize(captions[f]))) for f in empty), len(empty)


def run_cli(images: list[Path], guidance: str | None, extra: list[str]) -> tuple[dict[str, dict], float]:
    cmd = [sys.executable, "-m", "captioner.commands.main", "caption", *map(str, images), "-q", *extra]
    if guidance:
        cmd += ["--guidance", guidance]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {Path(r["image"]).name: r for r in map(json.loads, out.splitlines())}, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"))
    ap.add_argument("--guidance", nargs="*", default=["none"], help="extra runs with these --guidance values")
    ap.add_argument("--cli-args", default="", help="extra arguments for captioner caption, e.g. '--beam-size 5'")
    ap.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "coco_mini.json"))
    args = ap.parse_args()
    data = Path(args.data)
    coco = json.loads((data / "captions.json").read_text())
    file_of = {im["id"]: im["file_name"] for im in coco["images"]}
    refs: dict[str, list[str]] = {}
    for a in coco["annotations"]:
        refs.setdefault(file_of[a["image_id"]], []).append(a["caption"])
    objects: dict[str, list[str]] = json.loads((data / "objects.json").read_text())  # file name -> categories
    images = sorted(data / "images" / f for f in refs)

    results: dict[str, dict] = {}
    human = {f: rs[0] for f, rs in refs.items()}
    hit, n = recall(human, objects)
    m = score(human, {f: rs[1:] for f, rs in refs.items()})
    results["human (1 vs 4)"] = {
        "object_recall": round(100 * hit / n, 1),
        "hits": hit,
        "pairs": n,
        "cider_d": round(m["cider"], 1),
        "meteor": round(m["meteor"] or 0, 2),
        "invented_people": list(invented_people(human, {f: rs[1:] for f, rs in refs.items()})),
    }
    for guidance in [None, *args.guidance]:
        records, secs = run_cli(images, guidance, args.cli_args.split())
        caps = {f: r["caption"] for f, r in records.items()}
        hit, n = recall(caps, objects)
        m = score(caps, refs)
        label = f"captioner caption{' --guidance ' + guidance if guidance else ' (defaults)'}"
        results[label] = {
            "object_recall": round(100 * hit / n, 1),
            "hits": hit,
            "pairs": n,
            "cider_d": round(m["cider"], 1),
            "meteor": round(m["meteor"] or 0, 2),
            "bleu4": round(m["bleu4"], 1),
            "invented_people": list(invented_people(caps, refs)),
            "seconds": round(secs, 1),
            "captions": {f: {"caption": r["caption"], "concepts": r.get("concepts", [])} for f, r in records.items()},
        }
    for label, r in results.items():
        print(
            f"{label:40s} recall {r['object_recall']:5.1f}% ({r['hits']}/{r['pairs']})  "
            f"CIDEr-D {r['cider_d']:5.1f}  METEOR {r['meteor']:5.2f}  "
            f"a person where none is: {r['invented_people'][0]}/{r['invented_people'][1]}"
        )
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
