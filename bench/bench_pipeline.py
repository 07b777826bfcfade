"""Batched path vs the classic per-image pipeline (tutorial-style unbatched beam search).

    .venv/bin/python bench/bench_pipeline.py [--checkpoint DIR] [--images FOLDER] [--n 64] [--beam-size 3]

The classic approach captions one image at a time: encode it alone, then a beam search that
runs the k beams of that single image, recomputes the attention projection of the grid at
every step, and keeps going until all k beams have finished. The batched path is
``Captioner.caption``'s loop on batches (one encoder pass, one beam search for all images).
The hybrid path encodes one image at a time but runs the batched beam search. Each is timed
per stage (preprocess / encoder / decoder); all use the same weights, and the script reports
how many classic and batched captions agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import LEVERS_HELP, load_captioner, machine, parse_levers, sample_photos, set_threads
from captioner.api import Captioner
from captioner.decoder import Memory, State


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
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--levers", help=LEVERS_HELP)
    args = p.parse_args()
    parse_levers(args.levers)
    set_threads(args.threads)
    cap, levers = load_captioner(args.checkpoint, args.levers, device="cpu")
    photos = sample_photos(args.images, args.n)
    max_len = int(cap.defaults["max_length"])

    k, bs = args.beam_size, args.batch_size
    cap.caption(photos[:2], beam_size=k)  # warm-up
    clock = {"pre": 0.0, "enc": 0.0, "dec": 0.0}

    def timed(stage: str, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        clock[stage] += time.perf_counter() - t
        return out

    # classic: one image at a time, encoder and tutorial-style beam search
    classic = []
    for img in photos:
        x, _ = timed("pre", cap.preprocess, img)
        grid = timed("enc", cap.encode, x[None])  # (1, L, D)
        classic.append(timed("dec", classic_beam_search, cap, grid, k, max_len))
    t_classic = dict(clock)

    # batched: Captioner.caption's own loop (one encoder pass + one beam search per batch), stage by stage
    clock.update(pre=0.0, enc=0.0, dec=0.0)
    batched = []
    for i in range(0, len(photos), bs):
        x = torch.stack([timed("pre", cap.preprocess, img)[0] for img in photos[i : i + bs]])  # (b, 3, S, S)
        batched += timed("dec", cap.decode, timed("enc", cap.encode, x), beam_size=k)
    t_batched = dict(clock)

    # hybrid: the encoder one image at a time, the beam search batched
    # (for CPUs, where a big encoder batch is slower per image)
    clock.update(pre=0.0, enc=0.0, dec=0.0)
    for i in range(0, len(photos), bs):
        xs = [timed("pre", cap.preprocess, img)[0] for img in photos[i : i + bs]]
        grids = torch.cat([timed("enc", cap.encode, x[None]) for x in xs])  # (b, L, D)
        timed("dec", cap.decode, grids, beam_size=k)
    t_hybrid = dict(clock)

    n = len(photos)

    def summary(t: dict[str, float]) -> dict[str, float]:
        return {
            "images_per_s": round(n / sum(t.values()), 2),
            **{f"{s}_ms_per_image": round(v * 1e3 / n, 1) for s, v in t.items()},
        }

    same = sum(" ".join(cap.vocab.itos[i] for i in c) == b.text for c, b in zip(classic, batched))
    print(
        json.dumps(
            {
                "images": n,
                "beam_size": k,
                "batch_size": bs,
                "classic": summary(t_classic),
                "batched": summary(t_batched),
                "hybrid": summary(t_hybrid),
                "speedup": round(sum(t_classic.values()) / sum(t_batched.values()), 2),
                "decoder_speedup": round(t_classic["dec"] / t_batched["dec"], 2),
                "encoder_speedup": round(t_classic["enc"] / t_batched["enc"], 2),
                "hybrid_speedup": round(sum(t_classic.values()) / sum(t_hybrid.values()), 2),
                "identical_captions": f"{same}/{n} (the classic search has no repeat blocking)",
                "model": cap.name,
                "levers": levers,
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
