"""Dataset readers, the feature cache and torch datasets."""
from .features import FeatureCache, cache_identity, cache_key
from .records import DATASETS, SPLITS, CaptionRecord, DatasetError, load_records
from .samples import CaptionPairs, ImageGroupedBatches, collate_pairs

__all__ = [
    "DATASETS",
    "SPLITS",
    "CaptionPairs",
    "CaptionRecord",
    "DatasetError",
    "FeatureCache",
    "ImageGroupedBatches",
    "cache_identity",
    "cache_key",
    "collate_pairs",
    "load_records",
]
