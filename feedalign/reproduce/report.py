"""The reproduction report: our errors next to the paper's, per row and rule.

Reads run directories as `feedalign train` leaves them (options.json,
metrics.jsonl, finished.json; runner.json from the reproduce runner) and writes
`report.md` (one table) and `report.png` (test error per epoch, one panel per row),
plus `alignment.png` where runs logged alignment angles.

Usable on any folder: `python -m feedalign.reproduce.report DIR`. Runs laid out as
`<row>/<rule>/seed<k>` (the reproduce layout) are grouped by row; any other run
directory is grouped under its parent folder's name, with its rule from options.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from feedalign.reproduce.experiments import EXPERIMENTS, PAPER_EPOCHS, Row, find_row
from feedalign.rules import RULES
from feedalign.train.runlog import read_metrics

log = logging.getLogger("feedalign")
MARKERS = ("options.json", "metrics.jsonl", "checkpoint.pt", "runner.json")  # any makes a run directory


@dataclass
class RunResult:
    """One run as found on disk. Errors in percent."""

    row: str
    rule: str
    seed: int | None
    dir: Path | None
    status: str  # finished | unfinished | failed | missing
    epochs: int = 0  # epochs with a metrics record
    budget: int | None = None  # options.json "epoch" (-1 = unbounded)
    test: float | None = None  # final epoch
    train: float | None = None
    reason: str | None = None  # finished.json "reason"
    returncode: int | None = None  # runner.json
    dataset: str | None = None
    options: dict = field(default_factory=dict)  # options.json
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, test error %)
    alignment: list[tuple[int, dict]] = field(default_factory=list)  # (epoch, {layer: {metric: °}})

    def describe(self) -> str:
        """Why this run has no final figure, in the report's words."""
        if self.status == "missing":
            return "missing"
        if self.status == "failed":
            return f"failed (exit {self.returncode}, epoch {self.epochs}; see train.log)"
        return f"running/interrupted (epoch {self.epochs})"


def read_run(
    run_dir: Path, row: str | None = None, rule: str | None = None, seed: int | None = None
) -> RunResult:
    """Read one run directory; `row`/`rule`/`seed` default to what options.json says."""
    options = _json(run_dir / "options.json") or {}
    records = read_metrics(run_dir)
    finished = _json(run_dir / "finished.json")
    runner = _json(run_dir / "runner.json") or {}
    rc = runner.get("returncode")
    status = "finished" if finished is not None else "failed" if rc not in (None, 0, 130) else "unfinished"
    last = records[-1] if records else {}
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
        reason=(finished or {}).get("reason"),
        returncode=rc,
        dataset=options.get("dataset"),
        options=options,
        curve=[(r["epoch"], 100 * r["test_error"]) for r in records if "test_error" in r],
        alignment=[(r["epoch"], r["alignment"]) for r in records if r.get("alignment")],
    )


def find_runs(root: Path) -> list[RunResult]:
    """Every run directory under `root`, grouped as the module docstring says."""
    results = []
    for d in sorted({p.parent for m in MARKERS for p in root.rglob(m)}):
        rel = d.relative_to(root).parts
        if len(rel) >= 3 and rel[-2] in RULES and rel[-1].startswith("seed") and rel[-1][4:].isdigit():
            results.append(read_run(d, row=rel[-3], rule=rel[-2], seed=int(rel[-1][4:])))
        else:
            results.append(read_run(d, row=(rel[-2] if len(rel) >= 2 else root.resolve().name)))
    return results


def with_missing(found: list[RunResult], expected: list[tuple[str, str, int, Path]]) -> list[RunResult]:
    """`found` plus a "missing" entry for every expected (row, rule, seed, dir) not on disk."""
    have = {(r.row, r.rule, r.seed) for r in found}
    extra = [RunResult(row, rule, seed, d, "missing") for row, rule, seed, d in expected
             if (row, rule, seed) not in have]  # fmt: skip
    return found + extra


@dataclass
class Group:
    """All seeds of one (row, rule)."""

    row: str
    rule: str
    runs: list[RunResult]
    published: dict | None = None  # {"test", "std", "train"[, "roughly"]}
    paper_epochs: int = PAPER_EPOCHS
    row_options: dict = field(default_factory=dict)  # the row file's options, if known

    @property
    def finished(self) -> list[RunResult]:
        return [r for r in self.runs if r.status == "finished" and r.test is not None]

    def stat(self, key: str) -> tuple[float, float | None] | None:
        """(mean, sample std or None for one run) of the final `key` ("test"/"train") over finished seeds."""
        values = [getattr(r, key) for r in self.finished if getattr(r, key) is not None]
        if not values:
            return None
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


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
                                row.epochs if row else PAPER_EPOCHS, row.options if row else {})  # fmt: skip
        groups[key].runs.append(res)
    order = {name: i for i, name in enumerate(by_name)}
    keyed = sorted(groups.values(), key=lambda g: (order.get(g.row, len(order)), g.row, _rule_order(g.rule)))
    for g in keyed:
        g.runs.sort(key=lambda r: (r.seed is None, r.seed or 0))
    return keyed


def _rule_order(rule: str) -> int:
    return list(RULES).index(rule) if rule in RULES else len(RULES)


# --- formatting ---------------------------------------------------------------------


