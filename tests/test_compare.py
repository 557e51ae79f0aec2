"""`feedalign compare`: rules side by side, a table and a plot; the seed repeats the figures;
the same command again reuses finished runs; another recipe in the folder is refused."""

from __future__ import annotations

import re

import pytest

from feedalign.cli import EXIT_DIVERGED, EXIT_USAGE, main
from feedalign.reproduce.compare import RECIPE, RULES

TINY = ["--rules", "bp", "dfa", "shallow", "-epoch", "3", "-num_hidden", "16"]


def compare(tmp_path, out: str, *extra: str) -> list[str]:
    return ["compare", "--out", str(tmp_path / out), "-datapath", str(tmp_path / "D"),
            "-preProcDir", str(tmp_path / "P"), *TINY, *extra]  # fmt: skip


def table_rows(text: str) -> dict[str, str]:
    """rule -> its row of the printed table (the figures, not the time)."""
    lines = text[text.index("rule  ") :].splitlines()[1:]
    return {line.split()[0]: " ".join(line.split()[1:-2]) for line in lines if re.match(r"^\w+ +\d", line)}


def test_the_demo_recipe_names_every_default_rule():
    assert RECIPE["dataset"] == "digits" and RECIPE["seed"] == 1
    assert RULES[:3] == ("bp", "fa", "usf") and "dfa" in RULES and RULES[-1] == "shallow"


def test_rules_side_by_side_table_plot_and_the_seed_repeats_them(tmp_path, capsys):
    assert main(compare(tmp_path, "a")) == 0
    first = capsys.readouterr().out
    assert first.startswith(
        "digits: 3 rules side by side (bp, dfa, shallow), mlp 2×16 tanh, 3 epochs, 1 thread(s); seed 1 "
    )
    rows = table_rows(first)
    assert list(rows) == ["bp", "dfa", "shallow"] and all("%" in r for r in rows.values())
    out = tmp_path / "a"
    assert (out / "errors.png").stat().st_size > 0 and "| dfa |" in (out / "table.md").read_text()
    assert all((out / rule / "seed1" / "finished.json").exists() for rule in rows)
    assert main(compare(tmp_path, "b")) == 0  # another folder, the same seed: the same figures
    assert table_rows(capsys.readouterr().out) == rows


def test_the_same_command_reuses_and_another_recipe_is_refused(tmp_path, capsys, caplog):
    assert main(compare(tmp_path, "a")) == 0
    metrics = tmp_path / "a" / "bp" / "seed1" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert main(compare(tmp_path, "a")) == 0
    assert capsys.readouterr().out.count("(reused)") == 3 and metrics.stat().st_mtime_ns == before
    assert main(compare(tmp_path, "a", "-LR", "0.01")) == EXIT_USAGE
    assert "holds a run of another recipe (-LR 0.001 there, 0.01 now)" in caplog.text


def test_a_larger_budget_continues_the_runs_there(tmp_path, capsys):
    assert main(compare(tmp_path, "a", "--rules", "bp")) == 0
    metrics = tmp_path / "a" / "bp" / "seed1" / "metrics.jsonl"
    first = metrics.read_text()
    capsys.readouterr()
    assert main(compare(tmp_path, "a", "--rules", "bp", "-epoch", "5")) == 0
    text = capsys.readouterr().out
    assert "after 5 epochs" in text and "(reused)" not in text
    after = metrics.read_text()
    assert after.startswith(first) and len(after.splitlines()) == 5  # epochs 1-3 kept, 4-5 added


@pytest.mark.parametrize(
    "bad, said",
    [(["-gradient", "fa"], "-gradient (use --rules)"), (["-save", "x"], "-save (use --out)"),
     (["--rules", "dfa", "bp", "-error_at", "output"], "-error_at output only applies to -gradient dfa"),
     (["-num_hidden", "0"], "num_hidden")],
)  # fmt: skip
def test_a_bad_option_is_refused_before_any_rule_trains(tmp_path, caplog, bad, said):
    assert main(compare(tmp_path, "a", *bad)) == EXIT_USAGE
    assert said in caplog.text and not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exc:
        main(compare(tmp_path, "a", "--rules", "bp", "nosuchrule"))
    assert exc.value.code == EXIT_USAGE and not (tmp_path / "a").exists()


def test_a_rule_that_fails_is_reported_and_the_others_go_on(tmp_path, capsys, monkeypatch):
    import feedalign.train.session as session
    from feedalign.train.loop import Diverged

    real = session.train

    def train(opts, **kw):
        if opts.gradient == "dfa":
            raise Diverged("loss nan at batch 1")
        return real(opts, **kw)

    monkeypatch.setattr(session, "train", train)
    assert main(compare(tmp_path, "a")) == EXIT_DIVERGED
    text = capsys.readouterr().out
    assert "dfa: failed (exit 3) after 0 epoch(s)" in text and set(table_rows(text)) == {"bp", "shallow"}


def test_compare_help_shows_the_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "-num_hidden 64" in text and "--rules" in text and "-gradient" not in text
