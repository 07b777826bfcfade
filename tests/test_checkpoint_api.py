"""Checkpoints round-trip without pickle; the Captioner API captions paths, bytes and PIL images."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import checkpoint
from captioner.api import Captioner
from captioner.images import ImageError

from conftest import build_tiny_checkpoint, image_bytes, make_image


def test_checkpoint_folder_is_safetensors_plus_json(tiny_checkpoint: Path) -> None:
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert names == ["config.json", "model.safetensors", "vocab.json"]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["format_version"] == checkpoint.FORMAT_VERSION
    assert config["tied_weights"] == {"decoder.out.weight": "decoder.embed.weight"}
    raw = (tiny_checkpoint / "model.safetensors").read_bytes()
    assert b"pickle" not in raw[:2000] and raw[8:9] == b"{"  # safetensors: u64 header length, then JSON


def test_round_trip_gives_identical_outputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cap = Captioner.load(tiny_checkpoint, device="cpu", fast=False)  # exact fp32 weights to save
    state = {f"decoder.{k}": v for k, v in cap.decoder.state_dict().items()}
    copy = checkpoint.save(tmp_path / "copy", state, dict(cap.config), cap.vocab.to_json())
    again = Captioner.load(copy, device="cpu", fast=False)
    img = make_image(3)
    a, b = cap.caption(img, beam_size=3), again.caption(img, beam_size=3)
    assert a.text == b.text and a.logprobs == b.logprobs
    np.testing.assert_array_equal(a.attention, b.attention)


def test_fp16_storage_loads_as_float32(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cap = Captioner.load(tiny_checkpoint, device="cpu", fast=False)  # exact fp32 weights to save
    state = {f"decoder.{k}": v for k, v in cap.decoder.state_dict().items()}
    half = checkpoint.save(tmp_path / "half", state, dict(cap.config), cap.vocab.to_json(), half=True)
    assert (half / "model.safetensors").stat().st_size < (tiny_checkpoint / "model.safetensors").stat().st_size
    loaded = Captioner.load(half, device="cpu", fast=False)
    assert all(p.dtype == torch.float32 for p in loaded.decoder.parameters())
    weights = checkpoint.read_weights(half)
    assert {w.dtype for w in weights.values()} == {torch.float32}
    torch.testing.assert_close(weights["decoder.embed.weight"], state["decoder.embed.weight"].half().float())


def test_a_checkpoint_from_a_newer_format_is_refused(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "future")
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = checkpoint.FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        checkpoint.CheckpointError, match=f"newer captioner \\(format {checkpoint.FORMAT_VERSION + 1}\\)"
    ):
        Captioner.load(folder)


class RunsCode:
    """Unpickling this creates ``marker``: proof that loading a pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_files_are_refused_without_being_unpickled(tiny_checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="pickle"):
        Captioner.load(evil)
    with pytest.raises(checkpoint.CheckpointError):
        Captioner.load(tmp_path)  # a folder without config.json
    # a checkpoint folder whose weights file is a pickle (torch.save) in disguise
    folder = build_tiny_checkpoint(tmp_path / "disguised")
    torch.save({"decoder.embed.weight": RunsCode(marker)}, folder / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        Captioner.load(folder)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.read_weights(folder)
    assert not marker.exists(), "a pickle was unpickled"


def test_missing_or_mismatched_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "broken")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError):
        Captioner.load(folder)
    folder2 = build_tiny_checkpoint(tmp_path / "vocab")
    vocab = json.loads((folder2 / "vocab.json").read_text())
    vocab["itos"].append("extra")
    (folder2 / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(checkpoint.CheckpointError, match="vocabulary"):
        Captioner.load(folder2)


def test_interrupted_swap_falls_back_to_backup(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path / "last")
    folder.rename(tmp_path / ".last.old")  # as if killed between the two renames
    assert checkpoint.resolve(tmp_path / "last") == tmp_path / ".last.old"
    Captioner.load(tmp_path / "last")


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 3, "rng": (1, [2, 3], None), "np": np.arange(4)}
    checkpoint.save(
        tmp_path / "ck", {"w": model.weight}, {"encoder": {}, "decoder": {}}, {"itos": []}, trainer_state=state
    )
    back = checkpoint.load_trainer_state(tmp_path / "ck")
    assert back["epoch"] == 3 and back["rng"] == (1, [2, 3], None)
    np.testing.assert_array_equal(back["np"], np.arange(4))
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_caption_api_accepts_paths_bytes_and_pil(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cap = Captioner.load(tiny_checkpoint, device="cpu")
    img = make_image(1)
    path = tmp_path / "a.png"
    img.save(path)
    results = cap.caption([str(path), image_bytes(img, "PNG"), img], beam_size=2, n_best=2)
    assert len(results) == 3
    assert results[0].text == results[1].text == results[2].text
    H, W = cap.grid
    for r in results:
        assert r.attention.shape == (len(r.tokens), H, W)
        np.testing.assert_allclose(r.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
        assert len(r.logprobs) == len(r.tokens) and len(r.alternatives) == 1
        d = r.to_dict()
        assert d["caption"] == r.text and len(d["tokens"]) == len(r.tokens)
    single = cap.caption(img, beam_size=1)
    assert isinstance(single.text, str)
    with pytest.raises(ImageError):
        cap.caption(b"not an image")
    with pytest.raises(ValueError):
        cap.caption(img, beam_size=0)


def test_export_stores_fp16_and_decoding_defaults(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from captioner.commands.main import main

    out = tmp_path / "shipped"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tiny_checkpoint),
                "--output",
                str(out),
                "--beam-size",
                "5",
                "--length-alpha",
                "0.7",
                "--name",
                "shipped",
                "--model-version",
                "2.0",
            ]
        )
        == 0
    )
    cap = Captioner.load(out, device="cpu")
    assert cap.defaults["beam_size"] == 5 and cap.defaults["length_alpha"] == 0.7
    assert (cap.name, cap.version) == ("shipped", "2.0")
    assert (out / "model.safetensors").stat().st_size < (tiny_checkpoint / "model.safetensors").stat().st_size
    original = Captioner.load(tiny_checkpoint, device="cpu")
    img = make_image(9)
    assert cap.caption(img, beam_size=3).text == original.caption(img, beam_size=3).text
