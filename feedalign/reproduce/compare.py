"""`feedalign compare`: several learning rules trained side by side, then a table and a plot.

    feedalign compare                                  # the demo: 9 rules on digits, ~1 minute
    feedalign compare --rules bp fa dfa -seed 2        # some rules, another seed
    feedalign compare -dataset MNIST -epoch 5 --out cmp-mnist

Each rule is one `feedalign train` run (in this process, one after another) under
`<out>/<rule>/seed<k>/`, a complete run directory. The demo recipe (RECIPE) replaces
train's defaults where it differs; any train option given on the command line replaces
the recipe's. Afterwards: one table on stdout (final and best test error, training
error, training time per rule), the same table in `<out>/table.md`, and test error per
epoch per rule in `<out>/errors.png`. Running the same command again reuses the finished
runs (and resumes interrupted ones); a run directory holding another recipe is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import time
from pathlib import Path

from feedalign.reproduce.results import Group, RunResult, read_run
from feedalign.train.config import RESUME_MAY_CHANGE, OptionError, Options

log = logging.getLogger("feedalign")

# The demo: every rule clearly apart from shallow on the 1,797 8×8 digits in about a minute
# on two cores (seeds 1-5 measured in docs/compare.md). ce, not the original's bce: seed 1 ends
# at bp 8.3%, dfa 9.3% with ce, 10.0%, 11.7% with bce. The LR falls ×0.1 after epoch 30 so the
# final error is not one noisy epoch's. One thread: these layers are too small to gain from more,
# and with the two cores busy -threads 2 took 298 s, not 47 s, for the same figures.
RECIPE = {"dataset": "digits", "num_hidden": 64, "criterion": "ce", "LR": 1e-3, "lr_milestones": "30",
          "epoch": 40, "seed": 1, "threads": 1}  # fmt: skip
RULES = ("bp", "fa", "usf", "frsf", "brsf", "kp", "dfa", "drtp", "shallow")
# Options that do not change what a run computes: a reused or resumed run may differ in these
# (where the data and its cache are read from: a resumed run keeps its own).
HOW = RESUME_MAY_CHANGE | {"save", "datapath", "preProcDir"}
PER_RULE = ("gradient", "save")  # set by compare for each rule: --rules, --out


def register(sub: argparse._SubParsersAction) -> None:
    from feedalign.rules import RULES as ALL
    from feedalign.train.cli import add_option_arguments

    recipe = " ".join(f"-{k} {v}" for k, v in RECIPE.items())
    p = sub.add_parser("compare", help="train several rules side by side: a table and a plot",
                       description=__doc__ + f"\nThe recipe: {recipe} (the rest as feedalign train).",
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                       usage="feedalign compare [-h] [--rules RULE ...] [--out DIR] [-OPTION VALUE ...]",
                       )  # fmt: skip
    p.add_argument("--rules", nargs="+", choices=tuple(ALL), metavar="RULE", default=list(RULES),
                   help=f"rules to train (default: {' '.join(RULES)}; any of {', '.join(ALL)})")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: ./compare-<dataset>)")
    add_option_arguments(p, hidden=True)  # any train option, as `feedalign train --help` lists them
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    """Train each rule (or reuse its finished run), then report. Options are checked for every
    rule before the first trains; a run that diverges or fails is reported and the others go on."""
    from feedalign.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, exit_code

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Options) if hasattr(args, f.name)}
    if given.keys() & set(PER_RULE) or given.get("nGPU", 1) > 1:
        raise OptionError("compare sets -gradient (use --rules) and -save (use --out) per rule and trains in "
                          "one process (no -nGPU above 1)")  # fmt: skip
    base = RECIPE | given
    out = args.out or Path(f"compare-{base['dataset']}")
    plans = [(rule, _plan(Options(**(base | {"gradient": rule})), out)) for rule in dict.fromkeys(args.rules)]
    opts = plans[0][1][0]
    print(f"{opts.dataset}: {len(plans)} rules side by side ({', '.join(r for r, _ in plans)}), "
          f"{opts.network} {opts.num_layers}×{opts.num_hidden} {opts.nonlin}, {opts.epoch} epochs, "
          f"{opts.threads} thread(s); seed {opts.seed} (-seed {opts.seed} repeats the figures); output {out}",
          flush=True)  # fmt: skip
    status, results, t0 = 0, [], time.perf_counter()
    for rule, (opts, action) in plans:
        code, run_dir = 0, _run_dir(out, opts)
        try:
            _train(opts, action, run_dir)
        except Exception as err:  # a rule that diverges or meets a bad file: the others go on
            mapped = exit_code(err)
            if mapped is None or mapped[0] in (EXIT_INTERRUPTED, EXIT_TERMINATED):
                raise  # a bug (traceback), or Ctrl-C / SIGTERM: the checkpoint is written, stop here
            code, message = mapped
            log.error(f"{rule}: {message}")
            status = status or code
        result = read_run(run_dir, row=opts.dataset, rule=rule, seed=opts.seed)
        if code:
            result.status, result.returncode = "failed", code
        results.append(result)
        print(f"  {_row(result)}{' (reused)' if action == 'reuse' else ''}", flush=True)
    write_outputs(out, results, title=f"{opts.dataset}, seed {opts.seed}")
    print(f"\n{table(results)}\n\n{len(results)} rules in {time.perf_counter() - t0:.0f} s; table "
          f"{out / 'table.md'}, plot {out / 'errors.png'}, runs {out}/<rule>/seed{opts.seed}")  # fmt: skip
    return status


def _run_dir(out: Path, opts: Options) -> Path:
    return out / opts.gradient / f"seed{opts.seed}"


def _plan(opts: Options, out: Path) -> tuple[Options, str]:
    """(options, "fresh" | "resume" | "reuse") for one rule's run directory."""
    run_dir = _run_dir(out, opts)
    opts.save, opts.quiet = str(run_dir), True
    opts.check()
    if not (run_dir / "options.json").exists() or not (run_dir / "checkpoint.pt").exists():
        return opts, "fresh"
    from feedalign.train.rundir import options_from_run, saved_options

    saved = saved_options(run_dir)
    differ = sorted(k for k, v in opts.to_dict().items() if k not in HOW and saved.get(k, v) != v)
    if differ or saved.get("epoch", 0) > opts.epoch:
        what = ", ".join(f"-{k} {saved.get(k)} there, {getattr(opts, k)} now" for k in differ or ["epoch"])
        raise OptionError(f"{run_dir} holds a run of another recipe ({what}); give another --out, or "
                          "delete that folder")  # fmt: skip
    if (run_dir / "finished.json").exists() and saved.get("epoch") == opts.epoch:
        return opts, "reuse"
    # the run's own options.json, as `feedalign train --resume` reads it, with the new budget etc.
    return options_from_run(run_dir, {k: getattr(opts, k) for k in RESUME_MAY_CHANGE}), "resume"


