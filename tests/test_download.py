"""`feedalign download` against a local HTTP server serving fixture archives."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import socket
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_data import write_cifar10, write_mnist  # tests/ is on sys.path under pytest

from feedalign.data import DATASETS, load_dataset
from feedalign.data.download import ChecksumError, DownloadError, download


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of a threaded HTTP server on a random local port."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def pin(monkeypatch, name: str, md5s: list[str]) -> None:
    """Make the registry expect the fixtures' checksums instead of the official ones."""
    info = DATASETS[name]
    remotes = tuple(dataclasses.replace(r, md5=m) for r, m in zip(info.remotes, md5s, strict=True))
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, remotes=remotes))


def cifar_archive(served: Path, tmp_path: Path) -> Path:
    """A cifar-10-binary.tar.gz like the official one, holding small fixture batches."""
    write_cifar10(tmp_path / "src")
    archive = served / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "Cifar10" / "cifar-10-batches-bin", "cifar-10-batches-bin")
    return archive


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_archive_download_verify_unpack(server, tmp_path, monkeypatch):
    served, url = server
    archive = cifar_archive(served, tmp_path)
    pin(monkeypatch, "Cifar10", [md5(archive)])
    datapath = tmp_path / "Datasets"
    folder = download("cifar10", datapath, base_url=url)
    assert folder == datapath / "Cifar10"
    assert (folder / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-bin"]  # no temp files
    train, test = load_dataset("Cifar10", datapath)
    assert len(train) == 20 and len(test) == 4
    # a second call finds the data in place and fetches nothing (the server is gone)
    assert download("Cifar10", datapath, base_url=f"http://127.0.0.1:{free_port()}/") == folder


def test_plain_files_download(server, tmp_path, monkeypatch):
    served, url = server
    write_mnist(tmp_path / "src")
    files = sorted((tmp_path / "src" / "MNIST").iterdir())
    for f in files:
        (served / f.name).write_bytes(f.read_bytes())
    order = [r.filename for r in DATASETS["MNIST"].remotes]
    pin(monkeypatch, "MNIST", [md5(served / name) for name in order])
    folder = download("MNIST", tmp_path / "Datasets", base_url=url)
    assert sorted(p.name for p in folder.iterdir()) == [f.name for f in files]
    train, _ = load_dataset("MNIST", tmp_path / "Datasets")
    assert len(train) == 12


def test_corrupt_archive_is_refused(server, tmp_path, monkeypatch):
    served, url = server
    archive = cifar_archive(served, tmp_path)
    pin(monkeypatch, "Cifar10", [md5(archive)])
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    archive.write_bytes(bytes(raw))
    datapath = tmp_path / "Datasets"
    with pytest.raises(ChecksumError, match="cifar-10-binary.tar.gz: MD5 is .*expected"):
        download("Cifar10", datapath, base_url=url)
    assert list((datapath / "Cifar10").iterdir()) == []  # nothing installed, no temp files


def test_refused_connection_names_address_and_folder(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/"
    datapath = tmp_path / "Datasets"
    with pytest.raises(DownloadError) as err:
        download("MNIST", datapath, base_url=url)
    msg = str(err.value)
    assert url + "train-images-idx3-ubyte.gz" in msg
    assert str(datapath / "MNIST") in msg and "by hand" in msg
    assert leftovers(datapath / "MNIST") == []


def test_missing_file_on_server(server, tmp_path):
    _, url = server
    with pytest.raises(DownloadError, match="404"):
        download("STL10", tmp_path, base_url=url)
    assert list((tmp_path / "STL10").iterdir()) == []


def test_archive_placed_by_hand(server, tmp_path, monkeypatch):
    served, _ = server
    archive = cifar_archive(served, tmp_path)
    pin(monkeypatch, "Cifar10", [md5(archive)])
    folder = tmp_path / "Datasets" / "Cifar10"
    folder.mkdir(parents=True)
    (folder / archive.name).write_bytes(archive.read_bytes())
    download("Cifar10", tmp_path / "Datasets", base_url=f"http://127.0.0.1:{free_port()}/")
    assert (folder / "cifar-10-batches-bin" / "data_batch_5.bin").is_file()


def test_archive_escaping_the_folder_is_refused(server, tmp_path, monkeypatch):
    served, url = server
    archive = served / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    pin(monkeypatch, "Cifar10", [md5(archive)])
    with pytest.raises(DownloadError, match="escaped.txt|unpack"):
        download("Cifar10", tmp_path / "Datasets", base_url=url)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert list((tmp_path / "Datasets" / "Cifar10").iterdir()) == []


def test_cli_subcommand_exit_codes(tmp_path, caplog, capsys):
    """The README's table: 0 done, 4 a file that could not be fetched (offline: nothing
    listens at the address), 2 an unknown name."""
    from feedalign.cli import EXIT_FILE, EXIT_USAGE, main

    assert main(["download", "digits", "--datapath", str(tmp_path)]) == 0
    offline = [
        "download",
        "MNIST",
        "--datapath",
        str(tmp_path),
        "--base-url",
        f"http://127.0.0.1:{free_port()}/",
    ]
    assert main(offline) == EXIT_FILE
    assert "download failed: could not fetch" in caplog.text
    with pytest.raises(SystemExit) as stop:
        main(["download", "ImageNet"])
    assert stop.value.code == EXIT_USAGE and "unknown dataset 'ImageNet'" in capsys.readouterr().err
