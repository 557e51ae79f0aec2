"""`feedalign reproduce`: the experiment files, row selection, the runner's decisions
(with a fake trainer; nothing trains here) and the report on fabricated run directories."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest

from feedalign.cli import build_parser, main
from feedalign.reproduce import parse_overrides, run_reproduce
from feedalign.reproduce import runner as rn
from feedalign.reproduce.experiments import SUITES, load_suite, select_rows
from feedalign.reproduce.report import main as report_main
from feedalign.reproduce.report import write_report
from feedalign.reproduce.results import find_runs, group_runs, read_run

MNIST_ROWS = ["7x240-tanh", "100x240-tanh", "1x800-tanh", "2x800-tanh", "3x800-tanh", "4x800-tanh",
              "2x800-logistic", "2x800-relu", "2x800-tanh-dropout", "2x800-tanh-adversarial"]  # fmt: skip


# --- experiments ------------------------------------------------------------------


def test_suites_load_in_table_order_with_published_figures():
    rows = load_suite("mnist")
    assert [r.name for r in rows] == MNIST_ROWS
    by = {r.name: r for r in rows}
    assert by["100x240-tanh"].rules == ("dfa",)
    assert {k: by["100x240-tanh"].published["dfa"][k] for k in ("test", "std", "train")} == {
        "test": 3.92, "std": 0.09, "train": 0.12}  # fmt: skip
    assert by["2x800-tanh-adversarial"].options["eps"] == 0.08
    assert by["2x800-logistic"].options["nonlin"] == "sigm"
    assert by["2x800-tanh-dropout"].published["fa"]["train"] == 0.20
    assert all(r.options["LR"] == 1e-4 and r.epochs == 300 for r in rows)
    for suite, lr, dfa in [("cifar10", 5e-5, 26.9), ("cifar100", 2.5e-5, 59.0)]:
        (conv,) = load_suite(suite)
        assert conv.name == "conv-tanh" and conv.options["whiten"] is True and conv.options["LR"] == lr
        assert conv.published["dfa"]["test"] == dfa and conv.published["dfa"]["roughly"]
    assert set(SUITES) == {"mnist", "cifar10", "cifar100", "biotorch-mnist", "biotorch-fashion",
                           "biotorch-cifar10", "shakespeare-char", "local-loss"}  # fmt: skip


def test_row_selection_by_prefix_and_unknown_name():
    rows = load_suite("mnist")
    names = [r.name for r in select_rows(rows, ["2x800"])]
    assert names == ["2x800-tanh", "2x800-logistic", "2x800-relu", "2x800-tanh-dropout",
                     "2x800-tanh-adversarial"]  # fmt: skip
    assert [r.name for r in select_rows(rows, ["1x800-tanh", "7x"])] == ["7x240-tanh", "1x800-tanh"]
    assert len(select_rows(rows, None)) == len(rows)
    # a full name is that row only, not the rows it is a prefix of
    assert [r.name for r in select_rows(rows, ["2x800-tanh"])] == ["2x800-tanh"]
    with pytest.raises(ValueError, match=r"no row matches '5x800'.*2x800-relu"):
        select_rows(rows, ["5x800"])


def test_every_published_figure_says_where_it_is_from_and_whether_it_was_verified():
    for suite in SUITES:
        for row in load_suite(suite):
            for rule, pub in row.published.items():
                assert pub["source"] and isinstance(pub["verified"], bool), (suite, row.name, rule)
    # only the abstract's figure of the Nøkland MNIST table has been checked against the paper
    mnist = load_suite("mnist")
    verified = [(r.name, rule) for r in mnist for rule, p in r.published.items() if p["verified"]]
    assert verified == [("2x800-tanh-dropout", "dfa")]
    adv = next(r for r in load_suite("mnist") if r.name == "2x800-tanh-adversarial").published["dfa"]
    assert adv["test"] == 0.85 and adv["disputed"][0]["test"] == 1.02 and not adv["verified"]


def test_bad_row_file_is_refused(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "x.json").write_text(json.dumps(
        {"row": "x", "dataset": "MNIST", "options": {"learning_rate": 1}, "rules": ["bp"], "published": {}}
    ))  # fmt: skip
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        load_suite("mnist", tmp_path)
    with pytest.raises(ValueError, match="suites there: mnist"):
        load_suite("cifar10", tmp_path)
    row = {"row": "x", "dataset": "MNIST", "options": {}, "rules": ["bp"], "published": {"bp": {"test": 1.0}}}
    (tmp_path / "mnist" / "x.json").write_text(json.dumps(row))
    with pytest.raises(ValueError, match='needs "source".*"verified"'):
        load_suite("mnist", tmp_path)
    row["published"] = {}
    row["rule_options"] = {"dfa": {"LR": 1}}
    (tmp_path / "mnist" / "x.json").write_text(json.dumps(row))
    with pytest.raises(ValueError, match="rule_options.*'dfa'.*must name a rule of the row"):
        load_suite("mnist", tmp_path)
    row.pop("rule_options")
    row["tolerance"] = -1
    (tmp_path / "mnist" / "x.json").write_text(json.dumps(row))
    with pytest.raises(ValueError, match="tolerance -1 must be a positive number of points"):
        load_suite("mnist", tmp_path)


def test_delta_is_marked_within_or_outside_the_rows_tolerance():
    from feedalign.reproduce.results import Group, RunResult
    from feedalign.reproduce.tables import delta_cell

    def group(best: float, status: str = "finished", tolerance: float | None = 0.3) -> Group:
        run = RunResult("lenet", "fa", 1, None, status, test=best + 0.1, best=best)
        return Group("lenet", "fa", [run], {"test": 1.70}, metric="best", tolerance=tolerance)

    assert delta_cell(group(1.90)) == "+0.20 (within ±0.3)"
    assert delta_cell(group(1.40)) == "-0.30 (within ±0.3)"
    assert delta_cell(group(2.31)) == "+0.61 (**outside ±0.3**)"
    assert delta_cell(group(2.31, tolerance=None)) == "+0.61"
    assert delta_cell(group(2.31, status="unfinished")) == "+0.61 partial"
    assert [r.tolerance for r in load_suite("biotorch-mnist")] == [0.3]
    assert [r.tolerance for r in load_suite("biotorch-fashion")] == [1.0]


# --- runner -------------------------------------------------------------------------


def one_run(tmp_path, rule="dfa", epochs=5) -> rn.Run:
    rows = select_rows(load_suite("mnist"), ["2x800-tanh-adversarial"])
    (run,) = rn.plan(rows, rules=[rule], seeds=1, out=tmp_path, epochs=epochs)
    return run


def test_plan_expands_rows_rules_seeds(tmp_path):
    rows = select_rows(load_suite("mnist"), ["100x240", "2x800-relu"])
    runs = rn.plan(rows, rules=None, seeds=2, out=tmp_path, overrides={"datapath": "/data"})
    assert [r.label for r in runs] == ["100x240-tanh/dfa/seed1", "100x240-tanh/dfa/seed2"] + [
        f"2x800-relu/{rule}/seed{s}" for rule in ("bp", "fa", "dfa") for s in (1, 2)
    ]
    assert runs[0].dir == tmp_path / "runs" / "100x240-tanh" / "dfa" / "seed1"
    assert runs[0].options["datapath"] == "/data" and runs[0].options["seed"] == 1
    assert [r.label for r in rn.plan(rows, rules=["bp"], seeds=1, out=tmp_path)] == ["2x800-relu/bp/seed1"]


def test_command_lines(tmp_path):
    run = one_run(tmp_path)
    fresh = rn.command(run, "fresh", threads=2, trainer=["T"])
    assert fresh[0] == "T"
    pairs = dict(zip(fresh[1::2], fresh[2::2]))
    assert pairs["-gradient"] == "dfa" and pairs["-eps"] == "0.08" and pairs["-LR"] == "0.0001"
    assert pairs["-epoch"] == "5" and pairs["-seed"] == "1" and pairs["-save"] == str(run.dir)
    assert fresh[-3:] == ["-threads", "2", "--quiet"]
    resume = rn.command(run, "resume", threads=1, trainer=["T"])
    assert resume == ["T", "--resume", str(run.dir), "-epoch", "5", "-threads", "1", "--quiet"]
    assert rn.option_args({"whiten": True, "augment": False, "svhn_extra": False, "seed": None}) == [
        "-whiten", "-svhn_extra", "false"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown train option"):
        rn.option_args({"lr": 1})
    with pytest.raises(ValueError, match="not a train option"):
        parse_overrides(["lr=1"])
    assert parse_overrides(["type=float", "-alignment=100"]) == {"type": "float", "alignment": "100"}


def fabricate(run_dir: Path, *, epochs: int, test: list[float] | float = 0.02, train: float = 0.0,
              budget: int | None = None, finished: bool = True, dataset: str = "MNIST", rule: str = "dfa",
              seed: int = 1, checkpoint: bool = True, alignment: bool = False) -> Path:  # fmt: skip
    """A run directory as the trainer leaves it (errors as fractions)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    opts = {"dataset": dataset, "gradient": rule, "seed": seed, "epoch": budget or epochs}
    (run_dir / "options.json").write_text(json.dumps(opts))
    tests = test if isinstance(test, list) else [test] * epochs
    records = [{"epoch": e + 1, "train_error": train, "test_error": tests[e], "train_loss": 0.1,
                "test_loss": 0.1, "lr": 1e-4, "seconds": 1.0, "smoothed_error": train}
               for e in range(epochs)]  # fmt: skip
    if alignment:
        for r in records:
            r["alignment"] = {"1": {"update": 80.0, "error": 70.0}, "3": {"update": 60.0, "error": 50.0}}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if checkpoint:
        (run_dir / "checkpoint.pt").write_bytes(b"fake")
    if finished:
        (run_dir / "finished.json").write_text(
            json.dumps({"reason": f"reached -epoch {epochs}", "epochs": epochs})
        )
    return run_dir


