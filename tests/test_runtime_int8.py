"""The int8 encoder export (captioner.onnx_export --precision int8): calibrated reproducibly on named Flickr8k
train photos, batch invariant, named to users, falling back to torch when stale, and refused without data."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import checkpoint, runtime
from captioner.api import Captioner
from captioner.commands.main import main as cli_main

from conftest import build_tiny_checkpoint, make_image

pytestmark = pytest.mark.skipif(
    not runtime.onnxruntime_installed(), reason="onnxruntime is not installed (pip install 'captioner[onnx]')"
)
INT8_FILE = runtime.onnx_file("int8")


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flickr8k-shaped folder: images/, the split lists and the token file (6 train photos, 2 dev)."""
    root = tmp_path_factory.mktemp("flickr8k")
    (root / "images").mkdir()
    names = [f"{1000 + i}_photo.jpg" for i in range(8)]
    for i, name in enumerate(names):
        make_image(i, size=(120, 90)).save(root / "images" / name, quality=90)
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:6]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[6:]) + "\n")
    (root / "Flickr_8k.testImages.txt").write_text("")
    tokens = [f"{n}#{k}\ta dog runs on the grass" for n in names for k in range(2)]
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    return root


def export_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--checkpoint", str(src), "--output", str(out), "--onnx", "--precision", "int8", *extra]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, flickr: Path) -> Path:
    """A tiny checkpoint with its int8 encoder built by ``captioner export --onnx --precision int8``."""
    src = build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny")
    out = tmp_path_factory.mktemp("exported") / "tiny"
    assert cli_main(export_args(src, out, "--calibration-data", str(flickr), "--calibration-images", "4")) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_int8_export_records_its_recipe_and_is_reproducible(exported: Path, flickr: Path, tmp_path: Path) -> None:
    from captioner.onnx_export import Calibration, build_onnx

    recipe = checkpoint.read_config(exported)[runtime.RECIPE_KEY]
    assert recipe["file"] == INT8_FILE and recipe["precision"] == "int8"
    assert not (exported / runtime.ONNX_FILE).exists()  # one recipe, one file
    assert recipe["onnx_sha256"] == runtime.file_sha256(exported / INT8_FILE)
    train = (flickr / "Flickr_8k.trainImages.txt").read_text().split()
    assert recipe["calibration"]["photos"] == train[:4] and recipe["calibration"]["split"] == "train"
    assert len(recipe["calibration"]["photos_sha256"]) == 64
    assert recipe["quantization"] == {
        "pre_process": "quant_pre_process(skip_symbolic_shape=True)",
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",
        "method": "minmax",
        "exclude": [
            "/encoder/_conv_stem/Conv",
            "/encoder/_blocks.0/_depthwise_conv/Conv",
            "/encoder/_blocks.0/_project_conv/Conv",
        ],  # the default: the stem and first block stay fp32
    }
    assert {"torch", "onnx", "onnxruntime", "captioner"} <= recipe["built_with"].keys()
    again = build_onnx(copy_of(exported, tmp_path), "int8", Calibration(flickr, 4))  # same inputs -> same bytes
    assert again["onnx_sha256"] == recipe["onnx_sha256"]
    other = build_onnx(copy_of(exported, tmp_path / "three"), "int8", Calibration(flickr, 3))
    assert other["onnx_sha256"] != recipe["onnx_sha256"]  # the calibration set shapes the file
    whole = copy_of(exported, tmp_path / "whole")
    assert (
        cli_main(
            export_args(whole, whole, "--calibration-data", str(flickr), "--calibration-images", "4", "--keep-fp32")
        )
        == 0
    )  # no node named: every node quantised
    everything = checkpoint.read_config(whole)[runtime.RECIPE_KEY]
    assert everything["quantization"]["exclude"] == []
    assert everything["onnx_sha256"] != recipe["onnx_sha256"]


def test_int8_encoder_is_batch_invariant_and_close_to_torch(exported: Path) -> None:
    cap = Captioner.load(exported, device="cpu", runtime="onnx")
    assert cap.runtime == "onnxruntime-int8"
    images = [make_image(i) for i in range(6)]
    pixels = torch.stack([cap.preprocess(x)[0] for x in images])  # (6, 3, S, S)
    together = cap.encode(pixels)  # (6, L, D)
    for i in (0, 2, 5):
        assert torch.equal(cap.encode(pixels[i : i + 1])[0], together[i])  # bit-identical, static scales
    exact = Captioner.load(exported, device="cpu", runtime="torch").encode(pixels)  # (6, L, D)
    assert (together - exact).abs().mean() < 0.35 * exact.abs().mean()  # int8 rounding, not another network
    captions = cap.caption(images, beam_size=3)
    for i in (0, 4):
        alone = cap.caption(images[i], beam_size=3)
        assert alone.text == captions[i].text
        assert alone.logprobs == pytest.approx(captions[i].logprobs, abs=1e-5)
        np.testing.assert_allclose(alone.attention, captions[i].attention, atol=1e-5)


