"""write_atomically: a file is replaced whole or not at all, and no temporary file is left behind."""

import numpy as np
import pytest

from ldm_pipeline.files import write_atomically


def test_the_new_content_replaces_the_old_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    assert write_atomically(path, lambda tmp: tmp.write_text("new")) == path
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_writer_that_fails_half_way_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_the_temporary_name_keeps_the_suffix_for_writers_that_choose_the_format_by_it(tmp_path):
    path = tmp_path / "new" / "folder" / "cache.npz"  # missing folders are made
    seen = []

    def save(tmp):
        seen.append(tmp)
        np.savez(tmp, a=np.arange(3))  # would append ".npz" to a name without it

    write_atomically(path, save)
    assert seen[0].suffix == ".npz" and seen[0].name.startswith(".cache.npz.") and seen[0].parent == path.parent
    with np.load(path) as stored:
        assert stored["a"].tolist() == [0, 1, 2]
    assert [p.name for p in path.parent.iterdir()] == ["cache.npz"]
