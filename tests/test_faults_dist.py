"""Several processes, one run (issue 26, item 1).

The launcher of `feedalign train -nGPU N` (feedalign/launch.py) on light stand-in ranks: each
Ctrl-C or SIGTERM reaches every rank, even one that came while the ranks were starting, and
the launcher exits 130 / 143; a rank killed is named and the others are stopped; the ranks
die with the launcher. Then `feedalign train -nGPU 2` itself (two gloo processes on the CPU)
as a user would run it, without -save: a rank SIGKILLed mid-run stops the other with a line
naming it (exit 6) and the checkpoint intact; the resume command continues the run, Ctrl-C
gives one run directory, one checkpoint, one resume line and exit 130; the run then finishes.
Every wait is bounded by a generous timeout; none is a threshold on how long something took.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from feedalign import launch
from feedalign.cli import EXIT_INTERRUPTED, EXIT_LOST, EXIT_TERMINATED
from feedalign.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # for each wait; generous for a loaded 2-core machine
LINUX = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc (Linux)")

# a stand-in rank: takes its signals as feedalign.cli does (handlers, then launch.as_rank), says
# it is ready, then waits; `killed`: rank 1 SIGKILLs itself; `fails`: rank 1 exits 4
RANK = """
import os, signal, sys, time
from feedalign.launch import as_rank
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
as_rank()
rank, mode, folder = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
open(os.path.join(folder, f"ready{rank}.tmp"), "w").write(str(os.getpid()))
os.rename(os.path.join(folder, f"ready{rank}.tmp"), os.path.join(folder, f"ready{rank}"))
while not os.path.exists(os.path.join(folder, "ready0")):  # rank 1 acts once rank 0 runs
    time.sleep(0.01)
if rank == 1 and mode == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
if rank == 1 and mode == "fails":
    sys.exit(4)
while True:
    time.sleep(1)
