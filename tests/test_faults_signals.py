"""Ctrl-C at every stage of `feedalign train`: a real SIGINT, sent to this process from inside
each stage (start-up imports, loading, preprocessing, the first optimizer step, evaluating).
Each ends with exit 130 (SIGTERM: 143), one line, and nothing half-written: before the first
write nothing at all; after it, one whole checkpoint and the resume command.
"""

from __future__ import annotations

import logging
import os
import signal

import pytest
from test_faults import digits_args

import feedalign.cli
from feedalign.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, main
from feedalign.train import checkpoint as ckpt

NOTHING_WRITTEN = "stopped before anything was written"


def interrupt(sig: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), sig)  # handled in this (the main) thread before the next line runs


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


STARTS = [(signal.SIGINT, EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
          (signal.SIGTERM, EXIT_TERMINATED, "terminated (SIGTERM)")]  # fmt: skip


@pytest.mark.parametrize("sig,code,word", STARTS)
def test_a_signal_while_the_command_starts_waits_for_the_imports(tmp_path, caplog, monkeypatch, sig, code,
                                                                 word):  # fmt: skip
    real = feedalign.cli.build_parser
    imported = []

    def slow_start(command):  # the signal comes in the middle of start-up (importing torch)
        interrupt(sig)
        imported.append("after the signal")  # start-up was not cut short: a library cannot swallow it
        return real(command)

    monkeypatch.setattr(feedalign.cli, "build_parser", slow_start)
    assert main(digits_args(tmp_path, tmp_path / "run", "-epoch", "1")) == code
    assert imported and errors(caplog) == [f"{word}; {NOTHING_WRITTEN}"]
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_loading_or_preprocessing_writes_nothing(tmp_path, caplog, monkeypatch):
    import feedalign.preprocess.cache as cache

    def cut_write(path, write):  # Ctrl-C half-way through writing the preprocessing cache
        def half(f):
            f.write(b"half of a cache")
            interrupt()
            write(f)

        real_write(path, half)

    real_write = cache.atomic_write
    monkeypatch.setattr(cache, "atomic_write", cut_write)
    args = digits_args(tmp_path, tmp_path / "run", "-epoch", "1")
    assert main(args) == EXIT_INTERRUPTED
    assert errors(caplog) == [f"interrupted (Ctrl-C); {NOTHING_WRITTEN}"]
    assert not (tmp_path / "run").exists() and not [p for p in (tmp_path / "P").rglob("*") if p.is_file()]


@pytest.mark.parametrize("stage", ["the first optimizer step", "evaluating"])
def test_ctrl_c_once_training_has_started_writes_one_checkpoint(tmp_path, caplog, monkeypatch, stage):
    import feedalign.train.session as session
    from feedalign.train.optim import Optimizer

    saves = []
    real_save = ckpt.save
    monkeypatch.setattr(ckpt, "save", lambda obj, path: saves.append(path) or real_save(obj, path))
    if stage == "evaluating":
        real_evaluate = session.evaluate

        def evaluate(*args, **kw):
            interrupt()
            return real_evaluate(*args, **kw)

        monkeypatch.setattr(session, "evaluate", evaluate)
        expect, at = "interrupted after epoch 1; checkpoint written", (1, 0)
    else:  # where --compile_optimizer compiles (for ~20 s)
        real_step = Optimizer.step

        def step(self, *args, **kw):
            if self.steps == 0:
                interrupt()
            return real_step(self, *args, **kw)

        monkeypatch.setattr(Optimizer, "step", step)
        expect, at = "interrupted at epoch 1, batch 1; checkpoint written", (0, 1)
    run = tmp_path / "run"
    assert main(digits_args(tmp_path, run, "-epoch", "3")) == EXIT_INTERRUPTED
    assert errors(caplog) == [f"{expect}. Continue with: feedalign train --resume {run}"]
    assert saves == [run / "checkpoint.pt"]
    saved = ckpt.load(run / "checkpoint.pt")
    assert (saved["epoch"], saved["epoch_state"]["batch"]) == at
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_import_feedalign_loads_no_torch_so_the_command_line_can_wait_for_it():
    """`python -m feedalign` imports the package before feedalign.cli can hold a Ctrl-C back:
    the package must not import torch itself (every name of its API loads on first use)."""
    import subprocess
    import sys

    code = (
        "import sys, feedalign; print('torch' in sys.modules); import feedalign.describe; "
        "print(callable(feedalign.describe), all(hasattr(feedalign, n) for n in feedalign.__all__))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert res.stdout.split() == ["False", "True", "True"], res.stdout + res.stderr


def test_a_process_started_with_ctrl_c_ignored_keeps_ignoring_it(tmp_path, caplog, monkeypatch):
    """As Python itself does: a shell script's `feedalign train … &` starts with Ctrl-C ignored, so
    that the Ctrl-C meant for the script does not reach it; at no stage does feedalign take it
    back (SIGTERM, what a scheduler sends, still stops it)."""
    from feedalign.train.optim import Optimizer

    real_parser, real_step = feedalign.cli.build_parser, Optimizer.step

    def parser(command):
        interrupt()
        return real_parser(command)

    def step(self, *args, **kw):
        interrupt()
        return real_step(self, *args, **kw)

    monkeypatch.setattr(feedalign.cli, "build_parser", parser)
    monkeypatch.setattr(Optimizer, "step", step)
    run = tmp_path / "run"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(digits_args(tmp_path, run, "-epoch", "1")) == 0
    finally:
        signal.signal(signal.SIGINT, previous)
    assert errors(caplog) == [] and (run / "finished.json").exists()
