"""`atomic_dir`: the folder appears whole when the block succeeds, and not at all otherwise."""

from pathlib import Path

import pytest

from captioning.fsutil import atomic_dir


def test_success_renames_the_filled_folder(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "splits"  # the parent does not exist yet
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "data.txt").write_text("all of it")
    assert (target / "data.txt").read_text() == "all of it"
    assert sorted(p.name for p in target.parent.iterdir()) == ["splits"]  # no temporary left


def test_error_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "splits"
    with pytest.raises(RuntimeError, match="half-way"), atomic_dir(target) as tmp:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []


def test_second_writer_keeps_the_first_copy(tmp_path: Path) -> None:
    target = tmp_path / "splits"
    with atomic_dir(target) as first:
        with atomic_dir(target) as second:
            (second / "data.txt").write_text("second")
        (first / "data.txt").write_text("first")
    assert (target / "data.txt").read_text() == "second"  # finished first, so it stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits"]
