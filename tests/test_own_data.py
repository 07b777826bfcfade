"""Bring your own dataset: COCO files per split, Karpathy JSON and CSV/JSONL, and the malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.commands.main import main
from captioner.datasets import DatasetError, load_records, verify

from conftest import make_image

SPLIT_IMAGES = {"train": ["t0.jpg", "t1.jpg", "t2.jpg"], "dev": ["d0.jpg"], "test": ["e0.jpg", "e1.jpg"]}


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(n for names in SPLIT_IMAGES.values() for n in names):
        make_image(i, size=(32, 32)).save(folder / name)


def coco_files(root: Path) -> tuple[Path, dict[str, Path]]:
    """Images in root/images; one COCO captions file per split in root/ann (outside the image folder)."""
    _images(root / "images")
    (root / "ann").mkdir()
    files = {}
    for s, (split, names) in enumerate(SPLIT_IMAGES.items()):
        images = [{"id": 100 * s + i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)]
        anns = [
            {"id": 1000 * s + 10 * i + k, "image_id": 100 * s + i, "caption": f"A photo {n} number {k}."}
            for i, n in enumerate(names)
            for k in range(2)
        ]
        files[split] = root / "ann" / f"{split}.json"
        files[split].write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "images", files


def split_args(files: dict[str, Path]) -> list[str]:
    return [f"{split}={path}" for split, path in files.items()]


def test_coco_one_file_per_split(tmp_path: Path) -> None:
    images, files = coco_files(tmp_path)
    ann = split_args(files)
    for split, names in SPLIT_IMAGES.items():
        recs = load_records("coco", images, split, annotations=ann)
        assert [r.image_id for r in recs] == names and all(r.split == split for r in recs)
        assert recs[0].captions == [f"A photo {names[0]} number 0.", f"A photo {names[0]} number 1."]
    assert len(load_records("coco", images, "all", annotations=ann)) == 6
    m = verify.verify_dataset("coco", images, ann, progress=False)
    assert m["usable"] and m["problems"] == []
    assert {s: v["usable_images"] for s, v in m["splits"].items()} == {"train": 3, "dev": 1, "test": 2}
    assert m["annotations"] == ann and len(m["annotation_files"]) == 3


def test_coco_file_without_split_says_how_to_give_one(tmp_path: Path) -> None:
    images, files = coco_files(tmp_path)
    with pytest.raises(DatasetError, match=r"name no split.*--annotations train="):
        load_records("coco", images, "train", annotations=[str(files["train"])])
    m = verify.verify_dataset("coco", images, [str(files["train"])], progress=False)
    assert not m["usable"] and m["splits"] == {"all": {"images": 3, "usable_images": 3, "captions": 6}}


def test_images_looked_for_in_the_wrong_folder(tmp_path: Path) -> None:
    _, files = coco_files(tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_records("coco", tmp_path, "train", annotations=split_args(files))
    text = str(exc.value)
    assert str(files["train"]) in text and "none of the 3 images" in text and str(tmp_path) in text
    assert "--data-dir" in text


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_images", "no 'images' list"),
        ("duplicate_ids", "duplicate image ids"),
        ("orphan_captions", "refer to image ids that are not in 'images'"),
        ("empty_split", "split 'test' would be empty"),
        ("no_annotations", "no 'annotations' list"),
        ("karpathy_given", "Karpathy-style JSON"),
    ],
)
def test_malformed_coco_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    images, files = coco_files(tmp_path)
    data = json.loads(files["test"].read_text())
    if case == "no_images":
        del data["images"]
    elif case == "duplicate_ids":
        data["images"][1]["id"] = data["images"][0]["id"]
    elif case == "orphan_captions":
        data["annotations"].append({"id": 9, "image_id": 999, "caption": "a caption of nothing"})
    elif case == "empty_split":
        data = {"images": [], "annotations": []}
    elif case == "no_annotations":
        del data["annotations"]
    else:
        data = {"images": [{"filename": "e0.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}
    files["test"].write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=message):
        load_records("coco", images, "train", annotations=split_args(files))
    argv = ["--dataset", "coco", "--data-dir", str(images)] + [
        a for s in split_args(files) for a in ("--annotations", s)
    ]
    # every command: a message naming the file, a non-zero exit, no traceback
    assert main(["data", "verify", *argv, "--output", str(tmp_path / "m.json"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert message in out and str(files["test"]) in out and "Traceback" not in out
    for command in (
        ["data", "stats", *argv],
        ["train", *argv, "--output", str(tmp_path / "run")],
        ["evaluate", *argv, "--split", "test"],
        ["score", *argv, "--captions", str(files["test"])],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_karpathy_json_with_dataset_karpathy(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    images = [
        {
            "filename": n,
            "split": "val" if split == "dev" else split,
            "imgid": i,
            "sentences": [{"raw": f"A photo of {n}.", "tokens": ["a", "photo"]}],
        }
        for i, (split, n) in enumerate((s, n) for s, ns in SPLIT_IMAGES.items() for n in ns)
    ]
    (tmp_path / "my_split.json").write_text(json.dumps({"images": images, "dataset": "mine"}))
    for split, names in SPLIT_IMAGES.items():
        recs = load_records("karpathy", tmp_path, split, annotations="my_split.json")
        assert [r.image_id for r in recs] == names
    m = verify.verify_dataset("karpathy", tmp_path, ["my_split.json"], progress=False)
    assert m["usable"] and {s: v["images"] for s, v in m["splits"].items()} == {"train": 3, "dev": 1, "test": 2}


def test_karpathy_given_a_coco_file_names_the_right_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, files = coco_files(tmp_path)
    assert (
        main(
            [
                "data",
                "verify",
                "--dataset",
                "karpathy",
                "--data-dir",
                str(images),
                "--annotations",
                str(files["train"]),
                "--output",
                str(tmp_path / "m.json"),
                "--quiet",
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "is a COCO captions file" in out and "--dataset coco --annotations SPLIT=" in out


def test_karpathy_duplicate_file_names(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    img = {"filename": "t0.jpg", "split": "train", "sentences": [{"raw": "a"}]}
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": [img, img]}))
    with pytest.raises(DatasetError, match="duplicate file names"):
        load_records("karpathy", tmp_path, "train")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_tables_one_per_split(tmp_path: Path, fmt: str) -> None:
    _images(tmp_path / "images")
    ann = []
    for split, names in SPLIT_IMAGES.items():
        path = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            path.write_text("image,caption\n" + "".join(f"images/{n},a photo of {n}\n" for n in names))
        else:
            path.write_text(
                "".join(json.dumps({"image": f"images/{n}", "caption": f"a photo of {n}"}) + "\n" for n in names)
            )
        ann.append(f"{split}={path}")
    for split, names in SPLIT_IMAGES.items():
        assert [r.image_id for r in load_records("custom", tmp_path, split, annotations=ann)] == [
            f"images/{n}" for n in names
        ]
    (tmp_path / f"test.{fmt}").write_text("image,caption\n" if fmt == "csv" else "")
    with pytest.raises(DatasetError, match="would be empty"):
        load_records("custom", tmp_path, "train", annotations=ann)


def test_missing_dataset_flag_says_what_the_default_is(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, _ = coco_files(tmp_path)
    assert main(["train", "--data-dir", str(images), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "default to --dataset flickr8k" in err and "--dataset coco" in err


def test_flickr_refuses_per_split_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("t0.jpg#0\ta dog\n")
    (tmp_path / "b.txt").write_text("d0.jpg#0\ta cat\n")
    with pytest.raises(DatasetError, match="one caption file per split use --dataset coco"):
        load_records(
            "flickr8k", tmp_path, "train", annotations=[f"train={tmp_path / 'a.txt'}", f"dev={tmp_path / 'b.txt'}"]
        )


def test_verify_does_not_report_folders_outside_the_data_dir(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    _images(outside)
    make_image(99, size=(32, 32)).save(outside / "not_in_the_dataset.jpg")
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"image": str(outside / n), "caption": f"a photo of {n}", "split": s}
        for s, names in SPLIT_IMAGES.items()
        for n in names
    ]
    (data / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = verify.verify_dataset("custom", data, progress=False)
    assert m["usable"] and "images_without_captions" not in {p["kind"] for p in m["problems"]}


def test_custom_given_a_coco_file_or_odd_rows(tmp_path: Path) -> None:
    images, files = coco_files(tmp_path)
    with pytest.raises(DatasetError, match="looks like a COCO or Karpathy JSON file"):
        load_records("custom", images, "train", annotations=[str(files["train"])])
    (tmp_path / "rows.jsonl").write_text('["t0.jpg", "a dog"]\n')
    with pytest.raises(DatasetError, match="row 1 needs 'image' and 'caption'"):
        load_records("custom", tmp_path, "train", annotations=str(tmp_path / "rows.jsonl"))
