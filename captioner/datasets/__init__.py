"""Dataset readers, the feature cache and torch datasets.

The readers need no torch; the feature cache and the torch datasets (``features``, ``samples``)
are imported on first use, so the command-line parsers stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .annotations import ANNOTATIONS_HELP, DatasetFiles, annotation_arg, find_annotations
from .loading import load_records, read_dataset
from .records import DATASETS, SPLITS, CaptionRecord, DatasetError

if TYPE_CHECKING:
    from .features import FeatureCache, cache_identity, cache_key
    from .samples import CaptionPairs, ImageGroupedBatches, collate_pairs

#: Names of the torch-bound modules -> their module.
_LAZY = {
    "FeatureCache": "features",
    "cache_identity": "features",
    "cache_key": "features",
    "CaptionPairs": "samples",
    "ImageGroupedBatches": "samples",
    "collate_pairs": "samples",
}

__all__ = [
    "ANNOTATIONS_HELP",
    "DATASETS",
    "SPLITS",
    "CaptionPairs",
    "CaptionRecord",
    "DatasetError",
    "DatasetFiles",
    "FeatureCache",
    "ImageGroupedBatches",
    "annotation_arg",
    "cache_identity",
    "cache_key",
    "collate_pairs",
    "find_annotations",
    "load_records",
    "read_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
