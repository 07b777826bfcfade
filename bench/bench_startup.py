"""Where `captioner caption one.jpg` spends its time before the first caption, and what would cut it.

    .venv/bin/python bench/bench_startup.py --image ../shared/data/flickr8k/images/3385593926_d3e9c21170.jpg --rounds 3

Each measurement runs in a fresh process, round-robin over ``--rounds`` rounds (medians in seconds):

- ``python``: the bare interpreter; ``import_*``: one import each (torch, numpy+PIL, the captioner CLI,
  onnxruntime, openvino: what a torch-free encoder path would import instead);
- ``cli_workers1`` / ``cli_workers0``: the whole ``captioner caption -q one.jpg`` (default: one decoding
  worker process; ``--workers 0``: none);
- ``stages``: one process timing, in order, ``import torch``, ``import captioner.api``, ``Captioner.load``
  (with its parts from cProfile: the ImageNet ``.pth`` load, the checkpoint read, batch-norm folding,
  decoder quantisation) and the first ``caption()``; plus two scratch experiments on the side that
  leave the library untouched: building the encoder from one safetensors file of its (already folded)
  weights instead of the packaged ImageNet ``.pth`` + checkpoint, and ``Captioner.load(fast=False)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STAGES = r"""
import cProfile, json, pstats, sys, tempfile, time
t0 = time.perf_counter(); out = {}
import torch
out["import_torch"] = time.perf_counter() - t0; t = time.perf_counter()
from captioner.api import Captioner
from captioner import checkpoint, perf
from captioner.encoder import Encoder
out["import_captioner_api"] = time.perf_counter() - t; t = time.perf_counter()
prof = cProfile.Profile(); prof.enable()
cap = Captioner.load(device="cpu", runtime="torch")  # the torch path these stages take apart (bench_issue19.py: both)
prof.disable()
out["load"] = time.perf_counter() - t; t = time.perf_counter()
cap.caption(sys.argv[1])
out["first_caption"] = time.perf_counter() - t; t = time.perf_counter()
cap.caption(sys.argv[1])
out["second_caption"] = time.perf_counter() - t
stats = pstats.Stats(prof).stats
def cum(name, file=""):
    return sum(v[3] for k, v in stats.items() if k[2] == name and file in k[0])
out["load_parts"] = {"torch.load (ImageNet .pth)": cum("load", "torch/serialization"),
                     "EfficientNet.from_name": cum("from_name"), "read_weights (safetensors)": cum("read_weights"),
                     "fold_batchnorm": cum("fold_batchnorm"), "quantize_decoder": cum("quantize_decoder")}
# scratch experiment: the encoder from one safetensors file of its final (folded) weights
from safetensors.torch import load_file, save_file
with tempfile.TemporaryDirectory() as tmp:
    enc = cap.encoder.inner
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, f"{tmp}/enc.safetensors")
    t = time.perf_counter()
    fresh = Encoder(enc.config, pretrained=False)
    perf.fold_batchnorm(fresh)
    fresh.load_state_dict(load_file(f"{tmp}/enc.safetensors"))
    out["exp_encoder_from_safetensors"] = time.perf_counter() - t
t = time.perf_counter(); Encoder(enc.config, pretrained=True)
out["exp_encoder_pretrained_pth"] = time.perf_counter() - t
t = time.perf_counter(); Captioner.load(device="cpu", fast=False)
out["exp_load_exact"] = time.perf_counter() - t
print(json.dumps(out))
"""


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    py, cli = sys.executable, str(Path(sys.executable).parent / "captioner")
    commands = {
        "python": [py, "-c", "pass"],
        "import_torch": [py, "-c", "import torch"],
        "import_numpy_pil": [py, "-c", "import numpy, PIL.Image"],
        "import_captioner_cli": [py, "-c", "import captioner.commands.main"],
        "import_onnxruntime": [py, "-c", "import onnxruntime"],
        "import_openvino": [py, "-c", "import openvino"],
        "cli_workers1": [cli, "caption", "-q", args.image],
        "cli_workers0": [cli, "caption", "-q", "--workers", "0", args.image],
    }
    walls: dict[str, list[float]] = {k: [] for k in commands}
    stages: list[dict] = []
    loads = []
    for _ in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for name, cmd in commands.items():
            try:
                walls[name].append(timed(cmd))
            except subprocess.CalledProcessError:
                walls[name].append(float("nan"))  # e.g. the optional runtime is not installed
        run = subprocess.run([py, "-c", STAGES, args.image], check=True, capture_output=True, text=True, cwd=ROOT)
        stages.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(
            json.dumps({"walls": {k: round(v[-1], 2) for k, v in walls.items()}, "stages": stages[-1]}), file=sys.stderr
        )

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    flat = [k for k in stages[0] if k != "load_parts"]
    result = {
        "bench": "startup",
        "load1_per_round": loads,
        "walls_s": {k: med(v) for k, v in walls.items()},
        "stages_s": {k: med([s[k] for s in stages]) for k in flat},
        "load_parts_s": {k: med([s["load_parts"][k] for s in stages]) for k in stages[0]["load_parts"]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
