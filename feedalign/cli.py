"""`feedalign` command line: train | eval | sample | download | reproduce | compare.

Each subcommand lives beside the code it drives and registers itself here
through a `register(subparsers)` function that sets `func` on its parser. Only
the module of the subcommand being run is imported (start-up stays quick and
one subcommand's imports cannot break another's).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger("feedalign")

# Exit codes (docs/faults.md, "What happens when things go wrong"): decided here, once.
EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug: Python's own traceback and status
EXIT_USAGE = 2  # an option or combination that cannot work (argparse uses 2 as well)
EXIT_DIVERGED = 3  # the loss became NaN/inf; the last good checkpoint is kept
EXIT_FILE = (
    4  # a dataset, cache, checkpoint or run-directory file, a download, or the OS refused a read/write
)
EXIT_BUSY = 5  # another process trains in that run directory
EXIT_LOST = 6  # another process of the same run stopped (killed, or failed); the last checkpoint is kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class Terminated(BaseException):
    """SIGTERM outside the training loop (the loop turns it into a checkpoint instead)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def exit_code(err: BaseException) -> tuple[int, str] | None:
    """(exit code, one line) for an error the user can act on; None for a bug (traceback)."""
    from feedalign.data import DatasetError
    from feedalign.data.download import DownloadError
    from feedalign.dist import FeedbackMismatch, PeerLost
    from feedalign.models import ModelFileError
    from feedalign.train.checkpoint import CheckpointError
    from feedalign.train.config import OptionError
    from feedalign.train.loop import Diverged
    from feedalign.train.rundir import RunDirBusy
    from feedalign.train.runlog import RunFileError
    from feedalign.train.session import Interrupted

    if isinstance(err, Interrupted):
        return (EXIT_TERMINATED if err.signum == signal.SIGTERM else EXIT_INTERRUPTED), str(err)
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted (Ctrl-C); stopped before anything was written"
    if isinstance(err, Terminated):
        return EXIT_TERMINATED, "terminated (SIGTERM); stopped before anything was written"
    if isinstance(err, Diverged):
        return EXIT_DIVERGED, f"diverged: {err}"
    if isinstance(err, RunDirBusy):
        return EXIT_BUSY, f"error: {err}"
    if isinstance(err, PeerLost):
        return EXIT_LOST, f"error: {err}"
    if isinstance(err, DownloadError):  # offline, HTTP error, wrong checksum, unwritable folder
        return EXIT_FILE, f"download failed: {err}"
    if isinstance(err, (DatasetError, CheckpointError, RunFileError)):
        return EXIT_FILE, f"error: {err}"
    if isinstance(err, (OptionError, FeedbackMismatch, ModelFileError)):
        return EXIT_USAGE, f"error: {err}"
    if isinstance(err, FileNotFoundError) and err.filename is None:
        return EXIT_FILE, f"error: {err}"  # our own "no checkpoint at …" messages
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        advice = "check that the path exists, is the right kind (file or folder), is writable, and has room"
        return EXIT_FILE, f"error: {where}{err.strerror or err}; {advice}"
    return None


def said_by_rank_0(err: BaseException) -> bool:
    """Whether every process of a run raises `err` alike, rank 0 included (the options, the
    run directory's files, a stop the ranks agreed on), so that the other ranks need not say it."""
    from feedalign.dist import FeedbackMismatch
    from feedalign.models import ModelFileError
    from feedalign.train.checkpoint import CheckpointError
    from feedalign.train.config import OptionError
    from feedalign.train.loop import Diverged
    from feedalign.train.runlog import RunFileError
    from feedalign.train.session import Interrupted

    alike = (Interrupted, Diverged, KeyboardInterrupt, Terminated, OptionError, RunFileError, CheckpointError,
             ModelFileError, FeedbackMismatch)  # fmt: skip
    return isinstance(err, alike)


# name -> module providing `register(subparsers)`
SUBCOMMANDS = {
    "train": "feedalign.train.cli",
    "eval": "feedalign.train.cli",
    "sample": "feedalign.train.sample",
    "download": "feedalign.data.download",
    "reproduce": "feedalign.reproduce",
    "compare": "feedalign.reproduce.compare",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command`, or for all subcommands (help, unknown command)."""
    from feedalign.rules import RULES

    parser = argparse.ArgumentParser(
        prog="feedalign",
        description=f"Train networks with back-propagation (bp) or a rule that replaces it: "
        f"{', '.join(r for r in RULES if r != 'bp')} (docs/rules.md). `feedalign <command> --help` "
        "has each command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True
    wanted = [SUBCOMMANDS[command]] if command in SUBCOMMANDS else SUBCOMMANDS.values()
    for module_name in dict.fromkeys(wanted):
        importlib.import_module(module_name).register(sub)
    return parser


# modules a command runs with, imported at start-up while a Ctrl-C waits (see main)
PRELOAD = {"train": ("feedalign.train.session",), "eval": ("feedalign.train.session",)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    previous: dict = {}
    try:
        with _signals_wait():  # importing torch takes seconds; a library must not swallow a Ctrl-C meanwhile
            parser = build_parser(command)
            for module in PRELOAD.get(command, ()):
                importlib.import_module(module)
        args = parser.parse_args(argv)
        args.argv = argv  # what a launcher of several processes passes on (train -nGPU N)
        previous = _install_signal_handlers()
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt, Terminated) as err:
        mapped = exit_code(err)
        if mapped is None:
            raise
        code, message = mapped
        rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
        if rank and (getattr(err, "quiet", False) or said_by_rank_0(err)):
            log.debug(f"rank {rank}: {message}")  # one line per run, not one per process
        else:
            log.error(f"rank {rank}: {message}" if rank else message)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_wait() -> Iterator[None]:
    """SIGINT and SIGTERM are noted while the block runs and raised (KeyboardInterrupt,
    Terminated) once it is done: start-up is never cut in the middle of an import."""
    got: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
                previous[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
        except ValueError:  # not the main thread
            pass
    try:
        from feedalign.launch import as_rank

        as_rank()  # a rank of `-nGPU N` takes the signals held since it started
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if got:
        raise KeyboardInterrupt if got[0] == signal.SIGINT else Terminated


def _install_signal_handlers() -> dict:
    """SIGTERM ends the command with one line and exit 143 (the training loop replaces this
    with a checkpoint); a file-size limit (SIGXFSZ) becomes an OSError naming the file
    instead of killing the process. Only in the main thread (tests call main() elsewhere)."""
    wanted = {signal.SIGTERM: _terminate}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {}
    for sig, handler in wanted.items():
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous


if __name__ == "__main__":
    sys.exit(main())
