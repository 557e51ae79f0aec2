"""Writing artefacts safely: never half-written, never through a planted link.

Every file feedalign writes (options, metrics, checkpoints, caches, plots,
downloads) goes through these two helpers:

- `atomic_write(path, write)`: `write(f)` fills a temporary file with a unique
  name in the same folder (created with O_EXCL, so an existing file or symlink
  of that name is never opened), which is flushed to disk and then renamed
  onto `path`. A reader sees the old file or the new one, never a torn one;
  `os.replace` replaces a symlink at `path` itself, not what it points to.
- `write_if_changed(path, data, same=...)`: `atomic_write` unless `path` holds that
  content already (as `same` judges: a report dated today says what yesterday's did),
  so regenerating from the same inputs leaves files, and their history, alone.
- `append_line(path, line)`: appends one line, refusing to follow a symlink at
  `path` (O_NOFOLLOW), for the append-only logs (metrics.jsonl, ErrorRate.log).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` all at once: `write(f)` gets a binary file to fill."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_if_changed(path: str | os.PathLike, data: bytes,
                     same: Callable[[bytes, bytes], bool] = bytes.__eq__) -> bool:  # fmt: skip
    """`atomic_write` `data` to `path` unless `same(old, data)` for the bytes there now;
    returns whether it wrote."""
    path = Path(path)
    if path.is_file() and not path.is_symlink() and same(path.read_bytes(), data):
        return False
    atomic_write(path, lambda f: f.write(data))
    return True


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` (a newline is added) to `path`; a symlink at `path` is refused (OSError ELOOP)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
