"""Training schedule and randomness: learning-rate warm-up and decay, seeding, the RNG state a resume restores."""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def warmup_steps(steps: int | None, epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length: ``steps`` if given (at most a tenth of the run), else ``epochs`` x the steps of one epoch."""
    if steps is not None:
        return max(1, min(steps, total_steps // 10))
    return max(1, min(total_steps, round(epochs * steps_per_epoch)))


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor`` x the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    """Every random generator's state (Python, NumPy, torch CPU and CUDA), for a checkpoint's trainer state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (as read back from a checkpoint: tuples may come back as lists)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
