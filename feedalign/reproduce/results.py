"""Runs as found on disk, read and grouped for a report: one `RunResult` per run
directory, one `Group` per (row, rule) with its seeds and published figure.

Reads run directories as `feedalign train` leaves them (options.json, metrics.jsonl,
finished.json; runner.json from the reproduce runner; checkpoint.pt is not needed, so
committed metrics suffice). Runs laid out as `<row>/<rule>/seed<k>` (the reproduce
layout) are grouped by row; any other run directory is grouped under its parent
folder's name, with its rule from options.json. report.py, tables.py and lm_report.py
write reports from these; none of them is imported here.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from feedalign.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from feedalign.files import write_if_changed
from feedalign.reproduce.experiments import EXPERIMENTS, PAPER_EPOCHS, RULE_NAME, Row, find_row
from feedalign.rules import RULES
from feedalign.train.runlog import read_json, read_metrics

MARKERS = ("options.json", "metrics.jsonl", "checkpoint.pt", "runner.json")  # any makes a run directory


@dataclass
class RunResult:
    """One run as found on disk. Errors in percent."""

    row: str
    rule: str
    seed: int | None
    dir: Path | None
    status: str  # finished | unfinished (partial) | failed | missing | unavailable (rule not here)
    epochs: int = 0  # epochs with a metrics record
    budget: int | None = None  # options.json "epoch" (-1 = unbounded)
    test: float | None = None  # final epoch
    train: float | None = None
    best: float | None = None  # lowest test error over the epochs
    best_epoch: int | None = None
    reason: str | None = None  # finished.json "reason"
    returncode: int | None = None  # runner.json
    dataset: str | None = None
    options: dict = field(default_factory=dict)  # options.json
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, test error %)
    seconds: float = 0.0  # training time, summed over the epochs (evaluation not included)
    alignment: list[tuple[int, dict]] = field(default_factory=list)  # (epoch, {layer: {metric: °}})

    @property
    def stopped_early(self) -> bool:
        """Finished before its epoch budget: a stopping rule ended it."""
        return self.status == "finished" and self.budget not in (None, -1) and self.epochs < self.budget

    def describe(self) -> str:
        """The run's state in the report's words: how far it got and why it ended."""
        if self.status == "missing":
            return "missing"
        if self.status == "unavailable":
            return "rule not in this feedalign"
        if self.status == "failed":
            return f"failed (exit {self.returncode}, epoch {self.epochs}; see train.log)"
        of = "" if self.budget in (None, -1) else f"/{self.budget}"
        if self.status == "unfinished":
            return f"partial ({self.epochs}{of} epochs)"
        if self.stopped_early:
            return f"{self.epochs}{of} epochs, stopped: {self.reason}"
        return f"{self.epochs} epochs"


def read_run(
    run_dir: Path, row: str | None = None, rule: str | None = None, seed: int | None = None
) -> RunResult:
    """Read one run directory; `row`/`rule`/`seed` default to what options.json says."""
    options = _json(run_dir / "options.json") or {}
    records = read_metrics(run_dir)
    finished = _json(run_dir / "finished.json")
    runner = _json(run_dir / "runner.json") or {}
    rc = runner.get("returncode")
    status = "finished" if finished is not None else "failed" if _failed(rc) else "unfinished"
    last = records[-1] if records else {}
    curve = [(r["epoch"], 100 * r["test_error"]) for r in records if _finite(r.get("test_error"))]
    best_epoch, best = min(curve, key=lambda c: c[1]) if curve else (None, None)
    return RunResult(
        row=row or run_dir.parent.name,
        rule=rule or options.get("gradient", "?"),
        seed=seed if seed is not None else options.get("seed"),
        dir=run_dir,
        status=status,
        epochs=len(records),
        budget=options.get("epoch"),
        test=_pct(last.get("test_error")),
        train=_pct(last.get("train_error")),
        best=best,
        best_epoch=best_epoch,
        reason=(finished or {}).get("reason"),
        returncode=rc,
        dataset=options.get("dataset"),
        options=options,
        curve=curve,
        seconds=sum(r["seconds"] for r in records if _finite(r.get("seconds"))),
        alignment=[(r["epoch"], r["alignment"]) for r in records if r.get("alignment")],
    )


def _failed(returncode: int | None) -> bool:
    """A run that ended by its own fault (diverged, a bad file, a bug: exit 1-5). One stopped
    from outside is partial, not failed: Ctrl-C (130), SIGTERM (143) or killed by a signal
    (negative: Popen's -N for signal N); it keeps its last checkpoint and resumes."""
    return returncode is not None and returncode > 0 and returncode not in (EXIT_INTERRUPTED, EXIT_TERMINATED)


def find_runs(root: Path) -> list[RunResult]:
    """Every run directory under `root`, grouped as the module docstring says."""
    results = []
    for d in sorted({p.parent for m in MARKERS for p in root.rglob(m)}):
        rel = d.relative_to(root).parts
        if len(rel) >= 3 and re.fullmatch(RULE_NAME, rel[-2]) and re.fullmatch(r"seed\d+", rel[-1]):
            results.append(read_run(d, row=rel[-3], rule=rel[-2], seed=int(rel[-1][4:])))
        else:
            results.append(read_run(d, row=(rel[-2] if len(rel) >= 2 else root.resolve().name)))
    return results


def with_missing(found: list[RunResult], expected: list[tuple[str, str, int, Path]],
                 rows: list[Row] | None = None) -> list[RunResult]:  # fmt: skip
    """`found` plus a "missing" entry for every expected (row, rule, seed, dir) not on disk,
    and an "unavailable" one for each rule of `rows` that this feedalign lacks and no run has."""
    have = {(r.row, r.rule, r.seed) for r in found}
    extra = [RunResult(row, rule, seed, d, "missing") for row, rule, seed, d in expected
             if (row, rule, seed) not in have]  # fmt: skip
    ran = {(r.row, r.rule) for r in found}
    extra += [RunResult(row.name, rule, None, None, "unavailable") for row in rows or [] for rule in row.rules
              if rule not in RULES and (row.name, rule) not in ran]  # fmt: skip
    return found + extra


@dataclass
class Group:
    """All seeds of one (row, rule)."""

    row: str
    rule: str
    runs: list[RunResult]
    published: dict | None = None  # {"test", "std", "train", "source", "verified"[, "roughly", "disputed"]}
    paper_epochs: int = PAPER_EPOCHS
    row_options: dict = field(default_factory=dict)  # the row file's options, if known
    metric: str = "final"  # the published figure is the "final" or the "best" test error
    tolerance: float | None = None  # |Δ| (points) the row counts as reproduced, if it says

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "finished" and r.test is not None]

    @property
    def partial(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "unfinished" and r.test is not None]

    @property
    def basis(self) -> list[RunResult]:
        """The runs the figures are computed from: the finished seeds, else the partial ones."""
        return self.finished or self.partial

    def stat(self, key: str) -> tuple[float, float | None] | None:
        """(mean, sample std or None for one run) of `key` ("test", "best", "train") over `basis`."""
        values = [getattr(r, key) for r in self.basis if getattr(r, key) is not None]
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)

    def delta(self) -> float | None:
        """Ours − published, on the figure the table reports (final or best test error)."""
        ours = self.stat("best" if self.metric == "best" else "test")
        if ours is None or not self.published or self.published.get("test") is None:
            return None
        return ours[0] - self.published["test"]


