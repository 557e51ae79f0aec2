"""`feedalign reproduce SUITE --out SCRATCH --export results/SUITE`: keep what a reproduction
measured, not its checkpoints, in a folder meant for version control.

A long reproduction runs in a scratch folder, where checkpoints let it stop and
continue across sessions; the project keeps only each run's small files (KEPT) under
`results/<suite>/runs/<row>/<rule>/seed<k>/` and rebuilds the report from them.
Export copies those files for every run directory of the chosen rows and rules that
has trained at least one epoch, finished or partial (the report marks partial runs),
and never `checkpoint.pt`. A destination run that is further along than its source
(more epochs, or finished where the source is not) is kept, with a warning: a stale
scratch folder cannot overwrite newer results. Each file is replaced atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from feedalign.files import atomic_write
from feedalign.train.runlog import FINISHED, RunFileError, read_metrics

log = logging.getLogger("feedalign")
# small, no weights; text runs: their vocabulary and the report's generated sample
KEPT = ("metrics.jsonl", "options.json", "env.json", FINISHED, "runner.json", "vocab.json", "sample.txt")


def progress(run_dir: Path) -> tuple[int, bool]:
    """(epochs with a metrics record, finished): the order in which runs supersede each other."""
    return len(read_metrics(run_dir)), (run_dir / FINISHED).exists()


def export(src: Path, dst: Path, *, rows: Sequence[str], rules: Sequence[str] | None) -> dict[str, list[str]]:
    """Copy KEPT of `src/runs/<row>/<rule>/seed<k>` to the same place under `dst`, for the
    named rows and rules (None: all). Returns run labels under "finished", "partial"
    (copied) and "kept" (the destination was further along)."""
    if src.resolve() == dst.resolve():
        raise ValueError(f"--export {dst} is the --out folder itself; export to another folder")
    done: dict[str, list[str]] = {"finished": [], "partial": [], "kept": []}
    for run_dir in sorted(src.glob("runs/*/*/seed*")):
        row, rule = run_dir.parent.parent.name, run_dir.parent.name
        if row not in rows or (rules and rule not in rules):
            continue
        have = progress(run_dir)
        if not have[0]:  # started, no epoch trained yet
            continue
        label = f"{row}/{rule}/{run_dir.name}"
        target = dst / "runs" / row / rule / run_dir.name
        there = progress(target)
        if there > have:
            log.warning(f"export: kept {target} ({there[0]} epochs{', finished' if there[1] else ''}): "
                        f"{run_dir} is behind it ({have[0]} epochs)")  # fmt: skip
            done["kept"].append(label)
            continue
        links = [name for name in KEPT if (run_dir / name).is_symlink()]
        if links:  # a run directory is data: a link could smuggle any file into the results
            raise RunFileError(f"export: {run_dir} holds symbolic links ({', '.join(links)}); copy refused")
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            if (run_dir / name).exists():
                data = (run_dir / name).read_bytes()
                atomic_write(target / name, lambda f, data=data: f.write(data))
            else:  # e.g. finished.json of an older export whose run was since extended
                (target / name).unlink(missing_ok=True)
        done["finished" if have[1] else "partial"].append(label)
    return done
