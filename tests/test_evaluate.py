"""``captioner evaluate`` on images that no feature cache holds yet, with the default (fast) and exact models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.commands.main import main
from captioner.datasets import FeatureCache

from conftest import write_caption_dataset

CAPTIONS = {0: ["a red square"], 1: ["a blue ball"], 2: ["a green dog"], 3: ["a red ball"]}


@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_evaluate_builds_the_missing_feature_cache(tiny_checkpoint: Path, tmp_path: Path, exact: bool) -> None:
    data = write_caption_dataset(tmp_path / "data", CAPTIONS, dev={2, 3})
    cache, out = tmp_path / "cache", tmp_path / "eval.json"
    argv = [
        "evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--dataset",
        "custom",
        "--data-dir",
        str(data),
        "--split",
        "dev",
        "--no-meteor",
        "--guidance",
        "none",
        "--cache-dir",
        str(cache),
        "--output",
        str(out),
    ]
    assert main(argv + (["--exact"] if exact else [])) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 2 and set(result["captions"]) == {"img/2.png", "img/3.png"}
    caches = [FeatureCache(p) for p in cache.glob("features-*")]
    assert len(caches) == 1 and caches[0].complete() and len(caches[0].index["paths"]) == 2


def test_guidance_asked_for_is_the_guidance_decoded(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--guidance concepts on a checkpoint whose stored default is none: the captions are decoded with concepts."""
    import shutil

    from captioner import checkpoint
    from captioner.api import Captioner

    folder = tmp_path / "plain-by-default"
    shutil.copytree(tiny_checkpoint, folder)
    checkpoint.update_config(folder, {"inference": {"guidance": "none"}})
    decoded_with, real = [], Captioner.decode

    def decode(
        self, annotations, beam_size=None, max_length=None, n_best=1, length_alpha=None, concepts=None, guidance=None
    ):
        decoded_with.append(self.defaults["guidance"] if guidance is None else guidance)
        return real(self, annotations, beam_size, max_length, n_best, length_alpha, concepts, guidance)

    monkeypatch.setattr(Captioner, "decode", decode)
    data = write_caption_dataset(tmp_path / "data", CAPTIONS, dev={2, 3})
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(folder),
                "--dataset",
                "custom",
                "--data-dir",
                str(data),
                "--split",
                "dev",
                "--no-meteor",
                "--guidance",
                "concepts",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--exact",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["guidance"] == "concepts"
    assert decoded_with == ["concepts"]
