"""One reader per official file format (docs/original.md §5), each returning uint8 NCHW arrays.

Every reader reads whole files and reshapes them with numpy (no per-sample Python)
and turns any malformed content into a `DatasetError` that names the file and
what is wrong with it. Nothing here unpickles: the idx, CIFAR and STL-10 files are
raw bytes and SVHN's MATLAB v5 files go through `scipy.io.loadmat`.

A reader has the signature `reader(folder, files, split) -> RawSplit` where
`files` are the split's file names relative to `folder` (from the registry).
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset file or data folder is missing, unreadable or malformed.

    The message names the path, what is wrong with it and what to do; the command
    line prints it as one line, without a traceback.
    """


@dataclass
class RawSplit:
    """One split as numpy arrays, before they become tensors."""

    images: np.ndarray  # (N, C, H, W) uint8, C-contiguous
    labels: np.ndarray  # (N,) int64, 0-based
    coarse_labels: np.ndarray | None = None  # (N,) int64 (CIFAR-100 only)


def concat(parts: Sequence[RawSplit]) -> RawSplit:
    """Join splits read from several files, in file order."""
    if len(parts) == 1:
        return parts[0]
    coarse = None
    if all(p.coarse_labels is not None for p in parts):
        coarse = np.concatenate([p.coarse_labels for p in parts])
    return RawSplit(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        coarse,
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DatasetError(
            f"{path}: cannot be read ({err.strerror or err}); check that it is a file you may read"
        ) from err


def _check_labels(path: Path, labels: np.ndarray, lo: int, hi: int) -> None:
    if labels.size and (labels.min() < lo or labels.max() > hi):
        raise DatasetError(f"{path}: labels must lie in {lo}..{hi}, found {labels.min()}..{labels.max()}")


# ---------------------------------------------------------------- idx (MNIST)

IDX_UBYTE = 0x08  # element type code of unsigned bytes in the idx magic


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array of its stored shape.

    Layout: magic `00 00 08 ndim`, then `ndim` big-endian uint32 sizes, then bytes.
    """
    raw = _read_bytes(path)
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise DatasetError(f"{path}: not a complete gzip file ({err})") from err
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: {len(raw)} bytes is too short for an idx header")
    magic = raw[:4]
    if magic[0] != 0 or magic[1] != 0 or magic[2] != IDX_UBYTE or magic[3] != ndim:
        raise DatasetError(
            f"{path}: wrong magic number 0x{magic.hex()}, expected 0x000008{ndim:02x} "
            f"(idx, unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    header = 4 + 4 * ndim
    # math.prod of Python ints is exact: np.prod would wrap around at 2**63 and could
    # let a header of absurd sizes pass this check.
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: header announces {dims[0]} records of shape {dims[1:]} "
            f"({expected} bytes) but the file holds {len(raw) - header} bytes"
        )
    if dims[0] == 0:
        raise DatasetError(f"{path}: a well-formed idx file that holds 0 records")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    """`files` = (images, labels) idx files; images (N, H, W) become (N, 1, H, W)."""
    images_path, labels_path = folder / files[0], folder / files[1]
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path}: holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    _check_labels(labels_path, labels, 0, 9)
    return RawSplit(np.ascontiguousarray(images[:, None]), labels.astype(np.int64))


# ------------------------------------------------------ CIFAR-10 / -100 binary

CIFAR_PIXELS = 3 * 32 * 32  # per record: 1,024 R, then G, then B bytes, each row-major


def _read_records(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-size records `label_bytes` label bytes + 3,072 pixel bytes."""
    raw = _read_bytes(path)
    size = label_bytes + CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % size:
        raise DatasetError(
            f"{path}: {len(raw)} bytes is not a whole number of {size}-byte records "
            f"(truncated or not a CIFAR binary file)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size)
    images = np.ascontiguousarray(records[:, label_bytes:]).reshape(-1, 3, 32, 32)
    return images, records[:, :label_bytes].astype(np.int64)


def read_cifar10_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    """CIFAR-10 binary: records of (label, 3,072 pixels); files concatenated in order."""
    parts = []
    for name in files:
        images, labels = _read_records(folder / name, label_bytes=1)
        _check_labels(folder / name, labels, 0, 9)
        parts.append(RawSplit(images, labels[:, 0]))
    return concat(parts)


def read_cifar100_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    """CIFAR-100 binary: records of (coarse label, fine label, 3,072 pixels)."""
    parts = []
    for name in files:
        images, labels = _read_records(folder / name, label_bytes=2)
        _check_labels(folder / name, labels[:, 0], 0, 19)
        _check_labels(folder / name, labels[:, 1], 0, 99)
        parts.append(RawSplit(images, labels[:, 1].copy(), labels[:, 0].copy()))
    return concat(parts)


# ------------------------------------------------------------ SVHN (.mat v5)


def read_svhn_mat(path: Path) -> RawSplit:
    """`X` is (32, 32, 3, N) uint8 = (row, col, channel, sample); `y` is (N, 1), 10 = digit 0."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, OSError, ValueError, TypeError, EOFError, NotImplementedError) as err:
        raise DatasetError(f"{path}: not a readable MATLAB v5 file ({err})") from err
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: needs variables X and y, found {sorted(mat)}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: X must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != x.shape[3]:
        raise DatasetError(f"{path}: X holds {x.shape[3]} images but y {len(y)} labels")
    _check_labels(path, y, 1, 10)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # -> (N, C, row, col)
    return RawSplit(images, y % 10)  # label 10 means digit 0


def read_svhn_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    return concat([read_svhn_mat(folder / name) for name in files])


# --------------------------------------------------------------- STL-10 binary

STL_SHAPE = (3, 96, 96)


def read_stl10_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    """`files` = (X, y). Each image is stored channel-major, then column-major."""
    x_path, y_path = folder / files[0], folder / files[1]
    raw = _read_bytes(x_path)
    size = int(np.prod(STL_SHAPE))
    if len(raw) == 0 or len(raw) % size:
        raise DatasetError(f"{x_path}: {len(raw)} bytes is not a whole number of {size}-byte 3x96x96 images")
    stored = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, 96, 96)  # (N, C, col, row)
    labels = np.frombuffer(_read_bytes(y_path), dtype=np.uint8).astype(np.int64)
    if len(labels) != len(stored):
        raise DatasetError(f"{y_path}: holds {len(labels)} labels but {x_path} holds {len(stored)} images")
    _check_labels(y_path, labels, 1, 10)
    images = np.ascontiguousarray(stored.transpose(0, 1, 3, 2))
    return RawSplit(images, labels - 1)


# ------------------------------------------------------ scikit-learn's digits

DIGITS_TRAIN = 1497  # fixed split: the first 1,497 images train, the last 300 test


def read_digits_split(folder: Path, files: Sequence[str], split: str) -> RawSplit:
    """The 1,797 8x8 digits bundled with scikit-learn; values 0..16 -> 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    return RawSplit(np.ascontiguousarray(images[part]), labels[part].copy())
