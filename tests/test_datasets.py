"""Every dataset reader on small fixture files, all into CaptionRecord."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.datasets import DatasetError, load_records

from conftest import make_image


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        make_image(i, size=(16, 16)).save(folder / n)


def test_flickr_token_file_with_split_lists(tmp_path: Path) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    _images(tmp_path / "images", names[:3])  # d.jpg has captions but no image
    lines = [f"{n}#{k}\tCaption {k} of {n} ." for n in names for k in range(5)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("b.jpg\na.jpg\nd.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("")
    train = load_records("flickr8k", tmp_path, "train")
    assert [r.image_id for r in train] == ["b.jpg", "a.jpg"]  # list order; missing image dropped
    assert len(train[0].captions) == 5 and train[0].captions[0] == "Caption 0 of b.jpg ."
    assert Path(train[0].path).is_file()
    assert [r.image_id for r in load_records("flickr8k", tmp_path, "dev")] == ["c.jpg"]
    assert load_records("flickr8k", tmp_path, "val")[0].split == "dev"
    assert len(load_records("flickr8k", tmp_path, "train", limit=1)) == 1
    assert len(load_records("flickr8k", tmp_path, "train", require_images=False)) == 3


def test_karpathy_json(tmp_path: Path) -> None:
    _images(tmp_path / "images", ["x.jpg", "y.jpg", "z.jpg"])
    data = {
        "images": [
            {"filename": "x.jpg", "split": "train", "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}]},
            {"filename": "y.jpg", "split": "restval", "sentences": [{"tokens": ["a", "cat"]}]},
            {"filename": "z.jpg", "split": "val", "sentences": [{"raw": "A bird."}]},
        ]
    }
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    train = load_records("karpathy", tmp_path, "train")
    assert [r.image_id for r in train] == ["x.jpg", "y.jpg"] and train[1].captions == ["a cat"]
    assert [r.image_id for r in load_records("flickr8k", tmp_path, "dev")] == ["z.jpg"]


def test_coco_captions_json(tmp_path: Path) -> None:
    _images(tmp_path / "train2014", ["COCO_1.jpg"])
    _images(tmp_path / "val2014", ["COCO_2.jpg"])
    (tmp_path / "annotations").mkdir()
    for part, (iid, name) in {"train2014": (1, "COCO_1.jpg"), "val2014": (2, "COCO_2.jpg")}.items():
        ann = {
            "images": [{"id": iid, "file_name": name}],
            "annotations": [{"image_id": iid, "caption": f"caption {k} "} for k in range(3)],
        }
        (tmp_path / "annotations" / f"captions_{part}.json").write_text(json.dumps(ann))
    train = load_records("coco", tmp_path, "train")
    assert [r.image_id for r in train] == ["COCO_1.jpg"] and train[0].captions[0] == "caption 0"
    assert [r.image_id for r in load_records("coco", tmp_path, "dev")] == ["COCO_2.jpg"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_custom_table(tmp_path: Path, fmt: str) -> None:
    _images(tmp_path / "pics", ["p.png", "q.png"])
    rows = [("pics/p.png", "a red square", "train"), ("pics/p.png", "red box", "train"), ("pics/q.png", "blue", "test")]
    if fmt == "csv":
        text = "image,caption,split\n" + "".join(f"{i},{c},{s}\n" for i, c, s in rows)
    else:
        text = "".join(json.dumps({"image": i, "caption": c, "split": s}) + "\n" for i, c, s in rows)
    (tmp_path / f"captions.{fmt}").write_text(text)
    train = load_records("custom", tmp_path, "train")
    assert len(train) == 1 and train[0].captions == ["a red square", "red box"]
    assert load_records("custom", tmp_path, "all")[1].split == "test"


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_records("flickr8k", tmp_path / "nope")
    with pytest.raises(DatasetError):
        load_records("flickr8k", tmp_path)
    (tmp_path / "captions.csv").write_text("path,text\nx,y\n")
    with pytest.raises(DatasetError, match="image"):
        load_records("custom", tmp_path)
    with pytest.raises(DatasetError, match="split"):
        load_records("custom", tmp_path, "holdout")


def test_feature_cache_keeps_rows_aligned_when_an_image_fails(tmp_path: Path) -> None:
    """A file that does not decode gets a zero row and is listed as failed; the rows after it stay in place."""
    import numpy as np
    from PIL import Image

    from captioner.datasets import FeatureCache
    from captioner.encoder import Encoder, EncoderConfig

    good = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        path = tmp_path / f"good{i}.png"
        Image.new("RGB", (80, 60), colour).save(path)
        good.append(str(path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [good[0], str(broken), good[1]]
    encoder = Encoder(EncoderConfig("efficientnet-lite0", 64, "head"))
    cache = FeatureCache(tmp_path / "cache")
    cache.build(paths, encoder, batch_size=3, num_workers=0, progress=False)
    feats, rows = cache.load()
    alone = FeatureCache(tmp_path / "alone")
    alone.build([good[1]], encoder, batch_size=1, num_workers=0, progress=False)
    feats_alone, _ = alone.load()

    assert cache.index["failed"] == [str(broken)]
    assert not feats[rows[str(broken)]].float().abs().any()
    assert feats[rows[good[0]]].float().abs().sum() > 0
    np.testing.assert_allclose(feats[rows[good[1]]].float().numpy(), feats_alone[0].float().numpy(), atol=2e-3)
