"""Safe, self-describing checkpoints: safetensors weights + JSON, never pickle.

A checkpoint is a folder::

    model.safetensors     decoder weights, prefixed ``decoder.`` (and fine-tuned encoder weights, prefixed
                          ``encoder.``); a tensor shared by several names (tied weights) is stored once
    config.json           format version, model name/version, encoder + decoder config, inference defaults,
                          training record (:func:`model_config`), ``tied_weights`` (name -> the stored name)
    vocab.json            the vocabulary, so weights and words always travel together
    trainer_state.*       (training checkpoints only) optimiser/scheduler/RNG state for --resume

This module is the only one that knows the format: training saves with :func:`model_weights`
and :func:`model_config`, models load with :func:`load_decoder` and :func:`load_encoder`,
``captioner export`` ships with :func:`export`.

Folders are written to a temporary sibling and swapped in with renames, so a
kill during saving never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .encoder import Encoder

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
DECODER, ENCODER = "decoder.", "encoder."  # weight name prefixes


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


def read_weights(
    path: str | os.PathLike, device: str | torch.device = "cpu", prefix: str = ""
) -> dict[str, torch.Tensor]:
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


def model_config(
    name: str,
    version: str,
    encoder: dict,
    decoder: dict,
    inference: dict,
    training: dict,
    finetune_blocks: int = 0,
) -> dict:
    """A checkpoint's config.json (less ``format_version`` and ``tied_weights``, which :func:`save` adds).

    ``encoder``/``decoder`` are the model configs as dicts; ``finetune_blocks`` n > 0 records that
    the encoder's last n blocks were trained (their weights are stored, the trunk is not trained).
    """
    return {
        "name": name,
        "version": version,
        "encoder": encoder,
        "encoder_finetuned": bool(finetune_blocks),
        "finetune_blocks": finetune_blocks,
        "decoder": decoder,
        "inference": inference,
        "training": training,
    }


def model_weights(decoder: torch.nn.Module, encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The weights to save: the decoder's, and the encoder's when it is stored (fine-tuned), under their prefixes."""
    state = {f"{DECODER}{k}": v for k, v in decoder.state_dict(keep_vars=False).items()}
    if encoder is not None:
        state |= {f"{ENCODER}{k}": v for k, v in encoder.state_dict().items()}
    return state


def load_state(module: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str, tied: dict[str, str]) -> None:
    """Load ``prefix``-ed weights into ``module``, strictly except for tied copies stored once."""
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied_here = {k[len(prefix) :] for k in tied if k.startswith(prefix)}
    missing = [k for k in missing if k not in tied_here]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_decoder(decoder: torch.nn.Module, weights: dict[str, torch.Tensor], config: dict) -> None:
    """Load a checkpoint's decoder weights (``weights`` from :func:`read_weights`, ``config`` its config.json)."""
    load_state(decoder, weights, DECODER, config.get("tied_weights", {}))


def load_encoder(encoder: Encoder, weights: dict[str, torch.Tensor], finetune_blocks: int) -> None:
    """Load a checkpoint's fine-tuned encoder weights over ``encoder`` (built with its packaged ImageNet weights).

    With ``finetune_blocks`` n > 0 only the last n blocks and the head are taken: the frozen trunk
    stays at the packaged fp32 weights it was trained on (an export stores it rounded to fp16).
    Without, every stored encoder weight is taken (none: the encoder stays as packaged).
    """
    state = {k[len(ENCODER) :]: v for k, v in weights.items() if k.startswith(ENCODER)}
    if finetune_blocks:
        top = encoder.top_state_keys(finetune_blocks)
        if top - state.keys():
            raise CheckpointError(
                f"the checkpoint records {finetune_blocks} fine-tuned encoder blocks but lacks "
                f"their weights: missing {sorted(top - state.keys())[:5]}"
            )
        state = {k: v for k, v in state.items() if k in top}
    if state:
        encoder.load_state_dict(state, strict=False)


def update_config(path: str | os.PathLike, changes: dict[str, Any], merge: bool = True) -> dict:
    """Apply ``changes`` to a checkpoint's config.json, swapped in atomically: dict values are merged one level
    deep (``merge``) or replace the old value whole."""
    folder = resolve(path)
    config = read_config(folder)
    for key, value in changes.items():
        config[key] = {**(config.get(key) or {}), **value} if merge and isinstance(value, dict) else value
    tmp = folder / f".{CONFIG}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_json(tmp, config)
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CONFIG)
    finally:
        tmp.unlink(missing_ok=True)
    return config


def export(
    sources: list[str | os.PathLike],
    output: str | os.PathLike,
    half: bool = True,
    inference: dict[str, Any] | None = None,
    name: str | None = None,
    version: str | None = None,
) -> Path:
    """Copy a checkpoint for shipping: no trainer state, fp16 storage unless ``half`` is False.

    Several ``sources`` (checkpoints of one run) are averaged weight by weight. ``inference``
    values that are not None replace the stored decoding defaults; ``name``/``version``, when
    given, the model's. Returns the written folder.
    """
    folders = [resolve(s) for s in sources]
    config = read_config(folders[0])
    config.pop("format_version", None)
    tied = config.pop("tied_weights", {})
    if len(folders) > 1:
        weights = average_weights(folders)
        config["averaged_from"] = [str(f) for f in folders]
    else:
        weights = read_weights(folders[0])
    for key, target in tied.items():  # re-create the shared entries so save() can detect the ties
        weights[key] = weights[target]
    config.setdefault("inference", {}).update({k: v for k, v in (inference or {}).items() if v is not None})
    if name:
        config["name"] = name
    if version:
        config["version"] = version
    vocab = json.loads((folders[0] / VOCAB).read_text())
    return save(output, weights, config, vocab, half=half)


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
        return {
            "__dict__": [
                [_split_tensors(k, flat, f"{prefix}.k{i}"), _split_tensors(v, flat, f"{prefix}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
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
