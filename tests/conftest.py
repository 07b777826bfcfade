"""Shared fixtures: tiny generated images, captions and checkpoints (no ../shared data, no network)."""

from __future__ import annotations

import io
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "the", "grass", "red", "ball", "with", "blue", "sky", "man"]
TINY_CAPTIONS = [
    "a dog runs on the grass",
    "a cat sits on the red ball",
    "a man with a blue ball",
    "the dog sits",
]


def make_image(seed: int = 0, size: tuple[int, int] = (96, 72), mode: str = "RGB") -> Image.Image:
    """A deterministic, non-trivial picture (smooth gradients plus a coloured square)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(1, w - 1)), (yy * 255 // max(1, h - 1)), np.full_like(xx, (seed * 53) % 256)], -1)
    x0, y0 = rng.integers(0, max(1, w // 2)), rng.integers(0, max(1, h // 2))
    base[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    return img if mode == "RGB" else img.convert(mode)


def image_bytes(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    """A folder with four small JPEG photos named img0.jpg .. img3.jpg."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        make_image(i).save(folder / f"img{i}.jpg", quality=90)
    return folder


def build_tiny_checkpoint(folder: Path, image_size: int = 64, seed: int = 0) -> Path:
    """A real checkpoint with the packaged Lite0 encoder at a small input size and a tiny, untrained decoder."""
    from captioner import checkpoint
    from captioner.decoder import AttentionDecoder, DecoderConfig
    from captioner.encoder import EncoderConfig
    from captioner.vocab import Vocabulary

    torch.manual_seed(seed)
    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    enc = EncoderConfig("efficientnet-lite0", image_size, "head")
    dec = DecoderConfig(len(vocab), enc.feature_dim, 32, 32, 32, 32, 0.0)
    decoder = AttentionDecoder(dec)
    config = {
        "name": "tiny-test",
        "version": "0.0",
        "encoder": enc.to_dict(),
        "decoder": dec.to_dict(),
        "inference": {"beam_size": 3, "max_length": 12, "length_alpha": 0.0, "block_repeats": True},
    }
    weights = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    return checkpoint.save(folder, weights, config, vocab.to_json())


def assert_scored_by_the_model(
    cap,
    image,
    words: list[str],
    logprobs: list[float],
    score: float,
    max_length: int | None = None,
    abs_tol: float = 2e-3,
) -> None:
    """Check a caption's numbers against the decoder run teacher-forced on its words, not against the search.

    Each word's log-prob must be log p(word | previous words, image), and the score the documented
    formula: the sum of those and of <end>'s (when the caption ended before ``max_length`` words)
    over ((5 + length) / 6) ** length_alpha.
    """
    v = cap.vocab
    max_length = int(cap.defaults["max_length"]) if max_length is None else max_length
    finished = len(words) < max_length
    ids = [v.start_id] + [v.stoi[w] for w in words] + ([v.end_id] if finished else [])
    with torch.inference_mode():
        annotations = cap.encode(cap.preprocess(image)[0].unsqueeze(0))  # (1, L, D)
        memory, state = cap.decoder.prepare(annotations)
        expected = []
        for prev, word in itertools.pairwise(ids):  # one step at a time, as the paper writes it
            logits, state, _ = cap.decoder.step(torch.tensor([prev], device=annotations.device), state, memory)
            expected.append(float(torch.log_softmax(logits.float(), -1)[0, word]))
    assert logprobs == pytest.approx(expected[: len(words)], abs=abs_tol)
    alpha = float(cap.defaults["length_alpha"])
    assert score == pytest.approx(sum(expected) / ((5 + len(expected)) / 6) ** alpha, abs=abs_tol)


def tiny_model_args(width: int = 16) -> list[str]:
    """`captioner train` options for a tiny model on 64-px images: Lite0, embed/hidden/projection ``width``,
    attention ``width // 2``, every word kept (tests train it in seconds)."""
    return [
        "--encoder",
        "efficientnet-lite0",
        "--image-size",
        "64",
        "--min-count",
        "1",
        *("--embed-dim", str(width), "--hidden-dim", str(width)),
        *("--attention-dim", str(width // 2), "--proj-dim", str(width)),
    ]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


_LOADED_CAPTIONERS: dict = {}


@pytest.fixture
def load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process CLI runs load each checkpoint once per session (loading dominates a tiny job's time)."""
    from captioner.api import Captioner

    real = Captioner.load.__func__

    def load(cls, path=None, device=None, fast=None, runtime=None):
        key = (str(path), str(device), fast, runtime)
        if key not in _LOADED_CAPTIONERS:
            _LOADED_CAPTIONERS[key] = real(cls, path, device, fast, runtime)
        return _LOADED_CAPTIONERS[key]

    monkeypatch.setattr(Captioner, "load", classmethod(load))


def write_caption_dataset(root: Path, captions: dict[int, list[str]], dev: set[int]) -> Path:
    """A custom-format dataset in ``root``: img/<i>.png (48x48) and captions.csv; images in ``dev`` form the dev
    split."""
    (root / "img").mkdir(parents=True)
    rows = ["image,caption,split"]
    for i, caps in captions.items():
        make_image(i, size=(48, 48)).save(root / "img" / f"{i}.png")
        rows += [f"img/{i}.png,{c},{'dev' if i in dev else 'train'}" for c in caps]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------- the real service command
REPO = Path(__file__).resolve().parent.parent
GUNICORN = REPO / ".venv" / "bin" / "gunicorn"
if not GUNICORN.exists():  # a venv elsewhere: the gunicorn next to this interpreter
    GUNICORN = Path(sys.executable).parent / "gunicorn"
# Exactly what `make serve` runs (the Makefile exports HOST and PORT).
SERVE = [str(GUNICORN), "--config", "service/gunicorn_conf.py", "service.app:create_app()"]


def clean_env() -> dict[str, str]:
    """This process's environment without the service's own settings, for subprocesses under test."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONER_", "PROMETHEUS_MULTIPROC"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn_server(
    tmp_path: Path, env_extra: dict[str, str], ready_timeout: float = 180, stop_timeout: float = 60
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Run ``SERVE`` on a free loopback port until ``/readyz`` is 200; yields (base URL, process, log path).

    The environment is this one without CAPTIONER_*/PROMETHEUS_MULTIPROC_* settings, plus ``env_extra``.
    On exit the server gets SIGTERM (SIGKILL to its group if it does not stop in ``stop_timeout`` s).
    """
    port = free_port()
    env = clean_env() | {"HOST": "127.0.0.1", "PORT": str(port)} | env_extra
    log_path = tmp_path / f"gunicorn-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(SERVE, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:  # not listening yet, or 503 while the model loads (HTTPError is an OSError)
                pass
            if time.time() > deadline:
                pytest.fail(f"gunicorn not ready after {ready_timeout:g} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield base, proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:  # pragma: no cover
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def fake_gs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``gs`` first on PATH that leaves a marker (the returned path) when run; Pillow's EPS plugin would run it."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget a cached "no Ghostscript here"
    return marker


@contextmanager
def live_app_server(app) -> Iterator[str]:
    """Serve a Flask app on a free loopback port in a thread; yields its base URL and closes the app after."""
    from werkzeug.serving import make_server

    from service.app import EXTENSION_KEY

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        app.extensions[EXTENSION_KEY].close()
