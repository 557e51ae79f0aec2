"""`feedalign reproduce SUITE`: a published table, run and reported.

    feedalign reproduce mnist --rows 2x800 --seeds 3 --jobs 4 --datapath DATA
    feedalign reproduce mnist --hours 2.5 --jobs 2      # only what fits in 2.5 hours
    feedalign reproduce mnist --report-only --out results/mnist
    feedalign reproduce mnist --out /scratch/mnist --export results/mnist   # metrics, no checkpoints

Suites: the folders of feedalign/experiments (mnist, cifar10, cifar100: Nøkland 2016;
biotorch-mnist, biotorch-fashion, biotorch-cifar10: BioTorch's Benchmarks.md;
shakespeare-char: nanoGPT's character-level GPT recipe, every rule, validation loss;
local-loss: Nøkland & Eidnes 2019's MLP rows, the local rules beside bp and dfa). Expands
the chosen rows (feedalign/experiments/<suite>/*.json) × rules × seeds into `feedalign
train` runs under `<out>/runs/<row>/<rule>/seed<k>`, runs them J at a time (finished
ones are skipped, interrupted ones resumed: the same command continues a stopped
reproduction), then writes `<out>/report.md` and the figures. --hours estimates each
run's time from measured epoch times and runs, in table order, only what fits
(feedalign/reproduce/budget.py). --report-only reads whatever run directories are
under --out, committed metrics without checkpoints included. --export copies each run's
metrics (not its checkpoint) to a folder meant for version control and reports there
(export.py). docs/reproduce.md has more.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from pathlib import Path

from feedalign.dist import usable_cores
from feedalign.reproduce.experiments import (
    DEFAULT_SEEDS,
    EXPERIMENTS,
    PAPER_EPOCHS,
    SUITES,
    Row,
    load_suite,
    select_rows,
)
from feedalign.rules import RULES
from feedalign.train.config import Options

log = logging.getLogger("feedalign")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run a published table (rows × rules × seeds); report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("suite", choices=SUITES, help="which table: " + ", ".join(SUITES))
    p.add_argument("--rows", nargs="+", metavar="ROW",
                   help="row names or prefixes (2x800 = every 2x800 row); default: all rows")  # fmt: skip
    p.add_argument("--rules", nargs="+", choices=tuple(RULES), metavar="RULE",
                   help=f"any of {', '.join(RULES)}; default: the rules each row reports")  # fmt: skip
    p.add_argument("--seeds", type=int,
                   help=f"runs per row and rule, seeds 1..N (default: the row file's, else {DEFAULT_SEEDS}; "
                        "--report-only: the seeds present, at least seed 1)")  # fmt: skip
    p.add_argument("--hours", type=float,
                   help="run only what fits in this many hours with --jobs at a time, in table order "
                        "(estimated from measured epoch times); says what was chosen and what was "
                        "left")  # fmt: skip
    p.add_argument("--epochs", type=int,
                   help=f"epochs per run (default: the row's, the paper's {PAPER_EPOCHS})")  # fmt: skip
    p.add_argument("--jobs", type=int, help="runs at a time (default: min(CPU count, runs to do))")
    p.add_argument("--threads", type=int, help="torch threads per run (default: CPU count / jobs)")
    p.add_argument("--datapath", help="folder holding <dataset>/ (default: the trainer's ./Datasets/)")
    p.add_argument("--out", type=Path, help="output folder (default: ./reproduce-<suite>)")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", dest="overrides",
                   help="extra train options for every run, e.g. type=float alignment=100")  # fmt: skip
    p.add_argument("--experiments", type=Path, default=EXPERIMENTS,
                   help=f"folder of row files (default: {EXPERIMENTS})")  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true", help="show what would run, with each command; run nothing"
    )
    p.add_argument(
        "--report-only", action="store_true", help="write the report from what is there; run nothing"
    )
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="afterwards (also when stopped), copy each run's metrics, options and status "
                        "files, not its checkpoint, to DIR/runs/... and write DIR/report.md")  # fmt: skip
    p.set_defaults(func=run_reproduce)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["type=float", "alignment=100"] -> {"type": "float", "alignment": "100"}; the trainer
    parses the values, names are checked here against Options."""
    fields = {f.name for f in dataclasses.fields(Options)}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.lstrip("-")
        if not sep or not name:
            raise ValueError(f"--set expects NAME=VALUE, got {item!r}")
        if name in ("gradient", "seed", "save"):
            raise ValueError(f"--set {name}: set per run by reproduce (use --rules / --seeds / --out)")
        if name not in fields:
            raise ValueError(f"--set {name}: not a train option; they are: {', '.join(sorted(fields))}")
        out[name] = value
    return out


