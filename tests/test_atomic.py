"""Atomic folder writes: the target changes only once the whole new folder is written."""

from __future__ import annotations

import pytest

from hf_optim.core.atomic import staged_directory


def test_staged_directory_replaces_the_target_only_on_success(tmp_path):
    target = tmp_path / "out"
    with staged_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), staged_directory(target) as staging:
        (staging / "a.txt").write_text("half-written")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "first"

    with staged_directory(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left behind
