"""`feedalign download NAME`: fetch, verify and unpack a dataset's official files.

Each file comes from its official address (the registry's `Remote`s) and is checked
against the publisher's checksum (MD5, or SHA-256 where
published) before anything is installed. Nothing half-written ever
sits where `load_dataset` reads:

    download -> a unique temporary in the folder (`feedalign.files.atomic_write`
                for plain files, `.<archive>.XXXX.part` for archives)
    verify   -> checksum mismatch: delete it, raise ChecksumError
    install  -> plain file: renamed onto its final name;
                archive: unpacked into <folder>/.unpack-XXXX/, then its top folder
                renamed into place (with --force, the old folder is moved aside
                first and deleted only after the new one is in place).

A file already present is verified; a corrupt one is reported with the command
that replaces it (`--force`), and is kept until its new copy has verified.

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
from typing import BinaryIO

from tqdm import tqdm

from feedalign.data.paths import download_hint
from feedalign.data.registry import DatasetInfo, Remote, dataset_names, get_dataset
from feedalign.files import atomic_write

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


def _hasher(remote: Remote) -> hashlib._Hash:
    return hashlib.new(remote.digest[0], usedforsecurity=False)


def _verify(digest: hashlib._Hash, remote: Remote, what: str, info: DatasetInfo, datapath: Path,
            *, present: bool = False) -> None:  # fmt: skip
    """Raise ChecksumError unless `digest` is the published checksum (SHA-256 or MD5);
    `present`: a file already on disk."""
    kind, expected = remote.digest
    kind = kind.upper().replace("SHA256", "SHA-256")
    if digest.hexdigest() == expected.lower():
        return
    if present:
        raise ChecksumError(
            f"{what}: already present, but its {kind} is {digest.hexdigest()}, expected {expected}: "
            f"corrupt, truncated or not the official file. Run {download_hint(info, datapath, force=True)} "
            f"to replace it (it is kept until the new copy verifies), or delete it"
        )
    raise ChecksumError(
        f"{what}: {kind} is {digest.hexdigest()}, expected {expected}; the download is corrupt or not the "
        f"official file, so nothing was installed or replaced"
    )


def _open(url: str, remote: Remote, folder: Path, info: DatasetInfo):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    # URLError (refused, unknown host, HTTP status), timeouts and resets are OSErrors.
    except (OSError, http.client.HTTPException) as err:
        raise _fetch_error(err, url, remote, folder, info) from err


def _fetch_error(err: Exception, url: str, remote: Remote, folder: Path, info: DatasetInfo) -> DownloadError:
    reason = getattr(err, "reason", err)
    if isinstance(err, urllib.error.HTTPError):
        reason = f"HTTP {err.code} {err.reason}"
    return DownloadError(
        f"could not fetch {url} ({reason}). If this machine is offline, fetch "
        f"{remote.filename} elsewhere, put it into {folder}/ by hand and run "
        f"{download_hint(info, folder.parent)} again to verify{' and unpack' if remote.unpack else ''} it"
    )


def _fetch(url: str, out: BinaryIO, remote: Remote, info: DatasetInfo, folder: Path) -> None:
    """Stream `url` into `out` and check its checksum; a network fault is a DownloadError.

    Errors writing `out` (a full disk) stay OSErrors: `download` reports them with the folder.
    """
    digest = _hasher(remote)
    with _open(url, remote, folder, info) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=remote.filename,
                  disable=None, leave=False) as bar:  # fmt: skip
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    raise _fetch_error(err, url, remote, folder, info) from err
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    _verify(digest, remote, url, info, folder.parent)


def _verify_local(path: Path, remote: Remote, info: DatasetInfo) -> None:
    """Check a file already on disk against the published checksum."""
    digest = _hasher(remote)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    _verify(digest, remote, str(path), info, path.parent.parent, present=True)


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


def _public(f: BinaryIO) -> None:
    os.fchmod(f.fileno(), 0o644)  # mkstemp's files are private (0600); a dataset is not


def _install_file(remote: Remote, folder: Path, base_url: str | None, info: DatasetInfo) -> None:
    """A plain file: fetched into a unique temporary, verified, then renamed over its name."""
    url = _url(remote, base_url)
    log.info("fetching %s", url)

    def write(f: BinaryIO) -> None:
        _public(f)
        _fetch(url, f, remote, info, folder)  # a ChecksumError discards the temporary

    atomic_write(folder / remote.provides, write)


def _archive(remote: Remote, folder: Path, base_url: str | None, info: DatasetInfo,
             force: bool) -> tuple[Path, str, bool]:  # fmt: skip
    """(verified archive, its address, whether it is a temporary) for `remote`.

    An archive the user placed by hand in the folder is used if it verifies; a
    corrupt one is an error naming it, unless `force` fetches a fresh copy.
    """
    placed = folder / remote.filename
    if placed.is_file():
        log.info("verifying %s (placed by hand)", placed)
        try:
            _verify_local(placed, remote, info)
            return placed, str(placed), False
        except ChecksumError as err:
            if not force:
                raise ChecksumError(f"{err}, or delete {placed}") from err
            log.warning("%s; fetching a fresh copy", err)
    url = _url(remote, base_url)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{remote.filename}.", suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            log.info("fetching %s", url)
            _fetch(url, f, remote, info, folder)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, url, True


def _swap_in(new: Path, final: Path, aside: Path) -> None:
    """Rename `new` onto `final`; an old `final` is moved to `aside` first, and back on failure."""
    had_old = final.exists() or final.is_symlink()
    if had_old:
        os.replace(final, aside)  # same file system: a rename
    try:
        os.replace(new, final)
    except BaseException:
        if had_old:
            os.replace(aside, final)
        raise


def _install_archive(remote: Remote, folder: Path, base_url: str | None, info: DatasetInfo,
                     force: bool) -> None:  # fmt: skip
    """Verify an archive, unpack it beside its target, then swap it into place.

    An installed folder being replaced (`force`) is moved aside first and deleted
    only once the new one is in place.
    """
    archive, url, temporary = _archive(remote, folder, base_url, info, force)
    unpack_dir: Path | None = None
    try:
        unpack_dir = Path(tempfile.mkdtemp(dir=folder, prefix=".unpack-"))
        _unpack(archive, unpack_dir, url)
        if not (unpack_dir / remote.provides).is_dir():
            found = sorted(p.name for p in unpack_dir.iterdir())
            raise DownloadError(f"{url}: archive holds {found}, expected {remote.provides}/")
        _swap_in(unpack_dir / remote.provides, folder / remote.provides, unpack_dir / ".old")
    finally:
        if unpack_dir is not None:
            shutil.rmtree(unpack_dir, ignore_errors=True)
        if temporary:
            archive.unlink(missing_ok=True)
    placed = folder / remote.filename
    if temporary and placed.is_file():  # a corrupt archive placed by hand, now superseded
        placed.unlink()
        log.info("removed %s (corrupt; replaced by a verified download)", placed)


def _present(final: Path, remote: Remote, info: DatasetInfo) -> None:
    """A file already in place must match its checksum; an unpacked folder is trusted
    (its files are checked by the readers when loaded)."""
    if not remote.unpack:
        _verify_local(final, remote, info)
    log.info("%s: already present", final)


def download(
    name: str, datapath: str | Path = "./Datasets", *, base_url: str | None = None, force: bool = False
) -> Path:
    """Fetch dataset `name` into `<datapath>/<Name>/` unless already there; returns that folder.

    base_url: fetch `<base_url>/<file name>` instead of the official address.
    force: fetch every file again, even those present; each is replaced only once
        its new copy has verified (a failed download leaves the old file as it was).
    Raises DownloadError: ChecksumError for a corrupt file (fetched, or already in
    place without `force`), and for a folder that cannot be written.
    """
    info = get_dataset(name)
    datapath = Path(datapath)
    folder = datapath / info.folder
    if not info.remotes:
        log.info("%s is bundled with scikit-learn: nothing to download", info.name)
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for remote in info.remotes:
            final = folder / remote.provides
            if final.exists() and not force:
                _present(final, remote, info)
                continue
            if remote.unpack:
                _install_archive(remote, folder, base_url, info, force)
            else:
                _install_file(remote, folder, base_url, info)
            log.info("%s: installed", final)
    except OSError as err:  # the network's OSErrors are DownloadErrors by now: this is the disk
        where = err.filename or folder
        raise DownloadError(
            f"cannot write {where} ({err.strerror or err}); free space or choose a writable --datapath"
        ) from err
    return folder


def _run(args: argparse.Namespace) -> int:
    """A DownloadError reaches feedalign.cli.main, which reports it in one line (exit 4)."""
    folder = download(args.name, args.datapath, base_url=args.base_url, force=args.force)
    if get_dataset(args.name).remotes:
        log.info("%s is ready in %s", args.name, folder)
    return 0


def _dataset_name(name: str) -> str:
    """A registered dataset's name (an unknown one is a usage error: exit 2, with the list)."""
    try:
        return get_dataset(name).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `feedalign download NAME [--datapath DIR] [--base-url URL]`."""
    parser = subparsers.add_parser(
        "download",
        help="fetch and verify a dataset's official files",
        description="Download a dataset's official files, check their published "
        "checksums and unpack them under DATAPATH/NAME/. digits is bundled with "
        "scikit-learn and needs no download. Exit 0 when the files are in place and verified; "
        "4 when a file could not be fetched, verified or written (offline, an HTTP error, a wrong "
        "checksum, a full disk), with one line saying which; 2 for an unknown NAME.",
    )
    parser.add_argument("name", metavar="NAME", type=_dataset_name,
                        help="dataset, case-insensitive: " + ", ".join(dataset_names()))  # fmt: skip
    parser.add_argument("--datapath", default="./Datasets",
                        help="data set directory (default: ./Datasets)")  # fmt: skip
    parser.add_argument("--base-url", default=None,
                        help="fetch BASE_URL/<file name> instead of the official "
                        "addresses, e.g. a local mirror (default: official)")  # fmt: skip
    parser.add_argument("--force", action="store_true",
                        help="fetch every file again, even one already present (e.g. corrupt); "
                        "each is replaced only once its new copy has verified")  # fmt: skip
    parser.set_defaults(func=_run)
