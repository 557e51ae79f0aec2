"""Fitted preprocessing constants, cached under `preProcDir/<dataset>/` (docs/original.md §5).

A cache file is `torch.save` of plain data, read back with
`torch.load(weights_only=True)` (tensors, dicts, strings; nothing else is unpickled):

    {"format": 1, "name": <the file's own name>, "sha256": <hex digest>,
     "constants": {key: float64 tensor}}

The file name is the cache key: split, format, method and a fingerprint of the
training images (see `pipeline.cache_path`). A cached file is used only if every
check passes; otherwise a warning names the file and the fault and the constants
are refitted and the file rewritten:

- torch can read it and it has the layout above (an older feedalign wrote bare
  tensors without a checksum: refitted once);
- `name` is its own file name (a cache copied or renamed from another key);
- every expected constant is there with the expected shape, as float64 (another
  dataset's cache, a hand-edited file);
- `sha256` (over name, keys, shapes, dtypes and bytes) matches: bit rot. torch.load
  checks no CRC, so one flipped bit in a float would otherwise be trained on;
- every value is finite.

Files are written through `feedalign.files.atomic_write`. A cache that cannot be
written (read-only or full disk, a file where the folder belongs) costs a warning,
not the run: the constants just fitted are used, and refitted next time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from feedalign.files import atomic_write

log = logging.getLogger(__name__)

Constants = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]  # the constants a method fits: key -> shape (all float64)
FORMAT = 1  # layout version of a cache file


def fingerprint(images: torch.Tensor) -> str:
    """16 hex digits of SHA-1 over the shape, dtype and every byte of `images`.

    Hashing all bytes is cheap: about 0.1 s for CIFAR-10's 150 MB of uint8.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{tuple(images.shape)} {images.dtype}".encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()[:16]


def checksum(name: str, constants: Constants) -> str:
    """SHA-256 over the cache's name and each constant's key, shape, dtype and bytes."""
    digest = hashlib.sha256(f"feedalign cache {FORMAT} {name}".encode())
    for key in sorted(constants):
        t = constants[key].detach().cpu().contiguous()
        digest.update(f"|{key} {tuple(t.shape)} {t.dtype}|".encode())
        digest.update(memoryview(t.reshape(-1).numpy()).cast("B"))  # no copy (P can be 75 MB)
    return digest.hexdigest()


def _fault(data: object, name: str, shapes: Shapes) -> str | None:
    """What is wrong with the loaded cache `data`, or None if it may be used."""
    layout = isinstance(data, dict) and data.get("format") == FORMAT
    if not (layout and isinstance(data.get("constants"), dict)):
        return "is not a checksummed feedalign cache (an older version's, or another file)"
    if data.get("name") != name:
        return f"belongs to another cache key ({data.get('name')!r})"
    constants = data["constants"]
    for key, shape in shapes.items():
        t = constants.get(key)
        if not isinstance(t, torch.Tensor):
            return f"lacks the constant {key!r}"
        if tuple(t.shape) != shape or t.dtype != torch.float64:
            return (f"holds {key!r} as {t.dtype} of shape {tuple(t.shape)}, expected torch.float64 of "
                    f"shape {shape} (another dataset's cache, or an edited file)")  # fmt: skip
    if set(constants) != set(shapes):
        return f"holds constants {sorted(constants)}, expected {sorted(shapes)}"
    if data.get("sha256") != checksum(name, constants):
        return "fails its checksum (the file changed after it was written: bit rot or an edit)"
    if not all(t.isfinite().all() for t in constants.values()):
        return "holds values that are not finite"
    return None


def _load(path: Path, shapes: Shapes) -> Constants | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's long advice to pass weights_only=False would mislead
        log.warning("preprocessing cache %s is not a torch file of tensors; recomputing it", path)
        return None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning("preprocessing cache %s is unreadable (%s); recomputing it", path, first_line)
        return None
    fault = _fault(data, path.name, shapes)
    if fault:
        log.warning("preprocessing cache %s %s; recomputing it", path, fault)
        return None
    return data["constants"]


def _save(path: Path, constants: Constants) -> None:
    constants = {k: v.detach().cpu() for k, v in constants.items()}
    data = {"format": FORMAT, "name": path.name, "sha256": checksum(path.name, constants),
            "constants": constants}  # fmt: skip

    def write(f) -> None:
        os.fchmod(f.fileno(), 0o644)  # mkstemp's files are private (0600); a cache is not
        torch.save(data, f)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)


def unwritable_reason(folder: Path) -> str | None:
    """Why files could not be written under `folder` (created if missing), or None.

    Looks only (stat and access), creates nothing.
    """
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return "has no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return "is a file" if probe == folder else f"lies under {probe}, which is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return "is not writable" if probe == folder else f"cannot be created in {probe} (not writable)"
    return None


def cached(path: Path, shapes: Shapes, fit: Callable[[], Constants]) -> Constants:
    """The constants stored at `path`, or `fit()`'s, saved there for next time.

    shapes: the constants `fit` returns, key -> shape; a cache must match them exactly.
    """
    try:
        present = path.is_file()
    except OSError:  # a folder on the way that cannot be searched: as if there were no cache
        present = False
    if present:
        constants = _load(path, shapes)
        if constants is not None:
            log.info("preprocessing: reusing %s", path)
            return constants
    constants = fit()
    try:
        _save(path, constants)
    except OSError as err:
        log.warning("cannot write preprocessing cache %s (%s); going on without it (the constants are "
                    "refitted next run): point -preProcDir at a writable folder to cache them",
                    path, err.strerror or err)  # fmt: skip
        return constants
    log.info("preprocessing: saved %s", path)
    return constants
