"""``captioner data``: verify, stats, download and prepare datasets."""
from __future__ import annotations

from ..data_tools import add_parser

__all__ = ["add_parser"]
