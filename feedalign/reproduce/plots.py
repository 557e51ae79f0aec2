"""The report's figures: test error per epoch (report.png) and alignment angles
per layer (alignment.png). One panel per row; a line per rule, seeds averaged."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from feedalign.files import write_if_changed  # noqa: E402

COLOURS = {"bp": "tab:blue", "fa": "tab:orange", "dfa": "tab:green", "usf": "tab:red", "brsf": "tab:purple",
           "frsf": "tab:brown", "kp": "tab:pink", "drtp": "tab:olive", "shallow": "tab:gray",
           "pred": "tab:cyan", "sim": "goldenrod", "predsim": "black", "pred-bio": "teal",
           "sim-bio": "darkkhaki", "predsim-bio": "dimgray"}  # fmt: skip
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")
METRIC_STYLE = {"update": "-", "error": "--", "feedback": ":"}


def _seed_mean(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Per epoch, the mean over the seeds that reached it (finite values only)."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for epoch, value in curve:
            if value is not None and math.isfinite(value):
                by_epoch[epoch].append(value)
    epochs = sorted(by_epoch)
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _grid(n: int, width: float = 4.0, height: float = 3.0):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> None:
    """PNG bytes depend only on the figure (no date in them): a figure drawn from the same
    runs leaves the file as it was."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_if_changed(path, buf.getvalue())


def plot_errors(groups, path: Path, *, panel: tuple[float, float] = (4.0, 3.0)) -> None:
    """Test error (%) vs epoch, log y, one panel per row; the published figure as a dashed
    line per rule; a rule whose runs are all partial is drawn dotted."""
    rows = list(dict.fromkeys(g.row for g in groups))
    fig, axes = _grid(len(rows), *panel)
    for ax, row in zip(axes, rows):
        for g in (g for g in groups if g.row == row):
            colour = COLOURS.get(g.rule)
            curves = [r.curve for r in g.runs if r.curve and (r.status == "finished" or not g.finished)]
            epochs, mean = _seed_mean(curves)
            if epochs:
                partial = "" if g.finished else ", partial"
                ax.plot(epochs, mean, color=colour, linestyle=":" if partial else "-",
                        label=f"{g.rule} (n={len(curves)}{partial})")  # fmt: skip
            if g.published and g.published.get("test") is not None:
                ax.axhline(g.published["test"], color=colour, linestyle="--", linewidth=1,
                           label=f"{g.rule} published")  # fmt: skip
        ax.set_title(row)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error (%)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)  # 1.6, not 1.6×10⁰
        ax.yaxis.set_minor_formatter(PLAIN)
        ax.grid(alpha=0.3, which="both")
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_alignment(groups, path: Path) -> None:
    """Angle with back-prop (degrees) per layer vs epoch: one panel per (row, rule)
    that logged alignment; solid = weight update, dashed = error, dotted = fa's B vs W."""
    logged = [g for g in groups if any(r.alignment for r in g.runs)]
    fig, axes = _grid(len(logged), width=4.5)
    for ax, g in zip(axes, logged):
        series: dict[tuple[str, str], list[list[tuple[int, float]]]] = defaultdict(list)
        for r in g.runs:
            per_run: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
            for epoch, layers in r.alignment:
                for layer, metrics in layers.items():
                    for metric, value in metrics.items():
                        per_run[(layer, metric)].append((epoch, value))
            for key, curve in per_run.items():
                series[key].append(curve)
        layers = list(dict.fromkeys(layer for layer, _ in series))
        cmap = plt.get_cmap("viridis", max(2, len(layers)))
        for (layer, metric), curves in series.items():
            epochs, mean = _seed_mean(curves)
            ax.plot(epochs, mean, color=cmap(layers.index(layer)), linestyle=METRIC_STYLE.get(metric, "-."),
                    label=f"layer {layer} {metric}")  # fmt: skip
        ax.axhline(90, color="grey", linewidth=0.8)
        ax.set_ylim(0, 180 if any(v > 100 for c in series.values() for cc in c for _, v in cc) else 100)
        ax.set_title(f"{g.row} — {g.rule}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle with back-prop (°)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)
