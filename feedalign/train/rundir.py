"""The run directory: checked before work starts, owned by one process at a time,
and treated as data on resume (nothing in it is executed).

Ownership: rank 0 holds an exclusive `flock` on `<run>/.lock` for the whole run.
The kernel releases it when the process ends, however it ends (a crash or SIGKILL
leaves no stale lock to clean up); a second process asking for it is refused at
once with RunDirBusy. The new owner removes the temporary files (`.*.tmp`) of a
writer that was killed in the middle of a write.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from feedalign.models import NETWORKS
from feedalign.train.config import RESUME_MAY_CHANGE, OptionError, Options
from feedalign.train.runlog import RunFileError, read_json

LOCK = ".lock"


class RunDirBusy(RuntimeError):
    """Another process is training in this run directory."""


class UntrustedModelFile(OptionError):
    """A run directory names a Python model file that the user has not named."""


def is_builtin(network: str) -> bool:
    return network.removesuffix(".lua").removesuffix(".py") in NETWORKS


def check_trusted(opts: Options, where: Path, trust_model_file: bool) -> None:
    """Options read from a run directory may not import code: a model file is only
    imported when the user says so (docs/faults.md, "What is trusted")."""
    if is_builtin(opts.network) or trust_model_file:
        return
    file = Path(opts.modelsFolder) / f"{opts.network.removesuffix('.py')}.py"
    raise UntrustedModelFile(
        f"{where} names the model file {file} (options network + modelsFolder). A run "
        "directory is data and feedalign does not run code from it; if you trust that file, "
        "repeat the command with --trust-model-file"
    )


def check_writable_dir(path: Path, option: str) -> None:
    """`path` is, or can be made, a writable folder: say so now, not after the data loaded."""
    if path.exists() and not path.is_dir():
        raise OptionError(f"{option} {path}: is a file, not a folder; choose a folder")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise OptionError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"{option} {path}: {existing} is not writable; choose a folder you can write")


def check_paths(opts: Options, run_dir: Path) -> None:
    """The folders a run reads and writes, before any data is loaded."""
    check_writable_dir(run_dir, "-save")
    check_writable_dir(Path(opts.preProcDir), "-preProcDir")
    data = Path(opts.datapath)
    if data.exists() and not data.is_dir():
        raise OptionError(f"-datapath {data}: is a file, not a folder; give the folder holding <dataset>/")
    if data.is_dir() and not os.access(data, os.R_OK | os.X_OK):
        raise OptionError(f"-datapath {data}: not readable; fix its permissions or give another folder")


@contextlib.contextmanager
def owned(run_dir: Path, *, is_main: bool = True) -> Iterator[Path]:
    """Create `run_dir` if needed and hold its lock while the block runs (rank 0 only).
    A folder this call created and left holding nothing but the lock is removed again."""
    if not is_main:
        yield run_dir
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        _lock(fd, run_dir)
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for stale in run_dir.glob(".*.tmp"):  # files.atomic_write's, left by a writer that was killed
            stale.unlink(missing_ok=True)
        yield run_dir
    finally:
        if created and os.listdir(run_dir) == [LOCK]:  # nothing was written: leave no trace
            os.unlink(run_dir / LOCK)
            os.rmdir(run_dir)
        os.close(fd)  # releases the lock


def _lock(fd: int, run_dir: Path) -> None:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        owner = ""
        with contextlib.suppress(OSError):
            owner = (run_dir / LOCK).read_text().strip()
        raise RunDirBusy(
            f"{run_dir} is in use by another feedalign process (pid {owner or '?'}); wait for it "
            "to end, or train in another -save folder"
        ) from None


def check_resume_options(opts: Options, saved: dict, run_dir: Path) -> None:
    """Refuse a change to an option that the run's checkpoint depends on; only
    RESUME_MAY_CHANGE may differ from the run's own options."""
    if opts.seed is None:
        opts.seed = saved.get("seed")
    mine = opts.to_dict()
    changed = sorted(k for k, v in saved.items() if k in mine and mine[k] != v and k not in RESUME_MAY_CHANGE)
    if changed:
        given = ", ".join(f"{k} {mine[k]!r} (run: {saved[k]!r})" for k in changed)
        raise OptionError(
            f"resuming {run_dir}: only {', '.join(sorted(RESUME_MAY_CHANGE))} may change, not {given}"
        )


def already_finished(opts: Options, run_options: dict, epochs_done: int, finished: bool) -> bool:
    """A finished run stays finished unless a larger -epoch extends it."""
    if not finished:
        return False
    wanted = opts.epoch
    extends = wanted != run_options.get("epoch") and (wanted == -1 or wanted > epochs_done)
    return not extends


def saved_options(run_dir: Path) -> dict:
    """options.json of a run directory, read as data (RunFileError names the fault)."""
    path = Path(run_dir) / "options.json"
    if not path.exists():
        raise RunFileError(f"{run_dir}: no options.json there; is it a feedalign run directory?")
    return read_json(path)


def options_from_run(run_dir: Path, given: dict | None = None) -> Options:
    """Options of a run directory (with `given` on top), their types checked: a wrong
    type in options.json is a RunFileError naming the file."""
    path = Path(run_dir) / "options.json"
    try:
        opts = Options.from_dict(saved_options(run_dir) | (given or {}))
        opts.check_types()
    except OptionError as err:
        raise RunFileError(f"{path}: {err}") from None
    return opts
