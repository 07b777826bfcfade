"""The shipped encoder on other CPU runtimes: speed, feature fidelity, batch invariance, captions.

    .venv/bin/python bench/bench_runtimes.py --images ../shared/data/flickr8k/images \
        --data ../shared/data/flickr8k --rounds 3 --captions 200

Optional packages (skipped when missing; measured with these versions, the pins to recommend):
``openvino==2026.4.1`` (59.1 MB wheel), ``nncf==3.4.0`` (0.8 MB; int8 post-training quantisation for
OpenVINO, pulls scikit-learn), ``onnxruntime==1.32.0`` (27.8 MB), ``onnx==1.23.2`` (8.9 MB; export and
ORT's quantiser). Nothing here changes the library: the encoder comes from ``Captioner.load``.

Variants (all on ``--threads`` threads, default 2):
- ``torch_fast``: ``Captioner.load()``'s encoder as shipped (folded BN, channels-last, chunks of 2);
- ``ov_fp32`` / ``ov_int8``: OpenVINO on the exported ONNX, int8 by NNCF post-training quantisation;
- ``ort_fp32`` / ``ort_int8``: ONNX Runtime, int8 = static QDQ (per-channel weights, ``quantize_static``);
- ``ort_int8_fp32head``: the same int8 model with the head's 1×1 conv (the last Conv) kept in fp32;
- ``torch_ao_int8``: torch.ao FX static int8, x86 backend (skipped when the model does not trace).

Calibration uses ``--calib`` Flickr8k *train* photos; timing and fidelity use test photos; captions
use the first ``--captions`` dev photos. Timing runs the variants round-robin, ``--rounds`` times; the
speed-up of each variant is its ms/image against ``torch_fast`` in the same round. JSON to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine
from captioner.api import Captioner
from captioner.perf import fold_batchnorm

Run = Callable[[np.ndarray], np.ndarray]  # images (B, 3, S, S) -> annotations (B, L, D)


def split_names(data: Path, split: str) -> list[str]:
    return (data / f"Flickr_8k.{split}Images.txt").read_text().split()


def preprocessed(cap: Captioner, folder: Path, names: list[str]) -> np.ndarray:
    """The photos through the library's one preprocessing function -> (N, 3, S, S) float32."""
    return torch.stack([cap.preprocess(folder / n)[0] for n in names]).numpy()


def export_onnx(cap_exact: Captioner, path: Path) -> None:
    """The exact encoder with batch norms folded, batch axis dynamic, to ONNX (TorchScript exporter)."""
    enc = copy.deepcopy(cap_exact.encoder).eval()
    fold_batchnorm(enc)
    s = enc.config.image_size
    torch.onnx.export(
        enc,
        (torch.zeros(1, 3, s, s),),
        str(path),
        input_names=["images"],
        output_names=["annotations"],
        dynamic_axes={"images": {0: "batch"}, "annotations": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def ort_session(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[0]


def last_conv(onnx_path: Path) -> str:
    """Name of the graph's last Conv node (the head's 1×1 conv, whose output is the annotation grid)."""
    import onnx

    return [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Conv"][-1]


def ort_int8(fp32: Path, out: Path, calib: np.ndarray, exclude: list[str]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
    )
    return out


def ov_compiled(model: object, threads: int) -> Run:
    import openvino as ov

    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"},
    )
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def ov_int8(onnx_path: Path, calib: np.ndarray) -> object:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars; stdout is for the JSON
        return nncf.quantize(model, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]), subset_size=len(calib))


def torch_ao_int8(cap_exact: Captioner, calib: np.ndarray) -> Run:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    enc = copy.deepcopy(cap_exact.encoder).eval()
    example = (torch.from_numpy(calib[:1]),)
    prepared = prepare_fx(enc, get_default_qconfig_mapping("x86"), example)
    with torch.inference_mode():
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i : i + 1]))
    model = convert_fx(prepared).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def torch_run(cap: Captioner) -> Run:
    return lambda x: cap.encode(torch.from_numpy(x)).numpy()


def build(
    args: argparse.Namespace, cap: Captioner, cap_exact: Captioner, calib: np.ndarray, tmp: Path
) -> tuple[dict[str, Run], dict]:
    """Every variant that builds here -> ({name: run}, {name: build seconds or the error})."""
    runs: dict[str, Run] = {"torch_fast": torch_run(cap)}
    info: dict = {}
    onnx_path = tmp / "encoder.onnx"

    def attempt(name: str, make: Callable[[], Run | None]) -> None:
        t0 = time.perf_counter()
        try:
            run = make()
            if run is not None:
                runs[name] = run
            info[name] = {"build_s": round(time.perf_counter() - t0, 1)}
        except Exception as exc:  # noqa: BLE001  a runtime that cannot take this model is a finding, not a crash
            info[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"built {name}: {info[name]}", file=sys.stderr, flush=True)

    attempt("onnx_export", lambda: export_onnx(cap_exact, onnx_path))
    if onnx_path.is_file():
        attempt("ort_fp32", lambda: ort_session(onnx_path, args.threads))
        head = [last_conv(onnx_path)]
        attempt(
            "ort_int8", lambda: ort_session(ort_int8(onnx_path, tmp / "encoder_int8.onnx", calib, []), args.threads)
        )
        attempt(
            "ort_int8_fp32head",
            lambda: ort_session(ort_int8(onnx_path, tmp / "encoder_int8h.onnx", calib, head), args.threads),
        )
        attempt("ov_fp32", lambda: ov_compiled(str(onnx_path), args.threads))
        attempt("ov_int8", lambda: ov_compiled(ov_int8(onnx_path, calib), args.threads))
    if args.torch_ao:
        attempt("torch_ao_int8", lambda: torch_ao_int8(cap_exact, calib))
    return runs, info