def test_batches_encode_ahead_on_one_thread_with_the_same_captions(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the int8 encoder, batch captioning encodes the next batch on one ONNX Runtime thread while the decoder
    works; the results, a batch of unreadable files among them, are those of the one-batch-at-a-time loop."""
    from captioner import batch

    cap = Captioner.load(exported, device="cpu", runtime="onnx")
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))
        make_image(i).save(paths[-1])
    paths[2:4] = [str(tmp_path / "missing.png"), str(tmp_path / "broken.png")]  # batch 2 of size 2: no image at all
    (tmp_path / "broken.png").write_bytes(b"not an image")
    seen_threads: list[int | None] = []
    see = cap.see
    monkeypatch.setattr(cap, "see", lambda images, threads=None: seen_threads.append(threads) or see(images, threads))

    def run() -> list[tuple[str, str | None, str | None]]:
        return [(r.path, r.caption.text if r.caption else None, r.code) for r in batch.iter_captions(cap, paths, 2)]

    ahead = run()
    assert seen_threads == [1, 1, 1]  # batches 1, 3 and 4 (its last photo alone) on one thread; batch 2 has no image
    monkeypatch.setattr(batch, "OVERLAP_RUNTIMES", ())
    seen_threads.clear()
    assert run() == ahead and seen_threads == [None, None, None]
    assert [code for _, _, code in ahead] == [None, None, "not_found", "undecodable", None, None, None]


def test_evaluate_scores_the_exported_encoder_that_captions_run(
    exported: Path, flickr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``captioner evaluate`` scores what ships: the int8 encoder's captions, named in its output; torch on request."""
    import json

    def evaluate(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        args = ["evaluate", "--dataset", "flickr8k", "--data-dir", str(flickr), "--split", "dev"]
        assert cli_main([*args, "--checkpoint", str(exported), "--no-meteor", "--output", str(out)]) == 0
        return json.loads(out.read_text())

    scored = evaluate("int8")
    cap = Captioner.load(exported, device="cpu")
    dev = [flickr / "images" / name for name in (flickr / "Flickr_8k.devImages.txt").read_text().split()]
    assert scored["runtime"] == cap.runtime == "onnxruntime-int8"
    assert scored["captions"] == {p.name: c.text for p, c in zip(dev, cap.caption([str(p) for p in dev]))}
    monkeypatch.setenv("CAPTIONER_RUNTIME", "torch")
    assert evaluate("torch")["runtime"] == "torch"


def test_int8_runtime_named_in_summary_line_and_readyz(exported: Path, tmp_path: Path, capsys) -> None:
    from test_service import close, make_app, response_schema, validate

    image = tmp_path / "a.png"
    make_image(1).save(image)
    out = tmp_path / "out.jsonl"
    assert cli_main(["caption", "--checkpoint", str(exported), "--workers", "0", "-o", str(out), str(image)]) == 0
    assert "encoder: onnxruntime-int8" in capsys.readouterr().err
    app = make_app(exported, CAPTIONER_WARMUP=False)
    try:
        client = app.test_client()
        ready = client.get("/readyz").get_json()
        assert ready["model"]["runtime"] == "onnxruntime-int8"
        spec = client.get("/openapi.json").get_json()
        validate(ready, response_schema(spec, "/readyz", "get", 200), spec)  # the documented enum names it
    finally:
        close(app)


def test_missing_or_stale_int8_file_falls_back_to_torch(exported: Path, tmp_path: Path) -> None:
    missing = copy_of(exported, tmp_path / "missing")
    (missing / INT8_FILE).unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert Captioner.load(missing, device="cpu").runtime == "torch"
    edited = copy_of(exported, tmp_path / "edited")
    with (edited / INT8_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.warns(UserWarning, match="onnx_sha256"):
        assert Captioner.load(edited, device="cpu").runtime == "torch"
    with pytest.raises(runtime.RuntimeUnavailable, match="onnx_sha256"):
        Captioner.load(edited, device="cpu", runtime="onnx")


def test_rebuilding_in_fp32_replaces_the_int8_recipe(exported: Path, tmp_path: Path) -> None:
    from captioner.onnx_export import build_onnx

    folder = copy_of(exported, tmp_path)
    recipe = build_onnx(folder)
    assert recipe["precision"] == "fp32" and (folder / runtime.ONNX_FILE).is_file()
    assert not (folder / INT8_FILE).exists()
    assert checkpoint.read_config(folder)[runtime.RECIPE_KEY] == recipe  # no calibration keys left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Captioner.load(folder, device="cpu").runtime == "onnxruntime-fp32"


def test_int8_export_without_calibration_data_fails_cleanly(tmp_path: Path, flickr: Path, capsys) -> None:
    from captioner.onnx_export import main as onnx_main

    src = build_tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert cli_main(export_args(src, out)) == 2
    assert "--calibration-data" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(export_args(src, out, "--calibration-data", str(empty))) == 2
    assert "calibration data" in capsys.readouterr().err
    assert cli_main(export_args(src, out, "--calibration-data", str(flickr), "--calibration-images", "50")) == 2
    assert "6 train photos, 50 asked for" in capsys.readouterr().err
    assert not out.exists()  # the data is checked before the checkpoint is copied
    before = (src / checkpoint.CONFIG).read_text()
    assert onnx_main([str(src), "--precision", "int8"]) == 2
    assert "--calibration-data" in capsys.readouterr().err
    assert (src / checkpoint.CONFIG).read_text() == before
