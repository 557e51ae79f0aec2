"""Every code block of README.md, docs/*.md and results/*/README.md runs as written.

Each fenced block names its language:

- ```python blocks are executed, each in a fresh namespace, on one torch thread, in a scratch
  folder. A comment after `print(...)` that is a Python literal is what that line prints, and
  is checked. A block that imports a package which is not installed is skipped, naming it.
- ```bash blocks are read line by line (`\\` continues a line, `#` starts a comment, `&&`
  chains commands). Every `feedalign` command is parsed by feedalign's own command line and
  its options are checked; then the page's commands run in order, in-process, in one scratch
  folder per page (a later command may use an earlier one's run directory), where
  ./Datasets is the real datasets' folder (conftest.SHARED_DATA, when present) and ./results
  a copy of the repository's results/. Other programs are in OTHER_PROGRAMS, each with the
  reason it does not run here.
- ```text blocks are not code: layouts, file formats, printed output.

A command runs as written except for SHORTER, options appended to it (later options win):
one CPU thread, and the fewest iterations, epochs or runs that still exercise it. A command
that would still take minutes, or needs the network, GPUs or an absent dataset, is parsed
and checked but not run: `why_not_run` gives the reason, and `pytest -rs` lists them.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import re
import shlex
import shutil
import sys
import tokenize
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "results").glob("*/README.md")),
]
LANGUAGES = ("python", "bash", "text")

# Appended to a command before it runs: the same command, made short.
SHORTER = {
    "train": ["-threads", "1"],  # image data: only digits runs here (why_not_run), in seconds
    "train text": ["-iterations", "20", "-eval_every", "10", "-eval_windows", "32", "-threads", "1"],
    "compare": ["-epoch", "2", "-threads", "1"],
    "reproduce": ["--dry-run"],  # the runs' commands, every option checked; hours less
}
# Programs other than feedalign, by the words they start with: why they do not run here.
OTHER_PROGRAMS = {
    ("pip",): "installs packages: .ci/run runs the README's set-up commands in a fresh environment",
    ("python", "-m", "pytest"): "the test suite itself, this test among them",
    ("torchrun",): "starts several processes (tests/test_dist.py runs data parallelism)",
}
IMAGE_DATA_HERE = {"digits"}  # bundled and small: one epoch takes a fraction of a second


@dataclasses.dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    page = path.relative_to(REPO).as_posix()
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in re.finditer(r"^```(\S*)\n(.*?)^```\s*$", text, flags=re.M | re.S)
    ]


ALL = [b for p in PAGES for b in blocks(p)]
PYTHON = [b for b in ALL if b.language == "python"]


# --- commands -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def commands(block: Block) -> list[Command]:
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(Command(block.where, tuple(words[:cut])))
            words = words[cut + 1 :]
    return out


def page_commands(page: str) -> list[Command]:
    return [c for b in ALL if b.page == page and b.language == "bash" for c in commands(b)]


BASH_PAGES = sorted({b.page for b in ALL if b.language == "bash"})
COMMANDS = [c for page in BASH_PAGES for c in page_commands(page)]


def feedalign_argv(argv: tuple[str, ...]) -> list[str] | None:
    """The feedalign arguments of a command (`feedalign ...`, `torchrun ... -m feedalign ...`)."""
    if argv[0] == "feedalign":
        return list(argv[1:])
    for i in range(len(argv) - 1):
        if argv[i : i + 2] == ("-m", "feedalign"):
            return list(argv[i + 2 :])
    return None


def parse(args: list[str]):
    """feedalign's own parser on `args`, and for `train` the option checks; fails the test on error."""
    from feedalign.cli import build_parser
    from feedalign.train.cli import options_from_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed = build_parser(args[0]).parse_args(args)
    except SystemExit:
        pytest.fail(f"feedalign {shlex.join(args)}: the command line refuses it: {err.getvalue().strip()}")
    if args[0] == "train" and not parsed.resume:
        options_from_args(parsed).check()
    return parsed


def dataset_folder(name: str) -> Path | None:
    """Where the scratch folder's ./Datasets holds `name`; None for a bundled dataset or a text path."""
    from feedalign.data.registry import get_dataset

    if "/" in name or name.endswith(".txt"):
        return None
    info = get_dataset(name)
    return SHARED_DATA / info.folder if info.remotes else None


