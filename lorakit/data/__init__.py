"""Datasets for training: layouts on disk, safe image loading, captions, aspect-ratio buckets, the latent cache.

`TrainDataset.from_config(cfg, native_resolution=...)` is the entry point the training loop uses.
"""

from .buckets import BucketChoice, make_bucket_resolutions, select_bucket
from .dataset import Batch, TrainDataset
from .folders import DatasetSpec, LoadReport, Subset

__all__ = ["Batch", "BucketChoice", "DatasetSpec", "LoadReport", "Subset", "TrainDataset",
           "make_bucket_resolutions", "select_bucket"]
