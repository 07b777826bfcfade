"""The decoder alone: ``Captioner.decode`` on annotation grids computed once, per batch size and guidance.

    .venv/bin/python bench/bench_beam.py --data ../shared/data/flickr8k --n 64 --rounds 5 [--profile] \\
        [--captions before.jsonl] [--compare before.jsonl]

The first ``--n`` Flickr8k dev photos are encoded once (the shipped runtime, batches of 8); then each
round times ``decode`` (beam 3, the checkpoint's defaults) over all of them at every ``--batch`` size,
with concept guidance (the default: ``constrained_beam_search`` for images with confident concepts) and
without (``guidance="none"``). Reported per setting: the median ms/image over the rounds, decoder steps
per batch and the rows (beams) each step runs. ``--profile`` adds torch.profiler's top operators for one
pass at each setting. ``--captions`` writes every caption (text, score, per-word log-probs, a hash of the
attention grids) as JSONL; ``--compare`` diffs them against such a file, which is how a speed-up is
checked not to change any caption. To A/B two trees, run this script alternately from each (it imports
the ``captioner`` next to it). JSON to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from captioner.api import Captioner

GUIDANCE = ("concepts", "none")


def encode(cap: Captioner, data: Path, n: int) -> tuple[list[str], torch.Tensor, list]:
    """The first ``n`` dev photos -> names, annotations (n, L, D) and concepts, in batches of 8."""
    names = [line.strip() for line in (data / "Flickr_8k.devImages.txt").read_text().splitlines() if line.strip()][:n]
    grids, concepts = [], []
    for i in range(0, n, 8):
        batch = torch.stack([cap.preprocess(data / "images" / name)[0] for name in names[i : i + 8]])
        annotations, found = cap.see(batch)  # (b, L, D), b concept lists
        grids.append(annotations)
        concepts += found or [[] for _ in range(len(batch))]
    return names, torch.cat(grids), concepts


class StepCounter:
    """Wraps ``decoder.step`` to count the steps and the rows they run."""

    def __init__(self, cap: Captioner) -> None:
        self.steps = self.rows = 0
        inner = cap.decoder.step

        def step(prev: torch.Tensor, *args: object) -> object:
            self.steps += 1
            self.rows += prev.shape[0]
            return inner(prev, *args)

        cap.decoder.step = step  # type: ignore[method-assign]


def decode_all(cap: Captioner, grids: torch.Tensor, concepts: list, batch: int, guidance: str) -> list:
    captions = []
    for i in range(0, len(grids), batch):
        captions += cap.decode(grids[i : i + batch], beam_size=3, concepts=concepts[i : i + batch], guidance=guidance)
    return captions


def records(names: list[str], captions: list, batch: int, guidance: str) -> list[dict]:
    return [
        {
            "batch": batch,
            "guidance": guidance,
            "name": name,
            "text": c.text,
            "score": c.score,
            "logprobs": c.logprobs,
            "attention_sha1": hashlib.sha1(c.attention.tobytes()).hexdigest(),
        }
        for name, c in zip(names, captions)
    ]


def compare(mine: list[dict], theirs: list[dict]) -> dict:
    """How many captions differ from a saved run, in text and in any number."""
    keyed = {(r["batch"], r["guidance"], r["name"]): r for r in theirs}
    out = {"compared": 0, "text_differs": 0, "numbers_differ": 0, "examples": []}
    for r in mine:
        other = keyed.get((r["batch"], r["guidance"], r["name"]))
        if other is None:
            continue
        out["compared"] += 1
        if r["text"] != other["text"]:
            out["text_differs"] += 1
            out["examples"].append([r["name"], r["guidance"], r["batch"], other["text"], r["text"]])
        elif any(r[k] != other[k] for k in ("score", "logprobs", "attention_sha1")):
            out["numbers_differ"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--n", type=int, default=64, help="dev photos")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 suffers least under load)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's top operators per setting")
    parser.add_argument("--captions", type=Path, help="write every caption here (JSONL)")
    parser.add_argument("--compare", type=Path, help="diff the captions against this JSONL")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cap = Captioner.load(device="cpu")
    names, grids, concepts = encode(cap, args.data, args.n)
    counter = StepCounter(cap)
    settings = [(b, g) for b in args.batch for g in GUIDANCE]
    out: dict = {"runtime": cap.runtime, "threads": torch.get_num_threads(), "n": len(names), "load1": []}
    rows: list[dict] = []
    for b, g in settings:  # warm-up, and the captions
        rows += records(names, decode_all(cap, grids, concepts, b, g), b, g)
    times: dict = {s: [] for s in settings}
    counts: dict = {}
    for r in range(args.rounds):
        out["load1"].append(round(os.getloadavg()[0], 2))
        for s in settings:
            counter.steps = counter.rows = 0
            t0 = time.perf_counter()
            decode_all(cap, grids, concepts, *s)
            times[s].append((time.perf_counter() - t0) / len(names) * 1000.0)
            counts[s] = (counter.steps, counter.rows)
        print(f"round {r + 1}: " + ", ".join(f"b{b} {g} {times[(b, g)][-1]:.1f}" for b, g in settings), file=sys.stderr)
    out["load1"].append(round(os.getloadavg()[0], 2))
    out["settings"] = [
        {
            "batch": b,
            "guidance": g,
            "ms_per_image": round(statistics.median(times[(b, g)]), 2),
            "rounds_ms": [round(t, 2) for t in times[(b, g)]],
            "steps_per_batch": round(counts[(b, g)][0] / -(-len(names) // b), 2),
            "rows_per_step": round(counts[(b, g)][1] / max(1, counts[(b, g)][0]), 2),
        }
        for b, g in settings
    ]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        out["profile"] = {}
        for b, g in settings:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                decode_all(cap, grids, concepts, b, g)
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
            out["profile"][f"b{b}_{g}"] = [
                {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in top
            ]
    if args.captions:
        args.captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.compare:
        out["compare"] = compare(rows, [json.loads(line) for line in args.compare.read_text().splitlines()])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
