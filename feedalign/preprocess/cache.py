"""Fitted preprocessing constants, cached under `preProcDir/<dataset>/` (SPEC §5).

A cache file holds plain tensors (`torch.save`, read back with
`torch.load(weights_only=True)`, which unpickles nothing but tensors and
containers). Its name records the split (validate or full), format, method and
a fingerprint of the training images, so constants are never reused for other
data. A file that cannot be read or does not hold the expected tensors is
refitted (with a warning), never trusted. Files are written to a temporary name
and renamed into place, so a crash never leaves half a file under the real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Constants = dict[str, torch.Tensor]


def fingerprint(images: torch.Tensor) -> str:
    """16 hex digits of SHA-1 over the shape, dtype and every byte of `images`.

    Hashing all bytes is cheap: about 0.1 s for CIFAR-10's 150 MB of uint8.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{tuple(images.shape)} {images.dtype}".encode())
    digest.update(memoryview(images.detach().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()[:16]


def _load(path: Path, keys: tuple[str, ...]) -> Constants | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:  # fmt: skip
        log.warning("preprocessing cache %s is unreadable (%s); refitting", path, err)
        return None
    ok = (
        isinstance(data, dict)
        and set(keys) <= set(data)
        and all(isinstance(data[k], torch.Tensor) and data[k].isfinite().all() for k in keys)
    )
    if not ok:
        log.warning("preprocessing cache %s does not hold finite %s; refitting", path, keys)
        return None
    return {k: data[k] for k in keys}


def _save(path: Path, constants: Constants) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu() for k, v in constants.items()}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's files are private (0600)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cached(path: Path, keys: tuple[str, ...], fit: Callable[[], Constants]) -> Constants:
    """The constants stored at `path`, or `fit()`'s, saved there for next time."""
    if path.is_file():
        constants = _load(path, keys)
        if constants is not None:
            log.info("preprocessing: reusing %s", path)
            return constants
    constants = fit()
    _save(path, constants)
    log.info("preprocessing: saved %s", path)
    return constants
