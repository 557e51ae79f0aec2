"""A run's evidence: options.json, env.json, metrics.jsonl, ErrorRate.log (the
original's two columns), errors.png, TensorBoard events.

Every file goes through feedalign/files.py: whole files are replaced atomically,
the two logs are appended without following a planted symlink. Records are plain
JSON: a non-finite number (an `inf` test loss) is written as null, never as the
`Infinity` that JSON readers reject.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from feedalign.dist import THREADS_DEFAULT, usable_cores
from feedalign.files import append_line, atomic_write, atomic_write_text

METRICS = "metrics.jsonl"
ERROR_RATE = "ErrorRate.log"
FINISHED = "finished.json"

log = logging.getLogger("feedalign")


class RunFileError(ValueError):
    """A file of a run directory (options.json, metrics.jsonl) that cannot be read as written."""


def default_run_dir() -> Path:
    """runs/<date>-<time>-<microseconds>-<pid>: the pid separates processes started in
    the same microsecond; within a process a name already taken gets a suffix."""
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path("runs") / f"{stamp}-{int(now % 1 * 1e6):06d}-{os.getpid()}"
    path, n = base, 1
    while path.exists() or path in _NAMED:
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    _NAMED.add(path)
    return path


_NAMED: set[Path] = set()  # names this process handed out (their folders may not exist yet)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def finite_json(obj):
    """`obj` with every non-finite float replaced by None (JSON has no inf or nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_text(path: Path, errors: str = "strict") -> str:
    """A run directory's text file; a folder in its place or a refused read is a RunFileError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8", errors=errors)
    except IsADirectoryError:
        raise RunFileError(f"{path} is a folder, not a file; move it away (or restore the file)") from None
    except PermissionError:
        raise RunFileError(f"{path}: cannot be read (permission denied); give yourself read permission "
                           "on it (chmod u+r)") from None  # fmt: skip


def read_json(path: Path) -> dict:
    """A JSON object from a run directory, or RunFileError naming the file and the fault."""
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: not valid JSON ({err}); restore it from a copy") from None
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path}: not a text file ({err})") from None
    if not isinstance(obj, dict):
        raise RunFileError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def environment(device: torch.device) -> dict:
    import numpy

    import feedalign

    return {
        "feedalign": feedalign.__version__, "git_commit": git_commit(), "python": sys.version.split()[0],
        "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "usable_cores": usable_cores(),
        "threads_default": THREADS_DEFAULT, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a crash mid-write) is left out
    with a warning; a bad line before the last is an error naming the file and line."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in read_text(path, errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not a record with an integer epoch")
        except ValueError as err:
            if i == len(lines):
                log.warning(f"{path}: the last line is incomplete (a crash while writing?); it is left out")
                break
            raise RunFileError(f"{path}, line {i}: not a metrics record ({err})") from None
        records.append(record)
    return records


def say(text: str) -> None:
    """A result — what the run is, each epoch's figures, how it ended — on standard output
    (`feedalign train ... > log` keeps them); logs, progress bars, warnings and errors go
    to standard error (logging, tqdm)."""
    print(text, flush=True)


def summary(records: list[dict], reason: str, run_dir: Path) -> str:
    """The run's last line: why it ended, its final and best figures, its training time."""
    if not records:
        return f"finished: {reason}; run directory {run_dir}"
    last, seconds = records[-1], sum(r.get("seconds") or 0.0 for r in records)
    if "test_bpc" in last:  # text: validation loss, in nats and bits per character
        best = min(records, key=lambda r: r["test_loss"] if r["test_loss"] is not None else math.inf)
        figures = (f"validation loss {last['test_loss']:.4f} ({last['test_bpc']:.3f} bits/char) at "
                   f"iteration {last['iteration']} (best {best['test_loss']:.4f} at iteration "
                   f"{best['iteration']})")  # fmt: skip
    else:
        best = min(records, key=lambda r: r["test_error"] if r["test_error"] is not None else math.inf)
        figures = (f"test error {_pct(last['test_error'])} after epoch {last['epoch']} (best "
                   f"{_pct(best['test_error'])} at epoch {best['epoch']}), training error "
                   f"{_pct(last['train_error'])}")  # fmt: skip
    figures = figures[0].upper() + figures[1:]
    return f"finished: {reason}. {figures}; {seconds:.1f} s of training; run directory {run_dir}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


class RunLog:
    """Appends one record per epoch; on resume, keeps only epochs ≤ the checkpoint's
    (and so repairs a torn last line)."""

    def __init__(self, run_dir: Path, *, resume_epoch: int = 0, visualize: bool = False,
                 tensorboard: bool = False) -> None:  # fmt: skip
        self.dir = run_dir
        self.visualize = visualize
        self.records = [r for r in read_metrics(run_dir) if r["epoch"] <= resume_epoch]
        missing = sorted(set(range(1, resume_epoch + 1)) - {r["epoch"] for r in self.records})
        if missing:  # the file was cut or emptied since: say so, the checkpoint goes on regardless
            log.warning(f"{run_dir / METRICS} lacks the records of epoch(s) {_spans(missing)} that the "
                        "checkpoint has trained; training goes on, those records stay missing")  # fmt: skip
        self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked by resolve() beforehand

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _rewrite(self) -> None:
        atomic_write_text(self.dir / METRICS, "".join(dumps(r) + "\n" for r in self.records))
        log_text = "Training Error\tTest Error\n" + "".join(map(_error_rate_line, self.records))
        atomic_write_text(self.dir / ERROR_RATE, log_text)

    def add(self, record: dict) -> None:
        self.records.append(record)
        append_line(self.dir / METRICS, dumps(record))
        append_line(self.dir / ERROR_RATE, _error_rate_line(record))
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()
        if self.visualize:
            plot_errors(self.records, self.dir / "errors.png")

    def finish(self, reason: str) -> None:
        write_json(self.dir / FINISHED, {"reason": reason, "epochs": len(self.records)})
        if self.tb is not None:
            self.tb.close()


def _spans(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _error_rate_line(record: dict) -> str:
    """One row of the original's ErrorRate.log: training and test error, fractions."""
    return f"{record['train_error']:.6f}\t{record['test_error']:.6f}\n"


def plot_errors(records: list[dict], path: Path) -> None:
    """Training and test error per epoch, in percent (the original's `visualize 1`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [100 * r["train_error"] for r in records], label="training error")
    ax.plot(epochs, [100 * r["test_error"] for r in records], label="test error")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