def fmt_stat(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return ""
    mean, std = stat
    return f"{mean:.2f} ± {'—' if std is None else f'{std:.2f}'}"


def fmt_published(pub: dict | None, key: str = "test") -> str:
    if not pub or pub.get(key) is None:
        return "—"
    approx = "≈" if pub.get("roughly") else ""
    std = pub.get("std") if key == "test" else None
    return f"{approx}{pub[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def status_cell(g: Group) -> str:
    """What stands in place of the mean when no seed has finished."""
    live = [r for r in g.runs if r.status == "unfinished"]
    if live:
        return "running/interrupted (epoch " + ", ".join(str(r.epochs) for r in live) + ")"
    if any(r.status == "failed" for r in g.runs):
        return "failed"
    return "missing"


def notes_cell(g: Group) -> str:
    """Seeds without a final figure ("seeds 2, 3: missing"), and runs that stopped early."""
    if all(r.status == "missing" for r in g.runs):
        return ""
    by_state: dict[str, list[str]] = {}
    for r in g.runs:
        if r.status != "finished":
            by_state.setdefault(r.describe(), []).append(str(r.seed))
    notes = [f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}: {state}" for state, s in by_state.items()]
    for r in g.finished:
        if r.budget not in (None, -1) and r.epochs < r.budget:
            notes.append(f"seed {r.seed}: stopped at epoch {r.epochs} ({r.reason})")
    return "; ".join(notes)


def epochs_cell(g: Group) -> str:
    ran = [r.epochs for r in g.runs if r.status != "missing"]
    if not ran:
        return ""
    return str(min(ran)) if min(ran) == max(ran) else f"{min(ran)}–{max(ran)}"


def shorter_line(groups: list[Group]) -> str:
    """Plainly: which rows were run with a smaller epoch budget than the paper's."""
    short: dict[str, set[int]] = {}
    for g in groups:
        for r in g.runs:
            if r.status != "missing" and r.budget not in (None, -1) and r.budget < g.paper_epochs:
                short.setdefault(g.row, set()).add(int(r.budget))
    if not short:
        return f"Every run present was given the paper's {PAPER_EPOCHS} epochs."
    parts = [f"{row} ({'/'.join(str(b) for b in sorted(b_))} epochs)" for row, b_ in short.items()]
    return (f"**Shorter than the paper's {PAPER_EPOCHS} epochs:** {', '.join(parts)}. "
            "Their errors are not comparable with the published figures.")  # fmt: skip


def deviations_line(groups: list[Group]) -> str | None:
    """Options (other than the epoch budget) in which runs differ from their row file."""
    found: dict[str, set[str]] = {}
    for g in groups:
        for r in g.runs:
            for k, want in g.row_options.items():
                if k != "epoch" and r.options and k in r.options and r.options[k] != want:
                    found.setdefault(g.row, set()).add(f"{k}={r.options[k]} (row: {want})")
    if not found:
        return None
    parts = [f"{row}: {', '.join(sorted(d))}" for row, d in found.items()]
    return "**Runs differ from their row's options:** " + "; ".join(parts) + "."


def markdown(groups: list[Group], *, title: str, source: Path, rows: list[Row] | None = None,
             figures: list[str] = ()) -> str:  # fmt: skip
    lines = [
        f"# {title}",
        "",
        f"From {source} on {time.strftime('%Y-%m-%d %H:%M')}. Errors in %, at the final epoch; "
        "mean ± sample standard deviation (n−1) over the finished seeds (— for a single seed). "
        "Published: the paper's figure (≈ where quoted roughly); Δ = ours − published.",
        "",
        shorter_line(groups),
        "",
        *([deviations_line(groups), ""] if deviations_line(groups) else []),
        "| row | rule | test error | train error | seeds | epochs | published test | published train "
        "| Δ test | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        test = g.stat("test")
        delta = ""
        if test is not None and g.published and g.published.get("test") is not None:
            delta = f"{test[0] - g.published['test']:+.2f}"
        cells = [g.row, g.rule, fmt_stat(test) or status_cell(g), fmt_stat(g.stat("train")),
                 f"{len(g.finished)}/{len(g.runs)}", epochs_cell(g), fmt_published(g.published),
                 fmt_published(g.published, "train"), delta, notes_cell(g)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "## Rows", ""]
        lines += [f"- **{r.name}**: {r.description}" for r in rows if r.description]
        lines += sorted({f"- {r.note}" for r in rows if r.note})
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(root: Path, *, rows: list[Row] | None = None,
                 expected: list[tuple[str, str, int, Path]] | None = None,
                 title: str | None = None, experiments: Path = EXPERIMENTS) -> Path:  # fmt: skip
    """Write `root/report.md`, `root/report.png` (and `alignment.png` if any run logged
    alignment). `expected` lists the runs that should exist (shown as missing if not)."""
    from feedalign.reproduce.plots import plot_alignment, plot_errors

    results = with_missing(find_runs(root), expected or [])
    groups = group_runs(results, rows, experiments)
    figures = []
    if any(r.curve for r in results):
        plot_errors(groups, root / "report.png")
        figures.append("report.png")
    if any(r.alignment for r in results):
        plot_alignment(groups, root / "alignment.png")
        figures.append("alignment.png")
    text = markdown(groups, title=title or f"Reproduction report: {root.name}", source=root, rows=rows,
                    figures=figures)  # fmt: skip
    (root / "report.md").write_text(text)
    log.info(f"report: {root / 'report.md'} ({len(groups)} row/rule groups, {len(results)} runs)")
    return root / "report.md"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else 100.0 * x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m feedalign.reproduce.report",
        description="Write report.md / report.png for a folder of feedalign runs.",
    )
    p.add_argument("folder", type=Path, help="a folder holding run directories (searched recursively)")
    p.add_argument("--title", help="the report's heading (default: from the folder name)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.folder.is_dir():
        log.error(f"error: {args.folder} is not a folder")
        return 2
    write_report(args.folder, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
