"""The command line's help reads: `feedalign --help` lists each command in one line;
`feedalign train --help` names every rule and groups the options as docs/original.md §9's
table (model, learning rule, optimisation, data, run, platform), each default stated once."""

from __future__ import annotations

import dataclasses
import re

import pytest

from feedalign.cli import SUBCOMMANDS, build_parser
from feedalign.rules import RULES
from feedalign.train.cli import GROUPS, OTHER, grouped_fields
from feedalign.train.config import Options


def help_text(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as stop:
        build_parser(argv[0] if argv else None).parse_args([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_every_option_is_in_exactly_one_group():
    named = [n for names in GROUPS.values() for n in names]
    fields = {f.name for f in dataclasses.fields(Options)}
    assert len(named) == len(set(named)), "an option is in two groups"
    assert not set(named) - fields, f"GROUPS names options that do not exist: {set(named) - fields}"
    assert not grouped_fields()[OTHER], (
        f"add {[f.name for f in grouped_fields()[OTHER]]} to a group of GROUPS in feedalign/train/cli.py"
    )
    assert [t.split()[0].rstrip(":") for t in GROUPS] == ["model", "learning", "optimisation", "data", "run",
                                                           "platform"]  # fmt: skip


def test_top_level_help_lists_each_command_in_one_line(capsys, monkeypatch):
    text = help_text([], capsys, monkeypatch)
    for command in SUBCOMMANDS:
        line = next(x for x in text.splitlines() if re.match(rf"^    {command}\s", x))
        nxt = text.splitlines()[text.splitlines().index(line) + 1]
        assert len(line.split(maxsplit=1)) == 2 and not nxt.startswith(" " * 24), f"{command}: {line!r}"
    assert all(rule in text for rule in RULES)


def test_train_help_groups_options_names_every_rule_and_states_each_default_once(capsys, monkeypatch):
    text = help_text(["train"], capsys, monkeypatch)
    description = text[: text.index("\noptions:")]
    for rule in RULES:
        assert re.search(rf"(?<![\w-]){re.escape(rule)}(?![\w-])", description), (
            f"{rule} not in the description"
        )
    headers = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [h for h in headers if h in GROUPS] == list(GROUPS)
    for title, fields in grouped_fields().items():
        if not fields:
            continue
        section = text[text.index(f"\n{title}:\n") :]
        section = section[: section.index("\n\n", 1)]
        for f in fields:
            assert f"  -{f.name} " in section, f"-{f.name} is not under {title!r}"
    for f in dataclasses.fields(Options):
        assert "(default" not in f.metadata["help"], f"-{f.name}'s help states its default itself"
    actions = build_parser("train")._subparsers._group_actions[0].choices["train"]._actions
    for action in actions:
        if action.dest in {f.name for f in dataclasses.fields(Options)}:
            assert action.help.count("(default:") == 1, action.help
