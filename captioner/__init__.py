"""Show, Attend and Tell image captioning: encoder -> attention -> decoder -> search.

The public names are imported on first use (module ``__getattr__``), so ``import captioner.settings``
or the command-line parsers do not pay for torch.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Caption, Captioner
    from .images import ImageError, load_image, preprocess

try:  # pyproject.toml is the one version source
    __version__ = metadata.version("captioner")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["Caption", "Captioner", "ImageError", "__version__", "load_image", "preprocess"]

#: Public name -> the module that defines it.
_HOMES = {"Caption": "api", "Captioner": "api", "ImageError": "images", "load_image": "images", "preprocess": "images"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
