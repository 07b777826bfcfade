"""The ONNX Runtime encoder (captioner.runtime, captioner.onnx_export): same captions as torch, batch
invariance, fallback to torch when the file is missing or stale, and the runtime named to users."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import checkpoint, runtime
from captioner.api import Captioner, default_model_path
from captioner.commands.main import main as cli_main

from conftest import build_tiny_checkpoint, make_image

needs_ort = pytest.mark.skipif(
    not runtime.onnxruntime_installed(), reason="onnxruntime is not installed (pip install 'captioner[onnx]')"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with its encoder.onnx built by ``captioner export --onnx``."""
    src = build_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny")
    out = tmp_path_factory.mktemp("exported") / "tiny"
    assert cli_main(["export", "--checkpoint", str(src), "--output", str(out), "--onnx"]) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@needs_ort
def test_export_records_its_recipe_and_is_reproducible(exported: Path, tmp_path: Path) -> None:
    from captioner.onnx_export import build_onnx

    recipe = checkpoint.read_config(exported)[runtime.RECIPE_KEY]
    assert recipe["weights_sha256"] == runtime.file_sha256(exported / checkpoint.WEIGHTS)
    assert recipe["onnx_sha256"] == runtime.file_sha256(exported / runtime.ONNX_FILE)
    assert recipe["outputs"] == ["annotations", "class_probs"] and recipe["opset"] == runtime.OPSET
    assert recipe["precision"] == "fp32" and "torch" in recipe["built_with"]
    again = build_onnx(copy_of(exported, tmp_path))  # same checkpoint, same versions -> the same bytes
    assert again["onnx_sha256"] == recipe["onnx_sha256"]


@needs_ort
def test_onnx_encoder_matches_torch(exported: Path) -> None:
    onnx = Captioner.load(exported, device="cpu")  # auto: the fresh encoder.onnx is used
    torch_cap = Captioner.load(exported, device="cpu", runtime="torch")
    assert onnx.runtime == "onnxruntime-fp32" and torch_cap.runtime == "torch"
    assert onnx.optimizations == ["int8_decoder"]
    images = torch.stack([onnx.preprocess(make_image(i))[0] for i in range(4)])  # (4, 3, S, S)
    (grid_o, concepts_o), (grid_t, concepts_t) = onnx.see(images), torch_cap.see(images)
    torch.testing.assert_close(grid_o, grid_t, atol=2e-4, rtol=1e-3)
    assert [[c.word for c in cs] for cs in concepts_o] == [[c.word for c in cs] for cs in concepts_t]
    caps_o = onnx.caption([make_image(i) for i in range(4)])
    caps_t = torch_cap.caption([make_image(i) for i in range(4)])
    assert [c.text for c in caps_o] == [c.text for c in caps_t]


@needs_ort
def test_shipped_model_onnx_encoder_agrees_with_torch() -> None:
    """The shipped int8 encoder is a rounding of the torch one: grids close, the same concepts, and each guided caption
    places the same ones (exact captions for the fp32 graph: test_onnx_encoder_matches_torch)."""
    from skimage import data

    folder = default_model_path()
    recipe = json.loads((folder / checkpoint.CONFIG).read_text())[runtime.RECIPE_KEY]
    if not (folder / recipe["file"]).is_file():
        pytest.skip(f"{folder} has no {recipe['file']} (make onnx)")
    onnx = Captioner.load(folder, device="cpu", runtime="onnx")
    torch_cap = Captioner.load(folder, device="cpu", runtime="torch")
    assert onnx.runtime == f"onnxruntime-{recipe['precision']}" == "onnxruntime-int8"
    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")]
    pixels = torch.stack([onnx.preprocess(p)[0] for p in photos])  # (4, 3, S, S)
    grid_o, grid_t = onnx.encode(pixels), torch_cap.encode(pixels)  # (4, L, D)
    assert (grid_o - grid_t).abs().mean() < 0.2 * grid_t.abs().mean()  # int8 rounding (13%), not another network
    # int8 rounding, and the int8 decoder's, can flip which of two near-equal beams survives ("a man in a red and
    # white helmet" against "a man with a helmet on the ice"): the concepts, and which of them each caption
    # places, must agree
    for a, b in zip(onnx.caption(photos), torch_cap.caption(photos)):
        assert [c.word for c in a.concepts] == [c.word for c in b.concepts]
        np.testing.assert_allclose([c.probability for c in a.concepts], [c.probability for c in b.concepts], atol=0.05)
        required, _, _ = onnx.concept_map.constraints([a.concepts], onnx.vocab.stoi, len(onnx.vocab), onnx.defaults)
        satisfied = [
            [
                bool(required[0, k, [onnx.vocab.stoi[w] for w in c.tokens if w in onnx.vocab.stoi]].any())
                for k in range(required.shape[1])
            ]
            for c in (a, b)
        ]
        assert satisfied[0] == satisfied[1], (a.text, b.text)


