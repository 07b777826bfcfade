"""Service settings: environment variables, overridable by ``create_app(config)``.

Every setting has one name, used both as the environment variable and as the key
of the ``config`` mapping given to :func:`service.app.create_app` (which wins).
docs/service.md has the table; :data:`ENV_VARS` is its source of truth.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.images import DEFAULT_MAX_PIXELS
from captioner.settings import MAX_BEAM_SIZE, RUNTIMES, default_model_path, parse_flag

from .logs import parse_log_format


class ConfigError(ValueError):
    """An environment variable or config value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    model_path: Path
    device: str | None  # None: CUDA when available, else CPU
    max_upload_mb: float
    max_pixels: int
    max_batch: int
    batch_wait_ms: float
    queue_size: int
    request_timeout_s: float
    default_beam_size: int
    overlay_max_side: int
    torch_threads: int  # 0: leave PyTorch's default
    load_in_background: bool
    warmup: bool
    fast: bool  # CPU speed-ups of captioner.perf (Captioner.load's ``fast``)
    runtime: str  # what runs the encoder on that fast path: auto | torch | onnx (Captioner.load's ``runtime``)
    decode_slots: int  # 0: from the CPU quota (cgroup), see decode_workers
    decode_timeout_s: float
    decode_memory_mb: int
    log_format: str  # json | text (service.logs; gunicorn's logger reads the same variable)

    @property
    def decode_workers(self) -> int:
        """Decode worker processes: ``decode_slots``, or the CPUs this container may use (1 to 8)."""
        return self.decode_slots or max(1, min(8, available_cpus()))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


#: name -> (Settings field, parser, default, description). Defaults are strings, parsed like env values.
ENV_VARS: dict[str, tuple[str, str, str, str]] = {
    "CAPTIONER_MODEL": (
        "model_path",
        "path",
        "",
        "Checkpoint folder to serve (default: the shipped model, `models/flickr8k-lite2`).",
    ),
    "CAPTIONER_DEVICE": ("device", "str", "", "`cpu`, `cuda`, `cuda:1`, ... (default: CUDA when available, else CPU)."),
    "CAPTIONER_MAX_UPLOAD_MB": (
        "max_upload_mb",
        "float",
        "20",
        "Largest request body in MiB; larger bodies get 413 before they are read.",
    ),
    "CAPTIONER_MAX_PIXELS": (
        "max_pixels",
        "int",
        str(DEFAULT_MAX_PIXELS),
        "Largest image (width x height, from the header) decoded; larger gets 413 `too_large`.",
    ),
    "CAPTIONER_MAX_BATCH": ("max_batch", "int", "8", "Most images the micro-batcher runs through the model at once."),
    "CAPTIONER_BATCH_WAIT_MS": (
        "batch_wait_ms",
        "float",
        "10",
        "Longest the batcher holds a batch open for requests that are still decoding their uploads (never when no "
        "other request is on the way).",
    ),
    "CAPTIONER_QUEUE_SIZE": (
        "queue_size",
        "int",
        "16",
        "Requests waiting for the model per worker (besides the batch running); beyond it: 503 + `Retry-After`.",
    ),
    "CAPTIONER_REQUEST_TIMEOUT_S": (
        "request_timeout_s",
        "float",
        "30",
        "Longest wait for a caption (queue + inference); then 504 `timeout`.",
    ),
    "CAPTIONER_BEAM_SIZE": ("default_beam_size", "int", "3", "Beam size when the request gives none (1-10)."),
    "CAPTIONER_OVERLAY_MAX_SIDE": (
        "overlay_max_side",
        "int",
        "320",
        "Longest side of the PNG overlays returned with `attention=overlay`.",
    ),
    "CAPTIONER_TORCH_THREADS": (
        "torch_threads",
        "int",
        "0",
        "`torch.set_num_threads` per worker (0: PyTorch's default, all cores).",
    ),
    "CAPTIONER_LOAD_IN_BACKGROUND": (
        "load_in_background",
        "bool",
        "1",
        "Load + warm the model in a background thread (`/readyz` says when done) instead of inside `create_app`.",
    ),
    "CAPTIONER_WARMUP": ("warmup", "bool", "1", "Run one inference on a blank image before reporting ready."),
    "CAPTIONER_FAST": (
        "fast",
        "bool",
        "1",
        "On CPU: fold batch norms, channels-last encoder in chunks of 2, int8 decoder (BENCHMARKS.md; dev scores "
        "within noise). 0 serves the fp32 model exactly as trained.",
    ),
    "CAPTIONER_RUNTIME": (
        "runtime",
        "str",
        "auto",
        "What runs the encoder on the CPU fast path: `auto` uses ONNX Runtime when the `[onnx]` extra is installed and "
        "the model folder has an exported encoder built from its weights (`encoder.onnx`, or `encoder-int8.onnx` for "
        "int8; `make onnx`, `captioner export --onnx [--precision int8]`; recipe in `config.json`), else torch; "
        "`torch`; `onnx` fails the load without it. `/readyz` names it (`model.runtime`: `torch`, `onnxruntime-fp32` "
        "or `onnxruntime-int8`).",
    ),
    "CAPTIONER_DECODE_SLOTS": (
        "decode_slots",
        "int",
        "0",
        "Uploads decoded at once per worker, each in its own decode process (0: the CPU quota of the container's "
        "cgroup, else the usable cores; 1-8). Requests wait for a slot in arrival order until their deadline; then 503 "
        "`overloaded` + `Retry-After`.",
    ),
    "CAPTIONER_DECODE_TIMEOUT_S": (
        "decode_timeout_s",
        "float",
        "2.5",
        "Longest decode of one upload; a slower one is killed and answered 422 `too_slow`.",
    ),
    "CAPTIONER_DECODE_MEMORY_MB": (
        "decode_memory_mb",
        "int",
        "1024",
        "Memory (address space, `RLIMIT_AS`) one decode process may add to its start-up size; beyond it: 413 "
        "`too_large`.",
    ),
    "CAPTIONER_LOG_FORMAT": (
        "log_format",
        "log_format",
        "json",
        "`json`: one JSON object per log line, one access line per request with its `request_id` (service/logs.py); "
        "`text`: plain lines for a terminal.",
    ),
}

