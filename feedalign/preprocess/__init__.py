"""Preprocessing (docs/original.md §5): format, whitening or normalisation, augmentation.

train_x, test_x = prepare(train.images, test.images, dataset="Cifar10",
                          validate=False, whiten=True)
batch = augment(batch, generator)   # training only, on the batch's device
"""

from feedalign.preprocess.augmentation import augment, crop_flip_resize
from feedalign.preprocess.normalize import NORMALIZATIONS
from feedalign.preprocess.pipeline import FORMATS, cache_path, prepare, resize_images
from feedalign.preprocess.yuv import rgb2yuv
from feedalign.preprocess.zca import apply_zca, fit_zca

__all__ = [
    "FORMATS",
    "NORMALIZATIONS",
    "apply_zca",
    "augment",
    "cache_path",
    "crop_flip_resize",
    "fit_zca",
    "prepare",
    "resize_images",
    "rgb2yuv",
]
