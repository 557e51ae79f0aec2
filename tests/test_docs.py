"""The repository documents itself: no reference points outside it, every relative
link in the docs resolves, the README opens with the two set-up commands, and the
option table of docs/original.md names every option. That every code block runs:
tests/test_docs_blocks.py."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(REPO).as_posix()

# Text files that can carry a reference (code, docs, the experiments' row files).
SUFFIXES = {".py", ".md", ".json", ".sh", ".toml", ".txt", ".cfg", ".yaml", ".yml"}
# Not part of the repository's content: VCS data, caches, and what runs write.
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "PreProcData", "Datasets",
             "build", "dist", ".venv", "venv"}  # fmt: skip
RUN_FOLDERS = ("reproduce-", "compare-")  # what `feedalign reproduce` and `compare` write by default

# Documents that exist only outside the repository; citing them points nowhere.
# Names of documents outside the repository, spelled in pieces so this file does not match itself
SECTION = " §"
OUTSIDE = ("STYLE" + SECTION, "ORIGINAL" + "_README", "../" + "shared/")


@functools.cache
def text_files() -> tuple[tuple[str, str], ...]:
    """(path relative to the repository, text) of every text file, this test excluded."""
    out = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(RUN_FOLDERS))
        for name in sorted(files):
            path = Path(folder) / name
            rel = path.relative_to(REPO).as_posix()
            if path.suffix in SUFFIXES and rel != THIS and path.is_file():
                out.append((rel, path.read_text(encoding="utf-8", errors="replace")))
    return tuple(out)


def hits(needle: str) -> set[tuple[str, str]]:
    return {(rel, needle) for rel, text in text_files() if needle in text}


def test_the_scan_sees_the_repository():
    names = {rel for rel, _ in text_files()}
    assert {"README.md", "docs/original.md", "feedalign/rules/dfa.py", "pyproject.toml"} <= names
    assert THIS not in names


@pytest.mark.parametrize("needle", OUTSIDE)
def test_nothing_points_outside_the_repository(needle):
    found = sorted(hits(needle))
    assert not found, f"{needle!r} names a document outside the repository: {found}"


def test_no_spec_references():
    found = sorted(rel for rel, _ in hits("SPEC" + SECTION))
    assert not found, f"'SPEC{SECTION}n' points outside the repository; write 'docs/original.md §n': {found}"


# --- links ------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return slug.replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # headings inside code are not headings
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:


def test_anchor_rule():
    assert _anchor("The run directory") == "the-run-directory"
    assert _anchor("8. Where feedalign departs, and why") == "8-where-feedalign-departs-and-why"
    assert _anchor("Training: `feedalign train`") == "training-feedalign-train"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor})")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{doc.relative_to(REPO)}: broken links {broken}"


# --- the README and the option table ----------------------------------------------

SETUP = (
    "pip install torch==2.13.0 -e . && feedalign compare\n"
    'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q\n'
)


def test_readme_opens_with_the_two_setup_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```[a-z]*\n(.*?)```", readme, flags=re.S)
    assert first_block is not None and first_block.group(1) == SETUP


def test_option_table_names_every_option():
    from feedalign.train.config import Options

    text = (REPO / "docs" / "original.md").read_text(encoding="utf-8")
    table = text[text.index("## 9. Options") :]
    rows = set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", table, flags=re.M))
    missing = sorted({f.name for f in dataclasses.fields(Options)} - rows)
    assert not missing, f"docs/original.md §9 lacks a row for {missing}"


def test_original_keeps_the_section_numbers_the_code_cites():
    text = (REPO / "docs" / "original.md").read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)]
    assert numbers == list(range(1, 10))