def run_options(command: str, parsed):
    """The options a fresh `train` or `compare` run would use (compare: its recipe under them)."""
    from feedalign.train.cli import options_from_args
    from feedalign.train.config import Options

    if command == "train":
        return options_from_args(parsed)
    from feedalign.reproduce.compare import RECIPE

    given = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(Options) if hasattr(parsed, f.name)}
    return Options(**(RECIPE | given))


def why_not_run(command: Command, skipped_runs: set[str]) -> str | None:
    """Why a command is only parsed and checked, not run; None: it runs (with SHORTER)."""
    args = feedalign_argv(command.argv)
    parsed = parse(args) if args else None  # torchrun's feedalign arguments too
    for start, reason in OTHER_PROGRAMS.items():
        if command.argv[: len(start)] == start:
            return reason
    if args is None:
        return None  # a program nobody listed: run_command fails on it
    run_dir = getattr(parsed, "resume", None) or getattr(parsed, "run_dir", None)  # train, eval, sample
    if run_dir and str(run_dir) in skipped_runs:
        return f"uses {run_dir}, which a command skipped above would have written"
    if args[0] == "download":
        return "fetches files from the network"
    if args[0] == "reproduce" and parsed.export and not parsed.report_only:
        return "a reproduction that exports its runs (hours; --dry-run refuses --export)"
    if args[0] in ("train", "compare") and not getattr(parsed, "resume", None):
        opts = run_options(args[0], parsed)
        folder = dataset_folder(opts.dataset)
        reason = None
        if opts.nGPU > max(1, torch.cuda.device_count()) or (
            opts.type == "cuda" and not torch.cuda.is_available()
        ):
            reason = f"needs {max(1, opts.nGPU)} GPU(s)"
        elif folder is not None and not folder.is_dir():
            reason = f"dataset {opts.dataset} absent at {folder} (set FEEDALIGN_SHARED_DATA)"
        elif not opts.text and opts.dataset.lower() not in IMAGE_DATA_HERE:
            reason = f"trains on {opts.dataset}: minutes per epoch on a CPU"
        if reason:
            skipped_runs.add(str(opts.save))
            return reason
    return None


def shortened(args: list[str]) -> list[str]:
    if args[0] == "reproduce":
        return args if ("--dry-run" in args or "--report-only" in args) else args + SHORTER["reproduce"]
    if args[0] == "train":
        from feedalign.train.cli import options_from_args

        parsed = parse(args)
        text = not parsed.resume and options_from_args(parsed).text
        return args + SHORTER["train text" if text else "train"]
    return args + SHORTER.get(args[0], [])


def run_command(command: Command) -> str:
    """Run a feedalign command in-process in the current folder; its stdout, or the test fails."""
    from feedalign.cli import main

    args = feedalign_argv(command.argv)
    if args is None:
        pytest.fail(f"{command.where}: `{command.text}`: not feedalign: list it in OTHER_PROGRAMS")
    args = shortened(args)
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # eval and sample have no -threads; train's SHORTER gives one
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        torch.set_num_threads(threads)
    if code != 0:
        pytest.fail(
            f"{command.where}: `feedalign {shlex.join(args)}` exited {code}:\n{err.getvalue()[-2000:]}"
        )
    return out.getvalue()


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """An empty working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def reader_folder(scratch) -> Path:
    """A working folder as a reader's: ./Datasets (the real datasets, when present), ./results."""
    if SHARED_DATA.is_dir():
        (scratch / "Datasets").symlink_to(SHARED_DATA, target_is_directory=True)
    shutil.copytree(REPO / "results", scratch / "results")
    return scratch


def plan(page: str) -> list[tuple[Command, str | None, str | None]]:
    """The page's commands in order, each with why it is not run (None: it runs) and why it
    is refused (None: it parses and passes the checks)."""
    skipped_runs: set[str] = set()
    out = []
    for command in page_commands(page):
        try:
            out.append((command, why_not_run(command, skipped_runs), None))
        except (pytest.fail.Exception, ValueError) as err:  # the parser's refusal, an option check's
            out.append((command, None, f"{command.where}: {err}"))
    return out


