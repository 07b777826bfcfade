"""Safe, self-describing checkpoints: safetensors weights + JSON, never pickle.

A checkpoint is a folder::

    model.safetensors     decoder weights (and fine-tuned encoder weights, prefixed ``encoder.``)
    config.json           format version, model name/version, encoder + decoder config, inference defaults
    vocab.json            the vocabulary, so weights and words always travel together
    trainer_state.*       (training checkpoints only) optimiser/scheduler/RNG state for --resume

Folders are written to a temporary sibling and swapped in with renames, so a
kill during saving never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


class CheckpointError(ValueError):
    """A path that is not a loadable checkpoint folder (or is an unsafe format)."""


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``; falls back to the backup of an interrupted swap."""
    p = Path(path)
    if p.is_file():
        if p.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"):
            raise CheckpointError(
                f"{p} looks like a pickled PyTorch file; it is refused because loading it could run code. "
                "Checkpoints are folders with model.safetensors + config.json + vocab.json"
            )
        if p.name in (WEIGHTS, CONFIG, VOCAB):
            p = p.parent
    if not (p / CONFIG).is_file():
        backup = p.parent / f".{p.name}.old"
        if (backup / CONFIG).is_file():
            return backup
        raise CheckpointError(f"{p} is not a checkpoint folder (no {CONFIG})")
    for name in (WEIGHTS, VOCAB):
        if not (p / name).is_file():
            raise CheckpointError(f"checkpoint {p} is missing {name}")
    return p


def read_config(path: str | os.PathLike) -> dict:
    folder = resolve(path)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer captioner (format {config['format_version']})")
    return config


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu", prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights (only those whose names start with ``prefix``) as float32 tensors on ``device`` (fp16 is upcast)."""
    folder = resolve(path)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt", device=str(device)) as fh:
            names = [k for k in fh.keys() if k.startswith(prefix)]  # noqa: SIM118 (a safetensors file, not a dict)
            tensors = {k: fh.get_tensor(k) for k in names}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {folder / WEIGHTS}: {exc}") from exc
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}


def average_weights(paths: list[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several checkpoints of one model (e.g. a run's last epochs).

    Raises CheckpointError when the checkpoints differ in architecture or vocabulary.
    """
    folders = [resolve(p) for p in paths]
    vocab0 = (folders[0] / VOCAB).read_bytes()
    first: dict[str, torch.Tensor] = {}
    total: dict[str, torch.Tensor] = {}
    for folder in folders:
        if (folder / VOCAB).read_bytes() != vocab0:
            raise CheckpointError(f"{folder} has a different vocabulary from {folders[0]}: cannot average")
        weights = read_weights(folder)
        if not first:
            first = weights  # integer buffers (e.g. batch-norm counters) are taken from here, not averaged
        elif weights.keys() != total.keys() or any(weights[k].shape != total[k].shape for k in total):
            raise CheckpointError(f"{folder} has different weights from {folders[0]}: cannot average")
        for key, value in weights.items():
            total[key] = total[key] + value.double() if key in total else value.double()
    return {k: (v / len(folders)).float() if v.is_floating_point() else first[k] for k, v in total.items()}


def save(
    folder: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    config: dict,
    vocab: dict,
    trainer_state: dict | None = None,
    half: bool = False,
) -> Path:
    """Atomically write a checkpoint folder. Tied (shared) tensors are stored once."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        seen: dict[int, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            ptr = v.data_ptr()
            if ptr in seen and v.numel() > 0:
                config.setdefault("tied_weights", {})[k] = seen[ptr]
                continue
            seen[ptr] = k
            t = v.detach().cpu()
            tensors[k] = (t.half() if half and t.is_floating_point() else t).contiguous()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / CONFIG, {"format_version": FORMAT_VERSION, **config})
        _write_json(tmp / VOCAB, vocab)
        if trainer_state is not None:
            flat: dict[str, torch.Tensor] = {}
            skeleton = _split_tensors(trainer_state, flat, "s")
            save_file(flat, str(tmp / STATE_TENSORS))
            _write_json(tmp / STATE_JSON, skeleton)
        for f in tmp.iterdir():  # safetensors writes 0600; a model is read by other users (service, Docker)
            os.chmod(f, 0o644)
        _fsync_dir(tmp)
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def update_config(path: str | os.PathLike, changes: dict[str, Any]) -> dict:
    """Merge ``changes`` into a checkpoint's config.json (dict values one level deep); the file is swapped in atomically."""
    folder = resolve(path)
    config = read_config(folder)
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    tmp = folder / f".{CONFIG}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_json(tmp, config)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CONFIG)
    finally:
        tmp.unlink(missing_ok=True)
    return config


def load_trainer_state(path: str | os.PathLike) -> dict | None:
    folder = resolve(path)
    if not (folder / STATE_JSON).is_file():
        return None
    flat = load_file(str(folder / STATE_TENSORS))
    return _join_tensors(json.loads((folder / STATE_JSON).read_text()), flat)


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as fh:
        json.dump(obj, fh, indent=1, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace ``folder`` by ``tmp`` with renames; an old copy survives as ``.name.old`` until the end."""
    backup = folder.parent / f".{folder.name}.old"
    if folder.exists():
        if backup.exists():  # stale: ``folder`` is complete, so the old copy is not needed
            shutil.rmtree(backup)
        os.replace(folder, backup)
    # else: a backup left by an interrupted swap is the only complete copy; keep it until ``tmp`` is in place.
    os.replace(tmp, folder)
    if backup.exists():
        shutil.rmtree(backup)


def _split_tensors(obj: Any, flat: dict[str, torch.Tensor], prefix: str) -> Any:
    """Nested state -> JSON skeleton, with tensors/arrays moved into ``flat``."""
    if isinstance(obj, torch.Tensor):
        flat[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        flat[prefix] = torch.from_numpy(obj.copy())
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, flat, f"{prefix}.k{i}"), _split_tensors(v, flat, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split_tensors(v, flat, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split_tensors(v, flat, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _join_tensors(obj: Any, flat: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return flat[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return flat[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, flat) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_join_tensors(k, flat): _join_tensors(v, flat) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, flat) for v in obj]
    return obj
