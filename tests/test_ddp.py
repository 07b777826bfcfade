"""DDP training under ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU) matches one process.

Two ranks with 1 image per step see exactly the images one process sees with 2 per step
(``ImageGroupedBatches`` deals rank r the images r, r+2, ... of the same shuffled order).
Every caption has the same number of words and dropout is off, so the mean of the two
ranks' gradients is the single process's gradient: the loss curves agree to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from captioner.commands.main import main

from conftest import tiny_model_args, write_caption_dataset

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 3
TOLERANCE = 1e-4  # relative, on each epoch's mean loss and on every trained weight (float32 summation order)

# eight training images, two captions each, every caption four words long
CAPTIONS = {
    i: [f"a {c} {s} here", f"the {s} is {c}"]
    for i, (c, s) in enumerate(
        [(c, s) for c in ("red", "blue", "green", "pink") for s in ("ball", "square")]
        + [("red", "dog"), ("blue", "dog")]
    )
}

# The real `captioner train`, recording each rank's checkpoint writes and per-epoch statistics.
WRAPPER = textwrap.dedent(
    """
    import json, os, sys
    import captioner.checkpoint as C
    import captioner.train as T
    rank = os.environ.get("RANK", "0")
    log = open(os.path.join(os.environ["DDP_TEST_LOG"], f"rank{rank}.jsonl"), "a")
    real_save, real_epoch = C.save, T.train_one_epoch
    def save(folder, *a, **k):
        log.write(json.dumps({"save": os.path.basename(str(folder))}) + "\\n"); log.flush()
        return real_save(folder, *a, **k)
    def epoch(*a, **k):
        stats = real_epoch(*a, **k)
        log.write(json.dumps({"loss": stats["loss"]}) + "\\n"); log.flush()
        return stats
    C.save, T.train_one_epoch = save, epoch
    from captioner.commands.main import main
    sys.exit(main(sys.argv[1:]))
    """
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def train_args(data: Path, out: Path, images_per_step: int) -> list[str]:
    return [
        "train",
        "--dataset",
        "custom",
        "--data-dir",
        str(data),
        "--output",
        str(out),
        "--epochs",
        str(EPOCHS),
        *tiny_model_args(16),
        "--batch-size",
        str(images_per_step),
        "--warmup-steps",
        "2",
        "--lr",
        "0.03",
        "--label-smoothing",
        "0",
        "--dropout",
        "0",
        "--patience",
        "50",
        "--workers",
        "0",
        "--val-limit",
        "1",
        "--device",
        "cpu",
        "--cache-dir",
        str(out.parent / "cache"),
        "--quiet",
        "--seed",
        "3",
    ]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path: Path) -> None:
    assert len({len(c.split()) for caps in CAPTIONS.values() for c in caps}) == 1
    data = write_caption_dataset(tmp_path / "data", CAPTIONS, dev={8, 9})
    single = tmp_path / "single"
    assert main(train_args(data, single, 2)) == 0
    single_losses = [r["loss"] for r in read_log(single / "metrics.jsonl")]
    assert len(single_losses) == EPOCHS

    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DDP_TEST_LOG=str(logs))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "wrapper.py"),
            *train_args(data, out, 1),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    rank0, rank1 = read_log(logs / "rank0.jsonl"), read_log(logs / "rank1.jsonl")
    assert [r for r in rank1 if "save" in r] == [], "only rank 0 writes checkpoints"
    saves = [r["save"] for r in rank0 if "save" in r]
    assert saves.count("last") == EPOCHS and "best" in saves
    assert len(read_log(out / "metrics.jsonl")) == EPOCHS  # one log line per epoch, from rank 0 alone

    # each rank's loss is the mean over its half of every step: their mean is the one-process loss
    ddp_losses = [
        (a["loss"] + b["loss"]) / 2
        for a, b in zip([r for r in rank0 if "loss" in r], [r for r in rank1 if "loss" in r], strict=True)
    ]
    assert ddp_losses == pytest.approx(single_losses, rel=TOLERANCE)
    assert single_losses[-1] < 0.9 * single_losses[0], "the runs must actually train"
    a, b = load_file(single / "last" / "model.safetensors"), load_file(out / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    # the attention score's bias shifts every cell's score alike, so softmax cancels it: its gradient is
    # rounding noise, which Adam scales up to full steps. Every other weight follows the same path.
    for name in sorted(set(a) - {"decoder.attention.score.bias"}):
        if name.startswith("decoder."):
            print(name, float((b[name] - a[name]).abs().max()))
            torch.testing.assert_close(b[name], a[name], rtol=TOLERANCE, atol=TOLERANCE, msg=name)