def fidelity(runs: dict[str, Run], exact: Run, images: np.ndarray) -> dict[str, dict]:
    """Each variant's annotation grid against the exact fp32 encoder, and alone vs in a batch of 8."""
    ref = exact(images)
    out = {}
    for name, run in runs.items():
        batched = run(images)
        alone = np.concatenate([run(images[i : i + 1]) for i in range(len(images))])
        diff = np.abs(batched - ref)
        out[name] = {
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "ref_mean_abs": float(np.abs(ref).mean()),
            "batch_vs_alone_max_abs": float(np.abs(batched - alone).max()),
        }
    return out


def timing(runs: dict[str, Run], images: np.ndarray, rounds: int, batch: int) -> dict[str, dict]:
    """ms/image of each variant at ``batch``, round-robin; ratios against torch_fast within each round."""
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    for run in runs.values():  # warm-up: first calls allocate and pick kernels
        run(batches[0])
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        ms = {}
        for name, run in runs.items():
            t0 = time.perf_counter()
            for b in batches:
                run(b)
            ms[name] = 1000 * (time.perf_counter() - t0) / (len(batches) * batch)
        per_round.append(ms)
    return {
        name: {
            "ms_per_image": [round(r[name], 1) for r in per_round],
            "median_ms": round(statistics.median(r[name] for r in per_round), 1),
            "speedup_vs_torch_fast": round(statistics.median(r["torch_fast"] / r[name] for r in per_round), 2),
        }
        for name in runs
    }


def captions(
    args: argparse.Namespace, cap: Captioner, cap_exact: Captioner, runs: dict[str, Run], names: list[str]
) -> dict:
    """Captions of dev photos: exact model, shipped model, and the shipped decoder on each candidate's grids."""
    from captioner.metrics import score

    refs: dict[str, list[str]] = {}
    for line in (Path(args.data) / "Flickr8k.token.txt").read_text().splitlines():
        key, _, text = line.partition("\t")
        refs.setdefault(key.split("#")[0], []).append(text)
    images = preprocessed(cap, Path(args.images), names)
    systems: dict[str, list[str]] = {}
    for i in range(0, len(images), 16):
        chunk = images[i : i + 16]
        systems.setdefault("exact", []).extend(
            c.text for c in cap_exact.decode(cap_exact.encode(torch.from_numpy(chunk)))
        )
        for name in args.caption_variants:
            if name in runs:
                grids = torch.from_numpy(np.ascontiguousarray(runs[name](chunk)))
                systems.setdefault(name, []).extend(c.text for c in cap.decode(grids))
    out = {}
    for name, texts in systems.items():
        s = score(dict(zip(names, texts)), {n: refs[n] for n in names})
        out[name] = {
            "bleu4": round(s["bleu4"], 2),
            "meteor": None if s["meteor"] is None else round(s["meteor"], 2),
            "cider": round(s["cider"], 2),
            "changed_vs_torch_fast": sum(a != b for a, b in zip(texts, systems.get("torch_fast", texts))),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--data", required=True, help="Flickr8k folder with the split lists and Flickr8k.token.txt")
    ap.add_argument("--checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=16, help="test photos for timing and fidelity")
    ap.add_argument("--calib", type=int, default=64, help="train photos for int8 calibration")
    ap.add_argument("--captions", type=int, default=0, help="dev photos to caption (0: skip)")
    ap.add_argument("--caption-variants", default="torch_fast,ort_int8,ort_int8_fp32head,ov_int8")
    ap.add_argument("--torch-ao", action="store_true", help="also try torch.ao FX static int8 (x86)")
    args = ap.parse_args()
    args.caption_variants = args.caption_variants.split(",")
    torch.set_num_threads(args.threads)
    cap = Captioner.load(args.checkpoint, device="cpu")
    cap_exact = Captioner.load(args.checkpoint, device="cpu", fast=False)
    folder, data = Path(args.images), Path(args.data)
    calib = preprocessed(cap, folder, split_names(data, "train")[: args.calib])
    images = preprocessed(cap, folder, split_names(data, "test")[: args.n])
    result: dict = {
        "bench": "runtimes",
        "machine": machine(),
        "threads": args.threads,
        "load1_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs, result["build"] = build(args, cap, cap_exact, calib, Path(tmp))
        result["onnx_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in Path(tmp).glob("*.onnx")}
        result["fidelity"] = fidelity(runs, torch_run(cap_exact), images[:8])
        print(json.dumps(result["fidelity"]), file=sys.stderr, flush=True)
        result["batch1"] = timing(runs, images, args.rounds, 1)
        print(json.dumps(result["batch1"]), file=sys.stderr, flush=True)
        result["batch8"] = timing(runs, images, args.rounds, 8)
        print(json.dumps(result["batch8"]), file=sys.stderr, flush=True)
        result["load1_end"] = os.getloadavg()[0]
        if args.captions:
            result["captions"] = captions(args, cap, cap_exact, runs, split_names(data, "dev")[: args.captions])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