def _train(opts: Options, action: str, run_dir: Path) -> None:
    """One rule's run; its own per-epoch lines are kept out of the table's way (they are in
    its metrics.jsonl)."""
    from feedalign.train.session import train

    if action == "reuse":
        return
    level = log.level
    log.setLevel(logging.WARNING)  # the data and cache notes, nine times over: warnings and errors only
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train(opts, resume=run_dir if action == "resume" else None)
    finally:
        log.setLevel(level)


def _state(r: RunResult) -> str | None:
    """What stands in place of the figures of a run that did not finish."""
    if r.status == "failed":
        return f"failed (exit {r.returncode}) after {r.epochs} epoch(s)"
    return r.describe() if r.test is None else None


def _cells(r: RunResult) -> list[str]:
    if _state(r) is not None:
        return [_state(r), "", "", ""]
    return [f"{r.test:.2f}%", f"{r.best:.2f}% ({r.best_epoch})", f"{r.train:.2f}%", f"{r.seconds:.1f} s"]


def _row(r: RunResult) -> str:
    """One rule's line while the others train."""
    if _state(r) is not None:
        return f"{r.rule}: {_state(r)}"
    return f"{r.rule}: test error {r.test:.2f}% after {r.epochs} epochs ({r.seconds:.1f} s)"


HEADER = ("rule", "final test error", "best (epoch)", "training error", "training time")


def table(results: list[RunResult]) -> str:
    """The results as aligned text columns (what the terminal shows)."""
    rows = [HEADER, *([r.rule, *_cells(r)] for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    aligned = [
        [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))] for row in rows
    ]
    return "\n".join("  ".join(row) for row in aligned)


def write_outputs(out: Path, results: list[RunResult], *, title: str) -> None:
    """`out/table.md` and `out/errors.png` (rewritten only when their content changes)."""
    from feedalign.reproduce.plots import plot_errors
    from feedalign.reproduce.results import write_report_text

    lines = [f"# {title}", "", "| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join([r.rule, *_cells(r)]) + " |" for r in results]
    write_report_text(out / "table.md", "\n".join(lines) + "\n")
    groups = [Group(title, r.rule, [r]) for r in results]
    plot_errors(groups, out / "errors.png", panel=(7.0, 4.5))
