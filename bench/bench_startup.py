"""Where `captioner caption one.jpg` spends its time before the first caption, and what would cut it.

    .venv/bin/python bench/bench_startup.py --image ../shared/data/flickr8k/images/3385593926_d3e9c21170.jpg --rounds 5
    CAPTIONER_MODEL=/tmp/m8 .venv/bin/python bench/bench_startup.py --image ... --rounds 5   # another export (int8)

Each measurement runs in a fresh process, round-robin over ``--rounds`` rounds (medians in seconds):

- ``python``: the bare interpreter; ``import_*``: one import each (torch, numpy+PIL, the captioner CLI,
  onnxruntime, openvino);
- ``cli``: the whole ``captioner caption -q one.jpg`` as shipped (the ONNX Runtime encoder when the model
  has a fresh export; the exit's final garbage collection skipped), ``cli_workers0`` the same with
  ``--workers 0``, ``cli_torch`` with ``CAPTIONER_RUNTIME=torch``;
- ``cli_no_freeze``: the same CLI with the frozen exit turned off from a wrapper (the start before round 3);
- ``stages_onnx``: one process timing, in order, ``import torch``, ``import captioner.api``,
  ``Captioner.load`` and the first ``caption()`` on the ONNX path;
- ``prefetch_seq`` / ``prefetch_thread`` (a scratch experiment, library untouched): ``import torch`` then an
  ONNX Runtime session on the model's exported encoder, against the session built in a thread while torch
  imports (wall of both, and each part);
- with ``--torch-stages``: ``stages``, the same for the torch path with the load's parts from cProfile
  (the ImageNet ``.pth`` load, the checkpoint read, batch-norm folding, decoder quantisation), plus two
  scratch experiments: the encoder from one safetensors file of its folded weights, and ``fast=False``.
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


STAGES_ONNX = r"""
import json, sys, time
t0 = time.perf_counter(); out = {}
import torch
out["import_torch"] = time.perf_counter() - t0; t = time.perf_counter()
from captioner.api import Captioner
out["import_captioner_api"] = time.perf_counter() - t; t = time.perf_counter()
cap = Captioner.load(device="cpu")
out["load"] = time.perf_counter() - t; t = time.perf_counter()
cap.caption(sys.argv[1])
out["first_caption"] = time.perf_counter() - t
out["total"] = time.perf_counter() - t0; out["runtime"] = cap.runtime
print(json.dumps(out))
"""

#: Scratch: ``import torch`` and an ONNX Runtime session on the model's exported encoder, one after the
#: other (argv[1] "seq") or the session in a thread while torch imports ("thread").
PREFETCH = r"""
import json, sys, threading, time
t0 = time.perf_counter(); out = {}
from captioner.settings import default_model_path
folder = default_model_path()
recipe = json.loads((folder / "config.json").read_text())["encoder_onnx"]
def build():
    t = time.perf_counter()
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2; opts.inter_op_num_threads = 1
    ort.InferenceSession((folder / recipe["file"]).read_bytes(), opts, providers=["CPUExecutionProvider"])
    out["session"] = time.perf_counter() - t
job = threading.Thread(target=build)
if sys.argv[1] == "thread":
    job.start()
t = time.perf_counter(); import torch; out["import_torch"] = time.perf_counter() - t
if sys.argv[1] != "thread":
    job.start()
job.join(); out["total"] = time.perf_counter() - t0
print(json.dumps(out))
"""

#: `captioner caption -q IMAGE` with the frozen exit of round 3 switched off.
WITHOUT_FREEZE = r"""
import atexit, gc, sys
from captioner.commands.main import main
rc = main(["caption", "-q", sys.argv[1]])
atexit.unregister(gc.freeze)
sys.exit(rc)
"""


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    return time.perf_counter() - t0


def stages_of(script: str, *argv: str) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *argv], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-stages", action="store_true", help="also take the torch path's load apart")
    args = ap.parse_args()
    py, cli = sys.executable, str(Path(sys.executable).parent / "captioner")
    commands = {
        "python": [py, "-c", "pass"],
        "import_torch": [py, "-c", "import torch"],
        "import_numpy_pil": [py, "-c", "import numpy, PIL.Image"],
        "import_captioner_cli": [py, "-c", "import captioner.commands.main"],
        "import_onnxruntime": [py, "-c", "import onnxruntime"],
        "import_openvino": [py, "-c", "import openvino"],
        "cli": [cli, "caption", "-q", args.image],
        "cli_no_freeze": [py, "-c", WITHOUT_FREEZE, args.image],
        "cli_workers0": [cli, "caption", "-q", "--workers", "0", args.image],
        "cli_torch": [cli, "caption", "-q", args.image],
    }
    torch_env = dict(os.environ, CAPTIONER_RUNTIME="torch")
    walls: dict[str, list[float]] = {k: [] for k in commands}
    stages: dict[str, list[dict]] = {"stages_onnx": [], "prefetch_seq": [], "prefetch_thread": [], "stages": []}
    loads = []
    for _ in range(args.rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for name, cmd in commands.items():
            try:
                walls[name].append(timed(cmd, torch_env if name == "cli_torch" else None))
            except subprocess.CalledProcessError:
                walls[name].append(float("nan"))  # e.g. the optional runtime is not installed
        stages["stages_onnx"].append(stages_of(STAGES_ONNX, args.image))
        for mode in ("seq", "thread"):
            stages[f"prefetch_{mode}"].append(stages_of(PREFETCH, mode))
        if args.torch_stages:
            stages["stages"].append(stages_of(STAGES, args.image))
        last = {k: round(v[-1], 2) for k, v in walls.items()}
        print(json.dumps({"walls": last, "load1": loads[-1]}), file=sys.stderr)

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    result: dict = {"bench": "startup", "load1_per_round": loads, "walls_s": {k: med(v) for k, v in walls.items()}}
    for name, runs in stages.items():
        if runs:
            numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
            result[f"{name}_s"] = {k: med([r[k] for r in runs]) for k in numbers} | {"runtime": runs[0].get("runtime")}
    if stages["stages"]:
        parts = stages["stages"][0]["load_parts"]
        result["load_parts_s"] = {k: med([s["load_parts"][k] for s in stages["stages"]]) for k in parts}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
