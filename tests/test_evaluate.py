"""``captioner evaluate`` on images that no feature cache holds yet, with the default (fast) and exact models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_caption_dataset

from captioner.commands.main import main
from captioner.datasets import FeatureCache

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
