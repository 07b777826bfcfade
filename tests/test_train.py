"""End-to-end training on a tiny generated dataset: loss falls, checkpoints, exact resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from captioner.commands.main import main

CAPTIONS = {
    0: ["a red square on grass", "red square"],
    1: ["a blue ball in the sky", "blue ball"],
    2: ["a green dog runs", "green dog"],
    3: ["a red ball in the sky", "red ball"],
    4: ["a blue square on grass", "blue square"],
    5: ["a green ball runs", "green ball"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_caption_dataset

    return write_caption_dataset(tmp_path_factory.mktemp("data"), CAPTIONS, dev={i for i in CAPTIONS if i >= 4})


def train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    from conftest import tiny_model_args

    return [
        "train",
        "--dataset",
        "custom",
        "--data-dir",
        str(data),
        "--output",
        str(out),
        "--epochs",
        str(epochs),
        *tiny_model_args(32),
        "--batch-size",
        "1",
        "--warmup-steps",
        "2",
        "--lr",
        "0.02",
        "--label-smoothing",
        "0",
        "--dropout",
        "0.1",
        "--patience",
        "50",
        "--workers",
        "0",
        "--cache-dir",
        str(out.parent / "cache"),
        "--quiet",
        "--seed",
        "7",
        *extra,
    ]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_writes_checkpoints(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(dataset, out, 6)) == 0
    log = log_lines(out)
    assert [r["epoch"] for r in log] == list(range(1, 7))
    assert log[-1]["ce"] < 0.75 * log[0]["ce"]
    assert {"dev_bleu4", "dev_cider", "tokens_per_s"} <= set(log[0])
    weights = {"config.json", "model.safetensors", "vocab.json"}
    assert {p.name for p in (out / "best").iterdir()} == weights
    assert {p.name for p in (out / "last").iterdir()} == weights | {"trainer_state.json", "trainer_state.safetensors"}
    assert not list(out.glob(".*tmp*")), "no temporary folders left behind"
    # the trained checkpoint captions and evaluates through the public commands
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "best"),
                "--dataset",
                "custom",
                "--data-dir",
                str(dataset),
                "--split",
                "dev",
                "--beam-size",
                "2",
                "--no-meteor",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    evals = list((out / "best").glob("eval-*.json"))
    assert evals and {"bleu4", "cider", "rouge_l", "meteor"} <= set(json.loads(evals[0].read_text()))


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import captioner.train as T
    real = T.train_one_epoch
    def dying(model, encoder, loader, *a, **k):
        epoch = a[-1]  # (feats, optimizer, scheduler, args, device, epoch)
        if epoch == 2:  # SIGKILL in the middle of the second epoch
            for i, _ in enumerate(loader):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
        return real(model, encoder, loader, *a, **k)
    T.train_one_epoch = dying
    from captioner.commands.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_then_resume_matches_uninterrupted_run(dataset: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(train_args(dataset, straight, 3)) == 0

    resumed = tmp_path / "resumed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *train_args(dataset, resumed, 3)], capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["epoch"] for r in log_lines(resumed)] == [1]
    assert main(train_args(dataset, resumed, 3, "--resume")) == 0
    assert [r["epoch"] for r in log_lines(resumed)] == [1, 2, 3]

    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(resumed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert log_lines(straight)[-1]["loss"] == pytest.approx(log_lines(resumed)[-1]["loss"], rel=1e-6)


def test_finetune_blocks_train_from_a_trunk_cache(dataset: Path, tmp_path: Path) -> None:
    """--finetune-blocks: the last blocks and the head learn, the trunk and batch-norm statistics stay."""
    import torch

    from captioner import checkpoint
    from captioner.api import Captioner
    from captioner.datasets import FeatureCache
    from captioner.encoder import Encoder, EncoderConfig

    out = tmp_path / "ft"
    assert main(train_args(dataset, out, 5, "--finetune-blocks", "2", "--encoder-lr", "1e-3")) == 0
    log = log_lines(out)
    assert log[-1]["ce"] < 0.75 * log[0]["ce"]
    caches = [FeatureCache(p) for p in (tmp_path / "cache").glob("features-*")]
    assert [c.index["encoder"].get("trunk_blocks") for c in caches] == [2]
    assert checkpoint.read_config(out / "best")["encoder_finetuned"] is True

    stock = Encoder(EncoderConfig("efficientnet-lite0", 64, "head")).state_dict()
    saved = {
        k[len("encoder.") :]: v for k, v in checkpoint.read_weights(out / "best").items() if k.startswith("encoder.")
    }
    assert saved.keys() == stock.keys()
    changed = {k for k in saved if "running" not in k and not torch.equal(saved[k], stock[k])}
    last_two = {
        f"net._blocks.{i}."
        for i in (
            len(Encoder(EncoderConfig("efficientnet-lite0", 64)).net._blocks) - 2,
            len(Encoder(EncoderConfig("efficientnet-lite0", 64)).net._blocks) - 1,
        )
    }
    assert changed and all(k.startswith((*last_two, "net._conv_head", "net._bn1")) for k in changed)
    assert all(torch.equal(saved[k], stock[k]) for k in saved if "running" in k), "batch norms stay frozen"

    # the loaded model encodes images exactly as training saw them: trunk cache + trained top
    cap = Captioner.load(out / "best", device="cpu", fast=False)
    feats, rows = caches[0].load()
    image = sorted(rows)[0]
    from captioner.datasets.features import top_features

    via_cache = top_features(cap.encoder.encoder, feats[[rows[image]]], 2, "cpu").float()  # the caption encoder
    direct = cap.encode(cap.preprocess(image)[0][None]).float()
    assert torch.allclose(via_cache, direct, atol=0.05, rtol=0.02)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "best"),
                "--dataset",
                "custom",
                "--data-dir",
                str(dataset),
                "--split",
                "dev",
                "--no-meteor",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    # an fp16 export keeps the trained blocks; the frozen trunk loads from the packaged fp32 weights
    assert main(["export", "--checkpoint", str(out / "best"), "--output", str(tmp_path / "export")]) == 0
    exported = Captioner.load(tmp_path / "export", device="cpu", fast=False).encoder.encoder.state_dict()
    top = cap.encoder.encoder.top_state_keys(2)
    assert top and all(torch.equal(exported[k], stock[k]) for k in stock if k not in top)
    assert all(
        torch.equal(exported[k], saved[k].half().to(saved[k].dtype)) for k in top if saved[k].is_floating_point()
    )
    with pytest.raises(SystemExit, match="cannot split off the last 99"):
        main(train_args(dataset, tmp_path / "too-many", 1, "--finetune-blocks", "99"))
