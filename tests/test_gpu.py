"""CUDA: loading a checkpoint on the GPU, and bf16 autocast (AMP) training.

These run only where CUDA exists (a GPU machine or CI runner); elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner.api import Captioner
from captioner.commands.main import main

from conftest import TINY_CAPTIONS, make_image, tiny_model_args, write_caption_dataset

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False here)"
)


def test_gpu_loading_computes_what_the_cpu_computes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Same features (cuDNN may use TF32 convolutions: 1e-2), same next-word logits, captions on the GPU."""
    paths = []
    for i in range(4):
        make_image(i).save(tmp_path / f"g{i}.jpg")
        paths.append(str(tmp_path / f"g{i}.jpg"))
    cpu = Captioner.load(tiny_checkpoint, device="cpu", fast=False)
    gpu = Captioner.load(tiny_checkpoint, device="cuda")
    assert gpu.device.type == "cuda" and gpu.optimizations == []  # the CPU speed-ups are not applied
    assert all(p.device.type == "cuda" for p in [*gpu.decoder.parameters(), *gpu.encoder.parameters()])
    images = torch.stack([cpu.preprocess(p)[0] for p in paths])  # (4, 3, S, S)
    feats = cpu.encode(images)  # (4, L, D)
    torch.testing.assert_close(gpu.encode(images).cpu(), feats, rtol=1e-2, atol=1e-2)
    ids = [cpu.vocab.encode(c) for c in TINY_CAPTIONS]
    caps = torch.tensor([i + [0] * (9 - len(i)) for i in ids])  # (4, 9)
    lengths = torch.tensor([len(i) for i in ids])
    with torch.inference_mode():
        expected, _ = cpu.decoder(feats, caps, lengths)
        got, _ = gpu.decoder(feats.cuda(), caps.cuda(), lengths.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-4)
    for c in gpu.caption(paths, beam_size=3, n_best=2):
        assert c.text and c.attention.shape == (len(c.tokens), *gpu.grid) and len(c.alternatives) == 1


def test_amp_training_on_cuda_lowers_the_loss_and_saves_fp32_weights(tmp_path: Path) -> None:
    captions = {i: [f"a {c} ball", f"{c} ball"] for i, c in enumerate(["red", "blue", "green", "pink", "red"])}
    data = write_caption_dataset(tmp_path / "data", captions, dev={4})
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "custom",
                "--data-dir",
                str(data),
                "--output",
                str(out),
                "--epochs",
                "4",
                *tiny_model_args(32),
                "--batch-size",
                "2",
                "--warmup-steps",
                "2",
                "--lr",
                "0.02",
                "--dropout",
                "0",
                "--workers",
                "0",
                "--device",
                "cuda",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--quiet",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    weights = load_file(out / "last" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast leaves the master weights fp32
    cap = Captioner.load(out / "best", device="cpu")  # a GPU-trained checkpoint captions on CPU
    assert cap.caption(make_image(0)).text
