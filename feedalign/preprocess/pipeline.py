"""`prepare`: a dataset's uint8 images -> the float tensors the network sees (docs/original.md §5).

    format (rgb | yuv) -> whiten (ZCA)  or  normalization (scale | simple | channel | image)

Every constant is fitted on the training split and applied unchanged to the test
split, and cached (see `cache.py`) so that later runs reuse the same constants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from feedalign.preprocess.cache import cached, fingerprint
from feedalign.preprocess.normalize import NORMALIZATIONS
from feedalign.preprocess.yuv import rgb2yuv
from feedalign.preprocess.zca import apply_zca, fit_zca, zca_shapes

log = logging.getLogger(__name__)

FORMATS = ("rgb", "yuv")  # the one list of allowed `format` values


def _convert(images: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 0..255 values in format `fmt` (a new tensor)."""
    if fmt == "yuv" and images.shape[1] == 3:
        return rgb2yuv(images)
    # A grey image is its own Y channel (y = 0.299 + 0.587 + 0.114 = 1 times grey).
    return images.float()


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """float (N, C, H, W) -> (N, C, size, size), bilinear with half-pixel centres
    (align_corners=False, as PIL's and torchvision's Resize when enlarging)."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def cache_path(cache_dir: str | Path, dataset: str, *, validate: bool, fmt: str, method: str,
               train_images: torch.Tensor) -> Path:  # fmt: skip
    """`<cache_dir>/<dataset>/<validate|full>_<format>_<method>_<fingerprint>.pt`."""
    split = "validate" if validate else "full"
    name = f"{split}_{fmt}_{method}_{fingerprint(train_images)}.pt"
    return Path(cache_dir) / dataset / name


def prepare(
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    *,
    dataset: str,
    validate: bool,
    format: str = "rgb",  # the original option name
    whiten: bool = False,
    normalization: str = "scale",
    cache_dir: str | Path = "./PreProcData",
    resize: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed (train, test), float32 (N, C, H, W), on the images' device.

    train_images, test_images: uint8 (N, C, H, W) as `load_dataset` returns them.
    dataset, validate: name the cache file (with a fingerprint of train_images).
    format: "rgb" (as stored) or "yuv" (Torch7's rgb2yuv; grey images unchanged).
    whiten: ZCA on the 0..255 values instead of `normalization`.
    normalization: "scale" (to [0, 1] by the training min/max), "simple", "channel"
        or "image" (see normalize.py).
    resize: > 0: first resize both splits to resize×resize (`resize_images`); the
        constants are then fitted on the resized images (and cached under their own name).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {', '.join(FORMATS)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")
    if train_images.dtype != torch.uint8 or test_images.dtype != torch.uint8:
        raise ValueError(f"prepare needs uint8 images, got {train_images.dtype} / "
                         f"{test_images.dtype}")  # fmt: skip
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train images {tuple(train_images.shape[1:])} and test images "
                         f"{tuple(test_images.shape[1:])} differ in shape")  # fmt: skip
    if resize < 0:
        raise ValueError(f"resize must be 0 (off) or a size >= 1, got {resize}")
    method = ("zca" if whiten else normalization) + (f"_resize{resize}" if resize else "")
    path = cache_path(cache_dir, dataset, validate=validate, fmt=format, method=method,
                      train_images=train_images)  # fmt: skip
    train = _convert(train_images, format)
    test = _convert(test_images, format)
    if resize:
        train, test = resize_images(train, resize), resize_images(test, resize)
    chw = tuple(train.shape[1:])
    if whiten:
        constants = cached(path, zca_shapes(chw), lambda: fit_zca(train))
        return apply_zca(train, constants), apply_zca(test, constants)
    fit, apply_, shape = NORMALIZATIONS[normalization]
    constants = cached(path, {"shift": shape(chw), "divisor": shape(chw)}, lambda: fit(train))
    return apply_(train, constants), apply_(test, constants)
