"""Every file error names its file: each file feedalign reads (checkpoint by --resume, eval and
-load; options.json; metrics.jsonl; a preprocessing cache; a dataset file; a text file) is cut
short, emptied, replaced by a folder and made unreadable in turn. Each case checks the exit code,
that the message names the file and says what to do, and that the run directory did not change.

Unreadable: chmod 000 where that stops a read; as root (which reads regardless) every open of the
file raises the PermissionError the kernel would.
"""

from __future__ import annotations

import builtins
import errno
import io
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_data import write_mnist  # tests/ is on sys.path under pytest
from test_faults import digits_args, snapshot

from feedalign.cli import EXIT_FILE, EXIT_OK, EXIT_USAGE, main
from feedalign.train.runlog import METRICS

ROOT = os.geteuid() == 0
FAULTS = ("truncated", "empty", "folder", "unreadable")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished one-epoch digits run, an MNIST-format dataset and its preprocessing cache."""
    tmp = tmp_path_factory.mktemp("made")
    assert main(digits_args(tmp, tmp / "run", "-epoch", "1")) == EXIT_OK
    write_mnist(tmp / "D")
    assert main(mnist_args(tmp, tmp / "mnist-run")) == EXIT_OK
    (tmp / "story.txt").write_text("été " * 100 + "é", encoding="utf-8")  # 602 bytes: cut at 301, inside an é
    return tmp


def mnist_args(tmp: Path, run: Path) -> list[str]:
    args = digits_args(tmp, run, "-epoch", "1")
    args[args.index("-dataset") + 1] = "MNIST"
    return args


def text_args(tmp: Path, run: Path) -> list[str]:
    return ["train", "-dataset", str(tmp / "story.txt"), "-network", "lstm", "-criterion", "ce",
            "-num_hidden", "8", "-context", "8", "-batchSize", "4", "-iterations", "2", "-eval_every", "2",
            "-threads", "1", "-type", "float", "--quiet", "-seed", "1", "-save", str(run)]  # fmt: skip


def break_file(path: Path, fault: str) -> None:
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "folder":
        path.unlink()
        path.mkdir()
        (path / "inside").write_text("a folder where the file was\n")


def make_unreadable(path: Path, monkeypatch) -> None:
    if not ROOT:
        path.chmod(0)
        return
    deny = os.path.abspath(path)

    def wrap(real):
        def opener(file, *args, **kw):
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) == deny:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real(file, *args, **kw)

        return opener

    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))


# (what, the file to break, the command, {fault: exit code}; a fault left out ends in EXIT_FILE)
def cases(work: Path) -> dict:
    run, new = work / "run", work / "new"
    resume = ["train", "--resume", str(run), "-epoch", "2"]
    cache = next((work / "P" / "MNIST").glob("*.pt"))
    return {
        "checkpoint (--resume)": (run / "checkpoint.pt", resume, {}),
        "checkpoint (eval)": (run / "checkpoint.pt", ["eval", str(run)], {}),
        "checkpoint (-load)": (
            run / "checkpoint.pt",
            digits_args(work, new, "-epoch", "1", "-load", str(run / "checkpoint.pt")),
            {"folder": EXIT_USAGE},
        ),
        "options.json": (run / "options.json", resume, {}),
        # a cut or emptied log is repaired on resume, with a warning naming it
        "metrics.jsonl": (run / METRICS, resume, {"truncated": EXIT_OK, "empty": EXIT_OK}),
        # a cache fault costs a warning and a recomputation, never the run
        "preprocessing cache": (cache, mnist_args(work, new), dict.fromkeys(FAULTS, EXIT_OK)),
        "dataset file": (work / "D" / "MNIST" / "train-images-idx3-ubyte.gz", mnist_args(work, new), {}),
        "text file": (work / "story.txt", text_args(work, new), {}),
    }


NAMES = ["checkpoint (--resume)", "checkpoint (eval)", "checkpoint (-load)", "options.json", "metrics.jsonl",
         "preprocessing cache", "dataset file", "text file"]  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("what", NAMES)
def test_every_file_error_names_the_file(made, tmp_path, caplog, monkeypatch, what, fault):
    work = Path(shutil.copytree(made, tmp_path / "work", symlinks=True))
    monkeypatch.chdir(work)
    path, argv, codes = cases(work)[what]
    expected = codes.get(fault, EXIT_FILE)
    break_file(path, fault)
    before = snapshot(work / "run")
    if fault == "unreadable":
        make_unreadable(path, monkeypatch)
    caplog.set_level(logging.INFO)
    code = main(argv)
    monkeypatch.undo()
    path.chmod(0o644)
    said = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert code == expected, said
    assert str(path) in said, f"{what}, {fault}: the message does not name {path}: {said!r}"
    if expected != EXIT_OK:
        assert snapshot(work / "run") == before
        assert not (work / "new").exists()