def run_reproduce(args: argparse.Namespace, *, trainer=None) -> int:
    from feedalign.reproduce import runner
    from feedalign.reproduce.report import write_report

    out = args.out or Path(f"reproduce-{args.suite}")
    try:
        rows = select_rows(load_suite(args.suite, args.experiments), args.rows)
        overrides = parse_overrides(args.overrides)
        if args.datapath:
            overrides["datapath"] = args.datapath
        for name in ("jobs", "threads", "epochs", "seeds"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.hours is not None and args.hours <= 0:
            raise ValueError(f"--hours must be > 0, got {args.hours}")
        if args.export is not None and args.dry_run:
            raise ValueError("--export copies what ran; --dry-run runs nothing: use one of them")
        if args.export is not None and args.export.resolve() == out.resolve():
            raise ValueError(f"--export {args.export} is the --out folder itself; export to another folder")
        seeds = args.seeds or (1 if args.report_only else None)
        runs = runner.plan(rows, rules=args.rules, seeds=seeds, out=out, epochs=args.epochs,
                           overrides=overrides)  # fmt: skip
        if not runs and not args.report_only:
            raise ValueError(f"no runs: rows {[r.name for r in rows]} report none of the rules {args.rules}")
        unbuildable = [] if args.report_only else runner.missing_networks(rows)
        if unbuildable:
            raise ValueError(f"this feedalign cannot build the network of row(s) {'; '.join(unbuildable)} "
                             "(see the row's note)")  # fmt: skip
    except ValueError as err:
        log.error(f"error: {err}")
        return 2
    expected = [(r.row, r.rule, r.seed, r.dir) for r in runs]
    report = {"rows": rows, "expected": expected, "experiments": args.experiments,
              "title": f"Reproduction report: {args.suite} ({_source(rows)})"}  # fmt: skip
    if args.report_only:
        if not out.is_dir():
            log.error(f"error: {out} does not exist; nothing to report")
            return 2
        write_report(out, **report)
        _export(out, args, report)
        return 0

    work = [(r, runner.decide(r)) for r in runs]
    todo = [(r, a) for r, a in work if a != "skip"]
    jobs = args.jobs or runner.default_jobs(len(todo))
    threads = args.threads or max(1, usable_cores() // jobs)
    if args.hours is not None:
        todo = _within_hours(todo, rows, out, hours=args.hours, jobs=jobs)
    counts = {a: sum(1 for _, b in work if b == a) for a in ("fresh", "resume", "extend", "skip")}
    summary = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    log.info(f"{args.suite}: {len(rows)} row(s), {len(runs)} run(s): {summary}; {len(todo)} to run, "
             f"{jobs} at a time, {threads} thread(s) each; output {out}")  # fmt: skip
    kw = {"trainer": trainer} if trainer else {}
    if args.dry_run:
        chosen = {r.label for r, _ in todo}
        for r, action in work:
            show = action if action == "skip" or r.label in chosen else "later"
            runs_now = show not in ("skip", "later")
            cmd = shlex.join(runner.command(r, action, threads=threads, **kw)) if runs_now else ""
            print(f"{r.label:<40} {show:<7} {cmd}")
        return 0
    status = _execute(todo, out, jobs=jobs, threads=threads, report=report, **kw)
    _export(out, args, report)
    return status


SOURCES = {"biotorch": "BioTorch Benchmarks.md", "local-loss": "Nøkland & Eidnes 2019, anokland/local-loss"}


def _source(rows: list[Row]) -> str:
    """What the report's title cites: the publication of the suite's figures."""
    if rows and rows[0].measure == "loss":
        return "nanoGPT's README"
    suite = rows[0].suite if rows else ""
    return next((s for prefix, s in SOURCES.items() if suite.startswith(prefix)), "Nøkland 2016")


def _within_hours(todo: list, rows: list[Row], out: Path, *, hours: float, jobs: int) -> list:
    """The runs of `todo` that fit in `hours` (budget.py); logs what was chosen and left."""
    from feedalign.reproduce import budget

    chosen, left = budget.select(budget.estimate(todo, rows, out), hours=hours, jobs=jobs)
    log.info(budget.describe(chosen, left, hours=hours, jobs=jobs))
    return [(e.run, e.action) for e in chosen]


def _execute(todo: list, out: Path, *, jobs: int, threads: int, report: dict, **kw) -> int:
    from feedalign.reproduce import runner
    from feedalign.reproduce.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    status = 0
    try:
        results = runner.execute(todo, jobs=jobs, threads=threads, **kw)
        failed = [r.label for r, _ in todo if results.get(r.label, 0) != 0]  # in table order
        if failed:
            log.error(f"{len(failed)} run(s) failed (see their train.log): {', '.join(failed)}")
            status = exit_status(results[failed[0]])
    except KeyboardInterrupt:
        log.warning("stopped; run the same command again to continue")
        status = 130
    write_report(out, **report)
    return status


def exit_status(returncode: int) -> int:
    """reproduce's exit code when a run failed: the first failed run's own (3 diverged, 4 a
    file, …; docs/faults.md), or 128 + N for one killed by signal N, as a shell reports it."""
    return returncode if returncode > 0 else 128 - returncode


def _export(out: Path, args: argparse.Namespace, report: dict) -> None:
    """--export: copy the chosen runs' small files from `out` (export.py), then report in the
    destination on the whole suite, from every run there (earlier exports included), as
    `--report-only --out DIR` would. A run file that cannot be used raises RunFileError,
    which the command line turns into exit 4."""
    from feedalign.reproduce import runner
    from feedalign.reproduce.export import export
    from feedalign.reproduce.report import write_report

    if args.export is None:
        return
    dst = args.export
    done = export(out, dst, rows=[r.name for r in report["rows"]], rules=args.rules)
    log.info(f"exported to {dst}: {len(done['finished'])} finished, {len(done['partial'])} partial run(s)"
             + (f"; kept {len(done['kept'])} that were further along" if done["kept"] else ""))  # fmt: skip
    rows = load_suite(args.suite, args.experiments)
    expected = [(r.row, r.rule, r.seed, r.dir) for r in runner.plan(rows, rules=None, seeds=1, out=dst)]
    write_report(dst, **(report | {"rows": rows, "expected": expected}))
