"""Fault injection, data side: every fault the user must act on is one DatasetError or
DownloadError naming the path, the cause and what to do; a cache fault is a warning
and a recomputation. Each case compares the files before and after: nothing the user
had is lost or changed unless the user asked for it (`--force`, a cache rewrite).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import logging
import os
import struct
from pathlib import Path

import pytest
import torch
from test_data import write_cifar10, write_mnist  # tests/ is on sys.path under pytest
from test_download import cifar_archive, free_port, md5, pin, server  # noqa: F401 (server: a fixture)

from feedalign.data import DATASETS, DatasetError, check_paths, load_dataset
from feedalign.data.download import ChecksumError, DownloadError, download
from feedalign.preprocess import cache, cache_path, prepare

ROOT = os.geteuid() == 0  # root reads and writes regardless of permissions


def snapshot(root: Path) -> dict[str, object]:
    """Every file and link under `root`: relative path -> bytes (or the link's target)."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_file():
            out[key] = path.read_bytes()
    return out


def mnist(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    write_mnist(tmp_path / "D")
    return tmp_path / "D", snapshot(tmp_path / "D")


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, (part, message)


# ------------------------------------------------------- 1. preprocessing cache


def grey_images(n: int = 40) -> torch.Tensor:
    """uint8 (N, 1, 6, 6) spanning 0..255, so `scale` divides by exactly 255."""
    x = torch.randint(0, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0, 255
    return x


def scale_cache(tmp_path: Path, train: torch.Tensor) -> Path:
    return cache_path(tmp_path / "P", "toy", validate=False, fmt="rgb", method="scale", train_images=train)


def test_cache_bit_rot_is_detected_and_recomputed(tmp_path, caplog):
    train = grey_images()
    expected = train.double() / 255  # hand-computed: min 0, max 255
    first, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert torch.allclose(first.double(), expected, atol=1e-6)
    path = scale_cache(tmp_path, train)
    raw = bytearray(path.read_bytes())
    at = raw.find(struct.pack("<d", 255.0))
    raw[at + 6] ^= 0x01  # the flipped bit: 255.0 becomes 247.0
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["constants"]["divisor"].item() == 247.0  # torch sees no fault
    with caplog.at_level(logging.WARNING):
        again, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert_names(caplog.text, str(path), "checksum", "recomputing")
    assert torch.allclose(again.double(), expected, atol=1e-6)  # trained on 255, not 247
    assert torch.load(path, weights_only=True)["constants"]["divisor"].item() == 255.0  # rewritten
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert caplog.text == ""  # the rewritten cache verifies


def test_cache_of_another_dataset_is_not_used(tmp_path, caplog):
    train = grey_images()
    g = torch.Generator().manual_seed(1)
    other = torch.randint(0, 256, (30, 3, 4, 4), generator=g, dtype=torch.uint8)  # another dataset
    opts = dict(dataset="toy", validate=False, normalization="image", cache_dir=tmp_path / "P")
    prepare(other, other, **opts)
    good, _ = prepare(train, train, **opts | {"cache_dir": tmp_path / "fresh"})
    ours = cache_path(tmp_path / "P", "toy", validate=False, fmt="rgb", method="image", train_images=train)
    theirs = cache_path(tmp_path / "P", "toy", validate=False, fmt="rgb", method="image", train_images=other)
    ours.write_bytes(theirs.read_bytes())  # copied over by hand
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, **opts)
    assert_names(caplog.text, "preprocessing cache", str(ours), "another cache key")
    assert torch.equal(x, good)


def test_cache_of_wrong_shape_or_dtype_names_the_cache(tmp_path, caplog):
    train = grey_images()
    good, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    path = scale_cache(tmp_path, train)
    # A hand-made file with a valid name and checksum, but constants of another shape
    # and dtype: caught by the shape check, not the checksum.
    constants = {"shift": torch.zeros(1, 3, 1, 1), "divisor": torch.ones(1, 3, 1, 1)}
    torch.save({"format": cache.FORMAT, "name": path.name, "sha256": cache.checksum(path.name, constants),
                "constants": constants}, path)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert_names(caplog.text, "preprocessing cache", str(path), "torch.float32 of shape (1, 3, 1, 1)",
                 "expected torch.float64 of shape ()")  # fmt: skip
    assert torch.equal(x, good)


def test_cache_is_never_unpickled(tmp_path, caplog):
    train = grey_images()
    path = scale_cache(tmp_path, train)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": cache.FORMAT, "payload": Payload()}, path)
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert not marker.exists()
    assert_names(caplog.text, str(path), "not a torch file of tensors", "recomputing")
    assert torch.allclose(x.double(), train.double() / 255, atol=1e-6)


def test_cache_of_an_older_version_is_recomputed(tmp_path, caplog):
    train = grey_images()
    path = scale_cache(tmp_path, train)
    path.parent.mkdir(parents=True)
    torch.save({"shift": torch.tensor(0.0, dtype=torch.float64),
                "divisor": torch.tensor(247.0, dtype=torch.float64)}, path)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert_names(caplog.text, str(path), "not a checksummed feedalign cache")
    assert torch.allclose(x.double(), train.double() / 255, atol=1e-6)


# ------------------------------------------------------------ 2. malformed idx


def write_images_idx(path: Path, dims: tuple[int, ...], data: bytes = b"") -> None:
    path.write_bytes(gzip.compress(bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data))


def test_idx_header_whose_dimensions_overflow(tmp_path):
    write_mnist(tmp_path / "D")
    path = tmp_path / "D" / "MNIST" / "train-images-idx3-ubyte.gz"
    # 2**31 * 2**31 * 4 = 2**64: int64 arithmetic wraps it to 0, the size of the data
    write_images_idx(path, (2**31, 2**31, 4))
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("MNIST", tmp_path / "D")
    assert_names(str(err.value), str(path), "header announces 2147483648 records",
                 "(18446744073709551616 bytes) but the file holds 0 bytes",
                 "feedalign download MNIST", "--force")  # fmt: skip
    assert snapshot(tmp_path) == before


def test_empty_idx_file(tmp_path):
    write_mnist(tmp_path / "D")
    folder = tmp_path / "D" / "MNIST"
    write_images_idx(folder / "t10k-images-idx3-ubyte.gz", (0, 28, 28))
    write_images_idx(folder / "t10k-labels-idx1-ubyte.gz", (0,))
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("MNIST", tmp_path / "D")
    assert_names(str(err.value), "t10k-images-idx3-ubyte.gz", "holds 0 records", "--force", "delete")
    assert snapshot(tmp_path) == before


def test_truncated_cifar_record(tmp_path):
    write_cifar10(tmp_path / "D")
    path = tmp_path / "D" / "Cifar10" / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1000])
    before = snapshot(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("Cifar10", tmp_path / "D")
    assert_names(str(err.value), str(path), "not a whole number of 3073-byte records",
                 "feedalign download Cifar10", "--force")  # fmt: skip
    assert snapshot(tmp_path) == before


# ---------------------------------------------- 3. download over a corrupt file


def served_mnist(served: Path, tmp_path: Path, monkeypatch) -> list[Path]:
    """Serve fixture MNIST files and pin their checksums; returns the served files."""
    write_mnist(tmp_path / "src")
    files = sorted((tmp_path / "src" / "MNIST").iterdir())
    for f in files:
        (served / f.name).write_bytes(f.read_bytes())
    pin(monkeypatch, "MNIST", [md5(served / r.filename) for r in DATASETS["MNIST"].remotes])
    return files


def corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def run_cli(argv: list[str]) -> int:
    from feedalign.cli import main

    return main(argv)


def test_download_names_a_corrupt_file_in_place_and_changes_nothing(server, tmp_path, monkeypatch):  # noqa: F811
    served, url = server
    served_mnist(served, tmp_path, monkeypatch)
    datapath = tmp_path / "Datasets"
    download("MNIST", datapath, base_url=url)
    bad = datapath / "MNIST" / "t10k-labels-idx1-ubyte.gz"
    corrupt(bad)
    before = snapshot(datapath)
    with pytest.raises(ChecksumError) as err:
        download("MNIST", datapath, base_url=url)
    assert_names(str(err.value), str(bad), "already present", "MD5", "--force", "delete it")
    assert snapshot(datapath) == before
    parser_args = ["download", "MNIST", "--datapath", str(datapath), "--base-url", url]
    assert run_cli(parser_args) == 4 and snapshot(datapath) == before  # a file that cannot be used
    assert run_cli(parser_args + ["--force"]) == 0  # fetched again, verified, replaced
    assert bad.read_bytes() == (served / bad.name).read_bytes()
    assert sorted(snapshot(datapath)) == sorted(before)  # no temporaries left
    load_dataset("MNIST", datapath)


def test_force_keeps_the_old_file_until_the_new_one_verifies(server, tmp_path, monkeypatch):  # noqa: F811
    served, url = server
    served_mnist(served, tmp_path, monkeypatch)
    datapath = tmp_path / "Datasets"
    download("MNIST", datapath, base_url=url)
    corrupt(datapath / "MNIST" / "train-labels-idx1-ubyte.gz")
    before = snapshot(datapath)
    corrupt(served / "train-labels-idx1-ubyte.gz")  # the server now sends a bad copy
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz: MD5 is .* nothing was installed"):
        download("MNIST", datapath, base_url=url, force=True)
    assert snapshot(datapath) == before  # old file kept, no temporaries left
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    with pytest.raises(DownloadError, match="could not fetch"):
        download("MNIST", datapath, base_url=dead, force=True)
    assert snapshot(datapath) == before


def test_force_replaces_an_unpacked_archive_only_after_it_verifies(server, tmp_path, monkeypatch):  # noqa: F811
    served, url = server
    archive = cifar_archive(served, tmp_path)
    pin(monkeypatch, "Cifar10", [md5(archive)])
    datapath = tmp_path / "Datasets"
    download("Cifar10", datapath, base_url=url)
    batch = datapath / "Cifar10" / "cifar-10-batches-bin" / "data_batch_1.bin"
    good = batch.read_bytes()
    batch.write_bytes(good[:-7])  # damaged after unpacking: the reader names it
    with pytest.raises(DatasetError, match="data_batch_1.bin.*feedalign download Cifar10 .*--force"):
        load_dataset("Cifar10", datapath)
    before = snapshot(datapath)
    corrupt(archive)
    with pytest.raises(ChecksumError):
        download("Cifar10", datapath, base_url=url, force=True)
    assert snapshot(datapath) == before
    cifar_archive(served, tmp_path / "again")  # a good (new) archive
    pin(monkeypatch, "Cifar10", [md5(archive)])
    download("Cifar10", datapath, base_url=url, force=True)
    assert sorted(snapshot(datapath)) == sorted(before)  # same files, no temporaries
    load_dataset("Cifar10", datapath)


def test_corrupt_archive_placed_by_hand(server, tmp_path, monkeypatch):  # noqa: F811
    served, url = server
    archive = cifar_archive(served, tmp_path)
    pin(monkeypatch, "Cifar10", [md5(archive)])
    folder = tmp_path / "Datasets" / "Cifar10"
    folder.mkdir(parents=True)
    placed = folder / archive.name
    placed.write_bytes(archive.read_bytes()[:-100])
    before = snapshot(tmp_path / "Datasets")
    with pytest.raises(ChecksumError) as err:
        download("Cifar10", tmp_path / "Datasets", base_url=url)
    assert_names(str(err.value), str(placed), "--force", f"delete {placed}")
    assert snapshot(tmp_path / "Datasets") == before
    download("Cifar10", tmp_path / "Datasets", base_url=url, force=True)
    assert not placed.exists()  # the corrupt copy went once a verified one was installed
    load_dataset("Cifar10", tmp_path / "Datasets")


def test_download_into_a_folder_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DownloadError) as err:
        download("MNIST", tmp_path / "file" / "Datasets", base_url="http://127.0.0.1:9/")
    assert_names(str(err.value), str(tmp_path / "file"), "writable --datapath")
    assert (tmp_path / "file").read_text() == "not a folder"


