"""Checking the data paths before anything is loaded.

`check_paths(dataset, datapath, preproc_dir)` costs a few `stat`/`open` calls and
turns every problem with `-datapath` into one `DatasetError` naming the path and
what to do, so that a run refuses at once instead of failing with a traceback
after minutes of work. `load_dataset` runs the same file checks itself.

`-preProcDir` is only a cache: one that cannot be written is a warning, and the
run goes on, refitting its preprocessing constants (the same values) every time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from feedalign.data.formats import DatasetError
from feedalign.data.registry import DatasetInfo, get_dataset
from feedalign.preprocess.cache import unwritable_reason

log = logging.getLogger(__name__)


def needed_files(info: DatasetInfo, *, validate: bool = False, svhn_extra: bool = True) -> list[str]:
    """The files (relative to the dataset folder) that `load_dataset` will read."""
    splits = ["train"] + (["extra"] if svhn_extra and "extra" in info.splits else [])
    splits += [] if validate else ["test"]
    return [name for split in splits for name in info.splits[split]]


def download_hint(info: DatasetInfo, datapath: Path, *, force: bool = False) -> str:
    flag = " --force" if force else ""
    return f"`feedalign download {info.name} --datapath {datapath}{flag}`"


def _check_folder(
    path: Path, what: str, info: DatasetInfo, datapath: Path, *, missing_ok: bool = False
) -> None:
    fetch = f"run {download_hint(info, datapath)}"
    if missing_ok and not path.exists():  # the first missing file will be named instead
        return
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist; {fetch}, or point -datapath at the folder "
                           f"that holds {info.folder}/")  # fmt: skip
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is a file, not a folder; point -datapath at the folder "
                           f"that holds {info.folder}/, or move the file away and {fetch}")  # fmt: skip
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as err:
        raise DatasetError(f"{what} {path} cannot be read ({err.strerror or err}); give yourself "
                           f"read and search permission on it (chmod u+rx)") from err  # fmt: skip


def _check_file(path: Path, info: DatasetInfo, datapath: Path) -> None:
    folder = datapath / info.folder
    if not path.exists():
        raise DatasetError(f"{info.name}: file {path} not found. Run {download_hint(info, datapath)}, or "
                           f"place the official files (as their archives unpack) in {folder}/")  # fmt: skip
    if not path.is_file():
        raise DatasetError(f"{info.name}: {path} is not a file; move it away and run "
                           f"{download_hint(info, datapath)}")  # fmt: skip
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err}); give yourself read "
                           f"permission on it (chmod u+r) or fetch it again with "
                           f"{download_hint(info, datapath, force=True)}") from err  # fmt: skip


def check_files(info: DatasetInfo, datapath: str | os.PathLike, files: Iterable[str]) -> None:
    """Refuse (DatasetError) unless `<datapath>/<folder>/<f>` is a readable file for every f."""
    datapath = Path(datapath)
    files = list(files)
    if not files:  # bundled (digits): no folder needed
        return
    _check_folder(datapath, "data folder (-datapath)", info, datapath)
    _check_folder(datapath / info.folder, f"{info.name} folder", info, datapath, missing_ok=True)
    for name in files:
        _check_file(datapath / info.folder / name, info, datapath)


def check_paths(
    dataset: str,
    datapath: str | os.PathLike,
    preproc_dir: str | os.PathLike | None = None,
    *,
    validate: bool = False,
    svhn_extra: bool = True,
) -> None:
    """Check, before anything is loaded, that `dataset`'s files can be read.

    Raises DatasetError (a ValueError naming the path and what to do) for an unknown
    dataset, a missing or unreadable `datapath`, a path that is a file where a folder
    belongs (or the reverse), a missing or unreadable dataset file. Logs a warning if
    `preproc_dir` cannot be written: the run then goes on without a cache.
    validate, svhn_extra: as `load_dataset`'s (validate reads no test files).
    """
    try:
        info = get_dataset(dataset)
    except ValueError as err:
        raise DatasetError(str(err)) from err
    files = needed_files(info, validate=validate, svhn_extra=svhn_extra)
    check_files(info, datapath, files)
    if preproc_dir is not None:
        reason = unwritable_reason(Path(preproc_dir))
        if reason:
            log.warning("-preProcDir %s %s: preprocessing constants will not be cached, only refitted "
                        "each run (the same values); point -preProcDir at a writable folder to cache "
                        "them", preproc_dir, reason)  # fmt: skip
