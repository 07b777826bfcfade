"""Dataset readers, the feature cache and torch datasets."""
from .annotations import ANNOTATIONS_HELP, DatasetFiles, annotation_arg, find_annotations
from .features import FeatureCache, cache_identity, cache_key
from .loading import load_records, read_dataset
from .records import DATASETS, SPLITS, CaptionRecord, DatasetError
from .samples import CaptionPairs, ImageGroupedBatches, collate_pairs

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
