"""Atomic writes: the file appears whole or not at all, and a failed write raises."""
import pytest

from dompre._io import write_atomic


def test_write_atomic_writes_text_and_bytes(tmp_path):
    write_atomic(tmp_path / "a.json", '{"x": 1}')
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.json").read_text() == '{"x": 1}' and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporary left


def test_failed_write_raises_and_leaves_nothing(tmp_path):
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "keep.json", 123)  # type: ignore[arg-type]
    assert (tmp_path / "keep.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]
