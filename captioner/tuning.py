"""Decoding settings tuned on the dev split at the end of training, stored as the checkpoint's defaults."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

BEAMS = (1, 3, 5)
ALPHAS = (0.0, 0.5, 1.0)


def tune_decoding(
    score: Callable[[int, float], dict[str, Any]],
    monitor: str = "cider",
    beams: Sequence[int] = BEAMS,
    alphas: Sequence[float] = ALPHAS,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Try every (beam size, length alpha) with ``score(beam, alpha) -> metrics``; return (best, table).

    Alpha only matters for beams > 1, so greedy decoding is tried once. Ties go to the smaller
    beam and then the smaller alpha (the first in the grid's order).
    """
    grid = [(b, a) for b in sorted(set(beams)) for a in (sorted(set(alphas)) if b > 1 else [min(alphas)])]
    table = []
    for beam, alpha in grid:
        metrics = score(beam, alpha)
        table.append(
            {
                "beam_size": beam,
                "length_alpha": alpha,
                **{k: round(float(v), 2) for k, v in metrics.items() if k in ("bleu4", "cider")},
            }
        )
    best = max(table, key=lambda row: row[monitor])  # max keeps the first of equal rows
    return {"beam_size": best["beam_size"], "length_alpha": best["length_alpha"]}, table
