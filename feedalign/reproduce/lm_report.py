"""The report of a language-model suite (rows with "measure": "loss", e.g. shakespeare-char):
validation loss in nats per character, not test error.

`report.md`: one table, a line per (row, rule): final and best validation loss (with the
iteration of the best), final bits per character, training tokens (characters) per second
(median over the evaluation intervals), the gap to bp's final loss on the same recipe
(the row's own bp, else the first row's), the published figure and Δ = ours − published
(within or outside the row's tolerance), and a generated sample per rule.
`report.png`: validation loss against iterations, one panel per row, the published
figure as a dashed line. Each finished run with a checkpoint gets `sample.txt` (SAMPLE_TOKENS
characters from its final weights, seed 0, after a newline), which export keeps.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from feedalign.files import atomic_write_text
from feedalign.reproduce.experiments import Row
from feedalign.reproduce.results import Group, RunResult, dated, write_report_text
from feedalign.train.runlog import read_metrics

log = logging.getLogger("feedalign")
SAMPLE = "sample.txt"
SAMPLE_TOKENS = 300
HEADER = ("| row | rule | final val loss | best val loss (iter) | bits/char | tokens/s | gap to bp "
          "| published | Δ | iterations |")  # fmt: skip


def _curve(run: RunResult) -> list[dict]:
    return read_metrics(run.dir) if run.dir is not None and (run.dir / "metrics.jsonl").exists() else []


def _figures(g: Group) -> dict | None:
    """Final and best validation loss, bits/char, tokens/s of the group's first run that has records."""
    for run in g.basis or g.runs:
        records = _curve(run)
        if records:
            last = records[-1]
            best = min(records, key=lambda r: r["test_loss"])
            return {"final": last["test_loss"], "best": best["test_loss"], "best_at": best["iteration"],
                    "bpc": last["test_bpc"], "iterations": last["iteration"], "status": run.status,
                    "budget": run.options.get("iterations"),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records)}  # fmt: skip
    return None


def write_samples(groups: list[Group]) -> None:
    """sample.txt beside each finished run's checkpoint that has none yet."""
    from feedalign.train.sample import sample

    for g in groups:
        for run in g.runs:
            d = run.dir
            if (
                run.status == "finished"
                and d is not None
                and (d / "checkpoint.pt").exists()
                and not (d / SAMPLE).exists()
            ):
                atomic_write_text(d / SAMPLE, sample(d, tokens=SAMPLE_TOKENS, seed=0))


def markdown(groups: list[Group], rows: list[Row], *, title: str, source: Path, figure: str | None) -> str:
    figures = {(g.row, g.rule): _figures(g) for g in groups}
    bp = {row: f["final"] for (row, rule), f in figures.items() if rule == "bp" and f}
    fallback = next(iter(bp.values()), None)
    intro = (
        f"{dated(source)} Validation loss in nats per character on the "
        "whole validation split (the last 10% of the text, cut into windows at a seeded offset); bits/char = "
        "nats / ln 2, at the last evaluation; tokens/s: training characters per second on one thread (median "
        "over the intervals); gap to bp: final loss − bp's final loss on the same recipe. Δ = ours − "
        "published, on the final validation loss. *partial*: the run has not finished."
    )
    lines = [f"# {title}", "", intro, "", HEADER, "|---|---|---|---|---|---|---|---|---|---|"]
    tolerance = {r.name: r.tolerance for r in rows}
    for g in groups:
        f = figures[(g.row, g.rule)]
        pub = (g.published or {}).get("test")
        if f is None:
            lines.append(f"| {g.row} | {g.rule} | — | — | — | — | — | {_num(pub)} | — | {g.runs[0].status} |")
            continue
        ref = bp.get(g.row, fallback)
        gap = "—" if ref is None or g.rule == "bp" else f"{f['final'] - ref:+.3f}"
        delta = "—"
        if pub is not None:
            t = tolerance.get(g.row)
            verdict = (
                "" if t is None else f" ({'within' if abs(f['final'] - pub) <= t else 'outside'} ±{t:g})"
            )
            delta = f"{f['final'] - pub:+.3f}{verdict}"
        done = f"{f['iterations']}/{f['budget']}" + ("" if f["status"] == "finished" else " *partial*")
        cells = [g.row, g.rule, f"{f['final']:.3f}", f"{f['best']:.3f} ({f['best_at']})", f"{f['bpc']:.3f}",
                 f"{f['tokens_per_s']:.0f}", gap, _num(pub), delta, done]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Rows", ""] + [f"- **{r.name}**: {r.description}" for r in rows]
    lines += sorted({f"- {r.note}" for r in rows if r.note})
    sources = sorted({p["source"] for r in rows for p in r.published.values() if p.get("source")})
    lines += ["", "## Sources of the published figures", ""] + [f"- {s}" for s in sources]
    lines += ["", "## Samples", "", f"{SAMPLE_TOKENS} characters from each finished run's final weights "
              "(`feedalign sample RUN --tokens 300 --seed 0`), first lines:", ""]  # fmt: skip
    for g in groups:
        for run in g.runs:
            if run.dir is not None and (run.dir / SAMPLE).exists():
                text = (run.dir / SAMPLE).read_text(encoding="utf-8").strip("\n").splitlines()[:6]
                lines += [f"**{g.row} / {g.rule}**", "", "```", *text, "```", ""]
    if figure:
        lines += ["", f"![{figure}]({figure})"]
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def plot_losses(groups: list[Group], path: Path) -> None:
    """Validation loss (nats/char) against iterations, one panel per row."""
    from feedalign.reproduce.plots import COLOURS, _grid, _save

    rows = list(dict.fromkeys(g.row for g in groups))
    fig, axes = _grid(len(rows), width=5.0, height=3.5)
    for ax, row in zip(axes, rows):
        for g in (g for g in groups if g.row == row):
            for run in g.runs[:1]:
                records = _curve(run)
                if records:
                    ax.plot([r["iteration"] for r in records], [r["test_loss"] for r in records],
                            color=COLOURS.get(g.rule), label=g.rule, marker=".")  # fmt: skip
            if g.published and g.published.get("test") is not None:
                ax.axhline(g.published["test"], color=COLOURS.get(g.rule), linestyle="--", linewidth=1,
                           label=f"{g.rule} published")  # fmt: skip
        ax.set_title(row)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation loss (nats/char)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write(root: Path, groups: list[Group], rows: list[Row], *, title: str) -> Path:
    write_samples(groups)
    figure = None
    if any(_curve(r) for g in groups for r in g.runs):
        plot_losses(groups, root / "report.png")
        figure = "report.png"
    wrote = write_report_text(
        root / "report.md", markdown(groups, rows, title=title, source=root, figure=figure)
    )
    log.info(f"report: {root / 'report.md'} ({len(groups)} row/rule groups{'' if wrote else '; unchanged'})")
    return root / "report.md"
