"""The reproduced tables as data: one JSON file per row under `feedalign/experiments/<suite>/`.

A row file holds
    row          the row's name, e.g. "2x800-tanh"
    order        its position in the table
    dataset      Options.dataset of every run of the row
    description  what the row is, in words
    options      train options common to all rules (Options field names)
    rules        the rules the table reports for the row, e.g. ["bp", "fa", "dfa"]; a rule
                 this feedalign does not have (not in feedalign.rules.RULES) is skipped
                 with a warning when planning runs
    published    {rule: {"test": %, "std": % or null, "train": % or null[, "roughly": true],
                         "source": where the figure was read, "verified": true/false
                         [, "disputed": [{"test", "std", "source"}, ...]]}}
                 "verified" is true only where the figure was checked against the
                 publication itself (not recalled, not quoted second-hand)
    note         where the published figures come from, and how exact they are
optional:
    rule_options {rule: {option: value}}: per-rule train options (e.g. a rule's own LR)
    metric       "final" (default; the paper reports the last epoch) or "best" (the
                 table reports the best test error over epochs): which figure Δ compares
    epoch_seconds  estimated seconds per epoch on one thread, for `--hours` when no
                 metrics of the row have been measured yet
    seeds        runs per rule when --seeds is not given (default DEFAULT_SEEDS; 1 where
                 the table reports a single run)
    measure      "error" (default: test error in %) or "loss": language models, whose
                 published "test" is a validation loss in nats per character and whose
                 tolerance is in nats (reproduce/lm_report.py writes their report)
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from feedalign.rules import RULES
from feedalign.train.config import Options

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"  # shipped in the wheel
SUITES = tuple(sorted(p.name for p in EXPERIMENTS.iterdir() if p.is_dir()))
PAPER_EPOCHS = 300  # every run in the paper (docs/original.md §7)
REQUIRED = ("row", "dataset", "options", "rules", "published")
METRICS = ("final", "best")
MEASURES = ("error", "loss")
DEFAULT_SEEDS = 3
RULE_NAME = r"[a-z][a-z0-9]*(-[a-z0-9]+)*"  # lower case, words joined by hyphens: predsim-bio


@dataclass(frozen=True)
class Row:
    name: str
    suite: str
    dataset: str
    options: dict  # train options without gradient and seed
    rules: tuple[str, ...]
    published: dict[str, dict] = field(default_factory=dict)
    order: int = 0
    description: str = ""
    note: str = ""
    rule_options: dict[str, dict] = field(default_factory=dict)
    metric: str = "final"  # "final" or "best": the table's figure, which Δ compares
    epoch_seconds: float | None = None  # estimate, one thread
    seeds: int = DEFAULT_SEEDS  # runs per rule unless --seeds says otherwise
    tolerance: float | None = None  # |Δ| in points within which a figure counts as reproduced
    measure: str = "error"  # "loss": validation loss in nats per character (language models)

    def options_for(self, rule: str) -> dict:
        """The row's options with `rule`'s own overrides (without gradient and seed)."""
        return {**self.options, **self.rule_options.get(rule, {})}

    @property
    def epochs(self) -> int:
        """The row's epoch budget as configured (the paper's, unless the file says otherwise)."""
        return int(self.options.get("epoch", PAPER_EPOCHS))


def load_row(path: Path, suite: str) -> Row:
    """Read and check one row file; errors name the file and what is wrong."""
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ValueError(
            f"{path}: missing key(s) {', '.join(missing)}; a row file needs {', '.join(REQUIRED)}"
        )
    fields = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(d["options"]) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; use Options field names")
    fixed = sorted({"gradient", "seed", "save"} & set(d["options"]))
    if fixed:
        raise ValueError(f"{path}: options must not set {', '.join(fixed)}; the runner sets them per run")
    rules = d["rules"]
    if not rules or not all(isinstance(r, str) and re.fullmatch(RULE_NAME, r) for r in rules):
        raise ValueError(f"{path}: rules {rules} must be a non-empty list of rule names such as "
                         f"{', '.join(RULES)}")  # fmt: skip
    _check_published(path, d["published"], rules)
    rule_options = d.get("rule_options", {})
    for rule, opts in rule_options.items():
        bad = sorted(set(opts) - fields) + sorted({"gradient", "seed", "save"} & set(opts))
        if rule not in rules or bad:
            wrong = ", ".join(bad) or rule
            raise ValueError(f"{path}: rule_options[{rule!r}] must name a rule of the row and Options "
                             f"fields other than gradient/seed/save (wrong: {wrong})")  # fmt: skip
    metric = d.get("metric", "final")
    if metric not in METRICS:
        raise ValueError(f"{path}: metric {metric!r} must be one of {', '.join(METRICS)}")
    measure = d.get("measure", "error")
    if measure not in MEASURES:
        raise ValueError(f"{path}: measure {measure!r} must be one of {', '.join(MEASURES)}")
    return Row(
        name=d["row"],
        suite=suite,
        dataset=d["dataset"],
        options={"dataset": d["dataset"], **d["options"]},
        rules=tuple(d["rules"]),
        published=d["published"],
        order=int(d.get("order", 0)),
        description=d.get("description", ""),
        note=d.get("note", ""),
        rule_options=rule_options,
        metric=metric,
        epoch_seconds=d.get("epoch_seconds"),
        seeds=int(d.get("seeds", DEFAULT_SEEDS)),
        tolerance=_tolerance(path, d.get("tolerance")),
        measure=measure,
    )


def _tolerance(path: Path, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{path}: tolerance {value!r} must be a positive number of points")
    return float(value)


def _check_published(path: Path, published: dict, rules: list[str]) -> None:
    """Every published figure names its source and whether it was verified."""
    extra = sorted(set(published) - set(rules))
    if extra:
        raise ValueError(f"{path}: published figures for {', '.join(extra)}, which is not in rules")
    for rule, pub in published.items():
        if not isinstance(pub.get("source"), str) or not isinstance(pub.get("verified"), bool):
            raise ValueError(f"{path}: published[{rule!r}] needs \"source\" (text) and \"verified\" "
                             "(true/false): where the figure was read, and whether it was checked "
                             "against the publication itself")  # fmt: skip


def load_suite(suite: str, folder: str | Path = EXPERIMENTS) -> list[Row]:
    """The rows of `suite` ("mnist", "cifar10", "cifar100"), in the paper's table order."""
    where = Path(folder) / suite
    if not where.is_dir():
        known = sorted(p.name for p in Path(folder).iterdir() if p.is_dir()) if Path(folder).is_dir() else []
        there = ", ".join(known) or "none"
        raise ValueError(f"no experiments for suite {suite!r} in {Path(folder)}; suites there: {there}")
    rows = [load_row(p, suite) for p in sorted(where.glob("*.json"))]
    if not rows:
        raise ValueError(f"{where} holds no row files (*.json)")
    names = [r.name for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: row name(s) {', '.join(dup)} appear in more than one file")
    return sorted(rows, key=lambda r: (r.order, r.name))


def select_rows(rows: list[Row], wanted: list[str] | None) -> list[Row]:
    """Rows named in `wanted`, in table order; None or [] selects all. A full row name
    selects that row only ("2x800-tanh", not its -dropout and -adversarial variants);
    otherwise a prefix selects every row it starts ("2x800"). An unmatched name is an
    error listing the rows."""
    if not wanted:
        return list(rows)
    chosen: set[str] = set()
    for w in wanted:
        hits = [r.name for r in rows if r.name == w] or [r.name for r in rows if r.name.startswith(w)]
        if not hits:
            raise ValueError(f"no row matches {w!r}; the rows are: {', '.join(r.name for r in rows)}")
        chosen.update(hits)
    return [r for r in rows if r.name in chosen]


def suite_of_dataset(dataset: str) -> str | None:
    """Options.dataset -> suite name, for reports on folders of runs (None if no suite)."""
    key = dataset.lower()
    return key if key in SUITES else None


def find_row(dataset: str, name: str, folder: str | Path = EXPERIMENTS) -> Row | None:
    """The row config called `name` for runs on `dataset`, if the experiments define one."""
    suite = suite_of_dataset(dataset)
    if suite is None or not (Path(folder) / suite).is_dir():
        return None
    return next((r for r in load_suite(suite, folder) if r.name == name), None)
