"""`load_dataset`: a dataset's training and test splits as uint8 tensors (docs/original.md §5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feedalign.data.formats import DatasetError, RawSplit, concat
from feedalign.data.paths import check_files, download_hint, needed_files
from feedalign.data.registry import DatasetInfo, get_dataset

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Images and labels of one split, on the CPU, as read from disk."""

    images: torch.Tensor  # (N, C, H, W) uint8, contiguous
    labels: torch.Tensor  # (N,) int64, 0-based
    classes: list[str]  # label -> name
    coarse_labels: torch.Tensor | None = None  # (N,) int64, CIFAR-100's 20 superclasses
    coarse_classes: list[str] | None = None

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, (
            self.images.dtype,
            self.images.shape,
        )
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, part: slice) -> Split:
        """Images part (contiguous copies, so a held-out part does not pin the rest)."""
        coarse = None if self.coarse_labels is None else self.coarse_labels[part].clone()
        return Split(
            self.images[part].clone(),
            self.labels[part].clone(),
            self.classes,
            coarse,
            self.coarse_classes,
        )


def _read(info: DatasetInfo, datapath: Path, split: str) -> RawSplit:
    folder = datapath / info.folder
    try:
        raw = info.reader(folder, info.splits[split], split)
        if len(raw.labels) == 0:
            raise DatasetError(f"{info.name} {split} files in {folder}: they hold no images")
        if raw.images.shape[1:] != info.shape:
            raise DatasetError(f"{info.name} {split} files in {folder}: images of shape "
                               f"{raw.images.shape[1:]}, expected {info.shape}")  # fmt: skip
    except DatasetError as err:
        # The reader names the file and the fault; say what to do about it.
        raise DatasetError(
            f"{err}. Fetch the official files again with {download_hint(info, datapath, force=True)} "
            f"(it replaces a file only once the new copy verifies), or delete the file and download it"
        ) from err
    if split in info.sizes and len(raw.labels) != info.sizes[split]:
        log.warning("%s %s: %d images, the official files hold %d", info.name, split,
                    len(raw.labels), info.sizes[split])  # fmt: skip
    return raw


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays viewing a file's bytes are read-only; torch needs its own writable copy.
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def _to_split(raw: RawSplit, info: DatasetInfo) -> Split:
    coarse = None if raw.coarse_labels is None else _tensor(raw.coarse_labels)
    return Split(
        _tensor(raw.images),
        _tensor(raw.labels),
        list(info.classes),
        coarse,
        None if info.coarse_classes is None else list(info.coarse_classes),
    )


def load_dataset(
    name: str,
    datapath: str | Path = "./Datasets",
    *,
    validate: bool = False,
    svhn_extra: bool = True,
) -> tuple[Split, Split]:
    """(train, test) splits of dataset `name` (case-insensitive) from `<datapath>/<Name>/`.

    Raises DatasetError (naming the file, the fault and what to do) for a missing,
    unreadable or malformed file.

    validate: docs/original.md §5 -- the last `n_validation` training images (10k; STL10 1k,
        digits 300) become the test split and training uses the rest.
    svhn_extra: SVHN trains on train + extra (604,388 images), as docs/original.md §5 says;
        False uses train only. Ignored for other datasets.
    """
    info = get_dataset(name)
    datapath = Path(datapath)
    check_files(info, datapath, needed_files(info, validate=validate, svhn_extra=svhn_extra))
    parts = [_read(info, datapath, "train")]
    if svhn_extra and "extra" in info.splits:
        parts.append(_read(info, datapath, "extra"))
    train = _to_split(concat(parts), info)
    if validate:
        n_val = info.n_validation
        if not 0 < n_val < len(train):
            raise DatasetError(f"{info.name}: cannot hold out {n_val} of {len(train)} training images")
        test = train.subset(slice(len(train) - n_val, None))
        train = train.subset(slice(0, len(train) - n_val))
    else:
        test = _to_split(_read(info, datapath, "test"), info)
    log.info("%s: %d training / %d %s images of shape %s", info.name, len(train), len(test),
             "validation" if validate else "test", tuple(info.shape))  # fmt: skip
    return train, test