# ---------------------------------------------------------------- 4. OS errors


@pytest.mark.parametrize("loader", ["check_paths", "load_dataset"])
def test_datapath_missing_or_a_file(tmp_path, loader):
    def load(datapath: Path) -> None:
        if loader == "check_paths":
            check_paths("MNIST", datapath, tmp_path / "P")
        else:
            load_dataset("MNIST", datapath)

    with pytest.raises(DatasetError) as err:
        load(tmp_path / "nowhere")
    assert_names(str(err.value), str(tmp_path / "nowhere"), "does not exist", "feedalign download MNIST")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError) as err:
        load(tmp_path / "afile")
    assert_names(str(err.value), str(tmp_path / "afile"), "is a file, not a folder")
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "MNIST").write_text("x")
    with pytest.raises(DatasetError, match="MNIST folder .*/D/MNIST is a file"):
        load(tmp_path / "D")
    assert snapshot(tmp_path) == {"afile": b"x", "D/MNIST": b"x"}  # nothing created


def test_dataset_file_that_is_a_folder(tmp_path):
    datapath, _ = mnist(tmp_path)
    path = datapath / "MNIST" / "t10k-images-idx3-ubyte.gz"
    path.unlink()
    path.mkdir()
    with pytest.raises(DatasetError, match=f"{path} is not a file"):
        check_paths("MNIST", datapath)
    check_paths("MNIST", datapath, validate=True)  # validate reads no test file


