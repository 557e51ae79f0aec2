"""docs/language.md runs as written: every Python block is executed; every `feedalign`
command of its shell blocks is parsed by the command line and passes the option checks
(none is run: the recipe trains for minutes, the download needs the network)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from feedalign.cli import build_parser
from feedalign.train.cli import options_from_args

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
TEXT = DOC.read_text(encoding="utf-8")
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
COMMANDS = [c for b in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S) for c in [b.replace("\\\n", " ")]]


def test_the_doc_has_its_examples():
    assert len(PYTHON) == 2 and len(COMMANDS) == 4


@pytest.mark.parametrize("index", range(2))
def test_python_blocks_run(index, capsys):
    if "transformers" in PYTHON[index]:
        pytest.importorskip("transformers")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(PYTHON[index], f"docs/language.md example {index}", "exec"), {"__name__": "__doc__"})
    finally:
        torch.set_num_threads(old)
    assert capsys.readouterr().out


@pytest.mark.parametrize("index", range(4))
def test_commands_parse_and_pass_the_checks(index, tmp_path, monkeypatch):
    argv = shlex.split(COMMANDS[index])
    assert argv[0] == "feedalign"
    args = build_parser(argv[1]).parse_args(argv[1:])
    if argv[1] == "train":
        opts = options_from_args(args).check()
        assert opts.text and opts.iterations == 2000
