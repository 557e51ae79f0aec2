"""`feedalign reproduce --hours H`: run only what fits in H hours, J runs at a time.

Each run's time is estimated as

    seconds = remaining epochs × seconds per epoch × OVERHEAD

remaining epochs: the budget minus the epochs its directory already holds (a resumed
or extended run), else the whole budget. Seconds per epoch (the median of the
metrics' per-epoch training "seconds"), from the first source that has one:
    1. the run's own metrics.jsonl                           "measured (this run)"
    2. other runs of the same row and rule under <out>/runs  "measured (row/rule)"
    3. other runs of the same row, any rule                  "measured (row)"
    4. the row file's `epoch_seconds` estimate               "row file estimate"
A run with none of these cannot be estimated and is left out (say so, not guess).

Selection (`select`) follows the runner: runs in table order, each on the first of
the J slots to come free; a run is chosen if it ends within the budget there, and
left out otherwise (later, shorter runs may still fit). Stopping rules can end a run
early, so the estimate is an upper bound for rows that have them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from feedalign.reproduce.experiments import Row
from feedalign.reproduce.runner import Run
from feedalign.train.runlog import read_metrics

OVERHEAD = 1.1  # evaluation of the test set and the checkpoint, beside the training seconds


@dataclass(frozen=True)
class Estimate:
    run: Run
    action: str  # fresh | resume | extend
    epochs: int  # still to train
    epoch_seconds: float | None
    source: str  # where epoch_seconds came from, or why there is none

    @property
    def seconds(self) -> float | None:
        if self.epoch_seconds is None:
            return None
        return self.epochs * self.epoch_seconds * OVERHEAD


def _median_seconds(run_dirs: Sequence[Path]) -> float | None:
    values = [r["seconds"] for d in run_dirs for r in read_metrics(d) if r.get("seconds")]
    return statistics.median(values) if values else None


def epoch_seconds(run: Run, row: Row, out: Path) -> tuple[float | None, str]:
    """(seconds per epoch, source) for `run` of `row`, as the module docstring orders them."""
    own = _median_seconds([run.dir])
    if own is not None:
        return own, "measured (this run)"
    row_dir = out / "runs" / row.name
    same_rule = _median_seconds(sorted((row_dir / run.rule).glob("seed*")))
    if same_rule is not None:
        return same_rule, "measured (row/rule)"
    same_row = _median_seconds(sorted(row_dir.glob("*/seed*")))
    if same_row is not None:
        return same_row, "measured (row)"
    if row.epoch_seconds is not None:
        return float(row.epoch_seconds), "row file estimate"
    return None, "no estimate: no metrics of this row yet and no epoch_seconds in its row file"


def estimate(work: Sequence[tuple[Run, str]], rows: Sequence[Row], out: Path) -> list[Estimate]:
    """An Estimate for every (run, action) still to do, in the given (table) order."""
    by_name = {r.name: r for r in rows}
    found = []
    for run, action in work:
        done = len(read_metrics(run.dir)) if action in ("resume", "extend") else 0
        seconds, source = epoch_seconds(run, by_name[run.row], out)
        found.append(Estimate(run, action, max(0, run.epochs - done), seconds, source))
    return found


def select(
    estimates: Sequence[Estimate], *, hours: float, jobs: int
) -> tuple[list[Estimate], list[Estimate]]:
    """(chosen, left out): list scheduling on `jobs` slots within `hours` (module docstring)."""
    if hours <= 0 or jobs < 1:
        raise ValueError(f"--hours must be > 0 and --jobs >= 1, got {hours} and {jobs}")
    budget = hours * 3600.0
    slots = [0.0] * jobs  # seconds at which each slot comes free
    chosen, left = [], []
    for est in estimates:
        if est.seconds is None:
            left.append(est)
            continue
        i = min(range(jobs), key=slots.__getitem__)
        if slots[i] + est.seconds <= budget:
            slots[i] += est.seconds
            chosen.append(est)
        else:
            left.append(est)
    return chosen, left


def describe(chosen: Sequence[Estimate], left: Sequence[Estimate], *, hours: float, jobs: int) -> str:
    """What was chosen and what was left, one line per run, for the log."""

    def line(e: Estimate) -> str:
        t = "?" if e.seconds is None else f"{e.seconds / 3600:.2f} h"
        rate = "" if e.epoch_seconds is None else f" × {e.epoch_seconds:.1f} s"
        return f"  {e.run.label:<40} {e.action:<7} {e.epochs} epochs{rate} = {t}  [{e.source}]"

    total = sum(e.seconds or 0 for e in chosen) / 3600
    lines = [f"--hours {hours:g} --jobs {jobs}: {len(chosen)} run(s) chosen ({total:.2f} run-hours), "
             f"{len(left)} left for later"]  # fmt: skip
    lines += ["chosen:", *map(line, chosen)] if chosen else ["chosen: none"]
    lines += ["left:", *map(line, left)] if left else []
    return "\n".join(lines)