#: Settings read by service/gunicorn_conf.py only (documented in the same table).
GUNICORN_ENV_VARS: dict[str, tuple[str, str]] = {
    "HOST": ("127.0.0.1", "Address to bind (`0.0.0.0` or `::` for all interfaces)."),
    "PORT": ("8000", "Port to bind."),
    "CAPTIONER_WORKERS": ("1", "gunicorn worker processes; each loads its own model copy."),
    "CAPTIONER_THREADS": (
        "32",
        "Request threads per worker (gthread); they feed that worker's micro-batcher. Keep it above MAX_BATCH + "
        "QUEUE_SIZE so overload reaches the app and gets a quick 503.",
    ),
    "CAPTIONER_WORKER_TIMEOUT": ("120", "Seconds a silent worker may take before gunicorn restarts it."),
    "CAPTIONER_GRACEFUL_TIMEOUT": ("30", "Seconds to finish in-flight requests on shutdown/reload."),
    "CAPTIONER_KEEPALIVE": ("5", "Seconds to keep idle HTTP connections open."),
    "CAPTIONER_MAX_REQUESTS": (
        "5000",
        "Requests after which a worker is replaced (bounds slow memory growth; the new worker reloads the model); 0: "
        "never.",
    ),
    "CAPTIONER_MAX_REQUESTS_JITTER": (
        "500",
        "Random 0..N added to CAPTIONER_MAX_REQUESTS per worker, so that workers do not restart together.",
    ),
    "CAPTIONER_LOG_LEVEL": ("info", "gunicorn and service log level."),
    "CAPTIONER_CONTROL_SOCKET": (
        "",
        "Path for gunicorn's control socket (`gunicornc`); off by default so instances never share one.",
    ),
    "PROMETHEUS_MULTIPROC_DIR": (
        "",
        "Optional: a writable, empty folder; `/metrics` then aggregates all workers (see Metrics).",
    ),
}


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``) rounded up, else the CPU affinity (both bounded by the core count)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota(root: str) -> float | None:
    """The CPU quota in CPUs, None when unlimited or unknown."""

    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().strip()
        except OSError:
            return None

    v2 = read("cpu.max")  # "max 100000" or "200000 100000"
    if v2:
        quota, _, period = v2.partition(" ")
        return int(quota) / int(period) if quota != "max" and period else None
    for folder in ("cpu,cpuacct", "cpu"):
        quota, period = read(folder, "cpu.cfs_quota_us"), read(folder, "cpu.cfs_period_us")
        if quota and period:
            return int(quota) / int(period) if int(quota) > 0 and int(period) > 0 else None
    return None


def _parse(name: str, kind: str, raw: Any) -> Any:
    if kind == "path":
        return Path(raw) if raw not in (None, "") else default_model_path()
    if kind == "str":
        return str(raw) if raw not in (None, "") else None
    if kind == "log_format":
        try:
            return parse_log_format(str(raw))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        try:
            return parse_flag(str(raw), name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        return int(raw) if kind == "int" else float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {raw!r}") from None


def load_settings(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``), with ``config`` keys taking precedence."""
    environ = os.environ if environ is None else environ
    config = config or {}
    values: dict[str, Any] = {}
    for name, (field, kind, default, _) in ENV_VARS.items():
        raw = config[name] if name in config else environ.get(name, default)
        values[field] = _parse(name, kind, raw)
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(s.max_upload_mb > 0, "CAPTIONER_MAX_UPLOAD_MB must be > 0")
    need(s.max_pixels > 0, "CAPTIONER_MAX_PIXELS must be > 0")
    need(1 <= s.max_batch <= 1024, "CAPTIONER_MAX_BATCH must be between 1 and 1024")
    need(0 <= s.batch_wait_ms <= 10_000, "CAPTIONER_BATCH_WAIT_MS must be between 0 and 10000")
    need(1 <= s.queue_size <= 100_000, "CAPTIONER_QUEUE_SIZE must be between 1 and 100000")
    need(s.request_timeout_s > 0, "CAPTIONER_REQUEST_TIMEOUT_S must be > 0")
    need(1 <= s.default_beam_size <= MAX_BEAM_SIZE, f"CAPTIONER_BEAM_SIZE must be between 1 and {MAX_BEAM_SIZE}")
    need(16 <= s.overlay_max_side <= 4096, "CAPTIONER_OVERLAY_MAX_SIDE must be between 16 and 4096")
    need(s.torch_threads >= 0, "CAPTIONER_TORCH_THREADS must be >= 0")
    need(s.runtime in RUNTIMES, f"CAPTIONER_RUNTIME must be one of {', '.join(RUNTIMES)}")
    need(0 <= s.decode_slots <= 64, "CAPTIONER_DECODE_SLOTS must be between 0 and 64")
    need(0 < s.decode_timeout_s <= 600, "CAPTIONER_DECODE_TIMEOUT_S must be > 0 and <= 600")
    need(64 <= s.decode_memory_mb <= 65536, "CAPTIONER_DECODE_MEMORY_MB must be between 64 and 65536")


__all__ = ["ENV_VARS", "GUNICORN_ENV_VARS", "ConfigError", "Settings", "available_cpus", "load_settings"]
