"""Character-level text: a UTF-8 file as a stream of character ids (nanoGPT's shakespeare_char).

    text = load_text("shakespeare_char", "./Datasets", context=64)
    text.train  # (1003854,) int64 ids;  text.val  # (111540,);  text.vocab  # 65 characters

The vocabulary is the sorted set of characters of the whole file; the first 90% of
the characters are the training split, the last 10% validation (nanoGPT's
data/shakespeare_char/prepare.py). `-dataset` names a registered text dataset or a
path to any UTF-8 text file (anything ending in .txt or holding a path separator).

`WindowLoader` draws a training batch of `batch` windows of `context` characters at
random offsets, as nanoGPT's get_batch: the offsets of batch i of "epoch" e are a
pure function of (seed, e, i), so a resumed run sees the batches it would have seen.
`eval_windows` is the fixed, seeded set of validation windows every evaluation uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from feedalign.data.formats import DatasetError
from feedalign.data.paths import check_files, download_hint
from feedalign.data.registry import DATASETS, get_dataset

TRAIN_FRACTION = 0.9  # nanoGPT's split: the first 90% trains, the last 10% validates
EVAL_SEED = 1234  # the validation windows: the same for every run, whatever its -seed
_MIX = 1_000_003


@dataclass
class Text:
    train: Tensor  # (L_train,) int64 character ids
    val: Tensor  # (L_val,) int64
    vocab: str  # id -> character, sorted by code point
    source: Path

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)


def is_text(dataset: str) -> bool:
    """A registered text dataset, or a path to a text file (ends in .txt or holds a separator)."""
    info = {k.lower(): v for k, v in DATASETS.items()}.get(dataset.lower())
    if info is not None:
        return info.kind == "text"
    return dataset.endswith(".txt") or os.sep in dataset or "/" in dataset


def text_path(dataset: str, datapath: str | os.PathLike) -> Path:
    """The file `dataset` reads: `<datapath>/<folder>/<file>` for a registered one, else the path."""
    if dataset.lower() not in {k.lower() for k in DATASETS}:
        return Path(dataset)
    info = get_dataset(dataset)
    check_files(info, datapath, info.splits["train"])
    return Path(datapath) / info.folder / info.splits["train"][0]


def read_text(path: str | os.PathLike, *, context: int = 1, hint: str = "") -> Text:
    """The characters of the UTF-8 file `path`, split 90/10. Raises DatasetError naming the
    file for a missing, unreadable, empty, binary or non-UTF-8 file, or one whose
    validation split is shorter than one window of `context` characters plus its target.
    hint: what to do about a bad registered file (the download command)."""
    path = Path(path)
    fix = hint or "give a plain UTF-8 text file"
    if not path.exists():
        raise DatasetError(f"text file {path} not found; {hint or 'check the path given to -dataset'}")
    if not path.is_file():
        raise DatasetError(f"{path} is not a file; -dataset takes a UTF-8 text file (or a dataset name)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err}); give yourself read "
                           "permission on it (chmod u+r)") from err  # fmt: skip
    if not raw:
        raise DatasetError(f"{path} is empty: a language model needs text to learn from; {fix}")
    if b"\0" in raw:
        at = raw.index(b"\0")
        raise DatasetError(f"{path} holds a NUL byte at offset {at}: a binary file, not text; {fix}")
    try:
        chars = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); convert it, "
                           f"e.g. iconv -f latin1 -t utf-8, or {fix}") from None  # fmt: skip
    codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
    points = np.unique(codes)  # sorted
    vocab = "".join(map(chr, points))
    ids = torch.from_numpy(np.searchsorted(points, codes).astype(np.int64))
    n = int(len(ids) * TRAIN_FRACTION)
    need = context + 1  # a window and its targets, shifted by one character
    if len(ids) - n < need:
        raise DatasetError(f"{path}: {len(ids)} characters, so its validation split (the last 10%) holds "
                           f"{len(ids) - n}, fewer than one window of -context {context} plus its target "
                           f"({need}); use a text of at least {10 * need} characters or a "
                           "smaller -context")  # fmt: skip
    return Text(ids[:n].clone(), ids[n:].clone(), vocab, path)


def load_text(dataset: str, datapath: str | os.PathLike = "./Datasets", *, context: int = 1) -> Text:
    """A registered text dataset (from `<datapath>/<folder>/`) or a text file by path."""
    path = text_path(dataset, datapath)
    registered = dataset.lower() in {k.lower() for k in DATASETS}
    hint = ""
    if registered:
        hint = f"fetch it again with {download_hint(get_dataset(dataset), Path(datapath), force=True)}"
    return read_text(path, context=context, hint=hint)


def windows(ids: Tensor, context: int, starts: Tensor) -> tuple[Tensor, Tensor]:
    """(x, y), each (len(starts), context): the windows at `starts` and their next characters."""
    offsets = starts[:, None] + torch.arange(context + 1, device=ids.device)
    chunk = ids[offsets]
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(ids: Tensor, context: int, n: int = 0, seed: int = EVAL_SEED) -> tuple[Tensor, Tensor]:
    """The fixed validation set: `ids` cut into consecutive windows of `context` characters
    from an offset in [0, context) drawn by a generator seeded with `seed`, so that every
    character is predicted once, at every position of a window equally often; n > 0: a
    seeded sample of n of those windows (all of them when n is 0 or larger)."""
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(context, (1,), generator=gen))
    if len(ids) - shift < context + 1:
        shift = 0
    starts = torch.arange(shift, len(ids) - context, context)
    if 0 < n < len(starts):
        starts = starts[torch.randperm(len(starts), generator=gen)[:n]].sort().values
    return windows(ids, context, starts.to(ids.device))


class WindowLoader:
    """`steps` batches per "epoch" (one evaluation interval) of `batch` random windows of
    the training stream, (x, y) each (batch, context); the EpochLoader interface the trainer uses."""

    def __init__(self, ids: Tensor, batch: int, context: int, steps: int, *, seed: int = 0, rank: int = 0,
                 last_steps: int | None = None, epochs: int | None = None) -> None:  # fmt: skip
        if len(ids) <= context:
            raise ValueError(
                f"{len(ids)} training characters cannot fill a window of {context} plus a target"
            )
        self.ids, self.batch, self.context, self.steps = ids, batch, context, steps
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.last_steps, self.epochs = last_steps, epochs  # the last interval may be shorter

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def __len__(self) -> int:
        if self.epochs is not None and self.epoch == self.epochs and self.last_steps:
            return self.last_steps
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(len(self)):
            key = (((self.seed * _MIX + self.epoch) * _MIX + i) * _MIX + self.rank) % 2**63
            gen = torch.Generator().manual_seed(key)
            starts = torch.randint(len(self.ids) - self.context, (self.batch,), generator=gen)
            yield windows(self.ids, self.context, starts.to(self.device))
