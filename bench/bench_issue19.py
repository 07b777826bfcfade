"""Every issue-19 figure as a ratio, in one run: anchor, service vs CLI, 8 vs 1 clients, p50, CLI start, dev quality.

    .venv/bin/python bench/bench_issue19.py --data ../shared/data/flickr8k > bench/results/issue19/summary.json

Each round, interleaved on the same ``--n`` Flickr8k test photos:

1. ``captioner caption`` (a fresh process with its defaults, start-up included) -> CLI img/s;
2. the sgrvinod-style anchor pipeline (bench/bench_anchor.py, random weights) on the first
   ``--anchor-n`` of those photos (it takes each photo alone, so its rate does not depend on how many) -> anchor img/s;
3. the service (gunicorn, its defaults, started once and warmed up before round 1): 8 concurrent
   clients sharing the ``--n`` photos (img/s), then 1 client posting the first ``--single-n`` one
   after another (img/s and p50 latency); beam 3, attention grids included; each answer's own
   ``timing_ms`` (queue, preprocess, inference, postprocess) as p50s, so HTTP and JSON are the rest;
4. the encoder alone in this process: ms/image of the torch fast path and of ONNX Runtime on 32 of the
   photos in batches of 8 (grid + concepts);
5. the CLI start: ``captioner caption -q`` on one photo in a fresh process, per runtime
   (``CAPTIONER_RUNTIME`` onnx and torch): seconds to its first output line (the caption: the target) and to
   its exit, then the same steps timed inside one process (import torch / import captioner / load / first caption);
   ``--start-python NAME=PYTHON[@TREE]`` adds the ONNX path with another interpreter, or another checkout's
   code (``start_NAME``), and ``--start-only`` runs only these start measurements, ``--rounds`` times, alternated.

Ratios are taken within each round and reported with their median. After the rounds, ``--dev``
Flickr8k dev photos are captioned in this process by the shipped fast path (whatever runtime it
picks) and by the exact model (``fast=False``), and scored (BLEU-4, METEOR with Java). The 1-minute
load average (``uptime``) is recorded before and after every part. JSON goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_anchor import AnchorDecoder, AnchorEncoder, pick_photos, run_anchor, run_cli
from bench.bench_service import HOST, Service, free_port, get, run_clients
from bench.common import machine, repo_root

STAGES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from captioner.api import Captioner
t2 = time.perf_counter()
cap = Captioner.load(device="cpu")
t3 = time.perf_counter()
cap.caption(sys.argv[1])
t4 = time.perf_counter()
print(json.dumps({"runtime": cap.runtime, "import_torch": t1 - t0, "import_captioner": t2 - t1, "load": t3 - t2,
                  "first_caption": t4 - t3}))
"""


def uptime() -> str:
    return subprocess.run(["uptime"], check=True, capture_output=True, text=True).stdout.strip()


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def log(msg: object) -> None:
    print(json.dumps(msg) if not isinstance(msg, str) else msg, file=sys.stderr, flush=True)


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def cli_start(photo: Path, runtime: str, python: str | None = None, tree: Path | None = None) -> dict:
    """A fresh process: wall seconds of ``captioner caption -q photo``, then the same steps timed inside one.

    ``python``: another interpreter (a venv with another torch build), which runs ``tree``'s code (default: this
    checkout) as ``python -m captioner.commands.main`` with PYTHONPATH set to it; default: this venv's
    ``captioner`` script.
    """
    env, photo = dict(os.environ, CAPTIONER_RUNTIME=runtime), photo.absolute()
    if python:
        env["PYTHONPATH"] = str(tree or repo_root())
        cmd = [python, "-m", "captioner.commands.main"]
    else:
        cmd = [str(Path(sys.executable).parent / "captioner")]
    t0 = time.perf_counter()
    with subprocess.Popen([*cmd, "caption", "-q", str(photo)], env=env, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()  # the caption's record: the start is over
        first = time.perf_counter() - t0
        proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    run = subprocess.run(
        [python or sys.executable, "-c", STAGES, str(photo)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        cwd=tree or repo_root(),
    )
    return {
        "first_caption_s": round(first, 3),
        "wall_s": round(wall, 3),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in json.loads(run.stdout.splitlines()[-1]).items()},
    }


def encoder_round(caps: dict, pixels: torch.Tensor, batch: int = 8) -> dict:
    """ms/image of each captioner's encoder (``see``: grid + concepts) over ``pixels`` in batches of ``batch``."""
    out = {}
    for name, cap in caps.items():
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch):
            cap.see(pixels[i : i + batch])
        out[f"encoder_ms_{name}"] = round(1000 * (time.perf_counter() - t0) / len(pixels), 1)
    return out


