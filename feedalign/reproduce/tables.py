"""report.md's text: one table row per (row, rule) group of report.py, plus notes.

Columns: final test error, best test error over the epochs, final training error
(all %, mean ± sample std over the finished seeds, or over the partial ones where
none has finished, marked "partial"), runs finished / expected, epochs run and how
each run ended, the published test error, whether that figure was verified against
its publication, and Δ = ours − published on the figure the table reports (the final
epoch's, or the best epoch's for tables that report the best).
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

from feedalign.reproduce.experiments import Row
from feedalign.reproduce.results import Group, RunResult, dated
from feedalign.train.config import Options

HEADER = ("| row | rule | final test | best test | final train | runs | epochs | published test "
          "| verified | Δ | notes |")  # fmt: skip


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
    text = f"{approx}{pub[key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    for other in pub.get("disputed", []) if key == "test" else []:
        alt = f"{other['test']:.2f}" + (f" ± {other['std']:.2f}" if other.get("std") is not None else "")
        text += f" (also quoted: {alt})"
    return text


def verified_cell(pub: dict | None) -> str:
    if not pub or pub.get("test") is None:
        return ""
    return "yes" if pub.get("verified") else "**no**"


def status_cell(g: Group) -> str:
    """What stands in place of the figures when no seed has one."""
    if any(r.status == "unavailable" for r in g.runs):
        return "rule not in this feedalign"
    if any(r.status == "failed" for r in g.runs):
        return "failed"
    if any(r.status == "unfinished" for r in g.runs):
        return "started, no epoch yet"
    return "missing"


def figure_cell(g: Group, key: str) -> str:
    """`key` ("test", "best", "train") over the group's basis, "partial" where no seed finished."""
    text = fmt_stat(g.stat(key))
    if not text:
        return status_cell(g) if key == "test" else ""
    if key == "best" and len(g.basis) == 1 and g.basis[0].best_epoch is not None:
        text = f"{g.basis[0].best:.2f} (epoch {g.basis[0].best_epoch})"
    return text + (" partial" if not g.finished else "")


def _run_state(r: RunResult) -> str:
    return r.describe().replace(" epochs", "")


def epochs_cell(g: Group) -> str:
    """How far each run got: "300", "212/300, stopped: …", "partial (92/300)"; seeds named if several."""
    ran = [r for r in g.runs if r.status in ("finished", "unfinished")]
    states = [_run_state(r) for r in ran]
    if len(set(states)) <= 1:
        return states[0] if states else ""
    return "; ".join(f"seed {r.seed}: {s}" for r, s in zip(ran, states))


def notes_cell(g: Group) -> str:
    """Seeds without any figure ("seeds 2, 3: missing")."""
    if all(r.status in ("missing", "unavailable") for r in g.runs):
        return ""
    by_state: dict[str, list[str]] = {}
    for r in g.runs:
        if r.status in ("missing", "failed") or (r.status == "unfinished" and r.test is None):
            by_state.setdefault(r.describe(), []).append(str(r.seed))
    return "; ".join(f"seed{'s' if len(s) > 1 else ''} {', '.join(s)}: {state}"
                     for state, s in by_state.items())  # fmt: skip


def delta_cell(g: Group) -> str:
    """Δ, and against the row's tolerance (if it states one): "within ±t" or "**outside ±t**"."""
    d = g.delta()
    if d is None:
        return ""
    if not g.finished:
        return f"{d:+.2f} partial"
    if g.tolerance is None:
        return f"{d:+.2f}"
    verdict = f"within ±{g.tolerance:g}" if abs(d) <= g.tolerance + 1e-9 else f"**outside ±{g.tolerance:g}**"
    return f"{d:+.2f} ({verdict})"