def group_runs(results: list[RunResult], rows: list[Row] | None = None,
               experiments: Path = EXPERIMENTS) -> list[Group]:  # fmt: skip
    """(row, rule) groups in table order (rows' order, then as found), with published figures."""
    by_name = {r.name: r for r in rows or []}
    groups: dict[tuple[str, str], Group] = {}
    for res in results:
        key = (res.row, res.rule)
        if key not in groups:
            row = by_name.get(res.row) or (
                find_row(res.dataset, res.row, experiments) if res.dataset else None
            )
            groups[key] = Group(res.row, res.rule, [], (row.published.get(res.rule) if row else None),
                                row.epochs if row else PAPER_EPOCHS, row.options_for(res.rule) if row else {},
                                row.metric if row else "final", row.tolerance if row else None)  # fmt: skip
        groups[key].runs.append(res)
    order = {name: i for i, name in enumerate(by_name)}
    keyed = sorted(groups.values(), key=lambda g: (order.get(g.row, len(order)), g.row, _rule_order(g.rule)))
    for g in keyed:
        g.runs.sort(key=lambda r: (r.seed is None, r.seed or 0))
    return keyed


def _rule_order(rule: str) -> int:
    names = list(RULES)  # RULES may be a tuple or a name -> rule table
    return names.index(rule) if rule in names else len(names)


def _json(path: Path) -> dict | None:
    """One of a run's small JSON files; None where absent; RunFileError (naming the file)
    for anything but the JSON object the trainer writes."""
    return read_json(path) if path.exists() else None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pct(x: float | None) -> float | None:
    return 100.0 * x if _finite(x) else None


# The line that dates a report: "From <folder> on 2026-11-30 15:44."
_DATED = re.compile(rb"^(From .*?) on \d{4}-\d{2}-\d{2} \d{2}:\d{2}\.", re.M)


def dated(source: Path) -> str:
    """A report's opening words: where its runs are and when it was written."""
    return f"From {source} on {time.strftime('%Y-%m-%d %H:%M')}."


def _undated(text: bytes) -> bytes:
    return _DATED.sub(rb"\1.", text)


def write_report_text(path: Path, text: str) -> bool:
    """Write a report unless the file says the same already, its date aside: a report
    regenerated from the same runs (`--report-only` on committed metrics) stays as it was.
    Returns whether it wrote."""
    return write_if_changed(path, text.encode("utf-8"), same=lambda old, new: _undated(old) == _undated(new))
