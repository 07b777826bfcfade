"""The CPU fast path (captioner.perf) that Captioner.load applies by default, and checkpoint averaging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.api import Captioner
from captioner.commands.main import main as cli_main
from captioner.perf import ChunkedEncoder, fold_batchnorm

from conftest import build_tiny_checkpoint, make_image


def test_fast_is_the_cpu_default_and_can_be_turned_off(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = Captioner.load(tiny_checkpoint, device="cpu")
    assert fast.optimizations == ["fold_bn", "channels_last", "encode_chunk2", "int8_decoder"]
    assert isinstance(fast.encoder, ChunkedEncoder)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.encoder.modules())
    exact = Captioner.load(tiny_checkpoint, device="cpu", fast=False)
    assert exact.optimizations == [] and isinstance(exact.decoder.out, torch.nn.Linear)
    monkeypatch.setenv("CAPTIONER_FAST", "0")
    assert Captioner.load(tiny_checkpoint, device="cpu").optimizations == []
    # the library reads the variable as the service's settings do: empty is off, nonsense is an error
    monkeypatch.setenv("CAPTIONER_FAST", "")
    assert Captioner.load(tiny_checkpoint, device="cpu").optimizations == []
    monkeypatch.setenv("CAPTIONER_FAST", "maybe")
    with pytest.raises(ValueError, match="CAPTIONER_FAST must be a boolean"):
        Captioner.load(tiny_checkpoint, device="cpu")


def test_fast_encoder_matches_the_exact_one(tiny_checkpoint: Path) -> None:
    fast = Captioner.load(tiny_checkpoint, device="cpu")
    exact = Captioner.load(tiny_checkpoint, device="cpu", fast=False)
    images = torch.stack([fast.preprocess(make_image(i))[0] for i in range(5)])  # (5, 3, S, S): 3 chunks
    a, b = fast.encode(images), exact.encode(images)  # (5, L, D)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fast_captions_are_well_formed(tiny_checkpoint: Path) -> None:
    fast = Captioner.load(tiny_checkpoint, device="cpu")
    results = fast.caption([make_image(i) for i in range(3)], beam_size=3)
    for r in results:
        assert len(r.tokens) == len(r.logprobs) == r.attention.shape[0]
        assert torch.allclose(torch.from_numpy(r.attention).flatten(1).sum(1), torch.ones(len(r.tokens)), atol=1e-4)
        assert "<unk>" not in r.tokens


def test_fold_batchnorm_leaves_other_backbones_alone() -> None:
    assert fold_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))) == 0


def test_export_averages_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = build_tiny_checkpoint(tmp_path / "a", seed=1)
    b = build_tiny_checkpoint(tmp_path / "b", seed=2)
    wa, wb = checkpoint.read_weights(a), checkpoint.read_weights(b)
    assert cli_main(["export", "--checkpoint", str(a), str(b), "--output", str(tmp_path / "avg"), "--fp32"]) == 0
    avg = checkpoint.read_weights(tmp_path / "avg")
    for key in wa:
        torch.testing.assert_close(avg[key], (wa[key] + wb[key]) / 2)
    config = json.loads((tmp_path / "avg" / "config.json").read_text())
    assert config["averaged_from"] == [str(a), str(b)]
    # a checkpoint of another architecture cannot be averaged in
    other = tmp_path / "other"
    build_tiny_checkpoint(other, image_size=96)
    cfg = json.loads((other / "config.json").read_text())
    weights = checkpoint.read_weights(other)
    weights["decoder.extra"] = torch.zeros(2)
    checkpoint.save(other, weights, cfg, json.loads((other / "vocab.json").read_text()))
    with pytest.raises(checkpoint.CheckpointError, match="cannot average"):
        checkpoint.average_weights([a, other])


def test_int8_decoder_is_batch_invariant(tiny_checkpoint: Path) -> None:
    """An image's caption must not depend on which other images share its batch."""
    fast = Captioner.load(tiny_checkpoint, device="cpu")
    images = [make_image(i) for i in range(6)]
    together = fast.caption(images, beam_size=3)
    for i in (0, 4):
        alone = fast.caption(images[i], beam_size=3)
        assert alone.text == together[i].text
        assert alone.logprobs == pytest.approx(together[i].logprobs, abs=1e-5)


def test_int8_layers_match_float(tiny_checkpoint: Path) -> None:
    from captioner.perf import Int8Linear, Int8LSTMCell

    torch.manual_seed(0)
    linear, cell = torch.nn.Linear(64, 48), torch.nn.LSTMCell(64, 32)
    x = torch.randn(5, 7, 64)  # (B, L, in): any leading shape
    torch.testing.assert_close(Int8Linear.from_linear(linear)(x), linear(x), atol=0.03, rtol=0.05)
    h, c = torch.randn(5, 32), torch.randn(5, 32)
    for a, b in zip(Int8LSTMCell(cell)(x[:, 0], (h, c)), cell(x[:, 0], (h, c))):
        torch.testing.assert_close(a, b, atol=0.03, rtol=0.05)


def test_fast_encoder_copy_for_feature_caches(tiny_checkpoint: Path) -> None:
    from captioner.perf import fast_encoder

    exact = Captioner.load(tiny_checkpoint, device="cpu", fast=False)
    fast = fast_encoder(exact.encoder)
    assert fast_encoder(fast) is fast
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.encoder.modules())  # the original is untouched
    images = torch.stack([exact.preprocess(make_image(i))[0] for i in range(3)])  # (3, 3, S, S)
    with torch.inference_mode():
        torch.testing.assert_close(fast(images), exact.encoder(images), atol=1e-4, rtol=1e-4)
