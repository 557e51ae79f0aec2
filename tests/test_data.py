"""Dataset readers, the registry, `load_dataset` and `EpochLoader`.

Fixtures are written here in every official format from the format's own
description (byte offsets, MATLAB axes), not by inverting the readers, so a
transposed axis in a reader shows up as a misplaced marked pixel.
"""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from feedalign.data import (
    DATASETS,
    DatasetError,
    EpochLoader,
    Split,
    dataset_names,
    get_dataset,
    load_dataset,
)

RNG = np.random.default_rng(0)
MARK = (2, 3, 7)  # (channel, row, column) of the marked pixel in image 1


def images_with_mark(n: int, c: int, h: int, w: int) -> np.ndarray:
    """Random (N, C, H, W) uint8 in 0..254 with 255 only at image 1, MARK (or its row/col)."""
    x = RNG.integers(0, 255, size=(n, c, h, w), dtype=np.uint8)
    x[1, min(MARK[0], c - 1), MARK[1], MARK[2]] = 255
    return x


def assert_mark(images: torch.Tensor) -> None:
    c = min(MARK[0], images.shape[1] - 1)
    where = (images == 255).nonzero().tolist()
    assert where == [[1, c, MARK[1], MARK[2]]], where


# ------------------------------------------------------- official-format writers


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> None:
    head = magic or bytes([0, 0, 8, array.ndim])
    dims = struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(head + dims + array.astype(np.uint8).tobytes()))


