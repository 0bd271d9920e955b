"""Datasets for training: layouts on disk, safe image loading, captions, aspect-ratio buckets, the latent cache.

`scan_dataset(cfg)` reads and checks the images (before a model is loaded), `TrainDataset.from_config(cfg,
native_resolution=..., scanned=...)` lays them out for the model: the entry points the training loop uses.
"""

from .buckets import BucketChoice, make_bucket_resolutions, select_bucket
from .dataset import Batch, ScannedDataset, TrainDataset, scan_dataset
from .folders import DatasetSpec, LoadReport, Subset

__all__ = ["Batch", "BucketChoice", "DatasetSpec", "LoadReport", "ScannedDataset", "Subset", "TrainDataset",
           "make_bucket_resolutions", "scan_dataset", "select_bucket"]
