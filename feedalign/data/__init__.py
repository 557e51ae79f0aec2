"""Datasets by the original's names (docs/original.md §5), read from their official files.

    train, test = load_dataset("Cifar10", "./Datasets", validate=False)
    train.images  # (50000, 3, 32, 32) uint8;  train.labels  # (50000,) int64

`feedalign download NAME` fetches and verifies the official archives
(`feedalign.data.download`); `check_paths` refuses unusable data paths before anything
is loaded; `EpochLoader` batches preprocessed tensors on the device.
"""

from feedalign.data.dataset import Split, load_dataset
from feedalign.data.formats import DatasetError
from feedalign.data.loader import EpochLoader
from feedalign.data.paths import check_paths
from feedalign.data.registry import DATASETS, DatasetInfo, dataset_names, get_dataset

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "EpochLoader",
    "check_paths",
    "Split",
    "dataset_names",
    "get_dataset",
    "load_dataset",
]