def shorter_line(groups: list[Group]) -> str:
    """Plainly: which rows were run with a smaller epoch budget than the table's."""
    short: dict[str, set[int]] = {}
    table: dict[str, int] = {}
    for g in groups:
        for r in g.runs:
            ran = r.status not in ("missing", "unavailable")
            if ran and r.budget not in (None, -1) and r.budget < g.paper_epochs:
                short.setdefault(g.row, set()).add(int(r.budget))
                table[g.row] = g.paper_epochs
    if not short:
        return "Every run present was given the table's epoch budget."
    parts = [f"{row} ({'/'.join(str(b) for b in sorted(budgets))} of {table[row]} epochs)"
             for row, budgets in short.items()]  # fmt: skip
    return (f"**Shorter than the table's epochs:** {', '.join(parts)}. "
            "Their errors are not comparable with the published figures.")  # fmt: skip


# Options that change where a run writes, how fast it goes or what it logs, not what it
# computes: a run may differ from its row in these without the report saying so.
# fmt: off
RUN_LOCAL = frozenset({"epoch", "datapath", "save", "seed", "threads", "quiet", "load", "devid",
                       "nGPU", "modelsFolder", "preProcDir", "tensorboard", "visualize",
                       "memory_format", "compile_optimizer", "alignment",
                       "gradient", "type"})  # gradient: its own column; type: cpu or cuda
# fmt: on


def deviations_line(groups: list[Group]) -> str | None:
    """Options in which runs differ from their row file: the row's (and its rule's) own
    options, and every other computing option against the trainer's default — so a run
    made with `--set init=xavier` in a row that leaves init alone is named too. An option
    missing from a run's options.json (one that predates the option) is not compared."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()
                for f in fields(Options) if f.name not in RUN_LOCAL}  # fmt: skip
    found: dict[str, set[str]] = {}
    for g in groups:
        want = defaults | {k: v for k, v in g.row_options.items() if k not in RUN_LOCAL}
        for r in g.runs:
            for k, v in want.items():
                if r.options and k in r.options and r.options[k] != v:
                    found.setdefault(g.row, set()).add(f"{g.rule} {k}={r.options[k]} (row: {v})")
    if not found:
        return None
    parts = [f"{row}: {', '.join(sorted(d))}" for row, d in found.items()]
    return "**Runs differ from their row's options:** " + "; ".join(parts) + "."


def markdown(groups: list[Group], *, title: str, source: Path, rows: list[Row] | None = None,
             figures: list[str] = ()) -> str:  # fmt: skip
    best = any(g.metric == "best" for g in groups)
    deviations = deviations_line(groups)
    lines = [
        f"# {title}",
        "",
        f"{dated(source)} Errors in %; mean ± sample standard "
        "deviation (n−1) over the finished seeds (— for a single seed); where no seed has finished, "
        "over the partial runs, marked *partial* (not comparable with a published final figure). "
        "*best test*: the lowest test error over the epochs (with its epoch for a single run). "
        "Δ = ours − published, on "
        + ("the best test error (the figure this table reports)" if best else "the final test error")
        + ".",
        "",
        "*verified*: **no** means the published figure was not checked against the publication itself "
        "(recalled or quoted second-hand; see the row file's source) — treat its Δ with care.",
        "",
        shorter_line(groups),
        "",
        *([deviations, ""] if deviations else []),
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        present = [r for r in g.runs if r.status not in ("missing", "unavailable")]
        cells = [g.row, g.rule, figure_cell(g, "test"), figure_cell(g, "best"), figure_cell(g, "train"),
                 f"{len(g.finished)}/{len(g.runs)}" if present or g.finished else f"0/{len(g.runs)}",
                 epochs_cell(g), fmt_published(g.published), verified_cell(g.published), delta_cell(g),
                 notes_cell(g)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "## Rows", ""]
        lines += [f"- **{r.name}**: {r.description}" for r in rows if r.description]
        lines += sorted({f"- {r.note}" for r in rows if r.note})
        sources = sorted({p["source"] for r in rows for p in r.published.values() if p.get("source")})
        lines += ["", "## Sources of the published figures", ""] + [f"- {s}" for s in sources]
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
