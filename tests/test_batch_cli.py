"""``captioner caption``: inputs, record formats, resume, attention files, exit statuses, torchrun."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import batch, outputs
from captioner.commands.main import main

from conftest import assert_scored_by_the_model, image_bytes, make_image

BIN = Path(sys.executable).parent
GOOD = ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"]
BROKEN = ["text.jpg", "trunc.jpg", "zero.jpg"]  # sorted after the good ones


@pytest.fixture
def folder(images_dir: Path) -> Path:
    """img0..img3.jpg plus a text file named .jpg, a truncated JPEG, an empty file, a .txt and sub/img0.jpg."""
    (images_dir / "text.jpg").write_text("not an image\n")
    (images_dir / "trunc.jpg").write_bytes(image_bytes(make_image(7, (160, 120)))[:600])
    (images_dir / "zero.jpg").write_bytes(b"")
    (images_dir / "notes.txt").write_text("ignored: not an image extension\n")
    (images_dir / "sub").mkdir()
    make_image(11).save(images_dir / "sub" / "img0.jpg")
    return images_dir


def caption(ckpt: Path, *args: str, quiet: bool = True) -> int:
    return main(["caption", *args, "--checkpoint", str(ckpt), "--workers", "0", *(["-q"] if quiet else [])])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_broken_images(folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    assert caption(tiny_checkpoint, str(folder), "-o", str(out), quiet=False) == 1
    recs = read_jsonl(out)
    assert [Path(r["image"]).name for r in recs] == GOOD + BROKEN  # sorted; .txt and sub/ not taken
    assert all(r["image"].startswith(str(folder)) for r in recs)  # the path as given
    for r in recs[:4]:
        assert "error" not in r and isinstance(r["caption"], str) and isinstance(r["score"], float)
        assert [t["word"] for t in r["tokens"]] == r["caption"].split()
        assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in r["tokens"])
    for r in recs[4:]:
        assert r["error"] and r["error_code"] == "undecodable" and "caption" not in r
    err = capsys.readouterr().err
    assert all(name in err for name in BROKEN)
    assert "4 captioned, 0 skipped, 3 failed" in err and "images/s" in err


def test_stdout_workers_match_api(images_dir: Path, tiny_checkpoint: Path, capsys) -> None:
    """Batched + worker-decoded output equals the library's own captions (one preprocessing path)."""
    from captioner.api import Captioner

    code = main(
        [
            "caption",
            str(images_dir),
            "--checkpoint",
            str(tiny_checkpoint),
            "--workers",
            "2",
            "--batch-size",
            "3",
            "--beam-size",
            "2",
            "-q",
        ]
    )
    assert code == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    paths = [str(images_dir / n) for n in GOOD]
    expected = Captioner.load(tiny_checkpoint, device="cpu").caption(paths, beam_size=2)
    assert [r["image"] for r in recs] == paths
    assert [r["caption"] for r in recs] == [c.text for c in expected]
    assert [r["score"] for r in recs] == pytest.approx([c.score for c in expected], abs=1e-3)
    cap = Captioner.load(tiny_checkpoint, device="cpu")
    for r in recs:  # the numbers are the model's, not only the same as the library's
        assert_scored_by_the_model(
            cap, r["image"], [t["word"] for t in r["tokens"]], [t["logprob"] for t in r["tokens"]], r["score"]
        )