def deny(monkeypatch, denied: Path) -> None:
    """Opening `denied` raises PermissionError, as for a user without read permission."""
    real_open, real_scandir = builtins.open, os.scandir

    def fake_open(file, *args, **kw):
        if Path(os.fspath(file)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    def fake_scandir(path="."):
        if Path(os.fspath(path)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)


def test_unreadable_dataset_file(tmp_path, monkeypatch):
    datapath, before = mnist(tmp_path)
    path = datapath / "MNIST" / "train-labels-idx1-ubyte.gz"
    deny(monkeypatch, path)
    with pytest.raises(DatasetError) as err:
        check_paths("MNIST", datapath)
    assert_names(str(err.value), str(path), "cannot be read (Permission denied)", "chmod u+r")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        load_dataset("MNIST", datapath)
    assert snapshot(datapath) == before


def test_unreadable_datapath(tmp_path, monkeypatch):
    datapath, before = mnist(tmp_path)
    deny(monkeypatch, datapath)
    with pytest.raises(DatasetError) as err:
        check_paths("MNIST", datapath)
    assert_names(str(err.value), f"data folder (-datapath) {datapath} cannot be read", "chmod u+rx")


@pytest.mark.skipif(ROOT, reason="root reads files without read permission")
def test_unreadable_dataset_file_for_real(tmp_path):
    datapath, _ = mnist(tmp_path)
    path = datapath / "MNIST" / "t10k-labels-idx1-ubyte.gz"
    path.chmod(0)
    try:
        with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz: cannot be read"):
            load_dataset("MNIST", datapath)
    finally:
        path.chmod(0o644)


def test_unknown_dataset_and_bundled_digits(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'ImageNet'.*MNIST, FashionMNIST"):
        check_paths("ImageNet", tmp_path)
    check_paths("digits", tmp_path / "nowhere", tmp_path / "P")  # bundled: no folder needed
    assert list(tmp_path.iterdir()) == []


def test_preprocdir_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    """-preProcDir is only a cache: the run goes on, refitting, and says so."""
    (tmp_path / "P").write_text("a file where the cache folder belongs")
    with caplog.at_level(logging.WARNING):
        check_paths("digits", tmp_path, tmp_path / "P")
    assert_names(caplog.text, f"-preProcDir {tmp_path / 'P'} is a file", "will not be cached")
    caplog.clear()
    train = grey_images()
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert_names(caplog.text, "cannot write preprocessing cache", str(tmp_path / "P" / "toy"))
    assert torch.allclose(x.double(), train.double() / 255, atol=1e-6)
    assert snapshot(tmp_path) == {"P": b"a file where the cache folder belongs"}


def test_full_disk_while_caching_is_a_warning(tmp_path, caplog, monkeypatch):
    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache, "atomic_write", full)
    train = grey_images()
    with caplog.at_level(logging.WARNING):
        x, _ = prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert_names(caplog.text, "cannot write preprocessing cache", "No space left on device")
    assert torch.allclose(x.double(), train.double() / 255, atol=1e-6)


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
def test_read_only_preprocdir_for_real(tmp_path, caplog):
    (tmp_path / "P").mkdir()
    (tmp_path / "P").chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING):
            check_paths("digits", tmp_path, tmp_path / "P")
        assert "is not writable" in caplog.text
    finally:
        (tmp_path / "P").chmod(0o755)