def test_decide(tmp_path):
    run = one_run(tmp_path, epochs=5)
    assert rn.decide(run) == "fresh"
    run.dir.mkdir(parents=True)
    (run.dir / "options.json").write_text("{}")  # started, crashed before its first checkpoint
    assert rn.decide(run) == "fresh"
    fabricate(run.dir, epochs=2, budget=5, finished=False)
    assert rn.decide(run) == "resume"
    fabricate(run.dir, epochs=5)
    assert rn.decide(run) == "skip"
    assert rn.decide(one_run(tmp_path, epochs=3)) == "skip"  # ran longer than now asked
    assert rn.decide(one_run(tmp_path, epochs=300)) == "extend"  # budget reached, now larger
    fabricate(run.dir, epochs=4, budget=5)  # stopped early by its stopping rule: not extended
    assert rn.decide(one_run(tmp_path, epochs=300)) == "skip"


FAKE_TRAINER = """
import json, os, sys
from pathlib import Path
argv = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "--resume" in argv:
    d = Path(argv[argv.index("--resume") + 1])
    opts = json.loads((d / "options.json").read_text())
else:
    d = Path(argv[argv.index("-save") + 1])
    d.mkdir(parents=True, exist_ok=True)
    opts = {k[1:]: v for k, v in zip(argv[0::2], argv[1::2]) if k.startswith("-")}
if "-epoch" in argv:
    opts["epoch"] = int(argv[argv.index("-epoch") + 1])
if opts.get("gradient") == "fa" and opts.get("seed") == "2":
    sys.exit(3)  # a failing run
(d / "options.json").write_text(json.dumps(opts))
n = int(opts["epoch"])
(d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_error": 0.0, "test_error": 0.02})
                                         + "\\n" for e in range(1, n + 1)))
(d / "checkpoint.pt").write_bytes(b"x")
(d / "finished.json").write_text(json.dumps({"reason": "reached -epoch", "epochs": n}))
"""


