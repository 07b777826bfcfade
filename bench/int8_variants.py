"""Which int8 settings keep the encoder's grid close to fp32: quantise an fp32 encoder.onnx several ways.

    cp -r models/flickr8k-lite2 /tmp/m-fp32 && python -m captioner.onnx_export /tmp/m-fp32   # the shipped one is int8
    .venv/bin/python bench/int8_variants.py --data ../shared/data/flickr8k --checkpoint /tmp/m-fp32 \
        --variants base,u8u8,reduce,no_dw > out.json

Each variant is one ``quantize_static`` call over the same pre-processed fp32 graph and the same 64
calibration photos as ``captioner export --precision int8`` (the first train photos). It is then run on
``--eval`` Flickr8k dev photos against the fp32 graph: mean |error| of the annotation grid (relative to
the grid's mean |value|), the top ImageNet class agreement, and ms/image at batch 8 on 2 threads.
Variants (comma-separated): ``base`` (what the export does), ``u8u8`` (uint8 weights: no u8s8 saturation),
``reduce`` (7-bit weights, ``reduce_range``), ``no_dw`` (depthwise convolutions stay fp32), ``no_first``
/ ``no_last`` (the stem and first block / last block and head stay fp32), ``block:I`` (block I stays fp32),
``sym`` (symmetric int8 activations), ``ma`` (moving-average MinMax), ``pctP`` (percentile P calibration),
``no_stem`` (the first convolution stays fp32); ``a+b`` combines two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fp32_export
from captioner.batch import ImageFiles
from captioner.checkpoint import read_config
from captioner.datasets import load_records
from captioner.encoder import EncoderConfig
from captioner.onnx_export import Reader


def photos(data: Path, split: str, n: int) -> list[Path]:
    """The first ``n`` photos of a Flickr8k split, in split-list order (the export's calibration photos for train)."""
    return [Path(r.path) for r in load_records("flickr8k", data, split, limit=n)]


def pixels(paths: list[Path], folder: Path) -> np.ndarray:
    files = ImageFiles([str(p) for p in paths], EncoderConfig(**read_config(folder)["encoder"]))
    return np.stack([files[i].image.numpy() for i in range(len(files))])  # (N, 3, S, S)


def conv_nodes(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(name, group) of every Conv, in graph order."""
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out.append((node.name, group))
    return out


def variant_kwargs(name: str, convs: list[tuple[str, int]]) -> dict:
    """``quantize_static`` arguments of one variant; ``a+b`` merges a's and b's."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    if "+" in name:
        merged: dict = {"nodes_to_exclude": [], "extra_options": {}}
        for part in name.split("+"):
            kw = variant_kwargs(part, convs)
            merged["nodes_to_exclude"] += kw.pop("nodes_to_exclude", [])
            merged["extra_options"] |= kw.pop("extra_options", {})
            merged |= kw
        return merged
    names = [n for n, _ in convs]
    dw = [i for i, (_, g) in enumerate(convs) if g > 1]  # a depthwise conv is each MBConv block's middle
    if name.startswith("block:"):
        i = int(name.split(":")[1])
        start = dw[i] - 1 if i > 0 else 0
        end = dw[i + 1] - 1 if i + 1 < len(dw) else len(names)
        return {"nodes_to_exclude": names[start:end]}
    if name.startswith("pct"):
        return {"calibrate_method": CalibrationMethod.Percentile, "extra_options": {"CalibPercentile": float(name[3:])}}
    fixed = {
        "base": {},
        "u8u8": {"weight_type": QuantType.QUInt8},
        "reduce": {"reduce_range": True},
        "sym": {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}},
        "ma": {"extra_options": {"CalibMovingAverage": True}},
        "no_stem": {"nodes_to_exclude": names[:1]},
        "no_dw": {"nodes_to_exclude": [names[i] for i in dw]},
        "no_first": {"nodes_to_exclude": names[: dw[1] - 1]},
        "no_last": {"nodes_to_exclude": names[dw[-1] - 1 :]},
    }
    if name not in fixed:
        raise SystemExit(f"unknown variant {name}")
    return fixed[name]


def run(path: Path, x: np.ndarray, rounds: int = 3) -> tuple[list[np.ndarray], float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {"images": x[i : i + 8]}) for i in range(0, len(x), 8)]
    merged = [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, len(x), 8):
            sess.run(None, {"images": x[i : i + 8]})
        best = min(best, (time.perf_counter() - t0) / len(x) * 1000)
    return merged, best


def main() -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--checkpoint", help="model folder with an fp32 encoder.onnx (default: shipped, if it has one)")
    ap.add_argument("--variants", default="base,u8u8,reduce,no_dw")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--keep", help="folder to keep the quantised files in")
    args = ap.parse_args()
    folder = fp32_export(args.checkpoint)
    data = Path(args.data)
    calib = pixels(photos(data, "train", args.calib), folder)
    x = pixels(photos(data, "dev", args.eval), folder)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="int8v_"))
    tmp.mkdir(parents=True, exist_ok=True)
    pre = tmp / "pre.onnx"
    quant_pre_process(str(folder / "encoder.onnx"), str(pre), skip_symbolic_shape=True)
    convs = conv_nodes(onnx.load(str(pre)))
    ref, ref_ms = run(folder / "encoder.onnx", x)
    scale = float(np.abs(ref[0]).mean())
    result = {"fp32_ms": round(ref_ms, 2), "grid_mean_abs": round(scale, 4), "convs": len(convs), "variants": {}}
    print(json.dumps({"fp32_ms": ref_ms, "convs": len(convs)}), file=sys.stderr, flush=True)
    for name in args.variants.split(","):
        kw = variant_kwargs(name, convs)
        out = tmp / f"{name.replace(':', '_')}.onnx"
        t0 = time.perf_counter()
        quantize_static(
            str(pre),
            str(out),
            Reader([calib[i : i + 1] for i in range(len(calib))]),  # the export's reader: one photo per call
            **{
                "quant_format": QuantFormat.QDQ,
                "per_channel": True,
                "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8,
                "calibrate_method": CalibrationMethod.MinMax,
                **kw,
            },
        )
        got, ms = run(out, x)
        err = np.abs(got[0] - ref[0])
        r = {
            "excluded": len(kw.get("nodes_to_exclude", [])),
            "grid_rel_err": round(float(err.mean()) / scale, 4),
            "grid_max_err": round(float(err.max()), 3),
            "top1_agree": float((got[1].argmax(1) == ref[1].argmax(1)).mean()) if len(got) > 1 else None,
            "ms_b8": round(ms, 2),
            "speedup": round(ref_ms / ms, 2),
            "quantise_s": round(time.perf_counter() - t0, 1),
        }
        result["variants"][name] = r
        print(json.dumps({name: r}), file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