# ------------------------------------------------------- 5. planted symlinks


def test_cache_write_replaces_a_planted_symlink_not_its_target(tmp_path):
    train = grey_images()
    path = scale_cache(tmp_path, train)
    path.parent.mkdir(parents=True)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    path.symlink_to(victim)
    prepare(train, train, dataset="toy", validate=False, cache_dir=tmp_path / "P")
    assert victim.read_text() == "keep me"
    assert not path.is_symlink() and "constants" in torch.load(path, weights_only=True)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries


def test_download_force_replaces_a_planted_symlink_not_its_target(server, tmp_path, monkeypatch):  # noqa: F811
    served, url = server
    served_mnist(served, tmp_path, monkeypatch)
    folder = tmp_path / "Datasets" / "MNIST"
    folder.mkdir(parents=True)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (folder / "t10k-labels-idx1-ubyte.gz").symlink_to(victim)
    with pytest.raises(ChecksumError, match="already present"):
        download("MNIST", tmp_path / "Datasets", base_url=url)
    download("MNIST", tmp_path / "Datasets", base_url=url, force=True)
    assert victim.read_text() == "keep me"
    assert not (folder / "t10k-labels-idx1-ubyte.gz").is_symlink()
    load_dataset("MNIST", tmp_path / "Datasets")
