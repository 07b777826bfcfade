"""The command line's layout: light parsers, lazy package names, one image-files dataset, one torchrun setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import batch
from captioner.distributed import Distributed
from captioner.encoder import EncoderConfig
from captioner.images import load_and_preprocess

from conftest import make_image

REPO = Path(__file__).resolve().parent.parent

HEAVY = ("torch", "numpy", "PIL", "tqdm", "matplotlib")
PROBE = """
import json, sys
{code}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
"""


def heavy_modules(code: str) -> list[str]:
    """The heavy packages a fresh interpreter holds after running ``code``."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["caption", "--help"],
        ["data", "verify", "--help"],
        ["score", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
    ],
)
def test_help_imports_no_heavy_package(argv: list[str]) -> None:
    code = (
        f"from captioner.commands.main import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code"
    )
    assert heavy_modules(code) == []


def test_usage_errors_answer_before_torch_loads(tmp_path: Path) -> None:
    code = (
        f"from captioner.commands.main import main\ntry:\n    main(['caption', {str(tmp_path)!r}, '--resume'])\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code"
    )
    assert heavy_modules(code) == []
    code = (
        f"from captioner.commands.main import main\nassert main(['data', 'stats', '--dataset', 'custom', "
        f"'--data-dir', {str(tmp_path / 'none')!r}]) == 2"
    )
    assert "torch" not in heavy_modules(code)


def test_encoder_session_prefetch_imports_no_torch() -> None:
    """The CLI builds the ONNX Runtime session while torch imports: that path must not import torch itself."""
    assert heavy_modules("import captioner.ort_session") == []
    code = (
        "import threading\nfrom captioner.ort_session import prefetch\nfrom captioner.settings import "
        "default_model_path\nprefetch(default_model_path())\n"
        "[t.join() for t in threading.enumerate() if t.name == 'captioner-ort-prefetch']"
    )
    assert "torch" not in heavy_modules(code)


def test_package_names_are_imported_on_first_use() -> None:
    assert heavy_modules("import captioner, captioner.settings, captioner.datasets") == []
    assert "torch" in heavy_modules("import captioner\ncaptioner.Captioner")
    assert heavy_modules("from captioner import ImageError") == ["PIL", "numpy"]
    with pytest.raises(AttributeError):
        import captioner

        captioner.no_such_name  # noqa: B018


def test_image_files_decode_once_for_tensor_and_thumbnail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EncoderConfig(backbone="efficientnet-lite0", image_size=64)
    big, bad = tmp_path / "big.jpg", tmp_path / "bad.jpg"
    make_image(1, (900, 500)).save(big, quality=90)
    bad.write_bytes(b"not an image")
    decodes = []
    real = batch.load_image
    monkeypatch.setattr(batch, "load_image", lambda *a, **k: decodes.append(a[0]) or real(*a, **k))

    item = batch.ImageFiles([str(big), str(bad)], cfg, thumbs=True)[0]
    assert decodes == [str(big)], "one decode gives both the model's input and the thumbnail"
    expected, _ = load_and_preprocess(big, cfg.image_size, cfg.norm)  # what Captioner.preprocess returns
    assert torch.equal(item.image, expected)
    assert item.thumb is not None and item.thumb.dtype.name == "uint8" and max(item.thumb.shape[:2]) <= batch.THUMB_SIDE
    assert batch.ImageFiles([str(big)], cfg)[0].thumb is None

    failed = batch.ImageFiles([str(big), str(bad)], cfg)[1]
    assert failed.image is None and failed.error is not None and failed.error[1] == "undecodable"
    collated = batch.collate([item, failed])
    assert collated.ok == [0] and tuple(collated.images.shape) == (1, 3, 64, 64) and 1 in collated.errors


def test_distributed_without_torchrun_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with Distributed() as ddp:
        assert (ddp.world, ddp.rank, ddp.is_main, ddp.owned) == (1, 0, True, False)
        assert ddp.broadcast({"todo": [1, 2]}) == {"todo": [1, 2]}
        assert ddp.sum([3, 4]) == [3, 4]
        ddp.barrier()
        assert ddp.device("cpu") == torch.device("cpu")
        assert ddp.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