def reproduce_args(out: Path, **kw) -> argparse.Namespace:
    args = build_parser().parse_args(["reproduce", "mnist", "--out", str(out), "--rows", "2x800-tanh-adv",
                                      "--seeds", "2", "--epochs", "3", "--jobs", "2"])  # fmt: skip
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_runner_skips_resumes_and_starts_fresh(tmp_path, monkeypatch):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "out"
    runs = out / "runs" / "2x800-tanh-adversarial"
    fabricate(runs / "bp" / "seed1", epochs=3, rule="bp")  # finished: skipped
    fabricate(runs / "dfa" / "seed2", epochs=1, budget=3, finished=False)  # interrupted: resumed

    status = run_reproduce(reproduce_args(out), trainer=[sys.executable, str(script)])

    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    started = {
        (a[a.index("-save") + 1] if "-save" in a else "resume:" + a[a.index("--resume") + 1]) for a in argvs
    }
    assert str(runs / "bp" / "seed1") not in started and len(argvs) == 5
    assert "resume:" + str(runs / "dfa" / "seed2") in started
    assert str(runs / "fa" / "seed1") in started and str(runs / "dfa" / "seed1") in started
    assert status == 3  # fa seed 2 failed: it diverged (exit 3), and so does reproduce
    runner_info = json.loads((runs / "fa" / "seed2" / "runner.json").read_text())
    assert runner_info["returncode"] == 3 and "-save" in runner_info["command"]
    assert "# " in (runs / "fa" / "seed1" / "train.log").read_text()
    report = (out / "report.md").read_text()
    assert "failed (exit 3" in report and (out / "report.png").exists()

    calls.unlink()  # again: only the failed run is started (fresh: it left no checkpoint)
    assert run_reproduce(reproduce_args(out), trainer=[sys.executable, str(script)]) == 3
    assert len(calls.read_text().splitlines()) == 1

    calls.unlink()
    assert run_reproduce(reproduce_args(out, dry_run=True), trainer=[sys.executable, str(script)]) == 0
    assert not calls.exists()


