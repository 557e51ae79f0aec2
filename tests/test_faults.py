"""Fault injection: every class of fault in docs/faults.md, each case asserting the
exit code, that the message names the cause, and that nothing was lost or changed
(the run directory's files compared byte for byte before and after).

Subprocess cases (signals, locks across processes, file-size limits) are marked
slow; every wait in them is bounded by a timeout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import feedalign
from feedalign.cli import EXIT_BUSY, EXIT_FILE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, main
from feedalign.train import checkpoint as ckpt
from feedalign.train import rundir
from feedalign.train.config import Options
from feedalign.train.runlog import METRICS, RunLog, default_run_dir
from feedalign.train.session import Interrupted, train

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes), the lock file aside."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}  # fmt: skip


def digits_args(tmp: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "-dataset", "digits", "-datapath", str(tmp / "D"), "-preProcDir", str(tmp / "P"),
            "-num_hidden", "32", "-seed", "3", "-threads", "1", "-type", "float", "--quiet",
            "-save", str(run), *extra]  # fmt: skip


def digits_opts(tmp: Path, **kw) -> Options:
    base = dict(dataset="digits", datapath=str(tmp / "D"), preProcDir=str(tmp / "P"), epoch=1, seed=3,
                num_hidden=32, quiet=True, threads=1, type="float", save=str(tmp / "run"))  # fmt: skip
    return Options(**(base | kw))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-epoch digits run (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("finished")
    return train(digits_opts(tmp))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A digits run stopped in the middle of epoch 1 (checkpoint written, no finished.json)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(Interrupted):
        train(digits_opts(tmp, epoch=2), stop_at=(1, 10))
    return tmp / "run"


def copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


def errors(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


# --- bad: a finished run stays finished ---------------------------------------------------------


def test_resume_of_a_finished_run_changes_nothing_and_a_larger_epoch_extends_it(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert "has finished (1 epochs); nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "-epoch", "2"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / METRICS).read_text().splitlines()] == [1, 2]
    assert json.loads((run / "finished.json").read_text())["epochs"] == 2


# --- bad: one process per run directory ----------------------------------------------------------


def test_a_second_process_in_a_busy_run_directory_is_refused(tmp_path, caplog):
    run = tmp_path / "run"
    with rundir.owned(run):  # another owner (flock is per open file: this conflicts too)
        before = snapshot(run)
        assert main(digits_args(tmp_path, run, "-epoch", "1")) == EXIT_BUSY
        assert f"{run} is in use by another feedalign process (pid {os.getpid()})" in errors(caplog)
        assert snapshot(run) == before == {}


def test_a_dead_owners_lock_is_recovered_and_default_names_never_collide(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")  # fmt: skip
    owner = subprocess.Popen([sys.executable, "-c", hold, str(run / rundir.LOCK)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirBusy):
            with rundir.owned(run):
                pass
    finally:
        owner.kill()  # SIGKILL: no chance to clean up
        owner.wait(timeout=30)
    (run / ".checkpoint.pt.k3x9.tmp").write_bytes(b"half a checkpoint")  # the killed owner's, mid-write
    (run / "notes.tmp").write_text("the user's")
    with rundir.owned(run):  # the kernel released the dead owner's lock; the new owner clears its temp file
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK, "notes.tmp"]
    names = {default_run_dir() for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n.name for n in names)


@pytest.mark.slow
def test_two_processes_one_run_directory_and_sigterm(tmp_path):
    run = tmp_path / "my run"  # a space: the printed resume command must be quoted
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "feedalign", *digits_args(tmp_path, run, "-epoch", "-1")]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == EXIT_BUSY, second.stderr
        assert "is in use by another feedalign process" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == EXIT_TERMINATED, out
    assert "Traceback" not in out
    resume = out.strip().splitlines()[-1].split("Continue with: ")[1]
    assert resume == f"feedalign train --resume {shlex.quote(str(run))}"
    saved = ckpt.load(run / "checkpoint.pt")  # the partial epoch was kept, up to the last batch done
    during = re.search(r"interrupted at epoch (\d+), batch (\d+)", out)
    if during:
        epoch, batch = map(int, during.groups())
        assert (saved["epoch"], saved["epoch_state"]["batch"]) == (epoch - 1, batch)
    else:  # the signal came while the epoch's end was evaluated: its checkpoint is the one kept
        epoch = int(re.search(r"interrupted after epoch (\d+); checkpoint written", out).group(1))
        assert (saved["epoch"], saved["epoch_state"]["batch"]) == (epoch, 0)
    again = [sys.executable, "-m", *shlex.split(resume), "-epoch", str(epoch + 1)]
    res = subprocess.run(again, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert (run / "finished.json").exists()


# --- bad: no code from a run directory -----------------------------------------------------------

MODEL_FILE = """
from pathlib import Path
from torch import nn
Path(__file__).with_name("IMPORTED").touch()  # the evidence that this file ran
def build(input_shape, n_classes, **options):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, n_classes))
"""


def test_eval_and_resume_never_import_a_model_file_named_by_the_run_directory(tmp_path, caplog):
    models = tmp_path / "M"
    models.mkdir()
    (models / "mine.py").write_text(MODEL_FILE)
    run = tmp_path / "run"
    # named on the command line: trusted
    assert main(digits_args(tmp_path, run, "-network", "mine", "-modelsFolder", str(models), "-epoch", "1",
                            "-gradient", "bp")) == 0  # fmt: skip
    (models / "IMPORTED").unlink()
    before = snapshot(run)
    assert main(["eval", str(run)]) == EXIT_USAGE
    assert main(["train", "--resume", str(run), "-epoch", "2"]) == EXIT_USAGE
    assert "does not run code from it" in errors(caplog) and "--trust-model-file" in errors(caplog)
    assert not (models / "IMPORTED").exists()
    assert snapshot(run) == before
    with pytest.raises(rundir.UntrustedModelFile):
        feedalign.evaluate_run(run)
    assert main(["eval", str(run), "--trust-model-file"]) == 0  # the user says so
    assert (models / "IMPORTED").exists()


# --- bad: planted symlinks -----------------------------------------------------------------------


def test_planted_symlinks_are_never_written_through(interrupted, tmp_path):
    run = copy(interrupted, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for name in (METRICS, "ErrorRate.log", ".checkpoint.pt.tmp", ".options.json.tmp"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(victim)
    opts = Options.from_dict(json.loads((run / "options.json").read_text()))
    train(opts, resume=run)
    assert victim.read_text() == "precious\n"
    assert not (run / METRICS).is_symlink() and len((run / METRICS).read_text().splitlines()) == 2
    log = RunLog(run, resume_epoch=2)
    (run / METRICS).unlink()
    (run / METRICS).symlink_to(victim)  # planted between two appends
    with pytest.raises(OSError):
        log.add({"epoch": 3, "train_error": 0.1, "test_error": 0.1})
    assert victim.read_text() == "precious\n"


# --- bad: bit rot in a checkpoint ----------------------------------------------------------------


def test_a_flipped_bit_in_a_checkpoint_stops_the_resume(interrupted, tmp_path, caplog):
    run = copy(interrupted, tmp_path)
    path = run / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    raw = bytearray(path.read_bytes())
    at = raw.find(payload[:256]) + len(payload) // 2  # inside the stored weights, not the archive
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == EXIT_FILE
    assert f"{path}: checksum mismatch" in errors(caplog)
    assert snapshot(run) == before


# --- poor: OS errors, checked before work starts --------------------------------------------------


@pytest.mark.parametrize("option,expect", [("-save", "is a file, not a folder"),
                                           ("-datapath", "is a file, not a folder"),
                                           ("-preProcDir", "is a file, not a folder")])  # fmt: skip
def test_a_path_that_is_a_file_is_refused_before_the_data_loads(tmp_path, caplog, option, expect):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    args = digits_args(tmp_path, tmp_path / "run", "-epoch", "1")
    args[args.index(option) + 1] = str(blocker)
    assert main(args) == EXIT_USAGE
    assert f"{option} {blocker}: is a file" in errors(caplog) and expect in errors(caplog)
    assert blocker.read_text() == "a file\n" and not (tmp_path / "run").exists()


FSIZE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # bytes: json files fit, a checkpoint not
from feedalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_file_size_limit_while_checkpointing_is_one_line_and_leaves_no_partial_file(tmp_path):
    run = tmp_path / "run"
    args = digits_args(tmp_path, run, "-epoch", "1")
    args[args.index("-num_hidden") + 1] = "800"  # ~2.4 MB of weights and optimizer state
    res = subprocess.run([sys.executable, "-c", FSIZE, *args], capture_output=True, text=True, timeout=300,
                         env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    assert res.returncode == EXIT_FILE, res.stderr
    assert "File too large while writing the checkpoint" in res.stderr and "Traceback" not in res.stderr
    assert "--resume" in res.stderr
    assert not (run / "checkpoint.pt").exists() and not [p for p in os.listdir(run) if ".tmp" in p]


def test_a_missing_dataset_is_a_file_error_and_leaves_no_run_directory(tmp_path, caplog):
    args = digits_args(tmp_path, tmp_path / "run", "-epoch", "1")
    args[args.index("-dataset") + 1] = "MNIST"
    (tmp_path / "D").mkdir()
    assert main(args) == EXIT_FILE
    assert "train-images-idx3-ubyte" in errors(caplog)
    assert not (tmp_path / "run").exists()


# --- poor: impossible values, one validation for the CLI and the library -------------------------


@pytest.mark.parametrize("argv,expect", [
    (["-LR", "inf"], "-LR inf is not allowed; it must be finite and > 0"),
    (["-eps", "nan"], "-eps nan is not allowed; it must be finite and >= 0"),
    (["-weightDecay", "inf"], "-weightDecay inf is not allowed"),
    (["-LRDecay", "inf"], "-LRDecay inf is not allowed"),
    (["-rfb_mag", "inf"], "-rfb_mag inf is not allowed"),
    (["-seed", str(2**64)], "-seed 18446744073709551616 is not allowed; it must be an integer in [0, 2**63)"),
    (["-batchSize", "1", "-batchnorm", "1"], "BatchNorm cannot normalise a batch of one sample"),
])  # fmt: skip
def test_impossible_values_are_refused(tmp_path, caplog, argv, expect):
    assert main(digits_args(tmp_path, tmp_path / "run", *argv)) == EXIT_USAGE
    assert expect in errors(caplog)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw", [dict(dropout=7), dict(rfb_mag=float("nan")), dict(num_hidden=-1),
                                dict(n_classes=0)])  # fmt: skip
def test_the_library_refuses_the_same_values_with_the_same_words(tmp_path, caplog, kw):
    args = {"n_classes": 10} | kw
    with pytest.raises(ValueError) as err:
        feedalign.build_model("mlp", (1, 8, 8), args.pop("n_classes"), **args)
    ((name, value),) = kw.items()
    assert str(err.value).startswith(f"{name} {value!r} is not allowed; it must be ")
    if name != "n_classes":  # the same check, the same words, on the command line
        assert main(digits_args(tmp_path, tmp_path / "run", f"-{name}", str(value))) == EXIT_USAGE
        assert f"-{err.value}" in errors(caplog)


# --- poor: corrupt run-directory files -----------------------------------------------------------


@pytest.mark.parametrize("text,expect", [("{\"LR\": 0.001,", "options.json: not valid JSON"),
                                         ("[1, 2]", "options.json: expected a JSON object"),
                                         (None, "-LR 'fast': expected float")])  # fmt: skip
def test_a_corrupt_options_json_is_a_file_error(interrupted, tmp_path, caplog, text, expect):
    run = copy(interrupted, tmp_path)
    if text is None:
        text = json.dumps(json.loads((run / "options.json").read_text()) | {"LR": "fast"})
    (run / "options.json").write_text(text)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == EXIT_FILE
    assert expect in errors(caplog)
    assert main(["eval", str(run)]) == EXIT_FILE
    assert snapshot(run) == before


def test_a_checkpoint_of_another_network_on_resume(interrupted, tmp_path, caplog):
    run = copy(interrupted, tmp_path)
    other = train(digits_opts(tmp_path / "other", num_hidden=16))
    shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "-epoch", "2"]) == EXIT_FILE
    assert "holds weights of a different network" in errors(caplog) and "shape mismatches" in errors(caplog)
    assert snapshot(run) == before


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path):
    with pytest.raises(Interrupted):
        train(digits_opts(tmp_path, epoch=3), stop_at=(2, 5))
    run = tmp_path / "run"
    with open(run / METRICS, "a") as f:
        f.write('{"epoch": 2, "train_err')  # a crash in the middle of a write
    opts = Options.from_dict(json.loads((run / "options.json").read_text()))
    train(opts, resume=run)
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_non_finite_values_are_written_as_valid_json(tmp_path):
    log = RunLog(tmp_path)
    log.add({"epoch": 1, "train_error": 0.5, "test_error": 0.5, "test_loss": float("inf"),
             "train_loss": float("nan")})  # fmt: skip

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    (row,) = [json.loads(x, parse_constant=refuse) for x in (tmp_path / METRICS).read_text().splitlines()]
    assert row["test_loss"] is None and row["train_loss"] is None and row["train_error"] == 0.5


@pytest.mark.parametrize("content", [os.urandom(4096), b"not a checkpoint\n"])
def test_load_of_random_bytes_says_what_the_file_is_not(tmp_path, caplog, content):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    assert main(digits_args(tmp_path, tmp_path / "run", "-epoch", "1", "-load", str(bad))) == EXIT_FILE
    message = errors(caplog)
    assert f"{bad} is not a readable checkpoint" in message and "not in torch.save's format" in message
    assert "weights_only" not in message  # torch's advice to disable the safety check is not repeated
    assert bad.read_bytes() == content and not (tmp_path / "run").exists()


# --- poor: interruption --------------------------------------------------------------------------


def test_ctrl_c_while_the_data_loads_is_one_line(tmp_path, caplog, monkeypatch):
    import feedalign.train.session as session

    def interrupted_load(opts, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "load_data", interrupted_load)
    assert main(digits_args(tmp_path, tmp_path / "run", "-epoch", "1")) == EXIT_INTERRUPTED
    assert errors(caplog) == "interrupted (Ctrl-C); stopped before anything was written"
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_early_names_the_checkpoint_it_leaves(tmp_path):
    """One wording for a lost rank, a second Ctrl-C and a NaN (session.what_is_kept)."""
    from feedalign.train.session import what_is_kept

    again = "no checkpoint had been written yet: start the run again (the same command)"
    assert what_is_kept(tmp_path, resume="R") == again and what_is_kept(None, resume="R") == again
    # a NaN: rerunning the same command would repeat it, so no advice to
    assert what_is_kept(tmp_path, good=True) == "no checkpoint had been written yet"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"")
    assert what_is_kept(tmp_path, resume="R") == f"the last checkpoint is kept: {path}. Continue with: R"
    said = what_is_kept(tmp_path, when=" (after epoch 2 or at Ctrl-C)", good=True)
    assert said == f"the last good checkpoint is kept: {path} (after epoch 2 or at Ctrl-C)"


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "feedalign", *digits_args(tmp_path, run, "-epoch", "-1")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "Traceback" not in out and "--resume" in out
    ckpt.load(run / "checkpoint.pt")  # whichever signal won, the checkpoint is whole