def write_mnist(root: Path, n_train: int = 12, n_test: int = 5) -> dict:
    folder = root / "MNIST"
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = images_with_mark(n, 1, 28, 28)[:, 0]  # idx stores (N, rows, cols)
        y = RNG.integers(0, 10, size=n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
        data[split] = (x, y)
    return data


def cifar_records(x: np.ndarray, *labels: np.ndarray) -> bytes:
    # record: label byte(s), then 1,024 R, 1,024 G, 1,024 B bytes, each plane row-major
    out = bytearray()
    for i in range(len(x)):
        out += bytes(int(lab[i]) for lab in labels)
        for c in range(3):
            out += x[i, c].tobytes(order="C")
    return bytes(out)


def write_cifar10(root: Path, per_file: int = 4) -> dict:
    folder = root / "Cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    x = images_with_mark(6 * per_file, 3, 32, 32)
    y = RNG.integers(0, 10, size=6 * per_file)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        part = slice(k * per_file, (k + 1) * per_file)
        (folder / name).write_bytes(cifar_records(x[part], y[part]))
    (folder / "batches.meta.txt").write_text("\n".join(DATASETS["Cifar10"].classes) + "\n")
    n = 5 * per_file
    return {"train": (x[:n], y[:n]), "test": (x[n:], y[n:])}


def write_cifar100(root: Path) -> dict:
    folder = root / "Cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    data = {}
    for split, n in (("train", 9), ("test", 4)):
        x = images_with_mark(n, 3, 32, 32)
        fine = RNG.integers(0, 100, size=n)
        coarse = RNG.integers(0, 20, size=n)
        (folder / f"{split}.bin").write_bytes(cifar_records(x, coarse, fine))
        data[split] = (x, fine, coarse)
    return data


def write_svhn(root: Path) -> dict:
    folder = root / "SVHN"
    folder.mkdir(parents=True)
    data = {}
    for split, n in (("train", 7), ("test", 5), ("extra", 6)):
        digits = RNG.integers(0, 10, size=n)
        digits[0] = 0
        x = np.zeros((32, 32, 3, n), dtype=np.uint8)  # MATLAB: X(row, col, channel, sample)
        x[MARK[1], MARK[2], MARK[0], 1] = 255
        x[5, 6, 1, 0] = 17
        y = np.where(digits == 0, 10, digits).reshape(n, 1).astype(np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        data[split] = digits
    return data


def write_stl10(root: Path) -> dict:
    folder = root / "STL10" / "stl10_binary"
    folder.mkdir(parents=True)
    data = {}
    for split, n in (("train", 4), ("test", 3)):
        raw = np.zeros((n, 3 * 96 * 96), dtype=np.uint8)
        # channel-major, then column-major: byte c*9216 + col*96 + row
        raw[1, MARK[0] * 9216 + MARK[2] * 96 + MARK[1]] = 255
        labels = RNG.integers(1, 11, size=n).astype(np.uint8)  # 1..10
        labels[0] = 10
        (folder / f"{split}_X.bin").write_bytes(raw.tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        data[split] = labels
    return data


# ------------------------------------------------------------------ registry


def test_registry_names_and_lookup():
    assert dataset_names() == [
        "MNIST", "FashionMNIST", "Cifar10", "Cifar100", "SVHN", "STL10", "digits", "shakespeare_char",
    ]  # fmt: skip
    assert get_dataset("cifar10") is DATASETS["Cifar10"]
    assert get_dataset("DIGITS").name == "digits"
    with pytest.raises(ValueError, match="MNIST, FashionMNIST, Cifar10.*digits"):
        get_dataset("ImageNet")
    for info in DATASETS.values():
        if info.kind == "text":
            assert all(len(r.sha256) == 64 and r.digest[0] == "sha256" for r in info.remotes)
            continue
        assert len(info.classes) == (100 if info.name == "Cifar100" else 10)
        assert all(len(r.md5) == 32 for r in info.remotes)


# ------------------------------------------------------------- format readers


@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_idx_reader(tmp_path, name):
    data = write_mnist(tmp_path)
    if name == "FashionMNIST":
        (tmp_path / "MNIST").rename(tmp_path / "FashionMNIST")
    train, test = load_dataset(name.lower(), tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (5, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.images.is_contiguous()
    assert train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), data["train"][0])
    assert np.array_equal(test.labels.numpy(), data["test"][1])
    assert train.classes == list(DATASETS[name].classes)
    assert_mark(train.images)


def test_cifar10_reader(tmp_path):
    data = write_cifar10(tmp_path)
    train, test = load_dataset("Cifar10", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), data["train"][0])  # files in order 1..5
    assert np.array_equal(train.labels.numpy(), data["train"][1])
    assert np.array_equal(test.labels.numpy(), data["test"][1])
    assert_mark(train.images)
    assert train.coarse_labels is None


def test_cifar100_reader_keeps_coarse_labels(tmp_path):
    data = write_cifar100(tmp_path)
    train, test = load_dataset("CIFAR100", tmp_path)
    assert train.images.shape == (9, 3, 32, 32)
    assert np.array_equal(train.labels.numpy(), data["train"][1])  # fine
    assert np.array_equal(train.coarse_labels.numpy(), data["train"][2])
    assert np.array_equal(test.coarse_labels.numpy(), data["test"][2])
    assert len(train.classes) == 100 and len(train.coarse_classes) == 20
    assert_mark(train.images)


def test_svhn_reader_labels_axes_and_extra(tmp_path):
    digits = write_svhn(tmp_path)
    train, test = load_dataset("svhn", tmp_path)
    assert train.images.shape == (13, 3, 32, 32)  # train + extra
    assert test.images.shape == (5, 3, 32, 32)
    expected = np.concatenate([digits["train"], digits["extra"]])
    assert np.array_equal(train.labels.numpy(), expected)  # "10" -> 0
    assert train.labels[0] == 0
    assert train.images[0, 1, 5, 6] == 17
    assert_mark(test.images)
    only, _ = load_dataset("SVHN", tmp_path, svhn_extra=False)
    assert len(only) == 7


def test_stl10_reader_column_major(tmp_path):
    labels = write_stl10(tmp_path)
    train, test = load_dataset("stl10", tmp_path)
    assert train.images.shape == (4, 3, 96, 96) and test.images.shape == (3, 3, 96, 96)
    assert np.array_equal(train.labels.numpy(), labels["train"] - 1)  # 1..10 -> 0..9
    assert train.labels[0] == 9
    assert_mark(train.images)


def test_digits_split():
    train, test = load_dataset("digits", "/nonexistent")
    assert train.images.shape == (1497, 1, 8, 8) and test.images.shape == (300, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and int(train.images.max()) == 255
    assert set(train.labels.tolist()) == set(range(10))
    val_train, val = load_dataset("digits", validate=True)
    assert len(val_train) == 1197 and len(val) == 300
    assert torch.equal(val.images, train.images[-300:])


def test_validate_holds_out_last_training_images(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    info = DATASETS["MNIST"]
    monkeypatch.setitem(DATASETS, "MNIST", dataclasses.replace(info, n_validation=4))
    full, _ = load_dataset("MNIST", tmp_path)
    train, val = load_dataset("MNIST", tmp_path, validate=True)
    assert torch.equal(train.images, full.images[:8]) and torch.equal(val.images, full.images[8:])
    assert torch.equal(val.labels, full.labels[8:])
    assert isinstance(val, Split) and val.images.is_contiguous()


# --------------------------------------------------------------- bad inputs


def test_missing_file_names_file_and_download_command(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("MNIST", tmp_path)
    msg = str(err.value)
    assert "train-images-idx3-ubyte.gz" in msg and "feedalign download MNIST" in msg
    assert str(tmp_path / "MNIST") in msg


def test_truncated_idx(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # a whole gzip of too few bytes
    with pytest.raises(DatasetError, match="train-images.*header announces 12 records"):
        load_dataset("MNIST", tmp_path)
    path.write_bytes(gzip.compress(raw)[:-30])  # a cut gzip stream
    with pytest.raises(DatasetError, match="train-images.*gzip"):
        load_dataset("MNIST", tmp_path)


def test_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    labels = RNG.integers(0, 10, size=12)
    write_idx(tmp_path / "MNIST" / "train-labels-idx1-ubyte.gz", labels, magic=b"\0\0\x09\x01")
    with pytest.raises(DatasetError, match="train-labels.*wrong magic number 0x00000901"):
        load_dataset("MNIST", tmp_path)


def test_wrong_record_count(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "MNIST" / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(DatasetError, match="holds 5 images but .*t10k-labels.* holds 4 labels"):
        load_dataset("MNIST", tmp_path)


def test_cifar_record_size(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "Cifar10" / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="data_batch_3.bin.*3073-byte records"):
        load_dataset("Cifar10", tmp_path)


def test_cifar_label_out_of_range(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "Cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[0] = 12
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="test_batch.bin: labels must lie in 0..9"):
        load_dataset("Cifar10", tmp_path)


def test_svhn_malformed(tmp_path):
    write_svhn(tmp_path)
    folder = tmp_path / "SVHN"
    scipy.io.savemat(folder / "test_32x32.mat", {"X": np.zeros((32, 32, 5), np.uint8), "y": 1})
    with pytest.raises(DatasetError, match=r"test_32x32.mat: X must be uint8 \(32, 32, 3, N\)"):
        load_dataset("SVHN", tmp_path, svhn_extra=False)
    (folder / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset("SVHN", tmp_path, svhn_extra=False)


def test_stl10_count_mismatch(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "STL10" / "stl10_binary" / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DatasetError, match="test_y.bin: holds 2 labels but .*test_X.bin holds 3"):
        load_dataset("STL10", tmp_path)


# ------------------------------------------------------------- real data


def test_real_mnist(shared_data):
    train, test = load_dataset("MNIST", shared_data)
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.labels.bincount().sum() == 60_000 and set(test.labels.tolist()) == set(range(10))


def test_real_mnist_scale(shared_data, tmp_path):
    from feedalign.preprocess import prepare

    full, _ = load_dataset("MNIST", shared_data)
    train, test = load_dataset("MNIST", shared_data, validate=True)
    assert len(train) == 50_000 and len(test) == 10_000
    assert torch.equal(test.images, full.images[50_000:])
    x, _ = prepare(full.images, full.images[:10], dataset="MNIST", validate=False,
                   cache_dir=tmp_path)  # fmt: skip
    assert abs(x.mean().item() - 0.1307) < 5e-4


def test_real_cifar10(shared_data):
    train, test = load_dataset("Cifar10", shared_data)
    assert train.images.shape == (50_000, 3, 32, 32) and len(test) == 10_000
    assert train.labels.bincount().tolist() == [5000] * 10
    means = train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=5e-4)


# -------------------------------------------------------------- EpochLoader


def collect(loader: EpochLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def test_loader_covers_every_index_once():
    x, y = torch.randn(103, 2), torch.arange(103)
    loader = EpochLoader(x, y, 10)
    batches = list(loader)
    assert len(loader) == len(batches) == 11 and len(batches[-1][1]) == 3
    assert torch.equal(collect(loader).sort().values, y)
    xb, yb = batches[0]
    assert torch.equal(xb, x[yb])  # images follow their labels
    assert len(EpochLoader(x, y, 10, drop_last=True)) == 10


def test_loader_order_is_a_function_of_seed_and_epoch():
    x, y = torch.randn(50, 2), torch.arange(50)
    a, b = EpochLoader(x, y, 8, seed=3), EpochLoader(x, y, 8, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert torch.equal(collect(a), collect(b))
    first = collect(a)
    a.set_epoch(5)
    assert not torch.equal(collect(a), first)
    assert not torch.equal(collect(EpochLoader(x, y, 8, seed=4)), collect(EpochLoader(x, y, 8)))
    assert torch.equal(collect(EpochLoader(x, y, 8, shuffle=False)), y)


def test_loader_shards_are_disjoint_and_cover():
    x, y = torch.randn(100, 2), torch.arange(100)
    shards = [collect(EpochLoader(x, y, 16, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(torch.cat(shards).sort().values, y)
    # 101 samples: padded so both ranks take 51 samples in the same number of batches
    x, y = torch.randn(101, 2), torch.arange(101)
    loaders = [EpochLoader(x, y, 16, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 4
    shards = [collect(loader) for loader in loaders]
    assert len(shards[0]) == len(shards[1]) == 51
    assert set(torch.cat(shards).tolist()) == set(range(101))
    trunc = [collect(EpochLoader(x, y, 16, rank=r, world_size=2, drop_last=True)) for r in (0, 1)]
    assert len(trunc[0]) == len(trunc[1]) == 48  # 50 each, last partial batch dropped


def test_loader_augments_deterministically():
    x, y = torch.rand(20, 3, 12, 12), torch.arange(20)
    runs = []
    for _ in range(2):
        loader = EpochLoader(x, y, 8, seed=2, augment=True)
        loader.set_epoch(1)
        runs.append(torch.cat([xb for xb, _ in loader]))
    assert runs[0].shape == (20, 3, 12, 12)
    assert torch.equal(runs[0], runs[1])
    order = collect(loader)
    assert not torch.allclose(runs[0], x[order])  # something was cropped or flipped