def test_sigint_reaches_each_child_once(tmp_path):
    """The runner's Ctrl-C: one SIGINT per child, which checkpoints and exits."""
    script = tmp_path / "child.py"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "def stop(*_):\n"
        "    n = int((d / 'sigints').read_text()) + 1 if (d / 'sigints').exists() else 1\n"
        "    (d / 'sigints').write_text(str(n)); time.sleep(0.3); sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "(d / 'ready').write_text('1')\n"
        "time.sleep(30)\n"
    )
    run = one_run(tmp_path)
    run.dir.mkdir(parents=True)
    child = rn._start(run, "fresh", 1, [sys.executable, str(script), str(run.dir)])
    deadline = time.monotonic() + 10
    while not (run.dir / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    rn._stop([child], grace_s=10)
    assert rn._finish(child) == 130
    assert (run.dir / "sigints").read_text() == "1"
    assert json.loads((run.dir / "runner.json").read_text())["returncode"] == 130


# --- report -------------------------------------------------------------------------


def test_report_on_fabricated_runs(tmp_path):
    out = tmp_path / "rep"
    runs = out / "runs"
    for seed, err in zip((1, 2, 3), (0.015, 0.017, 0.019)):
        fabricate(runs / "2x800-tanh" / "bp" / f"seed{seed}", epochs=20, test=err, train=0.0001 * seed,
                  rule="bp", seed=seed)  # fmt: skip
    fabricate(runs / "2x800-tanh" / "dfa" / "seed1", epochs=20, test=0.018, seed=1, alignment=True)
    fabricate(runs / "2x800-tanh" / "dfa" / "seed2", epochs=4, budget=20, finished=False, seed=2)
    fabricate(runs / "1x800-tanh" / "bp" / "seed1", epochs=300, test=0.016, rule="bp")
    rows = select_rows(load_suite("mnist"), ["1x800-tanh", "2x800-tanh"])
    rows = [r for r in rows if r.name in ("1x800-tanh", "2x800-tanh")]
    expected = [(r.row, r.rule, r.seed, r.dir) for r in rn.plan(rows, rules=None, seeds=3, out=out)]

    write_report(out, rows=rows, expected=expected, title="T")

    text = (out / "report.md").read_text()
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
             if line.startswith("| ") and "---" not in line and not line.startswith("| row ")}  # fmt: skip
    bp = lines[("2x800-tanh", "bp")]
    assert "| 1.70 ± 0.20 | 1.70 ± 0.20 | 0.02 ± 0.01 | 3/3 | 20 |" in bp
    assert "| 1.60 ± 0.06 | **no** | +0.10 |" in bp
    dfa = lines[("2x800-tanh", "dfa")]
    assert "| 1.80 ± — | 1.80 (epoch 1) |" in dfa and "| 1/3 | seed 1: 20; seed 2: partial (4/20) |" in dfa
    assert "| 1.74 ± 0.08 | **no** | +0.06 | seed 3: missing |" in dfa
    fa = lines[("2x800-tanh", "fa")]
    assert "| missing |" in fa and "| 0/3 |" in fa and "| 1.64 ± 0.03 |" in fa
    one = lines[("1x800-tanh", "bp")]
    assert "| 1.60 ± — |" in one and "| 1/3 |" in one and "| 300 |" in one and "| 1.59 ± 0.04 |" in one
    assert list(lines)[:3] == [("1x800-tanh", "bp"), ("1x800-tanh", "fa"), ("1x800-tanh", "dfa")]
    shorter = next(line for line in text.splitlines() if "Shorter than" in line)
    assert "2x800-tanh (20 of 300 epochs)" in shorter and "1x800-tanh" not in shorter
    assert "differ from their row's options" not in text
    opts = json.loads((runs / "1x800-tanh" / "bp" / "seed1" / "options.json").read_text())
    (runs / "1x800-tanh" / "bp" / "seed1" / "options.json").write_text(json.dumps(opts | {"num_hidden": 32}))
    write_report(out, rows=rows, expected=expected, title="T")
    assert "1x800-tanh: bp num_hidden=32 (row: 800)" in (out / "report.md").read_text()
    # an option the row leaves at the trainer's default (init) is checked against that default;
    # where a run ran, how fast, and the rule itself are not deviations
    local = {"init": "xavier", "threads": 1, "datapath": "/elsewhere", "gradient": "bp"}
    (runs / "1x800-tanh" / "bp" / "seed1" / "options.json").write_text(json.dumps(opts | local))
    write_report(out, rows=rows, expected=expected, title="T")
    line = next(x for x in (out / "report.md").read_text().splitlines() if "differ from their row" in x)
    assert line.endswith("1x800-tanh: bp init=xavier (row: classic).")
    assert (out / "report.png").stat().st_size > 0 and (out / "alignment.png").stat().st_size > 0


def test_a_report_is_rewritten_only_when_its_content_changes(tmp_path, monkeypatch):
    import feedalign.reproduce.results as results

    fabricate(tmp_path / "a", epochs=3, test=0.02, rule="bp", seed=1)
    monkeypatch.setattr(results.time, "strftime", lambda fmt: "2026-01-01 10:00")
    write_report(tmp_path)
    report, plot = tmp_path / "report.md", tmp_path / "report.png"
    first = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (report, plot)}
    assert "From " in report.read_text() and " on 2026-01-01 10:00." in report.read_text()
    for p in (report, plot):  # an mtime in the past: a rewrite would show
        os.utime(p, ns=(first[p][1] - 10**9, first[p][1] - 10**9))
    monkeypatch.setattr(results.time, "strftime", lambda fmt: "2026-02-02 11:11")  # only the date differs
    write_report(tmp_path)
    assert all(p.read_bytes() == first[p][0] and p.stat().st_mtime_ns == first[p][1] - 10**9 for p in first)
    fabricate(tmp_path / "b", epochs=3, test=0.03, rule="dfa", seed=1)  # new content: both rewritten
    write_report(tmp_path)
    assert " on 2026-02-02 11:11." in report.read_text() and "| dfa |" in report.read_text()
    assert plot.read_bytes() != first[plot][0]


def test_report_on_any_folder_and_running_only(tmp_path):
    fabricate(tmp_path / "a", epochs=3, budget=300, finished=False, seed=7)
    fabricate(tmp_path / "b", epochs=300, test=0.02, rule="bp", seed=8)
    groups = group_runs(find_runs(tmp_path))
    assert [(g.row, g.rule, len(g.runs)) for g in groups] == [
        (tmp_path.name, "bp", 1),
        (tmp_path.name, "dfa", 1),
    ]
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 2.00 ± — partial | 2.00 (epoch 1) partial |" in text and "| partial (3/300) |" in text


