"""Packaging: the wheel is a working product on its own, the extras split, one version source.

The wheel test builds the project's wheel (offline, no build isolation), installs it with ``--no-deps``
into a fresh venv whose heavy dependencies (torch, ...) come from this test venv through a ``.pth``
file, hides the evaluation extras (nltk, matplotlib, pycocoevalcap) from it as a core install would
lack them, and captions a photo from an empty folder with ``captioner caption`` and
``Captioner.load()``: the installed code and its packaged model, never this checkout.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, clean_env

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
MODEL = "flickr8k-lite2"
MODEL_FILES = {"model.safetensors", "config.json", "vocab.json", "MODEL_CARD.md", "encoder-int8.onnx"}
EXTRAS_ONLY = ("nltk", "matplotlib", "pycocoevalcap")  # the [train] extra: never needed to caption or serve


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements(path: Path) -> set[str]:
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= _requirements(path.parent / line[3:].strip())
        elif line:
            names.add(_name(line))
    return names


def test_extras_split_and_the_requirements_files_agree():
    project = PYPROJECT["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert not core & set(EXTRAS_ONLY) and not core & {"flask", "gunicorn", "prometheus-client"}
    assert {"flask", "gunicorn", "prometheus-client"} <= extras["service"]
    assert set(EXTRAS_ONLY) <= extras["train"]
    assert {"pytest", "kubernetes-validate"} <= extras["dev"] and "captioner" in extras["dev"]
    # requirements.txt pins exactly the service image's packages: core + [service] + [onnx] (the image runs the
    # encoder in ONNX Runtime); then [train]; then [dev]
    assert _requirements(REPO / "requirements.txt") == core | extras["service"] | extras["onnx"]
    assert _requirements(REPO / "requirements-train.txt") == core | extras["service"] | extras["onnx"] | extras["train"]
    assert _requirements(REPO / "requirements-test.txt") == core | set().union(*extras.values()) - {"captioner"}


def test_one_version_source():
    import captioner
    from service.config import load_settings
    from service.openapi import build_spec

    assert captioner.__version__ == VERSION  # importlib.metadata of the installed project
    assert build_spec(load_settings({}, {}))["info"]["version"] == VERSION
    assert not re.search(r"__version__\s*=\s*[\"']\d+\.\d+", (REPO / "captioner" / "__init__.py").read_text())


def test_tokenizer_matches_the_nltk_one_it_replaced():
    from nltk.tokenize import RegexpTokenizer

    from captioner.vocab import tokenize

    nltk_tok = RegexpTokenizer(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")
    for text in [
        "A man's T-shirt, red.",
        "two--dogs  run''",
        "ÉCOLE café 3-4 kids' toys!",
        "",
        "-a- 'b' c-'d",
        "line\nbreak\ttab",
        "x-ray O'Neil 1990s",
    ]:
        assert tokenize(text) == nltk_tok.tokenize(text.lower()), text


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (nothing is written into the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("captioner", "service"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    shutil.copytree(REPO / "models" / MODEL, src / "models" / MODEL, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (found,) = dist.glob("captioner-*.whl")
    return found


def test_wheel_contents(wheel):
    assert wheel.name == f"captioner-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"captioner-{VERSION}.dist-info/METADATA").decode()
    packaged = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"captioner/models/{MODEL}/")}
    assert packaged == MODEL_FILES  # weights, config, vocabulary and the card with its data licence
    assert {
        "captioner/api.py",
        "captioner/datasets/__init__.py",
        "service/app.py",
        "service/logs.py",
        "service/templates/index.html",
        "service/static/app.js",
        "captioner/py.typed",
        "service/py.typed",
    } <= names
    assert f"captioner-{VERSION}.dist-info/licenses/LICENSE" in names
    assert not any(n.startswith(("tests/", "models/", "bench/", "docs/")) for n in names)
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert core and not any(re.search(r"\b(flask|gunicorn|nltk|matplotlib|pycocoevalcap)\b", line) for line in core)
    assert "License-Expression: MIT" in meta
    for extra in ("service", "train", "dev"):
        assert f"Provides-Extra: {extra}" in meta


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed (--no-deps); dependencies from this venv's site-packages."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (site_dir,) = (venv / "lib").glob("python3*/site-packages")
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    deps += [p for p in site.getsitepackages() if p not in deps]
    (site_dir / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    # as in a core install without the [train] extra: importing these fails
    (site_dir / "zz_no_train_extra.pth").write_text(f"import sys; sys.modules.update(dict.fromkeys({EXTRAS_ONLY!r}))\n")
    return venv


def _run(venv: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = clean_env()
    for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
        env.pop(key, None)
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_installed_wheel_captions_from_an_empty_folder(fresh_venv, tmp_path):
    from PIL import Image
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(data.chelsea()).save(photos / "cat.jpg", quality=92)
    empty = tmp_path / "empty"
    empty.mkdir()
    (site_dir,) = (fresh_venv / "lib").glob("python3*/site-packages")

    # the library: the installed code and its packaged model; neither the checkout nor the extras
    probe = f"""
import json, sys
import captioner
from captioner import Captioner
from captioner.settings import default_model_path
assert not any(p and {str(REPO)!r} in p and 'site-packages' not in p for p in sys.path), sys.path
for extra in {EXTRAS_ONLY!r}:
    try:
        __import__(extra)
    except ImportError:
        pass
    else:
        raise SystemExit(extra + ' is importable')
import service.app  # the service imports without them too
cap = Captioner.load()
out = cap.caption({str(photos / "cat.jpg")!r})
print(json.dumps({{"file": captioner.__file__, "version": captioner.__version__, "model": str(default_model_path()),
                  "name": cap.name, "caption": out.text}}))
"""
    done = _run(fresh_venv, [str(fresh_venv / "bin" / "python"), "-c", probe], empty)
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(site_dir), info
    assert Path(info["model"]) == site_dir / "captioner" / "models" / MODEL and info["name"] == MODEL
    assert info["version"] == VERSION and len(info["caption"].split()) >= 3, info
    digest = {
        p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
        for p in (Path(info["model"]), REPO / "models" / MODEL)
    }
    assert len(set(digest.values())) == 1, digest  # the shipped weights, byte for byte

    # the CLI entry point, overlays included (drawn without matplotlib)
    done = _run(
        fresh_venv,
        [
            str(fresh_venv / "bin" / "captioner"),
            "caption",
            str(photos),
            "--output",
            "caps.jsonl",
            "--attention-dir",
            "attention",
            "--beam-size",
            "3",
            "-q",
        ],
        empty,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(line) for line in (empty / "caps.jsonl").read_text().splitlines()]
    assert record["caption"] == info["caption"], (record, info)
    assert list((empty / "attention").rglob("*.png")), "no overlays written"
    assert sorted(p.name for p in empty.iterdir()) == ["attention", "caps.jsonl"]

    # a command of the [train] extra says what to install instead of a traceback
    done = _run(
        fresh_venv,
        [str(fresh_venv / "bin" / "captioner"), "evaluate", "--dataset", "flickr8k", "--data-dir", str(photos)],
        empty,
    )
    assert done.returncode == 2 and "pip install 'captioner[train]'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
