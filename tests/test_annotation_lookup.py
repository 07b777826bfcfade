"""One annotation-file lookup: ``data verify``'s manifest and training name the same files."""

from __future__ import annotations

import json
from pathlib import Path

from captioner.commands.main import main
from captioner.datasets import find_annotations, load_records, verify

from conftest import make_image, tiny_model_args

CAPS = {
    "a.png": ["a red square on grass", "red square"],
    "b.png": ["a blue ball in the sky", "blue ball"],
    "c.png": ["a green dog runs", "green dog"],
}


def make_flickr_with_lemma(root: Path) -> Path:
    """A Flickr8k folder that also holds ``Flickr8k.lemma.token.txt`` (it sorts before ``Flickr8k.token.txt``)."""
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(CAPS):
        make_image(i, size=(48, 48)).save(root / "images" / name)
    (root / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{k}\t{c}\n" for n, cs in CAPS.items() for k, c in enumerate(cs))
    )
    (root / "Flickr8k.lemma.token.txt").write_text(
        "".join(f"{n}#{k}\tLEMMA {c}\n" for n, cs in CAPS.items() for k, c in enumerate(cs))
    )
    (root / "Flickr_8k.trainImages.txt").write_text("a.png\nb.png\n")
    (root / "Flickr_8k.devImages.txt").write_text("c.png\n")
    (root / "Flickr_8k.testImages.txt").write_text("")
    return root


def test_lookup_skips_the_lemma_file(tmp_path: Path) -> None:
    root = make_flickr_with_lemma(tmp_path / "f8k")
    files = find_annotations("flickr8k", root)
    assert files.names() == [
        "Flickr8k.token.txt",
        "Flickr_8k.trainImages.txt",
        "Flickr_8k.devImages.txt",
        "Flickr_8k.testImages.txt",
    ]
    assert load_records("flickr8k", root, "train")[0].captions == CAPS["a.png"]


def test_verify_manifest_and_training_name_the_same_files(tmp_path: Path) -> None:
    root = make_flickr_with_lemma(tmp_path / "f8k")
    manifest = verify.verify_dataset("flickr8k", root, progress=False)
    assert manifest["caption_file"] == "Flickr8k.token.txt"
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "flickr8k",
                "--data-dir",
                str(root),
                "--output",
                str(out),
                "--epochs",
                "1",
                *tiny_model_args(16),
                "--workers",
                "0",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--quiet",
            ]
        )
        == 0
    )
    trained = json.loads((out / "last" / "config.json").read_text())["training"]["annotation_files"]
    assert trained == list(manifest["annotation_files"])
    assert not any("lemma" in name for name in trained)
