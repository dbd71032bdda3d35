"""Atomic writes: the file appears whole or not at all, and a failed write raises."""
import os

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


def test_atomic_open_streams_and_commits_on_success(tmp_path):
    from dompre._io import atomic_open
    with atomic_open(tmp_path / "rows.csv", "w") as f:
        f.write("a,b\n")
        assert not (tmp_path / "rows.csv").exists()  # invisible until the block ends
        f.write("1,2\n")
    assert (tmp_path / "rows.csv").read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]


def test_atomic_open_failure_and_abort_leave_the_old_file(tmp_path):
    from dompre._io import atomic_open
    (tmp_path / "x.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "x.bin") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    held = atomic_open(tmp_path / "x.bin")  # held open across calls, as a store's shard is
    held.file.write(b"new")
    held.abort()
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_written_files_get_the_permissions_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", "{}")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644


def test_fsync_can_be_skipped_for_cheap_files(tmp_path, monkeypatch):
    from dompre._io import atomic_open
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    with atomic_open(tmp_path / "slice.dcm", fsync=False) as f:
        f.write(b"x")
    assert synced == [] and (tmp_path / "slice.dcm").read_bytes() == b"x"
    with atomic_open(tmp_path / "cohort.json") as f:
        f.write(b"{}")
    assert len(synced) == 1
