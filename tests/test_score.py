"""``captioner score``: a captions file against a split's references, with coco-caption's CIDEr-D."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.commands.main import main

from conftest import make_image

REFS = {
    "dog.jpg": ["A brown dog runs on the grass .", "A dog is running across a field .", "The dog plays outside ."],
    "kids.jpg": ["Two children play football in a park .", "Kids kick a ball on the grass .", "Two boys play soccer ."],
    "beach.jpg": ["A man walks along the beach .", "A person on the sand near the sea .", "A man at the beach ."],
    "bike.jpg": ["A girl rides a red bike .", "A child on a bicycle in the street .", "A girl cycling ."],
}
HYPS = {
    "dog.jpg": "a dog runs on the grass",
    "kids.jpg": "two boys play football on the grass",
    "beach.jpg": "a man on the beach",
    "bike.jpg": "a dog rides a bike in the park",
}
METRICS = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "distinct_captions", "images"}


@pytest.fixture
def dataset(tmp_path: Path) -> list[str]:
    """COCO-format test split (file_name resolved against --data-dir) -> the common argv."""
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(REFS):
        make_image(i, size=(32, 32)).save(images / name)
    coco = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(REFS)],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": c}
            for i, caps in enumerate(REFS.values())
            for k, c in enumerate(caps)
        ],
    }
    (tmp_path / "test.json").write_text(json.dumps(coco))
    return [
        "score",
        "--dataset",
        "coco",
        "--data-dir",
        str(images),
        "--annotations",
        f"test={tmp_path / 'test.json'}",
        "--split",
        "test",
        "--no-meteor",
    ]


def _score(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _ptb_like(text: str) -> str:
    """What coco-caption's PTB tokenizer makes of these captions: lower case, the final ' .' dropped."""
    return re.sub(r"\s*\.$", "", text.lower()).strip()


def test_cider_d_equals_coco_caption(dataset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"image": f"images/{k}", "caption": v, "score": -1.0}) + "\n" for k, v in HYPS.items())
    )
    result = _score([*dataset, "--captions", str(captions)], capsys)
    gts = {k: [_ptb_like(c) for c in refs] for k, refs in REFS.items()}
    res = {k: [_ptb_like(v)] for k, v in HYPS.items()}
    expected = 100 * Cider().compute_score(gts, res)[0]
    assert expected > 10  # a real, non-trivial score
    assert result["cider"] == pytest.approx(expected, abs=0.005)
    assert set(result) >= METRICS and result["images"] == 4 and result["split"] == "test"
    assert result["missing_captions"] == 0 and result["meteor"] is None


def test_csv_paths_and_evaluate_json_score_the_same(
    dataset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in HYPS.items()))
    csv_file = tmp_path / "b.csv"  # absolute paths, as 'captioner caption -o b.csv' writes them
    csv_file.write_text(
        "image,caption,score\n" + "".join(f"{tmp_path / 'images' / k},{v},-1\n" for k, v in HYPS.items())
    )
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"cider": 0, "captions": HYPS}))
    scores = [_score([*dataset, "--captions", str(f)], capsys) for f in (jsonl, csv_file, evaluated)]
    assert scores[0]["cider"] == scores[1]["cider"] == scores[2]["cider"]
    assert scores[0]["bleu4"] == scores[1]["bleu4"] == scores[2]["bleu4"]


def test_a_constant_caption_scores_far_below_real_ones(
    dataset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    real, constant = tmp_path / "real.jsonl", tmp_path / "constant.jsonl"
    real.write_text("".join(json.dumps({"image": k, "caption": v}) + "\n" for k, v in HYPS.items()))
    constant.write_text("".join(json.dumps({"image": k, "caption": "a dog runs on the grass"}) + "\n" for k in HYPS))
    good, flat = (_score([*dataset, "--captions", str(f)], capsys) for f in (real, constant))
    assert good["cider"] > 1.8 * flat["cider"] and flat["distinct_captions"] == 1


def test_missing_captions_are_an_error_unless_allowed(
    dataset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    captions = tmp_path / "partial.jsonl"
    rows = [{"image": k, "caption": v} for k, v in list(HYPS.items())[:2]]
    rows.append({"image": "beach.jpg", "error": "cannot decode", "error_code": "undecodable"})  # a failed row
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*dataset, "--captions", str(captions)]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 images of the split have no caption" in err and "--allow-missing" in err
    result = _score([*dataset, "--captions", str(captions), "--allow-missing"], capsys)
    assert result["images"] == 2 and result["missing_captions"] == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"image": "dog.jpg", "caption": "a dog"}\nnot json\n', "bad.jsonl:2: invalid JSON"),
        ('{"caption": "a dog"}\n', "has no 'image'"),
        ('{"image": "cat.jpg", "caption": "a cat"}\n', "none of the 1 captions"),
        ("", "no captions"),
    ],
)
def test_bad_captions_files(
    dataset: list[str], tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    captions = tmp_path / "bad.jsonl"
    captions.write_text(content)
    assert main([*dataset, "--captions", str(captions)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert main([*dataset, "--captions", str(tmp_path / "absent.jsonl")]) == 2
    assert "cannot read captions file" in capsys.readouterr().err
