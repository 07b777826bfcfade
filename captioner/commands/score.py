"""``captioner score``: score a file of captions against a dataset split's references."""
from __future__ import annotations

from ..scoring import add_parser, cmd_score as run

__all__ = ["add_parser", "run"]
