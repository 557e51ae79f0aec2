"""`feedalign download NAME`: fetch, verify and unpack a dataset's official files.

Each file comes from its official address (the registry's `Remote`s) and is checked
against the publisher's MD5 (or a SHA-256 pinned here) before anything is installed.
Nothing half-written ever sits where `load_dataset` reads:

    download -> <folder>/.<name>.XXXX.part      (temporary, same file system)
    verify   -> checksum mismatch: delete it, raise ChecksumError
    install  -> plain file: os.replace onto its final name;
                archive: unpack into <folder>/.unpack-XXXX/, then os.replace its
                top folder into place.

Tar members that would land outside the target folder (absolute paths, `..`,
links, devices) are refused (tarfile's "data" filter where Python has it).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from feedalign.data.registry import DatasetInfo, Remote, dataset_names, get_dataset

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read per network call
TIMEOUT_S = 60  # seconds without data before a download is abandoned


class DownloadError(RuntimeError):
    """A file could not be fetched, verified or installed."""


class ChecksumError(DownloadError):
    """A fetched file does not match its published checksum."""


def _url(remote: Remote, base_url: str | None) -> str:
    # base_url replaces everything before the file name (a mirror, or a test server).
    return remote.url if base_url is None else base_url.rstrip("/") + "/" + remote.filename


def _digests(remote: Remote, md5: hashlib._Hash, sha256: hashlib._Hash, what: str) -> None:
    for algo, expected, digest in (("MD5", remote.md5, md5), ("SHA-256", remote.sha256, sha256)):
        if expected is not None and digest.hexdigest() != expected.lower():
            raise ChecksumError(
                f"{what}: {algo} is {digest.hexdigest()}, expected {expected}; the file is "
                f"corrupt or not the official one, so nothing was installed"
            )


def _fetch(url: str, target: Path, remote: Remote, info: DatasetInfo) -> None:
    """Stream `url` into `target`, computing its MD5 and SHA-256 on the way."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(target, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename,
                      disable=None, leave=False) as bar:  # fmt: skip
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    md5.update(chunk)
                    sha256.update(chunk)
                    bar.update(len(chunk))
    # URLError (refused, unknown host, HTTP status), timeouts and resets are OSErrors.
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(err, urllib.error.HTTPError):
            reason = f"HTTP {err.code} {err.reason}"
        raise DownloadError(
            f"could not fetch {url} ({reason}). If this machine is offline, fetch "
            f"{remote.filename} elsewhere, put it into {target.parent}/ by hand and run "
            f"`feedalign download {info.name} --datapath {target.parent.parent}` again "
            f"to verify{' and unpack' if remote.unpack else ''} it"
        ) from err
    _digests(remote, md5, sha256, url)


def _verify_local(path: Path, remote: Remote) -> None:
    """Check a file placed by hand against the published checksum."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    _digests(remote, md5, sha256, str(path))


def _check_members(archive: tarfile.TarFile, dest: Path) -> None:
    """Fallback for Pythons without tarfile's "data" filter: refuse unsafe members."""
    root = dest.resolve()
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            raise DownloadError(f"refusing archive member {member.name!r}: outside {dest}")


def _unpack(archive_path: Path, dest: Path, url: str) -> None:
    try:
        with tarfile.open(archive_path, "r:*") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:
                _check_members(archive, dest)
                archive.extractall(dest)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DownloadError(f"{url}: cannot unpack the archive ({err})") from err


def _install(remote: Remote, folder: Path, base_url: str | None, info: DatasetInfo) -> None:
    """Fetch (or take the archive placed by hand), verify, and move into place."""
    url = _url(remote, base_url)
    placed = folder / remote.filename  # an archive the user downloaded by hand
    tmp: Path | None = None
    unpack_dir: Path | None = None
    try:
        if remote.unpack and placed.is_file():
            log.info("verifying %s (placed by hand)", placed)
            _verify_local(placed, remote)
            archive, url = placed, str(placed)
        else:
            fd, name = tempfile.mkstemp(dir=folder, prefix=f".{remote.filename}.", suffix=".part")
            os.close(fd)
            tmp = archive = Path(name)
            log.info("fetching %s", url)
            _fetch(url, tmp, remote, info)
        if not remote.unpack:
            os.chmod(archive, 0o644)  # mkstemp's files are private (0600)
            os.replace(archive, folder / remote.provides)
            return
        unpack_dir = Path(tempfile.mkdtemp(dir=folder, prefix=".unpack-"))
        _unpack(archive, unpack_dir, url)
        if not (unpack_dir / remote.provides).is_dir():
            found = sorted(p.name for p in unpack_dir.iterdir())
            raise DownloadError(f"{url}: archive holds {found}, expected {remote.provides}/")
        os.replace(unpack_dir / remote.provides, folder / remote.provides)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if unpack_dir is not None:
            shutil.rmtree(unpack_dir, ignore_errors=True)


def download(name: str, datapath: str | Path = "./Datasets", *, base_url: str | None = None) -> Path:
    """Fetch dataset `name` into `<datapath>/<Name>/` unless already there; returns that folder.

    base_url: fetch `<base_url>/<file name>` instead of the official address.
    Raises DownloadError (ChecksumError for a corrupt file).
    """
    info = get_dataset(name)
    folder = Path(datapath) / info.folder
    if not info.remotes:
        log.info("%s is bundled with scikit-learn: nothing to download", info.name)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for remote in info.remotes:
        final = folder / remote.provides
        if final.exists():
            if not remote.unpack:
                _verify_local(final, remote)
            log.info("%s: already present", final)
            continue
        _install(remote, folder, base_url, info)
        log.info("%s: installed", final)
    return folder


def _run(args: argparse.Namespace) -> int:
    try:
        folder = download(args.name, args.datapath, base_url=args.base_url)
    except (DownloadError, ValueError) as err:
        log.error("download failed: %s", err)
        return 1
    if get_dataset(args.name).remotes:
        log.info("%s is ready in %s", args.name, folder)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `feedalign download NAME [--datapath DIR] [--base-url URL]`."""
    parser = subparsers.add_parser(
        "download",
        help="fetch and verify a dataset's official files",
        description="Download a dataset's official files, check their published "
        "checksums and unpack them under DATAPATH/NAME/. digits is bundled with "
        "scikit-learn and needs no download.",
    )
    parser.add_argument("name", metavar="NAME",
                        help="dataset, case-insensitive: " + ", ".join(dataset_names()))  # fmt: skip
    parser.add_argument("--datapath", default="./Datasets",
                        help="data set directory (default: ./Datasets)")  # fmt: skip
    parser.add_argument("--base-url", default=None,
                        help="fetch BASE_URL/<file name> instead of the official "
                        "addresses, e.g. a local mirror (default: official)")  # fmt: skip
    parser.set_defaults(func=_run)
