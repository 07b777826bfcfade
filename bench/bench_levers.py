"""CPU speed levers for inference, each measured against the unchanged model.

    .venv/bin/python bench/bench_levers.py [--checkpoint DIR] [--images DIR] [--n N] [--only threads,draft,encoder,int8]
    .venv/bin/python bench/bench_levers.py --checkpoint runs/demo/best --n 4 --repeats 2   # smoke run

Sections (all print one JSON line each, then one JSON summary):

* ``threads``: encoder forward (batch 1 and 8) and beam-3 decode (batch 1 and 8) at 1 and 2
  torch threads.
* ``draft``: whether JPEG draft-mode decoding (``load_image(..., draft_size=S)``) triggers, by
  input size, and decode + preprocess time with and without it (plus the tensor difference).
* ``encoder``: encoder forward time per image at batch 1, 2, 4, 8 and 16 for the baseline, BatchNorm folded
  into the convs (``captioner.perf.fold_batchnorm``), channels-last, both, a TorchScript
  ``optimize_for_inference`` trace, and ``torch.compile`` (only with ``--compile``: it takes
  minutes to compile on 2 cores). Each with its largest absolute output difference from the baseline.
* ``int8``: the decoder with dynamic int8 Linear/LSTMCell weights (``captioner.perf.quantize_decoder``):
  beam-3 decode time at batch 1 and 16 and caption agreement with fp32 on ``--n`` photos.
* ``int8_quality`` (only when asked, with ``--data-dir``): BLEU-4 / CIDEr-D / ROUGE-L of the fp32 and
  int8 decoders on a Flickr8k split (beam 3), decoded from that split's existing feature cache.

Times are milliseconds over ``--repeats`` runs after one warm-up, the variants of a comparison
interleaved round-robin; ``min`` (best of N) is robust to other load on a shared machine, ``median`` is shown too.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import jpeg_bytes, machine, sample_photos
from captioner import perf
from captioner.api import Captioner
from captioner.images import load_image, preprocess


def race(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Time each function ``repeats`` times, round-robin (so background load hits all alike), after a warm-up.

    Returns ms per call: ``min`` (best of N: the least disturbed run) and ``median``.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"min": round(min(t), 1), "median": round(statistics.median(t), 1)} for name, t in times.items()}


def emit(name: str, data: dict) -> dict:
    print(json.dumps({name: data}), file=sys.stderr, flush=True)
    return data


def with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def bench_threads(cap: Captioner, x: torch.Tensor, repeats: int) -> dict:
    """x (16, 3, S, S) preprocessed photos; batch 8 = the first 8."""
    grid1, grid8 = cap.encode(x[:1]), cap.encode(x[:8])
    ops = {
        "encode_b1": lambda: cap.encode(x[:1]),
        "encode_b8": lambda: cap.encode(x[:8]),
        "decode_beam3_b1": lambda: cap.decode(grid1, beam_size=3),
        "decode_beam3_b8": lambda: cap.decode(grid8, beam_size=3),
    }
    fns = {f"{op}@{n}": with_threads(n, fn) for op, fn in ops.items() for n in (1, 2)}
    return race(fns, repeats)


def bench_draft(cap: Captioner, photos: list, repeats: int) -> dict:
    size, norm = cap.encoder_cfg.image_size, cap.encoder_cfg.norm
    out = {}
    base = photos[0]
    for w in (500, 1024, 2048, 4032):
        h = w * 3 // 4
        data = jpeg_bytes(base.resize((w, h)), quality=90)
        drafted = load_image(data, draft_size=size)
        full = load_image(data)
        diff = (preprocess(drafted, size, norm) - preprocess(full, size, norm)).abs().max().item()
        times = race(
            {
                "with_draft": lambda data=data: preprocess(load_image(data, draft_size=size), size, norm),
                "without_draft": lambda data=data: preprocess(load_image(data), size, norm),
            },
            repeats,
        )
        out[f"{w}x{h}"] = {
            "decoded_as": list(drafted.size),
            "draft_triggers": drafted.size != (w, h),
            "with_draft_ms": times["with_draft"],
            "without_draft_ms": times["without_draft"],
            "max_abs_tensor_diff": round(diff, 3),
        }
    return out


def bench_encoder(cap: Captioner, x: torch.Tensor, repeats: int, try_compile: bool) -> dict:
    base_enc = getattr(cap.encoder, "encoder", cap.encoder)  # the caption encoder without the ImageNet head (concepts)
    with torch.inference_mode():
        ref = base_enc(x)  # (16, L, D)

    def variant(fold: bool, nhwc: bool) -> torch.nn.Module:
        enc = copy.deepcopy(base_enc)
        if fold:
            perf.fold_batchnorm(enc)
        if nhwc:
            perf.use_channels_last(enc)
        return enc.eval()

    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "baseline": base_enc,
        "fold_bn": variant(True, False),
        "channels_last": variant(False, True),
        "fold_bn+channels_last": variant(True, True),
    }
    out: dict = {}
    try:
        with torch.no_grad():
            traced = torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(base_enc).eval(), x[:1]))
        encoders["torchscript_optimize_for_inference"] = traced
    except Exception as exc:  # noqa: BLE001 - report and go on
        out["torchscript_optimize_for_inference"] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if try_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(base_enc).eval())
        with torch.inference_mode():
            compiled(x[:1])
            compiled(x)
        out["compile_seconds_b1_b8"] = round(time.perf_counter() - t0, 1)
        encoders["torch_compile"] = compiled
    with torch.inference_mode():
        for name, enc in encoders.items():
            out[name] = {"max_abs_diff": round((enc(x) - ref).abs().max().item(), 5), "per_image_ms": {}}
        for b in (1, 2, 4, 8, 16):
            times = race({name: (lambda enc=enc, b=b: enc(x[:b])) for name, enc in encoders.items()}, repeats)
            for name, t in times.items():
                out[name]["per_image_ms"][f"b{b}"] = {k: round(v / b, 1) for k, v in t.items()}
    for name in encoders:
        emit("encoder." + name, out[name])
    return out


def bench_int8(cap: Captioner, photos: list, repeats: int) -> dict:
    tensors = torch.stack([cap.preprocess(p)[0] for p in photos])  # (n, 3, S, S)
    grids = torch.cat([cap.encode(tensors[i : i + 16]) for i in range(0, len(tensors), 16)])  # (n, L, D)
    fp32 = cap.decoder
    int8 = perf.quantize_decoder(fp32).eval()
    out, texts = {}, {}

    def decode_with(dec: torch.nn.Module, g: torch.Tensor) -> list:
        cap.decoder = dec
        try:
            return cap.decode(g, beam_size=3)
        finally:
            cap.decoder = fp32

    for name, dec in (("fp32", fp32), ("int8", int8)):
        texts[name] = [c.text for i in range(0, len(grids), 16) for c in decode_with(dec, grids[i : i + 16])]
    b1 = race(
        {name: (lambda d=dec: decode_with(d, grids[:1])) for name, dec in (("fp32", fp32), ("int8", int8))}, repeats
    )
    b16 = race(
        {name: (lambda d=dec: decode_with(d, grids[:16])) for name, dec in (("fp32", fp32), ("int8", int8))},
        max(2, repeats // 3),
    )
    for name in ("fp32", "int8"):
        out[name] = {
            "decode_beam3_b1_ms": b1[name],
            "decode_beam3_b16_ms_per_image": {k: round(v / 16, 1) for k, v in b16[name].items()},
        }
    cap.decoder = fp32
    same = sum(a == b for a, b in zip(texts["fp32"], texts["int8"]))
    overlap = statistics.mean(
        len(set(a.split()) & set(b.split())) / max(1, len(set(a.split()) | set(b.split())))
        for a, b in zip(texts["fp32"], texts["int8"])
    )
    out["identical_captions"] = f"{same}/{len(grids)}"
    out["mean_word_jaccard"] = round(overlap, 3)
    out["examples"] = [{"fp32": a, "int8": b} for a, b in zip(texts["fp32"], texts["int8"]) if a != b][:3]
    return out


def bench_int8_quality(cap: Captioner, data_dir: str, split: str, beam: int) -> dict:
    """BLEU-4 / CIDEr-D of the fp32 and int8 decoders on a dataset split, from its complete feature cache."""
    import os

    from captioner.datasets import FeatureCache, cache_key, load_records
    from captioner.evaluate import evaluate_split
    from captioner.settings import default_cache_dir

    records = load_records("flickr8k", data_dir, split)
    paths = sorted({os.path.abspath(r.path) for r in records})
    cache = FeatureCache(default_cache_dir() / f"features-{cache_key(paths, cap.encoder_cfg)}")
    if not cache.complete():
        raise SystemExit(
            f"no complete feature cache for {split} in {cache.folder}; run 'captioner evaluate' once first"
        )
    feats, rows = cache.load()
    out = {"split": split, "images": len(records), "beam_size": beam}
    for name, dec in (("fp32", cap.decoder), ("int8", perf.quantize_decoder(cap.decoder).eval())):
        t0 = time.perf_counter()
        metrics, _ = evaluate_split(
            dec,
            feats,
            rows,
            records,
            cap.vocab,
            beam,
            int(cap.defaults["max_length"]),
            float(cap.defaults["length_alpha"]),
            meteor=False,
        )
        out[name] = {k: round(float(metrics[k]), 2) for k in ("bleu4", "cider", "rouge_l")}
        out[name]["decode_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--images", help="folder of photos (default: scikit-image samples)")
    p.add_argument("--n", type=int, default=48, help="photos for the int8 caption agreement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="threads,draft,encoder,int8")
    p.add_argument("--data-dir", help="Flickr8k folder: section int8_quality scores fp32 vs int8 captions on --split")
    p.add_argument("--split", default="dev")
    p.add_argument("--compile", action="store_true", help="also try torch.compile on the encoder (slow to compile)")
    args = p.parse_args()
    cap = Captioner.load(args.checkpoint, device="cpu", fast=False)  # each lever is measured against the fp32 model
    photos = sample_photos(args.images, max(16, args.n))
    x = torch.stack([cap.preprocess(img)[0] for img in photos[:16]])  # (16, 3, S, S)
    out: dict = {"model": cap.name, "machine": machine()}
    for section in args.only.split(","):
        if section == "threads":
            out["threads"] = emit("threads", bench_threads(cap, x, args.repeats))
        elif section == "draft":
            out["draft"] = emit("draft", bench_draft(cap, photos, args.repeats))
        elif section == "encoder":
            out["encoder"] = bench_encoder(cap, x, args.repeats, args.compile)
        elif section == "int8":
            out["int8"] = emit("int8", bench_int8(cap, photos[: args.n], args.repeats))
        elif section == "int8_quality":
            if not args.data_dir:
                p.error("int8_quality needs --data-dir")
            out["int8_quality"] = emit("int8_quality", bench_int8_quality(cap, args.data_dir, args.split, 3))
        else:
            p.error(f"unknown section {section!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