def service_round(port: int, uploads: list[bytes], single_n: int, query: str) -> dict:
    """8 clients sharing the photos, then 1 client over the first ``single_n``: img/s and p50."""
    eight = run_clients(port, uploads, 8, max(1, len(uploads) // 8), query)
    one = run_clients(port, uploads[:single_n], 1, min(single_n, len(uploads)), query)
    return {
        "c1_ips": one["throughput_rps"],
        "c1_p50_ms": one.get("p50_ms"),
        "c8_ips": eight["throughput_rps"],
        "c8_p50_ms": eight.get("p50_ms"),
        "errors": one["errors"] + eight["errors"],
        "c8_mean_batch": eight["mean_batch_size"],
        "c1_server_p50_ms": one.get("server_p50_ms"),  # queue / preprocess / inference / postprocess / total
        "c8_server_p50_ms": eight.get("server_p50_ms"),
    }


def dev_quality(data: Path, n: int) -> dict:
    """The shipped fast path and the exact model on the first ``n`` dev photos: BLEU-4 and METEOR."""
    from captioner.api import Captioner
    from captioner.datasets import load_records
    from captioner.metrics import score

    records = load_records("flickr8k", data, "dev", limit=n or None)
    refs = {r.image_id: r.captions for r in records}
    out: dict = {"images": len(records)}
    for name, kwargs in (("shipped", {}), ("exact", {"fast": False})):
        cap = Captioner.load(device="cpu", **kwargs)
        t0 = time.perf_counter()
        texts = [
            c.text
            for i in range(0, len(records), 16)
            for c in cap.caption([r.path for r in records[i : i + 16]], batch_size=16)
        ]
        seconds = time.perf_counter() - t0
        metrics = score({r.image_id: t for r, t in zip(records, texts)}, refs)
        out[name] = {
            "runtime": cap.runtime,
            "optimizations": cap.optimizations,
            "seconds": round(seconds, 1),
            "bleu4": round(metrics["bleu4"], 2),
            "meteor": round(metrics["meteor"], 2) if metrics.get("meteor") is not None else None,
        }
        log({"dev": name, **out[name], "load1": load1()})
    out["delta_bleu4"] = round(out["shipped"]["bleu4"] - out["exact"]["bleu4"], 2)
    if out["shipped"]["meteor"] is not None and out["exact"]["meteor"] is not None:
        out["delta_meteor"] = round(out["shipped"]["meteor"] - out["exact"]["meteor"], 2)
    return out


START_KEYS = ("first_caption_s", "wall_s", "import_torch", "import_captioner", "load", "first_caption")


def start_pythons(items: list[str]) -> dict[str, tuple[str, Path | None]]:
    """``--start-python`` values, NAME=PYTHON or NAME=PYTHON@TREE -> {NAME: (PYTHON, TREE or None)}."""
    out: dict[str, tuple[str, Path | None]] = {}
    for item in items:
        name, _, spec = item.partition("=")
        python, _, tree = spec.partition("@")
        python = str(Path(python).absolute()) if os.sep in python else python  # the runs start in TREE
        out[name] = (python, Path(tree).resolve() if tree else None)
    return out


def start_only(photo: Path, pythons: dict[str, tuple[str, Path | None]], rounds: int) -> dict:
    """``--start-only``: the CLI start on the ONNX path with this venv and each ``--start-python``; the order of
    the ``--start-python`` runs is reversed every other round."""
    result: dict = {"bench": "issue19-start", "machine": machine(), "uptime_start": uptime(), "photo": photo.name}
    result["rounds"] = []
    for k in range(rounds):
        r: dict = {"load1_start": load1(), "start_onnx": cli_start(photo, "auto")}
        for name, (python, tree) in list(pythons.items())[:: 1 if k % 2 == 0 else -1]:
            r[f"start_{name}"] = cli_start(photo, "auto", python, tree)
        result["rounds"].append(r)
        log({"round": k + 1, **r})
    result["medians"] = {
        f"{part}_{key}": med([r[part][key] for r in result["rounds"]])
        for part in ["start_onnx", *(f"start_{n}" for n in pythons)]
        for key in START_KEYS
    }
    result["torch"] = {name: torch_version(python) for name, (python, _) in pythons.items()}
    result["trees"] = {name: str(tree or repo_root()) for name, (_, tree) in pythons.items()}
    result["uptime_end"] = uptime()
    return result


def torch_version(python: str) -> str:
    run = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return run.stdout.strip() or run.stderr.strip()[-200:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the Flickr8k folder (images/, Flickr_8k.*Images.txt, tokens)")
    ap.add_argument("--n", type=int, default=500, help="test photos per round (CLI, service at 8 clients)")
    ap.add_argument("--anchor-n", type=int, default=100, help="of those, the first N for the anchor pipeline")
    ap.add_argument("--single-n", type=int, default=100, help="of those, the first N for the 1-client service run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dev", type=int, default=1000, help="dev photos to score (0: the whole split; -1: skip)")
    ap.add_argument("--beam-size", type=int, default=3)
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument(
        "--start-python",
        action="append",
        default=[],
        metavar="NAME=PYTHON[@TREE]",
        help="also time the CLI start with this interpreter (e.g. a venv with a CPU-only torch) running TREE's code "
        "(default: this checkout), as start_NAME",
    )
    ap.add_argument("--start-only", action="store_true", help="only the CLI start (this venv and each --start-python)")
    args = ap.parse_args()
    data = Path(args.data)
    pythons = start_pythons(args.start_python)
    if args.start_only:
        photo = pick_photos(data / "images", data / "Flickr_8k.testImages.txt", 1)[0]
        print(json.dumps(start_only(photo, pythons, args.rounds), indent=1))
        return
    paths = pick_photos(data / "images", data / "Flickr_8k.testImages.txt", args.n)
    uploads = [p.read_bytes() for p in paths]
    from captioner.api import Captioner

    encoders = {"torch": Captioner.load(device="cpu", runtime="torch"), "onnx": Captioner.load(device="cpu")}
    pixels = torch.stack([encoders["torch"].preprocess(p)[0] for p in paths[:32]])  # (32, 3, S, S)
    encoder_round(encoders, pixels[:8])  # warm-up
    torch.manual_seed(0)
    anchor = (AnchorEncoder().eval(), AnchorDecoder().eval())
    result: dict = {"bench": "issue19", "machine": machine(), "uptime_start": uptime(), "n": args.n, "rounds": []}
    port = free_port()
    env = dict(os.environ, HOST=HOST, PORT=str(port), CAPTIONER_LOG_LEVEL="warning", PYTHONUNBUFFERED="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    query = f"beam_size={args.beam_size}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_issue19_") as tmp:
        service = Service(env, Path(tmp) / "service.log")
        try:
            service.wait_ready(port, args.startup_timeout)
            result["service_readyz"] = json.loads(get(port, "/readyz")[1])["model"]
            run_clients(port, uploads[:8], 1, 8, query)  # warm-up
            for k in range(args.rounds):
                r: dict = {"load1_start": load1()}
                r["cli_ips"] = round(len(paths) / run_cli(paths, None, Path(tmp)), 2)
                few = paths[: args.anchor_n]
                r["anchor_ips"] = round(len(few) / run_anchor(*anchor, few, 3, 13), 3)
                r |= service_round(port, uploads, args.single_n, query)
                r |= encoder_round(encoders, pixels)
                r["start_onnx"] = cli_start(paths[0], "auto")
                r["start_torch"] = cli_start(paths[0], "torch")
                for name, (python, tree) in pythons.items():
                    r[f"start_{name}"] = cli_start(paths[0], "auto", python, tree)
                r["load1_end"] = load1()
                r["anchor_ratio"] = round(r["cli_ips"] / r["anchor_ips"], 2)
                r["service8_vs_cli"] = round(r["c8_ips"] / r["cli_ips"], 2)
                r["service8_vs_1"] = round(r["c8_ips"] / r["c1_ips"], 2)
                r["onnx_encoder_speedup"] = round(r["encoder_ms_torch"] / r["encoder_ms_onnx"], 2)
                result["rounds"].append(r)
                log({"round": k + 1, **r})
        finally:
            service.stop()
    rounds = result["rounds"]
    result["medians"] = {
        key: med([r[key] for r in rounds])
        for key in (
            "anchor_ratio",
            "service8_vs_cli",
            "service8_vs_1",
            "c1_p50_ms",
            "cli_ips",
            "anchor_ips",
            "c1_ips",
            "c8_ips",
            "onnx_encoder_speedup",
            "encoder_ms_torch",
            "encoder_ms_onnx",
        )
    }
    for rt in ("onnx", "torch", *pythons):
        for key in START_KEYS:
            result["medians"][f"start_{rt}_{key}"] = med([r[f"start_{rt}"][key] for r in rounds])
    result["rounds_seconds"] = round(time.perf_counter() - started, 1)
    if args.dev >= 0:
        result["dev"] = dev_quality(data, args.dev)
    result["uptime_end"] = uptime()
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