def test_cli_report_only_and_errors(tmp_path, caplog):
    args = build_parser().parse_args(
        ["reproduce", "cifar10", "--out", str(tmp_path / "none"), "--report-only"]
    )
    assert args.func(args) == 2
    args = build_parser().parse_args(["reproduce", "mnist", "--rows", "9x9", "--out", str(tmp_path)])
    assert args.func(args) == 2
    assert "no row matches '9x9'" in caplog.text


def test_the_experiment_tables_ship_inside_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import feedalign
    from feedalign.reproduce.experiments import EXPERIMENTS

    package = Path(feedalign.__file__).parent
    assert EXPERIMENTS.is_relative_to(package)  # found from a wheel install too, not only from a clone
    pyproject = package.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("installed from a wheel: no pyproject.toml beside the package")
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["feedalign"]
    files = [f.relative_to(package) for f in EXPERIMENTS.rglob("*") if f.is_file()]
    assert len(files) >= 13
    unshipped = [str(f) for f in files if not any(f.match(g) for g in globs)]
    assert not unshipped, f"not in pyproject's package-data: {unshipped}"


# --- reports from committed metrics, partial runs and the best epoch ------------------


def committed_suite(tmp_path: Path) -> Path:
    """An experiments folder with one row that reports the best epoch, and a rule this
    feedalign does not have."""
    folder = tmp_path / "experiments"
    (folder / "mnist").mkdir(parents=True)
    pub = {"source": "a fixture", "verified": True}
    row = {"row": "lenet", "dataset": "MNIST", "options": {"epoch": 100, "LR": 0.1}, "metric": "best",
           "rules": ["bp", "fa", "dfa", "nosuchrule"],
           "published": {"bp": {"test": 0.91, **pub}, "fa": {"test": 1.7, **pub},
                         "nosuchrule": {"test": 5.0, "source": "recalled", "verified": False}},
           "rule_options": {"dfa": {"LR": 0.01}}}  # fmt: skip
    (folder / "mnist" / "lenet.json").write_text(json.dumps(row))
    return folder


def test_report_only_from_committed_metrics(tmp_path, caplog):
    """Metrics committed without checkpoints (results/<suite>/runs/<row>/<rule>/seed<k>):
    final and best error, partial runs with their epochs, a stopping rule, Δ on the best epoch."""
    experiments, out = committed_suite(tmp_path), tmp_path / "results" / "mnist"
    runs = out / "runs" / "lenet"
    fabricate(runs / "bp" / "seed1", epochs=3, budget=3, test=[0.05, 0.01, 0.02], rule="bp", checkpoint=False)
    fabricate(runs / "bp" / "seed2", epochs=3, budget=3, test=[0.05, 0.014, 0.03], rule="bp", seed=2,
              checkpoint=False)  # fmt: skip
    fabricate(runs / "fa" / "seed1", epochs=2, budget=100, test=[0.10, 0.04], rule="fa", finished=False,
              checkpoint=False)  # fmt: skip
    dfa = fabricate(runs / "dfa" / "seed1", epochs=3, budget=100, test=0.03, checkpoint=False)
    (dfa / "finished.json").write_text(json.dumps({"reason": "zero training error reached", "epochs": 3}))
    args = build_parser().parse_args(["reproduce", "mnist", "--experiments", str(experiments),
                                      "--out", str(out), "--report-only"])  # fmt: skip
    assert args.func(args) == 0

    text = (out / "report.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| lenet ")}
    # bp: final 2.00 and 3.00 -> 2.50 ± 0.71; best 1.00 and 1.40 -> 1.20 ± 0.28; Δ = 1.20 − 0.91
    assert "| 2.50 ± 0.71 | 1.20 ± 0.28 | 0.00 ± 0.00 | 2/2 | 3 | 0.91 | yes | +0.29 |" in rows["bp"]
    # fa: no seed finished: its partial figures, marked, and its epochs out of the budget
    assert "| 4.00 ± — partial | 4.00 (epoch 2) partial |" in rows["fa"]
    assert "| 0/1 | partial (2/100) | 1.70 | yes | +2.30 partial |" in rows["fa"]
    assert "| 3.00 ± — | 3.00 (epoch 1) |" in rows["dfa"]
    assert "| 3/100, stopped: zero training error reached |" in rows["dfa"]
    assert "| rule not in this feedalign |" in rows["nosuchrule"]
    assert "| 5.00 | **no** |" in rows["nosuchrule"]
    assert "Δ = ours − published, on the best test error" in text and (out / "report.png").stat().st_size > 0


# runner.json's returncode -> status: stopped from outside, then the trainer's own faults
STOPS = [(None, "unfinished"), (130, "unfinished"), (143, "unfinished"), (-15, "unfinished"),
         (-9, "unfinished"), (3, "failed"), (4, "failed"), (1, "failed")]  # fmt: skip


