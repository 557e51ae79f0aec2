"""The reproduction report: our errors next to the published ones, per row and rule.

Writes `report.md` (one table, tables.py) and `report.png` (test error per epoch, one
panel per row), plus `alignment.png` where runs logged alignment angles, from the run
directories under a folder (read and grouped by results.py; checkpoint.pt is not
needed, so committed metrics suffice). A file whose content would not change (the
report's date aside) is left as it is.

Usable on any folder: `python -m feedalign.reproduce.report DIR`. Runs laid out as
`<row>/<rule>/seed<k>` (the reproduce layout) are grouped by row; any other run
directory is grouped under its parent folder's name, with its rule from options.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from feedalign.cli import EXIT_FILE
from feedalign.reproduce.experiments import EXPERIMENTS, Row
from feedalign.reproduce.results import find_runs, group_runs, with_missing, write_report_text
from feedalign.reproduce.tables import markdown
from feedalign.train.runlog import RunFileError

log = logging.getLogger("feedalign")


def write_report(root: Path, *, rows: list[Row] | None = None,
                 expected: list[tuple[str, str, int, Path]] | None = None,
                 title: str | None = None, experiments: Path = EXPERIMENTS) -> Path:  # fmt: skip
    """Write `root/report.md`, `root/report.png` (and `alignment.png` if any run logged
    alignment). `expected` lists the runs that should exist (shown as missing if not)."""
    from feedalign.reproduce.plots import plot_alignment, plot_errors

    results = with_missing(find_runs(root), expected or [], rows)
    groups = group_runs(results, rows, experiments)
    if rows and all(r.measure == "loss" for r in rows):  # language models: losses, not errors
        from feedalign.reproduce import lm_report

        return lm_report.write(root, groups, rows, title=title or f"Reproduction report: {root.name}")
    figures = []
    if any(r.curve for r in results):
        plot_errors(groups, root / "report.png")
        figures.append("report.png")
    if any(r.alignment for r in results):
        plot_alignment(groups, root / "alignment.png")
        figures.append("alignment.png")
    text = markdown(groups, title=title or f"Reproduction report: {root.name}", source=root, rows=rows,
                    figures=figures)  # fmt: skip
    wrote = write_report_text(root / "report.md", text)
    log.info(f"report: {root / 'report.md'} ({len(groups)} row/rule groups, {len(results)} runs"
             f"{'' if wrote else '; unchanged'})")  # fmt: skip
    return root / "report.md"


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
    try:
        write_report(args.folder, title=args.title)
    except RunFileError as err:  # a run's file is not what the trainer writes
        log.error(f"error: {err}")
        return EXIT_FILE
    return 0


if __name__ == "__main__":
    sys.exit(main())
