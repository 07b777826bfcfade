"""Batched path vs the classic per-image pipeline (tutorial-style unbatched beam search).

    .venv/bin/python bench/bench_pipeline.py [--checkpoint DIR] [--images FOLDER] [--n 64] [--beam-size 3]

The classic approach captions one image at a time: encode it alone, then a beam search that
runs the k beams of that single image, recomputes the attention projection of the grid at
every step, and keeps going until all k beams have finished. The batched path is
``Captioner.caption`` on batches (one encoder pass, one beam search for all images).
Both use the same weights; the script also reports how many captions agree.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import sample_photos  # noqa: E402
from captioner.api import Captioner  # noqa: E402
from captioner.decoder import Memory, State  # noqa: E402


@torch.inference_mode()
def classic_beam_search(cap: Captioner, grid: torch.Tensor, k: int, max_len: int) -> list[int]:
    """One image (1, L, D) -> word ids, as in the widely copied tutorial implementation."""
    dec, v = cap.decoder, cap.vocab
    feats = dec.proj(grid).expand(k, -1, -1)  # (k, L, P)
    mean = feats.mean(1)
    state = State(torch.tanh(dec.init_h(mean)), torch.tanh(dec.init_c(mean)))
    prev = torch.full((k,), v.start_id, dtype=torch.long)
    seqs = prev.unsqueeze(1)  # (k, 1)
    top = torch.zeros(k, 1)
    done_seqs, done_scores = [], []
    for step in range(max_len):
        memory = Memory(feats, dec.attention.project(feats))  # recomputed every step, as the tutorial does
        pre, state, _ = dec.advance(prev, state, memory)
        logp = torch.log_softmax(dec.out(pre), -1)  # (k, V)
        scores = top + logp
        flat = scores[0] if step == 0 else scores.view(-1)  # all beams are identical at the first step
        best, idx = flat.topk(k)
        origin, word = idx // logp.shape[1], idx % logp.shape[1]
        seqs = torch.cat([seqs[origin], word.unsqueeze(1)], 1)
        ended = word == v.end_id
        for j in ended.nonzero().flatten().tolist():
            done_seqs.append(seqs[j].tolist())
            done_scores.append(float(best[j]))
        keep = (~ended).nonzero().flatten()
        k = len(keep)
        if k == 0:
            break
        seqs, top, prev = seqs[keep], best[keep].unsqueeze(1), word[keep]
        state = state.index_select(origin[keep])
        feats = feats[:k]
    if not done_seqs:
        done_seqs, done_scores = [seqs[0].tolist()], [0.0]
    best_seq = done_seqs[max(range(len(done_scores)), key=done_scores.__getitem__)]
    return [i for i in best_seq if i not in (v.start_id, v.end_id)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--images")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    cap = Captioner.load(args.checkpoint, device="cpu")
    photos = sample_photos(args.images, args.n)
    max_len = int(cap.defaults["max_length"])

    cap.caption(photos[:2], beam_size=args.beam_size)  # warm-up
    t0 = time.perf_counter()
    classic = []
    for img in photos:
        x, _ = cap.preprocess(img)
        classic.append(classic_beam_search(cap, cap.encode(x[None]), args.beam_size, max_len))
    t_classic = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched = cap.caption(photos, beam_size=args.beam_size, batch_size=args.batch_size)
    t_batched = time.perf_counter() - t0
    same = sum(" ".join(cap.vocab.itos[i] for i in c) == b.text for c, b in zip(classic, batched))
    print(json.dumps({
        "images": len(photos), "beam_size": args.beam_size, "batch_size": args.batch_size,
        "classic_images_per_s": round(len(photos) / t_classic, 2),
        "batched_images_per_s": round(len(photos) / t_batched, 2),
        "speedup": round(t_classic / t_batched, 2),
        "identical_captions": f"{same}/{len(photos)} (the classic search has no repeat blocking)",
    }))


if __name__ == "__main__":
    main()
