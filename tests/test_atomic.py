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


def test_staged_directory_builds_under_the_final_name(tmp_path):
    # a model card's title and recorded paths read the folder's name while it is being built
    target = tmp_path / "my-variant"
    with staged_directory(target) as staging:
        assert staging.name == "my-variant" and staging.is_dir() and not any(staging.iterdir())
        assert staging.parent.parent == tmp_path and staging.parent.name.startswith(".my-variant.")
    assert [p.name for p in tmp_path.iterdir()] == ["my-variant"]
