"""Faults: kills during checkpoint saving, a batch job killed with SIGKILL, a gunicorn worker killed with -9,
and a client that announces a body above the limit (raw socket, headers only).

Every kill here is a real ``SIGKILL`` of a real process (a subprocess, or the service's worker);
only the *moment* is chosen by a hook inside the victim, so the tests are deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner import checkpoint
from captioner.api import Captioner
from captioner.commands.main import main

from conftest import REPO, clean_env, gunicorn_server, image_bytes, make_image, tiny_model_args, write_caption_dataset

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    return clean_env() | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | extra


# ---------------------------------------------------------------- (1) kill while saving a checkpoint
CAPTIONS = {0: ["a red square on grass"], 1: ["a blue ball in the sky"], 2: ["a green dog runs"], 3: ["a red ball"]}

#: Runs ``captioner`` with a hook on the renames/removals of checkpoint saving; at the chosen moment the
#: process SIGKILLs itself (KILL_AT = "<after|before>:<os.replace|shutil.rmtree>:<target name>").
KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    when, func, target = os.environ["KILL_AT"].split(":")
    real = {"os.replace": os.replace, "shutil.rmtree": shutil.rmtree}[func]
    def hooked(*args, **kwargs):
        hit = os.path.basename(str(args[-1] if func == "os.replace" else args[0])) == target
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    if func == "os.replace":
        os.replace = hooked
    else:
        shutil.rmtree = hooked
    from captioner.commands.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caption_dataset(tmp_path_factory.mktemp("faults-data"), CAPTIONS, dev={3})


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        "custom",
        "--data-dir",
        str(data),
        "--output",
        str(out),
        "--epochs",
        "3",
        *tiny_model_args(16),
        "--batch-size",
        "1",
        "--warmup-steps",
        "1",
        "--lr",
        "0.02",
        "--dropout",
        "0.1",
        "--patience",
        "50",
        "--workers",
        "0",
        "--val-beam-size",
        "1",
        "--cache-dir",
        str(out.parent / "cache"),
        "--quiet",
        "--seed",
        "3",
        *extra,
    ]


@contextmanager
def one_thread() -> Iterator[None]:
    """In-process training with the killed subprocesses' thread count (OMP_NUM_THREADS=1): results are
    bit-for-bit comparable (a different thread count changes float summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_killed_at(kill_at: str, data: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *train_args(data, out, *extra)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(KILL_AT=kill_at),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_last_is_usable(out: Path, epoch: int) -> None:
    """``last`` resolves (maybe to the backup of an interrupted swap), loads and holds ``epoch``'s state."""
    folder = checkpoint.resolve(out / "last")
    assert checkpoint.load_trainer_state(out / "last")["epoch"] == epoch
    cap = Captioner.load(out / "last", device="cpu")
    assert isinstance(cap.caption(make_image(1), beam_size=1).text, str)
    assert folder.name in ("last", ".last.old")


def test_kills_during_checkpoint_saving_never_lose_last(dataset: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    with one_thread():
        assert main(train_args(dataset, straight)) == 0

    run = tmp_path / "run"
    # Killed between the two renames of epoch 2's save: 'last' was moved aside, the new one not yet in place.
    train_killed_at("after:os.replace:.last.old", dataset, run)
    assert not (run / "last").exists() and (run / ".last.old").is_dir()
    assert_last_is_usable(run, epoch=1)
    assert epochs(run) == [1]

    # Resumed from the backup, then killed again just before the new 'last' is renamed into place:
    # the backup must still be there (it is the only complete copy).
    train_killed_at("before:os.replace:last", dataset, run, "--resume")
    assert_last_is_usable(run, epoch=1)

    # Resumed, then killed after epoch 2's 'last' is in place, while the old copy is being removed
    # (before the epoch's line reaches metrics.jsonl).
    train_killed_at("before:shutil.rmtree:.last.old", dataset, run, "--resume")
    assert (run / "last" / checkpoint.CONFIG).is_file()
    assert_last_is_usable(run, epoch=2)

    # The last resume finishes the job and equals the uninterrupted run, weights and log.
    with one_thread():
        assert main(train_args(dataset, run, "--resume")) == 0
    assert epochs(run) == epochs(straight) == [1, 2, 3]
    a, b = load_file(str(straight / "last" / "model.safetensors")), load_file(str(run / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (run / ".last.old").exists()
    Captioner.load(run / "last", device="cpu")


# ---------------------------------------------------------------- (2) the batch CLI killed mid-run
SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    from captioner import outputs
    real = outputs.make_record
    def slow(*args, **kwargs):  # the model is tiny: slow the writing down so that the kill lands mid-run
        time.sleep(0.15)
        return real(*args, **kwargs)
    outputs.make_record = slow
    from captioner.commands.main import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_batch_cli_sigkill_then_resume_loses_and_duplicates_nothing(
    fmt: str, tiny_checkpoint: Path, tmp_path: Path, load_once: None
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(10):
        make_image(i, (40 + i, 32)).save(folder / f"p{i:02d}.jpg")
    (folder / "p99.jpg").write_bytes(b"broken")  # a failed input is recorded once too
    common = [str(folder), "--checkpoint", str(tiny_checkpoint), "--workers", "0", "--batch-size", "2", "-q"]

    reference = tmp_path / f"reference.{fmt}"
    with one_thread():
        assert main(["caption", *common, "-o", str(reference)]) == 1

    out = tmp_path / f"out.{fmt}"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "caption", *common, "-o", str(out)],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b'"caption"') >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b'"caption"')
    assert 4 <= written < 10

    with one_thread():
        assert main(["caption", *common, "-o", str(out), "--resume"]) == 1

    def records(path: Path) -> list[dict]:
        text = path.read_text()
        return json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]

    got, want = records(out), records(reference)
    assert [r["image"] for r in got] == [r["image"] for r in want]  # none lost, none twice, input order
    assert [r.get("caption") for r in got] == [r.get("caption") for r in want]
    assert [r.get("error_code") for r in got] == [r.get("error_code") for r in want]


# ---------------------------------------------------------------- (3) the real service: worker killed, lying clients
def get(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (gunicorn's workers are the master's children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@contextmanager
def serve(tmp_path: Path, model: Path, **extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    env = {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "CAPTIONER_MODEL": str(model),
        "CAPTIONER_TORCH_THREADS": "1",
        "CAPTIONER_THREADS": "8",
        "CAPTIONER_MAX_UPLOAD_MB": "1",
        **extra,
    }
    with gunicorn_server(tmp_path, env, ready_timeout=120, stop_timeout=30) as (base, proc, _):
        yield base, proc


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    with serve(tmp_path_factory.mktemp("gunicorn"), tiny_checkpoint) as running:
        yield running


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def caption_status(base: str) -> tuple[int, dict]:
    body, ctype = multipart(image_bytes(make_image(5)))
    return get(f"{base}/v1/captions", body, {"Content-Type": ctype})


@pytest.mark.parametrize("content_type", ["image/jpeg", "multipart/form-data; boundary=xyz"])
def test_announced_oversize_body_is_refused_before_it_is_sent(server, content_type: str) -> None:
    """Only the headers go out (Content-Length: 50 MiB, limit 1 MiB); the 413 comes back without a body byte read."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {50 * 2**20}\r\n\r\n"
            ).encode()
        )
        started = time.perf_counter()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        elapsed = time.perf_counter() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert elapsed < 5
    assert get(f"{base}/readyz")[0] == 200


def test_killed_worker_is_replaced_and_readiness_follows_the_model(server) -> None:
    base, master = server
    assert caption_status(base)[0] == 200
    (old,) = children(master.pid)
    os.kill(old, signal.SIGKILL)

    seen: list[tuple[int, str]] = []
    deadline = time.time() + 120
    new: list[int] = []
    while time.time() < deadline:
        assert master.poll() is None, "the master must survive its worker"
        status, body = get(f"{base}/readyz")  # the listening socket stays open: never refused
        seen.append((status, body["status"]))
        new = [pid for pid in children(master.pid) if pid != old]
        if status == 200 and new:
            break
        time.sleep(0.05)
    assert new and old not in children(master.pid), "a fresh worker replaced the killed one"
    assert seen[-1] == (200, "ready")
    assert all(s in ((200, "ready"), (503, "loading")) for s in seen), seen  # 503 only while loading
    status, body = caption_status(base)
    assert status == 200 and body["caption"]
    assert get(f"{base}/healthz") == (200, {"status": "ok"})