def test_recursive_glob_stdin_and_missing(folder: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "r.jsonl"
    assert caption(tiny_checkpoint, str(folder), "-r", "-o", str(out)) == 1
    assert str(folder / "sub" / "img0.jpg") in [r["image"] for r in read_jsonl(out)]
    assert len(read_jsonl(out)) == 8

    # globs: only image files; '**' crosses folders; duplicates are captioned once
    pattern = str(folder / "**" / "img0.jpg")
    assert caption(tiny_checkpoint, str(folder / "img[12].jpg"), pattern, str(folder / "img1.jpg"), "-o", str(out)) == 0
    assert [r["image"] for r in read_jsonl(out)] == [
        str(folder / "img1.jpg"),
        str(folder / "img2.jpg"),
        str(folder / "img0.jpg"),
        str(folder / "sub" / "img0.jpg"),
    ]

    # a glob that matches nothing is a failed input, the rest is still captioned
    assert caption(tiny_checkpoint, str(folder / "nomatch*.png"), str(folder / "img3.jpg"), "-o", str(out)) == 1
    recs = read_jsonl(out)
    assert recs[0]["error_code"] == "not_found" and recs[1]["caption"]

    # a list of paths on stdin (blank lines ignored; a folder in it is expanded)
    stdin = f"{folder / 'img2.jpg'}\n\n{folder / 'missing.jpg'}\n{folder / 'sub'}\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert caption(tiny_checkpoint, "-", "-o", str(out)) == 1
    recs = read_jsonl(out)
    assert [Path(r["image"]).name for r in recs] == ["img2.jpg", "missing.jpg", "img0.jpg"]
    assert recs[1]["error_code"] == "not_found" and "error" not in recs[2]


def test_resume_after_torn_last_line(folder: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.jsonl"
    assert caption(tiny_checkpoint, str(folder), "-o", str(out)) == 1
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    torn = b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2]  # killed while writing the third record
    out.write_bytes(torn)
    make_image(42).save(folder / "img9.jpg")  # a new image arrived meanwhile

    assert caption(tiny_checkpoint, str(folder), "-o", str(out), "--resume", quiet=False) == 1
    recs = read_jsonl(out)  # every line parses: the torn fragment is gone
    assert out.read_bytes().startswith(b"".join(lines[:2]))
    assert [Path(r["image"]).name for r in recs] == GOOD[:2] + GOOD[2:] + ["img9.jpg"] + BROKEN
    assert len({r["image"] for r in recs}) == len(recs) == 8
    assert "3 captioned, 2 skipped, 3 failed" in capsys.readouterr().err

    before = out.read_bytes()  # a finished job: nothing to do, exit status still reports the failures
    assert caption(tiny_checkpoint, str(folder), "-o", str(out), "--resume", quiet=False) == 1
    assert out.read_bytes() == before
    assert "0 captioned, 8 skipped, 3 failed (3 in an earlier run)" in capsys.readouterr().err
    assert caption(tiny_checkpoint, *(str(folder / n) for n in GOOD), "-o", str(out), "--resume") == 0


def test_resume_recovers_parts_of_killed_torchrun_job(images_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    assert caption(tiny_checkpoint, str(images_dir), "-o", str(out)) == 0
    recs = read_jsonl(out)
    out.unlink()  # a 2-rank job killed before the merge: only part files, rank 1's last line torn
    (tmp_path / "out.jsonl.part0-of-2.jsonl").write_text(json.dumps(recs[0]) + "\n")
    (tmp_path / "out.jsonl.part1-of-2.jsonl").write_text(json.dumps(recs[1]) + "\n" + json.dumps(recs[3])[:40])
    assert caption(tiny_checkpoint, str(images_dir), "-o", str(out), "--resume") == 0
    assert read_jsonl(out) == recs
    assert not list(tmp_path.glob("out.jsonl.part*"))


def test_json_format_valid_after_interrupt_and_resume(
    images_dir: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "out.json"
    real = outputs.make_record
    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C after two records
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "make_record", interrupted)
    assert caption(tiny_checkpoint, str(images_dir), "-o", str(out)) == 130
    assert len(json.loads(out.read_text())) == 2  # still a valid JSON array
    monkeypatch.setattr(outputs, "make_record", real)

    assert caption(tiny_checkpoint, str(images_dir), "-o", str(out), "--resume") == 0
    recs = json.loads(out.read_text())
    assert [Path(r["image"]).name for r in recs] == GOOD

    text = out.read_text()  # a kill: no closing bracket, last record torn
    out.write_text(text[: text.rindex("},\n{") + 12])
    assert caption(tiny_checkpoint, str(images_dir), "-o", str(out), "--resume") == 0
    assert json.loads(out.read_text()) == recs

    empty = tmp_path / "none.json"  # nothing captioned is still valid JSON
    assert caption(tiny_checkpoint, str(images_dir / "nomatch*.jpg"), "-o", str(empty), "--format", "json") == 1
    assert json.loads(empty.read_text())[0]["error_code"] == "not_found"


def test_csv_format_and_resume(folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert caption(tiny_checkpoint, str(folder), "-o", str(out), "--n-best", "2") == 1
    rows = list(csv.DictReader(out.open(newline="")))
    assert list(rows[0]) == outputs.CSV_FIELDS
    assert [Path(r["image"]).name for r in rows] == GOOD + BROKEN
    assert [t["word"] for t in json.loads(rows[0]["tokens"])] == rows[0]["caption"].split()
    assert len(json.loads(rows[0]["alternatives"])) == 1
    assert float(rows[1]["score"]) < 0 and rows[4]["error"] and not rows[4]["caption"]

    text = out.read_text()
    out.write_text(text[: text.index(str(folder / "img2.jpg")) + 30])  # torn third row
    assert caption(tiny_checkpoint, str(folder), "-o", str(out), "--resume", "--n-best", "2") == 1
    assert list(csv.DictReader(out.open(newline=""))) == rows


def test_attention_dir(folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from captioner.api import Captioner

    inputs = [folder / "img0.jpg", folder / "sub" / "img0.jpg", folder / "sub" / ".." / "img1.jpg", folder / "zero.jpg"]
    hashes = {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in inputs}
    att = tmp_path / "att"
    out = tmp_path / "out.jsonl"
    assert (
        caption(tiny_checkpoint, *map(str, inputs), "-o", str(out), "--attention-dir", str(att), "--n-best", "3") == 1
    )
    recs = read_jsonl(out)
    grid = Captioner.load(tiny_checkpoint, device="cpu").grid
    npzs = sorted(att.glob("*.npz"))
    assert len(npzs) == 3 and len({p.stem for p in npzs}) == 3  # same basename, distinct names
    for rec in recs[:3]:
        npz = Path(rec["attention"])
        assert npz.parent == att and npz.name.startswith(("img0-", "img1-"))
        with np.load(npz) as data:
            attention, tokens = data["attention"], list(data["tokens"])
        assert tokens == [t["word"] for t in rec["tokens"]]
        assert attention.shape == (len(tokens), *grid)  # (T, H, W)
        np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
        pngs = sorted((att / npz.stem).glob("*.png"))
        assert len(pngs) == len(tokens) and pngs[0].name.startswith("00-")
        with Image.open(pngs[0]) as im:
            assert im.format == "PNG" and max(im.size) <= batch.THUMB_SIDE
        assert len(rec["alternatives"]) == 2
    assert "attention" not in recs[3] and recs[3]["error"]
    for f in att.rglob("*"):  # nothing outside the folder, no temporary files left, inputs untouched
        assert f.resolve().is_relative_to(att.resolve()) and ".tmp" not in f.name
    assert {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in inputs} == hashes
    assert outputs.attention_name("../../etc/passwd").startswith("passwd-")
    assert "/" not in outputs.attention_name("a/..\\..jpg")


@pytest.mark.parametrize(
    "bad",
    [
        ["--beam-size", "0"],
        ["--beam-size", "11"],
        ["--format", "xml"],
        ["--resume"],
        ["--batch-size", "0"],
        ["--workers", "-1"],
        ["--n-best", "x"],
        ["--no-such-flag"],
    ],
)
def test_usage_errors_exit_2(bad: list[str], images_dir: Path, tiny_checkpoint: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        caption(tiny_checkpoint, str(images_dir), *bad)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_checkpoint(images_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["caption", str(images_dir), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    monkeypatch.setenv("CAPTIONER_MODEL", str(tmp_path / "nope"))
    assert main(["caption", str(images_dir)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))


def test_installed_command(folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        [
            str(BIN / "captioner"),
            "caption",
            str(folder),
            "--checkpoint",
            str(tiny_checkpoint),
            "-o",
            str(out),
            "--workers",
            "1",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 1, proc.stderr
    assert len(read_jsonl(out)) == 7
    assert "img/s" in proc.stderr and "4 captioned, 0 skipped, 3 failed" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_merge_in_input_order(folder: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.jsonl"
    assert caption(tiny_checkpoint, str(folder), "-r", "-o", str(single)) == 1
    out = tmp_path / "dist.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(BIN / "captioner"),
            "caption",
            str(folder),
            "-r",
            "--checkpoint",
            str(tiny_checkpoint),
            "-o",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken files fail on both ranks' behalf
    assert out.read_text() == single.read_text()
    assert not list(tmp_path.glob("dist.jsonl.part*"))
    assert "5 captioned, 0 skipped, 3 failed" in proc.stderr