"""


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ready(folder: Path, n: int = 2) -> list[int]:
    """The pids of the stand-in ranks, once each has said it is ready."""
    wait_for(lambda: all((folder / f"ready{r}").exists() for r in range(n)), "the ranks to start")
    return [int((folder / f"ready{r}").read_text()) for r in range(n)]


def stand_in(tmp_path: Path, mode: str) -> list[str]:
    (tmp_path / "rank.py").write_text(RANK)
    return [sys.executable, str(tmp_path / "rank.py"), mode, str(tmp_path)]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@LINUX
def test_a_signal_while_the_ranks_start_reaches_every_rank(tmp_path, monkeypatch):
    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # Ctrl-C right after rank 0 is started, before rank 1 is
        p = real_popen(cmd, **kw)
        if kw["env"]["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGINT)
        return p

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch, "GRACE_S", float(TIMEOUT_S))  # a rank that missed it would hang the test
    assert launch.run_ranks(2, stand_in(tmp_path, "wait")) == EXIT_INTERRUPTED


@LINUX
def test_sigterm_reaches_every_rank_once_they_run(tmp_path):
    def terminate() -> None:
        ready(tmp_path)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, which waits for the ranks

    sender = threading.Thread(target=terminate)
    sender.start()
    try:
        assert launch.run_ranks(2, stand_in(tmp_path, "wait")) == EXIT_TERMINATED
    finally:
        sender.join()


@LINUX
@pytest.mark.parametrize("mode,code", [("killed", EXIT_LOST), ("fails", 4)])
def test_a_rank_that_dies_is_named_and_the_others_stopped(tmp_path, monkeypatch, caplog, mode, code):
    monkeypatch.setattr(launch, "GRACE_S", 0.0)  # rank 0 never stops by itself: stopped at once
    caplog.set_level(logging.INFO, logger="feedalign")
    assert launch.run_ranks(2, stand_in(tmp_path, mode)) == code
    pids = ready(tmp_path)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    lost = [f"rank 1 (pid {pids[1]}) was killed by SIGKILL (the out-of-memory killer sends SIGKILL); "
            "the other ranks stop"] if mode == "killed" else []  # fmt: skip
    assert said == [*lost, f"rank 0 (pid {pids[0]}) did not stop within 0 s: killed"]


@LINUX
def test_the_ranks_die_with_their_launcher(tmp_path):
    cmd = stand_in(tmp_path, "wait")
    code = f"import sys; from feedalign.launch import run_ranks; sys.exit(run_ranks(2, {cmd!r}))"
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        pids = ready(tmp_path)
        launcher.kill()  # SIGKILL: the launcher's own clean-up cannot run
        wait_for(lambda: all(gone(pid) for pid in pids), "the ranks to die with the launcher")
    finally:
        launcher.kill()
        launcher.wait()


def test_a_signal_while_a_rank_starts_python_is_one_line(tmp_path):
    """A rank starts with the signals blocked (as the launcher leaves them); one that comes
    while Python and torch load is answered, once they have, with one line, no traceback."""
    cmd = [sys.executable, "-m", "feedalign", "train", "-dataset", "digits", "-type", "float", "-save",
           str(tmp_path / "run"), "-preProcDir", str(tmp_path / "P"), "--quiet"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), launch.LAUNCHER: str(os.getpid())}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, launch.FORWARDED)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    proc.send_signal(signal.SIGINT)  # at once: the rank's Python has only begun to start
    out = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert out.splitlines() == ["interrupted (Ctrl-C); stopped before anything was written"]
    assert not (tmp_path / "run").exists()


# --- feedalign train -nGPU 2 ------------------------------------------------------------------------


def feedalign(*argv: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "feedalign", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip


def ranks_of(pid: int) -> dict[int, int]:
    """rank -> pid of the processes `pid` started (Linux /proc)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == pid:
            ranks[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(stat.parent.name)
    return ranks


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        proc.kill()
    assert "Traceback" not in out, out
    return out


@pytest.mark.slow
@LINUX
def test_a_killed_rank_then_ctrl_c_then_the_end_under_ngpu(tmp_path):
    args = ["train", "-nGPU", "2", "-type", "float", "-dataset", "digits", "-datapath", str(tmp_path / "D"),
            "-preProcDir", str(tmp_path / "P"), "-num_hidden", "64", "-batchSize", "8", "-threads", "1",
            "-seed", "5", "-epoch", "-1", "--quiet"]  # fmt: skip
    runs = tmp_path / "runs"

    def checkpoint(after: int = 0):
        found = list(runs.glob("*/checkpoint.pt"))
        return found and ckpt.load(found[0])["epoch"] > after and found[0]

    # rank 1 SIGKILLed in the middle of the run: rank 0 stops, naming it; the checkpoint is intact
    proc = feedalign(*args, cwd=tmp_path)
    wait_for(checkpoint, "the first checkpoint")
    ranks = ranks_of(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)
    out = finish(proc)
    assert proc.returncode == EXIT_LOST, out
    (run,) = runs.iterdir()  # rank 0 named it, every rank used that name
    name = shlex.quote(str(run.relative_to(tmp_path)))
    assert f"run directory {run.relative_to(tmp_path)}" in out
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert f"rank 1 (pid {ranks[1]}) was killed by SIGKILL" in out
    (lost,) = [line for line in out.splitlines() if "stopped before the others" in line]
    resume = f"feedalign train --resume {name}"
    assert lost.startswith(f"error: rank 1 (pid {ranks[1]})") and lost.endswith(f"Continue with: {resume}")
    saved = ckpt.load(run / "checkpoint.pt")  # whole: its checksum verified
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]

    # the resume command continues it; Ctrl-C (the terminal's SIGINT reaches the launcher only)
    proc = feedalign(*shlex.split(resume)[1:], cwd=tmp_path)
    wait_for(lambda: checkpoint(after=saved["epoch"]), "a checkpoint after resuming")
    proc.send_signal(signal.SIGINT)
    out = finish(proc)
    assert proc.returncode == EXIT_INTERRUPTED, out
    resumes = [line.split("Continue with: ")[1] for line in out.splitlines() if "Continue with:" in line]
    assert resumes == [resume]
    assert list(runs.iterdir()) == [run]

    # and the run goes on to its end, its records whole
    done = ckpt.load(run / "checkpoint.pt")["epoch"] + 1
    proc = feedalign(*shlex.split(resume)[1:], "-epoch", str(done), cwd=tmp_path)
    out = finish(proc)
    assert proc.returncode == 0, out
    assert json.loads((run / "finished.json").read_text())["epochs"] == done
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, done + 1))
    assert out.count("running 2 processes") == 1