PAGE_COMMANDS = [(page, i) for page in BASH_PAGES for i in range(len(page_commands(page)))]


@pytest.mark.parametrize(("page", "i"), PAGE_COMMANDS, ids=lambda x: str(x))
def test_command_parses_or_says_why_not(page, i):
    """Each command is parsed and checked; those that do not run here are skipped with the reason."""
    _, reason, refused = plan(page)[i]  # the commands before it decide whether its run directory exists
    if refused:
        pytest.fail(refused)
    if reason:
        pytest.skip(f"not run: {reason}")


@pytest.mark.slow
@pytest.mark.parametrize("page", BASH_PAGES)
def test_the_page_commands_run_in_order(page, reader_folder, capsys):
    ran = 0
    for command, reason, refused in plan(page):
        assert refused is None, refused
        if reason is None:
            run_command(command)
            ran += 1
    if not ran:
        pytest.skip(f"{page}: every command is skipped (test_command_parses_or_says_why_not says why)")


# --- python ---------------------------------------------------------------------------


def missing_modules(code: str) -> list[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def promised_outputs(code: str) -> dict[int, str]:
    """Line → what it prints, from `print(...)  # <a Python literal>` (str of the literal)."""
    promised = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = code.splitlines()[tok.start[0] - 1]
        if not line.lstrip().startswith("print("):
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            promised[tok.start[0]] = str(ast.literal_eval(tok.string[1:].strip()))
    return promised


def run_python(block: Block) -> None:
    """Execute a block; each `print(...)  # literal` must print that literal."""
    name = f"{block.where} (python)"
    printed: dict[int, list[str]] = {}

    def recording_print(*args, **kwargs):
        buf = io.StringIO()
        print(*args, **{**kwargs, "file": buf})
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name:
            printed.setdefault(frame.f_lineno, []).append(buf.getvalue().rstrip("\n"))
        print(buf.getvalue(), end="")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block.code, name, "exec"), {"__name__": "__doc__", "print": recording_print})
    finally:
        torch.set_num_threads(threads)
    for line, expected in promised_outputs(block.code).items():
        got = printed.get(line)
        assert got, f"{block.where}, block line {line}: promises {expected!r} but never printed"
        assert all(g == expected for g in got), (
            f"{block.where}, block line {line}: promises {expected!r}, printed {got}"
        )


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_python_block_runs(block, scratch, capsys):
    missing = missing_modules(block.code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (not installed)")
    run_python(block)


# --- the pages themselves and the test's own teeth -------------------------------------


def test_every_block_names_its_language():
    unnamed = [f"{b.where} ({b.language or 'none'})" for b in ALL if b.language not in LANGUAGES]
    assert not unnamed, f"fenced blocks must be one of {LANGUAGES}: {unnamed}"
    assert len(PYTHON) >= 10 and len(COMMANDS) >= 20, "the extraction finds too few blocks"


def test_no_command_hides_in_an_indented_block():
    """An indented code block is not run by this test: commands belong in ```bash blocks."""
    found = []
    for path in PAGES:
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
        lines = re.finditer(r"^ {4,}(feedalign|pip|python|torchrun) .*$", text, flags=re.M)
        found += [f"{path.name}: {m.group(0).strip()}" for m in lines]
    assert not found, f"commands in indented blocks (fence them as ```bash): {found}"


def test_a_broken_block_fails(scratch):
    def fails(call) -> bool:
        try:
            call()
        except (pytest.fail.Exception, AssertionError, NameError, TypeError):
            return True
        return False

    assert fails(
        lambda: run_python(Block("x.md", 1, "python", "import feedalign\nfeedalign.convert(model, 'fa')\n"))
    )
    assert fails(lambda: run_python(Block("x.md", 1, "python", "print([1, 2])  # [1, 3]\n")))
    assert not fails(lambda: run_python(Block("x.md", 1, "python", "print([1, 2])  # [1, 2]\n")))
    taken_literally = commands(Block("x.md", 1, "bash", "feedalign eval runs/x [--split train]\n"))[0]
    assert fails(lambda: why_not_run(taken_literally, set()))
    assert fails(lambda: run_command(Command("x.md:1", ("feedalign", "eval", "runs/none"))))
    assert fails(lambda: run_command(Command("x.md:1", ("make", "all"))))
