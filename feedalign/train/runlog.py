"""A run's evidence (STYLE §11): options.json, env.json, metrics.jsonl,
ErrorRate.log (the original's two columns), errors.png, TensorBoard events."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

METRICS = "metrics.jsonl"
FINISHED = "finished.json"


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    import numpy

    import feedalign

    return {
        "feedalign": feedalign.__version__, "git_commit": git_commit(), "python": sys.version.split()[0],
        "torch": torch.__version__, "numpy": numpy.__version__, "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLog:
    """Appends one record per epoch; on resume, keeps only epochs ≤ the checkpoint's."""

    def __init__(self, run_dir: Path, *, resume_epoch: int = 0, visualize: bool = False,
                 tensorboard: bool = False) -> None:  # fmt: skip
        self.dir = run_dir
        self.visualize = visualize
        self.records = [r for r in read_metrics(run_dir) if r["epoch"] <= resume_epoch]
        self._rewrite()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # checked by the CLI beforehand

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _rewrite(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        (self.dir / METRICS).write_text(lines)
        log = "Training Error\tTest Error\n" + "".join(map(_error_rate_line, self.records))
        (self.dir / "ErrorRate.log").write_text(log)

    def add(self, record: dict) -> None:
        self.records.append(record)
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.dir / "ErrorRate.log", "a") as f:
            f.write(_error_rate_line(record))
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
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