@pytest.mark.parametrize("returncode, status", STOPS)
def test_a_run_stopped_from_outside_is_partial_not_failed(tmp_path, returncode, status):
    """Ctrl-C, SIGTERM to the trainer (143) or a signal that killed it (Popen's -N) leave a
    resumable partial run; only the trainer's own faults (diverged 3, bad file 4, bug 1) fail."""
    run = fabricate(tmp_path / "bp" / "seed1", epochs=4, budget=300, rule="bp", finished=False)
    (run / "runner.json").write_text(json.dumps({"action": "fresh", "returncode": returncode}))
    result = read_run(run)
    assert result.status == status
    expected = "partial (4/300 epochs)" if status == "unfinished" else f"failed (exit {returncode}, epoch 4;"
    assert result.describe().startswith(expected)


def test_export_copies_metrics_not_checkpoints_and_never_goes_backwards(tmp_path, caplog):
    """--export: the small files of every run of the chosen rows (finished and partial) go to
    DIR/runs/...; checkpoints stay behind; a destination run further along is kept; a run
    since extended loses its old finished.json; the report is rebuilt in DIR from all its runs."""
    experiments, scratch, dst = committed_suite(tmp_path), tmp_path / "scratch", tmp_path / "results"
    src, old = scratch / "runs" / "lenet", dst / "runs" / "lenet"
    fabricate(src / "bp" / "seed1", epochs=3, budget=3, rule="bp")
    fabricate(src / "fa" / "seed1", epochs=2, budget=100, rule="fa", finished=False)
    fabricate(src / "dfa" / "seed1", epochs=5, budget=100, test=0.03, finished=False)
    fabricate(scratch / "runs" / "other" / "bp" / "seed1", epochs=3, rule="bp")  # not a row of the suite
    (src / "bp" / "seed2").mkdir()  # started, nothing trained: nothing to export
    # already in the destination: fa further along than the scratch copy, dfa since extended
    fabricate(old / "fa" / "seed1", epochs=7, budget=100, rule="fa", finished=False, checkpoint=False)
    fabricate(old / "dfa" / "seed1", epochs=4, budget=4, checkpoint=False)
    fabricate(old / "bp" / "seed3", epochs=3, budget=3, rule="bp", checkpoint=False)
    argv = ["--out", str(scratch), "--report-only", "--export", str(dst)]
    args = build_parser().parse_args(["reproduce", "mnist", "--experiments", str(experiments), *argv])
    caplog.set_level("INFO", logger="feedalign")
    assert args.func(args) == 0

    bp, fa, dfa = (old / rule / "seed1" for rule in ("bp", "fa", "dfa"))
    assert sorted(p.name for p in bp.iterdir()) == ["finished.json", "metrics.jsonl", "options.json"]
    assert (bp / "metrics.jsonl").read_bytes() == (src / "bp" / "seed1" / "metrics.jsonl").read_bytes()
    assert not list(dst.rglob("checkpoint.pt")) and not (dst / "runs" / "other").exists()
    assert not (old / "bp" / "seed2").exists()
    assert len((fa / "metrics.jsonl").read_text().splitlines()) == 7  # kept: 7 epochs there, 2 here
    assert f"export: kept {fa} (7 epochs)" in caplog.text
    assert len((dfa / "metrics.jsonl").read_text().splitlines()) == 5 and not (dfa / "finished.json").exists()
    assert "exported to" in caplog.text and "1 finished, 1 partial run(s); kept 1" in caplog.text
    text = (dst / "report.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| lenet ")}
    assert "| 2/2 |" in rows["bp"]  # seed 3 was already there
    assert "| 0/1 | partial (7/100) |" in rows["fa"] and "| 0/1 | partial (5/100) |" in rows["dfa"]
    assert (src / "bp" / "seed1" / "checkpoint.pt").exists()  # the source is untouched
    # an export of one row and rule still reports the whole suite from what the destination holds
    mlp = json.loads((experiments / "mnist" / "lenet.json").read_text()) | {"row": "mlp"}
    (experiments / "mnist" / "mlp.json").write_text(json.dumps(mlp))
    mlp_bp = dst / "runs" / "mlp" / "bp" / "seed1"
    fabricate(mlp_bp, epochs=2, budget=2, test=0.04, rule="bp", checkpoint=False)
    fabricate(src / "fa" / "seed1", epochs=9, budget=100, rule="fa", finished=False)
    argv = ["--experiments", str(experiments), "--rows", "lenet", "--rules", "fa", *argv]
    assert main(["reproduce", "mnist", *argv]) == 0
    lines = [line for line in (dst / "report.md").read_text().splitlines() if line.startswith("| ")]
    rows = {line.split("|")[2].strip(): line for line in lines if line.startswith("| lenet ")}
    assert "| 0/1 | partial (9/100) |" in rows["fa"] and "| 2/2 |" in rows["bp"]
    assert any(line.startswith("| mlp | bp | 4.00 ± — |") for line in lines)
    assert any(line.startswith("| mlp | fa | missing |") for line in lines)  # the table stays whole