@needs_ort
def test_decoder_runs_on_one_thread_beside_onnx_runtime(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's pool and torch's second thread would share the cores: a small batch's search runs on one
    thread, with the same captions, and the caller's thread count comes back; a large batch keeps its threads."""
    from captioner import api
    from captioner.perf import ONE_THREAD_BATCH

    seen: list[int] = []
    real = api.best_hypotheses

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "best_hypotheses", spy)
    images = [make_image(i) for i in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        onnx = Captioner.load(exported, device="cpu", runtime="onnx")
        torch_path = Captioner.load(exported, device="cpu", runtime="torch")
        texts = [c.text for c in onnx.caption(images, beam_size=3, guidance="none")]
        assert seen == [1] and torch.get_num_threads() == 2
        assert texts == [c.text for c in torch_path.caption(images, beam_size=3, guidance="none")]
        assert seen == [1, 2]  # the torch encoder's path keeps the caller's threads
        onnx.caption([make_image(i) for i in range(ONE_THREAD_BATCH + 1)], beam_size=3, guidance="none")
        assert seen == [1, 2, 2]
    finally:
        torch.set_num_threads(before)


@needs_ort
def test_onnx_path_is_batch_invariant(exported: Path) -> None:
    """An image's grid, caption and attention never depend on its batch-mates."""
    cap = Captioner.load(exported, device="cpu", runtime="onnx")
    images = [make_image(i) for i in range(6)]
    pixels = torch.stack([cap.preprocess(x)[0] for x in images])  # (6, 3, S, S)
    together = cap.encode(pixels)  # (6, L, D)
    for i in (0, 3, 5):
        assert torch.equal(cap.encode(pixels[i : i + 1])[0], together[i])  # bit-identical
    captions = cap.caption(images, beam_size=3)
    for i in (0, 4):
        alone = cap.caption(images[i], beam_size=3)
        assert alone.text == captions[i].text
        assert alone.logprobs == pytest.approx(captions[i].logprobs, abs=1e-5)
        np.testing.assert_allclose(alone.attention, captions[i].attention, atol=1e-5)


@needs_ort
def test_encoder_on_one_thread_is_bit_identical(exported: Path) -> None:
    """``see(threads=1)`` (the service's encoder while a batch decodes) runs a second session of the same file:
    the same grid and concepts as the session opened at load; the torch encoder ignores it."""
    onnx = Captioner.load(exported, device="cpu", runtime="onnx")
    pixels = torch.stack([onnx.preprocess(make_image(i))[0] for i in range(3)])  # (3, 3, S, S)
    grid, concepts = onnx.see(pixels)
    narrow, narrow_concepts = onnx.see(pixels, threads=1)
    assert torch.equal(narrow, grid) and narrow_concepts == concepts
    assert onnx.encoder.session_for(1) is not onnx.encoder.session_for(None)  # one session per thread count
    assert onnx.encoder.session_for(1) is onnx.encoder.session_for(1)  # built once
    plain = Captioner.load(exported, device="cpu", runtime="torch")  # runs as loaded: no other rounding
    assert torch.equal(plain.see(pixels, threads=1)[0], plain.see(pixels)[0])


@needs_ort
def test_prefetched_session_is_taken_over_only_when_it_matches(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ort_session.prefetch (the CLI, while torch imports) builds the session early; the load takes it over when
    file, digest and thread count match, and otherwise builds its own, with the usual errors and fallbacks."""
    from captioner import ort_session

    built: list[int] = []
    build = ort_session._build
    monkeypatch.setattr(ort_session, "_build", lambda folder, recipe, n: built.append(n) or build(folder, recipe, n))
    n = torch.get_num_threads()
    ort_session.prefetch(exported, threads=n)
    assert Captioner.load(exported, device="cpu").runtime == "onnxruntime-fp32"
    assert built == [n] and not ort_session._pending  # built once, early, and handed over

    ort_session.prefetch(exported, threads=n + 1)  # not what the load asks for: dropped, built again
    assert Captioner.load(exported, device="cpu").runtime == "onnxruntime-fp32"
    assert built[1:] == [n + 1, n] and not ort_session._pending

    edited = copy_of(exported, tmp_path / "edited")
    with (edited / runtime.ONNX_FILE).open("ab") as fh:
        fh.write(b"\0")
    ort_session.prefetch(edited, threads=n)  # fails in the background; the load still warns and falls back
    with pytest.warns(UserWarning, match="onnx_sha256"):
        assert Captioner.load(edited, device="cpu").runtime == "torch"
    assert not ort_session._pending

    del built[:]
    monkeypatch.setenv("CAPTIONER_RUNTIME", "torch")  # nothing to prefetch
    ort_session.prefetch(exported, threads=n)
    ort_session.prefetch(tmp_path / "no-such-model", threads=n)
    assert built == [] and not ort_session._pending


@needs_ort
def test_cli_builds_the_encoder_session_while_torch_imports(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioner import ort_session

    built: list[int] = []
    build = ort_session._build
    monkeypatch.setattr(ort_session, "_build", lambda folder, recipe, n: built.append(n) or build(folder, recipe, n))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # what the prefetch takes torch to use
    image = tmp_path / "a.png"
    make_image(2).save(image)
    outs = [tmp_path / "prefetched.jsonl", tmp_path / "exact.jsonl"]
    assert cli_main(["caption", "--checkpoint", str(exported), "--workers", "0", "-o", str(outs[0]), str(image)]) == 0
    assert built == [torch.get_num_threads()] and not ort_session._pending  # the early session was the one used
    assert cli_main(["caption", "--checkpoint", str(exported), "--exact", "-o", str(outs[1]), str(image)]) == 0
    assert len(built) == 1  # --exact runs torch: nothing prefetched
    first = json.loads(outs[0].read_text())
    assert first["caption"] and set(first) >= {"caption", "tokens", "concepts"}


@needs_ort
def test_missing_or_stale_file_falls_back_to_torch(exported: Path, tmp_path: Path) -> None:
    missing = copy_of(exported, tmp_path / "missing")
    (missing / runtime.ONNX_FILE).unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert Captioner.load(missing, device="cpu").runtime == "torch"
    with pytest.raises(runtime.RuntimeUnavailable, match="missing"):
        Captioner.load(missing, device="cpu", runtime="onnx")

    stale = copy_of(exported, tmp_path / "stale")  # retrained weights, the old encoder.onnx left behind
    weights = checkpoint.read_weights(stale)
    weights["decoder.init_h.bias"] = weights["decoder.init_h.bias"] + 1.0
    with (stale / checkpoint.WEIGHTS).open("wb") as fh:
        from safetensors.torch import save

        fh.write(save(weights))
    with pytest.warns(UserWarning, match="other weights"):
        assert Captioner.load(stale, device="cpu").runtime == "torch"

    edited = copy_of(exported, tmp_path / "edited")  # bytes that are not what the recipe built
    with (edited / runtime.ONNX_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.warns(UserWarning, match="onnx_sha256"):
        assert Captioner.load(edited, device="cpu").runtime == "torch"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain checkpoint without the file: torch, silently
        assert Captioner.load(build_tiny_checkpoint(tmp_path / "plain"), device="cpu").runtime == "torch"
    assert Captioner.load(exported, device="cpu", fast=False).runtime == "torch"  # the exact model stays torch


def test_without_onnxruntime_torch_runs(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    assert Captioner.load(tiny_checkpoint, device="cpu").runtime == "torch"
    with pytest.raises(runtime.RuntimeUnavailable, match="not installed"):
        Captioner.load(tiny_checkpoint, device="cpu", runtime="onnx")


def test_unknown_runtime_is_a_clear_cli_error(
    tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "a.png"
    make_image(0).save(image)
    monkeypatch.setenv("CAPTIONER_RUNTIME", "tensorrt")
    assert cli_main(["caption", "--checkpoint", str(tiny_checkpoint), str(image)]) == 2
    assert "CAPTIONER_RUNTIME" in capsys.readouterr().err


@needs_ort
def test_runtime_named_in_summary_line_and_readyz(exported: Path, tmp_path: Path, capsys) -> None:
    from test_service import close, make_app

    image = tmp_path / "a.png"
    make_image(1).save(image)
    out = tmp_path / "out.jsonl"
    assert cli_main(["caption", "--checkpoint", str(exported), "--workers", "0", "-o", str(out), str(image)]) == 0
    assert "encoder: onnxruntime-fp32" in capsys.readouterr().err
    assert json.loads(out.read_text())["caption"]
    app = make_app(exported, CAPTIONER_WARMUP=False)
    try:
        model = app.test_client().get("/readyz").get_json()["model"]
        assert model["runtime"] == "onnxruntime-fp32" and model["optimizations"] == ["int8_decoder"]
    finally:
        close(app)
