"""``captioner caption`` when things go wrong: SIGTERM mid-run, a model that fails on batches, one that always fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from captioner.api import Captioner
from captioner.commands.main import main

from conftest import make_image

REPO = Path(__file__).resolve().parent.parent
N_IMAGES = 6

# The real command, with each batch's decode slowed down so that a SIGTERM lands mid-run.
SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    from captioner.api import Captioner
    real = Captioner.decode
    def slow(self, *a, **k):
        time.sleep(0.4)
        return real(self, *a, **k)
    Captioner.decode = slow
    from captioner.commands.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N_IMAGES):
        make_image(i).save(folder / f"p{i}.jpg")
    return folder


def expected_paths(folder: Path) -> list[str]:
    return [str(folder / f"p{i}.jpg") for i in range(N_IMAGES)]


def caption(ckpt: Path, *args: str) -> int:
    return main(["caption", *args, "--checkpoint", str(ckpt), "--workers", "0", "-q"])


def test_sigterm_closes_the_json_array_exits_130_and_resume_completes(
    photos: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-c",
        SLOW_CLI,
        "caption",
        str(photos),
        "--checkpoint",
        str(tiny_checkpoint),
        "-o",
        str(out),
        "--workers",
        "0",
        "--batch-size",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out.exists() and out.read_text().count('"image"') >= 2):  # two records written
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no records after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    partial = json.loads(out.read_text())  # a complete, valid JSON array
    done = [r["image"] for r in partial]
    assert 2 <= len(done) < N_IMAGES, "the signal must have landed mid-run"
    assert done == expected_paths(photos)[: len(done)] and all(r["caption"] for r in partial)

    assert caption(tiny_checkpoint, str(photos), "-o", str(out), "--resume") == 0
    recs = json.loads(out.read_text())
    assert [r["image"] for r in recs] == expected_paths(photos)  # each image once, in input order
    assert recs[: len(done)] == partial  # the records from before the signal are kept as they were
    assert all("error" not in r for r in recs)


@pytest.fixture
def flaky_decode(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Captioner.decode raises RuntimeError (as on out-of-memory) for more than one image; records batch sizes."""
    real = Captioner.decode
    sizes: list[int] = []

    def decode(self, annotations, *a, **k):
        sizes.append(annotations.shape[0])
        if annotations.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, annotations, *a, **k)

    monkeypatch.setattr(Captioner, "decode", decode)
    return sizes


def test_a_batch_failure_is_retried_image_by_image(
    photos: Path, tiny_checkpoint: Path, tmp_path: Path, flaky_decode: list[int]
) -> None:
    out = tmp_path / "out.jsonl"
    assert caption(tiny_checkpoint, str(photos), "-o", str(out), "--batch-size", "4") == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == expected_paths(photos)
    assert all("error" not in r and r["caption"] for r in recs)
    assert flaky_decode == [4, 1, 1, 1, 1, 2, 1, 1]  # each failed batch, then its images one by one
    # the retried captions are the ones a healthy run gives
    reference = Captioner.load(tiny_checkpoint, device="cpu").caption(expected_paths(photos)[:1])
    assert recs[0]["caption"] == reference[0].text


def test_a_model_that_always_fails_gives_model_error_records_and_exit_1(
    photos: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def broken(self, *a, **k):
        raise RuntimeError("device lost (simulated)")

    monkeypatch.setattr(Captioner, "decode", broken)
    (photos / "zz-broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "caption",
                str(photos),
                "--checkpoint",
                str(tiny_checkpoint),
                "--workers",
                "0",
                "-o",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 1
    )
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in recs] == [*expected_paths(photos), str(photos / "zz-broken.jpg")]
    for r in recs[:-1]:
        assert r["error_code"] == "model_error" and "device lost (simulated)" in r["error"] and "caption" not in r
    assert recs[-1]["error_code"] == "undecodable"  # an input error keeps its own code
    assert f"0 captioned, 0 skipped, {N_IMAGES + 1} failed" in capsys.readouterr().err