@pytest.mark.parametrize("case", ["same-folder", "dry-run", "link", "corrupt"])
def test_export_refusals(tmp_path, caplog, case):
    """Refused with exit 2 and a message, before anything is copied: exporting onto --out,
    --export with --dry-run, a run directory holding a symbolic link, a run file that is
    not the JSON the trainer writes (named; the report stops, the file stays). Exit 2 for
    the options, 4 for the files (docs/faults.md)."""
    experiments, scratch, dst = committed_suite(tmp_path), tmp_path / "scratch", tmp_path / "results"
    run = fabricate(scratch / "runs" / "lenet" / "bp" / "seed1", epochs=3, budget=3, rule="bp")
    argv = ["reproduce", "mnist", "--experiments", str(experiments), "--out", str(scratch), "--export"]
    if case == "same-folder":
        argv += [str(scratch), "--report-only"]
    elif case == "dry-run":
        argv += [str(dst), "--dry-run"]
    elif case == "link":
        (tmp_path / "secret.json").write_text('{"not": "a result"}')
        (run / "runner.json").symlink_to(tmp_path / "secret.json")
        argv += [str(dst), "--report-only"]
    else:
        (run / "runner.json").write_text("{truncated")
        argv += [str(dst), "--report-only"]
    assert main(argv) == (2 if case in ("same-folder", "dry-run") else 4)
    message = {"same-folder": "is the --out folder itself", "dry-run": "--dry-run runs nothing",
               "link": "holds symbolic links (runner.json); copy refused",
               "corrupt": f"error: {run / 'runner.json'}: not valid JSON"}[case]  # fmt: skip
    assert message in caplog.text
    assert not (dst / "runs").exists()
    assert (run / "metrics.jsonl").exists() and (run / "checkpoint.pt").exists()  # nothing lost
    if case == "corrupt":  # the report's own entry point says the same
        assert report_main([str(scratch)]) == 4


def test_plan_uses_rule_options_and_skips_rules_this_feedalign_lacks(tmp_path, caplog):
    rows = load_suite("mnist", committed_suite(tmp_path))
    runs = rn.plan(rows, rules=None, seeds=1, out=tmp_path)
    assert [r.rule for r in runs] == ["bp", "fa", "dfa"]
    assert [r.options["LR"] for r in runs] == [0.1, 0.1, 0.01]
    assert "nosuchrule are not in this feedalign" in caplog.text


# --- --hours ------------------------------------------------------------------------


def test_epoch_time_estimates_come_from_metrics_then_the_row_file(tmp_path):
    from feedalign.reproduce import budget

    rows = load_suite("mnist")
    rows = [r for r in rows if r.name in ("2x800-tanh", "1x800-tanh")]
    out = tmp_path / "out"
    timed = fabricate(out / "runs" / "2x800-tanh" / "bp" / "seed1", epochs=3, rule="bp")
    records = [{"epoch": e, "test_error": 0.1, "seconds": s} for e, s in ((1, 2.0), (2, 4.0), (3, 3.0))]
    (timed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    resumed = fabricate(out / "runs" / "2x800-tanh" / "dfa" / "seed1", epochs=2, budget=10, finished=False)
    (resumed / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 5.0}) + "\n"
                                                   for e in (1, 2)))  # fmt: skip
    runs = {r.label: r for r in rn.plan(rows, rules=None, seeds=2, out=out, epochs=10)}
    work = [
        (runs[label], rn.decide(runs[label]))
        for label in (
            "2x800-tanh/bp/seed2",
            "2x800-tanh/fa/seed1",
            "2x800-tanh/dfa/seed1",
            "1x800-tanh/bp/seed1",
        )
    ]
    est = {e.run.label: e for e in budget.estimate(work, rows, out)}
    same_rule, same_row = est["2x800-tanh/bp/seed2"], est["2x800-tanh/fa/seed1"]
    assert (same_rule.epoch_seconds, same_rule.source) == (3.0, "measured (row/rule)")  # median of 2, 4, 3
    assert same_row.source == "measured (row)" and same_row.epoch_seconds == 4.0  # median of 2, 4, 3, 5, 5
    own = est["2x800-tanh/dfa/seed1"]
    assert (own.action, own.epochs, own.source) == ("resume", 8, "measured (this run)")
    assert own.seconds == pytest.approx(8 * 5.0 * budget.OVERHEAD)
    row_file = est["1x800-tanh/bp/seed1"]
    assert (row_file.epoch_seconds, row_file.source) == (3.5, "row file estimate")


