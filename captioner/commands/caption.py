"""``captioner caption``: caption image files, folders, globs or a list on stdin (see docs/cli.md)."""
from __future__ import annotations

from ..batch import add_parser, run

__all__ = ["add_parser", "run"]
