"""feedalign.files: atomic writes and no-follow appends."""

import os

import pytest

from feedalign.files import append_line, atomic_write, atomic_write_text, write_if_changed


def test_atomic_write_replaces_a_planted_symlink_not_its_target(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "options.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_append_line_refuses_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("x\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError):
        append_line(link, "{}")
    assert target.read_text() == "x\n"
    plain = tmp_path / "log"
    append_line(plain, "a")
    append_line(plain, "b\n")
    assert plain.read_text() == "a\nb\n"
    assert os.stat(plain).st_size == 4


def test_write_if_changed_writes_only_new_content(tmp_path):
    path = tmp_path / "f.txt"
    assert write_if_changed(path, b"a 1") and path.read_bytes() == b"a 1"
    assert not write_if_changed(path, b"a 1")
    same_letter = lambda old, new: old[:1] == new[:1]  # noqa: E731
    assert not write_if_changed(path, b"a 2", same=same_letter) and path.read_bytes() == b"a 1"
    assert write_if_changed(path, b"b 2", same=same_letter) and path.read_bytes() == b"b 2"
    target = tmp_path / "target"
    target.write_bytes(b"b 2")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert write_if_changed(link, b"b 2") and not link.is_symlink() and target.read_bytes() == b"b 2"