def test_hour_budget_picks_runs_in_table_order_on_the_first_free_slot():
    from feedalign.reproduce.budget import OVERHEAD, Estimate, describe, select

    def est(i: int, seconds: float | None) -> Estimate:
        run = rn.Run(f"row{i}", "bp", 1, Path(f"r{i}"), {"epoch": 1})
        return Estimate(run, "fresh", 10, None if seconds is None else seconds / 10 / OVERHEAD, "fixture")

    # 2 slots, 1 h: 2000 | 2000, then 1500 on slot 1 (ends 3500), 1700 would end 3700 on slot 2: left;
    # 500 still fits on slot 2 (ends 2500); an unestimated run is left
    runs = [est(1, 2000), est(2, 2000), est(3, 1500), est(4, 1700), est(5, 500), est(6, None)]
    chosen, left = select(runs, hours=1.0, jobs=2)
    assert [e.run.row for e in chosen] == ["row1", "row2", "row3", "row5"]
    assert [e.run.row for e in left] == ["row4", "row6"]
    chosen, left = select(runs, hours=1.0, jobs=1)  # one slot: 2000, (4000: left), 3500, then nothing fits
    assert [e.run.row for e in chosen] == ["row1", "row3"] and len(left) == 4
    text = describe(chosen, left, hours=1.0, jobs=1)
    assert "2 run(s) chosen" in text and "4 left for later" in text and "row6/bp/seed1" in text
    with pytest.raises(ValueError, match="--hours must be > 0"):
        select(runs, hours=0, jobs=1)


def test_cli_hours_runs_only_what_fits(tmp_path, monkeypatch, caplog):
    """--hours with the fake trainer: 1x800 rows are estimated at 3.5 s/epoch (row file)."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "out"
    # 3 epochs × 3.5 s × 1.1 = 11.55 s a run; 25 s with one job: two of the three rules fit
    args = build_parser().parse_args(["reproduce", "mnist", "--out", str(out), "--rows", "1x800-tanh",
                                      "--seeds", "1", "--epochs", "3", "--jobs", "1",
                                      "--hours", str(25 / 3600)])  # fmt: skip
    caplog.set_level("INFO")
    assert run_reproduce(args, trainer=[sys.executable, str(script)]) == 0
    started = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [a[a.index("-gradient") + 1] for a in started] == ["bp", "fa"]
    assert "2 run(s) chosen" in caplog.text and "1x800-tanh/dfa/seed1" in caplog.text.split("left:")[1]


def test_biotorch_suites_follow_their_protocol(tmp_path):
    from feedalign.models import NETWORKS
    from feedalign.rules import RULES

    published = {"biotorch-mnist": {"bp": 0.91, "fa": 1.7, "usf": 0.94, "brsf": 0.91, "frsf": 0.97,
                                    "dfa": 1.61},
                 "biotorch-fashion": {"bp": 9.2, "fa": 13.06, "usf": 9.69, "brsf": 10.02, "frsf": 9.61,
                                      "dfa": 12.81}}  # fmt: skip
    for suite, figures in published.items():
        (row,) = load_suite(suite)
        assert {rule: p["test"] for rule, p in row.published.items()} == figures
        assert all(p["verified"] and "Benchmarks.md" in p["source"] for p in row.published.values())
        assert set(row.rules) == set(figures) | {"kp", "drtp", "shallow"}
        assert (row.metric, row.seeds, row.epochs) == ("best", 1, 100)
        o = row.options
        assert (o["network"], o["resize"], o["lr_milestones"], o["lr_gamma"], o["batchSize"]) == (
            "lenet", 32, "50,75", 0.1, 64)  # fmt: skip
        sgd = (o["optimization"], o["momentum"], o["weightDecay"], o["criterion"])
        assert sgd == ("sgd", 0.9, 1e-3, "ce")
        runs = rn.plan([row], rules=None, seeds=None, out=tmp_path)
        assert [r.label for r in runs] == [f"lenet/{rule}/seed1" for rule in row.rules if rule in RULES]
        assert {r.rule: r.options["LR"] for r in runs if r.rule in ("bp", "dfa")} == {"bp": 0.1, "dfa": 0.01}
        # fa with BioTorch's xavier init at LR/10, drtp on tanh units (the row note says why)
        by_rule = {r.rule: r.options for r in runs}
        assert (by_rule["fa"]["init"], by_rule["fa"]["LR"]) == ("xavier", 0.01)
        assert (by_rule["drtp"]["nonlin"], by_rule["drtp"]["LR"]) == ("tanh", 0.1)
        assert "init" not in by_rule["bp"] and by_rule["bp"]["nonlin"] == "relu"
    (resnet,) = load_suite("biotorch-cifar10")
    assert {rule: p["test"] for rule, p in resnet.published.items()} == {
        "bp": 8.63, "fa": 32.16, "dfa": 45.94, "usf": 10.05, "brsf": 11.02, "frsf": 11.2}  # fmt: skip
    assert resnet.options_for("dfa")["LR"] == 0.01 and resnet.options_for("bp")["LR"] == 1.0
    if "resnet20" not in NETWORKS:
        assert rn.missing_networks([resnet]) == ["resnet20-sgd: resnet20"]


def test_runs_of_hyphenated_rules_group_under_their_row(tmp_path):
    """runs/<row>/<rule>/seed<k> with a rule such as predsim-bio is that row's run, not a row of its own."""
    fabricate(tmp_path / "runs" / "mnist-mlp" / "predsim-bio" / "seed1", epochs=2, rule="predsim-bio")
    fabricate(tmp_path / "runs" / "mnist-mlp" / "bp" / "seed1", epochs=2, rule="bp")
    groups = group_runs(find_runs(tmp_path))
    assert sorted((g.row, g.rule) for g in groups) == [("mnist-mlp", "bp"), ("mnist-mlp", "predsim-bio")]
