"""The ingest job: every bad input skipped with its reason, report and summary, resume after a failure or a kill."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dompre import cli
from dompre.data import ingest as ingest_mod
from dompre.data.ingest import IngestRecipe, ingest_dicom
from dompre.data.prep import PrepConfig
from dompre.data.store import SliceStore
from dompre.synth.dicom import write_dicom_series

from _dicom_files import edit_dicom

SPACING = (2.0, 0.8, 0.8)
RECIPE = IngestRecipe(prep=PrepConfig(size=16, min_slices=6), shard_size=2)


def phantom(z: int = 9, y: int = 24, x: int = 24) -> np.ndarray:
    hu = np.full((z, y, x), -1000.0, np.float32)
    hu[:, 4:20, 5:19] = 10.0 * np.arange(z)[:, None, None]
    return hu


def good_series(root: Path, n: int = 2) -> None:
    for i in range(n):
        write_dicom_series(root / f"ok{i}", phantom(), spacing=SPACING, patient_id=f"OK{i}")


def bad_cohort(root: Path) -> dict[str, str]:
    """One series per bad case (PatientID = case); returns case -> expected reason fragment."""
    def series(name, z=9, **kw):
        return write_dicom_series(root / name, phantom(z=z), spacing=SPACING, patient_id=name, **kw)
    for f in series("mr"):
        edit_dicom(f, Modality="MR")
    for f in series("norescale", unsigned=True):
        edit_dicom(f, RescaleIntercept=None)
    dup = series("dup")
    shutil.copy(dup[3], root / "dup" / "IM0099.dcm")
    edit_dicom(root / "dup" / "IM0099.dcm", SOPInstanceUID=generate_uid())
    series("gap")[4].unlink()
    mixed = series("mixed")
    other = write_dicom_series(root / "scratch", phantom(y=16, x=16), spacing=SPACING, patient_id="mixed",
                               series_uid=pydicom.dcmread(mixed[0]).SeriesInstanceUID)
    shutil.copy(other[2], mixed[2])
    shutil.rmtree(root / "scratch")
    px = series("pixels")
    ds = pydicom.dcmread(px[5])
    ds.PixelData = ds.PixelData[:64]
    ds.save_as(px[5])
    trunc = series("trunc")
    trunc[6].write_bytes(trunc[6].read_bytes()[: trunc[6].stat().st_size * 2 // 3])
    series("single", z=1)
    series("short", z=4)
    (root / "junk").mkdir()
    (root / "junk" / "zero.dcm").write_bytes(b"")
    (root / "junk" / "README.txt").write_text("exported by a PACS\n" * 10)
    (root / "junk" / "head.dcm").write_bytes(mixed[0].read_bytes()[:100])
    return {"mr": "modality MR", "norescale": "missing RescaleSlope", "dup": "duplicated slice positions",
            "gap": "gap in z", "mixed": "mixed matrix sizes", "pixels": "gap in z",  # IM0006 skipped: short pixels
            "trunc": "gap in z", "single": "single-slice", "short": "too short: 4 slices < min_slices 6"}


def test_ingest_skips_each_bad_input_with_reason(tmp_path):
    good_series(tmp_path / "in")
    expected = bad_cohort(tmp_path / "in")
    summary = ingest_dicom(tmp_path / "in", tmp_path / "st", recipe=RECIPE, progress=False)
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    by_patient = {r["patient"]: r for r in report["series"]}
    for case, reason in expected.items():
        assert by_patient[case]["status"] == "skipped", case
        assert reason in by_patient[case]["reason"], (case, by_patient[case]["reason"])
    assert by_patient["OK0"]["status"] == by_patient["OK1"]["status"] == "ok"
    files = {Path(f["file"]).name: f["reason"] for f in report["files"]}
    assert files["zero.dcm"] == "zero-byte file"
    assert set(files) == {"zero.dcm", "README.txt", "head.dcm", "IM0006.dcm", "IM0007.dcm"}
    assert "fewer than the" in files["IM0006.dcm"] and "truncated" in files["IM0007.dcm"]
    assert summary["series_ok"] == 2 and summary["series_skipped"] == len(expected)
    assert summary["files_skipped"] == 5 and summary["inputs"] == 6 and summary["slices"] == 18
    assert summary["skip_reasons"]["too short"] == 1
    st = SliceStore(tmp_path / "st")
    assert len(st) == 6
    m = st.meta[st.meta["patient"] == "OK0"]
    np.testing.assert_allclose(sorted(m["z"]), [2.0, 8.0, 14.0])   # middle slices 1, 4, 7 at 2 mm
    assert m["file"].iloc[0].startswith("ok0/IM000") and m["spacing"].iloc[0] == pytest.approx(SPACING)
    assert (m["source"] == "dicom").all() and m["window"].iloc[0] == (-1024.0, 3071.0)
    img = st[int(m.index[0])]
    body = np.rint((np.array([0.0, 10.0, 20.0]) + 1024) / 4095 * 255)   # slices 0..2 hold 0, 10, 20 HU
    np.testing.assert_array_equal(img[:, 8, 8], body)                   # the body fills the crop's centre
    assert img.shape == (3, 16, 16) and img[:, 0, 0].max() < 5           # only the air margin is dark


def test_failure_mid_run_then_rerun_is_exactly_once(tmp_path, monkeypatch):
    good_series(tmp_path / "in", n=4)
    ingest_dicom(tmp_path / "in", tmp_path / "ref", recipe=RECIPE, progress=False)
    real, calls = ingest_mod.process_series, []

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(ingest_mod, "process_series", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        ingest_dicom(tmp_path / "in", tmp_path / "st", recipe=RECIPE, progress=False)
    assert len(SliceStore(tmp_path / "st").units) == 2
    monkeypatch.setattr(ingest_mod, "process_series", real)
    summary = ingest_dicom(tmp_path / "in", tmp_path / "st", recipe=RECIPE, progress=False)
    assert summary["resumed_series"] == 2 and summary["series_ok"] == 4
    _assert_same_store(tmp_path / "st", tmp_path / "ref")


def _assert_same_store(a: Path, b: Path) -> None:
    """Same items in the same order: the order depends on neither the workers nor a kill and resume."""
    sa, sb = SliceStore(a), SliceStore(b)
    assert len(sa) == len(sb)
    key = ["series_uid", "z"]
    assert not sa.meta.duplicated(key).any()
    np.testing.assert_array_equal(sa.meta[key].to_numpy(), sb.meta[key].to_numpy())
    np.testing.assert_array_equal(sa.images(np.arange(len(sa))), sb.images(np.arange(len(sb))))


SLOW_CHILD = """
import sys, time
from dompre.data import ingest
real = ingest.process_series
def slow(*a):
    time.sleep(0.2)
    return real(*a)
ingest.process_series = slow
from dompre import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_with_two_workers(tmp_path):
    good_series(tmp_path / "in", n=6)
    (tmp_path / "r.yaml").write_text("prep: {size: 16, min_slices: 6}\nshard_size: 1\n")
    args = ["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--workers", "2",
            "--recipe", str(tmp_path / "r.yaml"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args], env=env, start_new_session=True)
    manifest = tmp_path / "st" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if manifest.is_file() and SliceStore(tmp_path / "st").units:
            break
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)   # the job and its workers, as an OOM killer or a node loss would
    assert child.wait() == -signal.SIGKILL
    done_at_kill = len(SliceStore(tmp_path / "st").units)
    assert 1 <= done_at_kill < 6
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    assert report["summary"]["resumed_series"] == done_at_kill
    ingest_dicom(tmp_path / "in", tmp_path / "ref", recipe=RECIPE, progress=False)
    _assert_same_store(tmp_path / "st", tmp_path / "ref")


def test_cli_bad_configuration_stops_with_clear_message(tmp_path, capsys):
    good_series(tmp_path / "in", n=1)
    (tmp_path / "afile").write_text("x")
    cases = [
        (["ingest", "dicom", str(tmp_path / "missing"), str(tmp_path / "st")], "does not exist"),
        (["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "afile" / "st")], "not writable"),
        (["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--workers", "0"], "workers = 0 must be an integer >= 1"),
        (["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--set", "prep.sise=3"], "prep.sise"),
        (["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--set", "prep.stride=0"], "stride"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error" in err and message in err, (argv, err)
    assert not (tmp_path / "st" / "manifest.json").exists()
    ok = ["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--set", "prep.min_slices=6",
          "--set", "prep.size=16", "--no-progress"]
    assert cli.main(ok) == 0
    assert "1 series ok, 0 skipped" in capsys.readouterr().out
    assert cli.main(ok[:-5] + ["--no-progress"]) == 2     # same store, other settings: refused
    assert "use a new STORE_DIR" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_kill_9_of_the_main_process_ends_its_workers(tmp_path):
    """Item 10 of issue 15: kill -9 of the ingest process (not its group) left both pool workers running."""
    good_series(tmp_path / "in", n=6)
    args = ["ingest", "dicom", str(tmp_path / "in"), str(tmp_path / "st"), "--workers", "2",
            "--set", "prep.size=16", "--set", "prep.min_slices=6", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args], env=env, start_new_session=True)
    try:
        deadline, workers = time.time() + 120, []
        while time.time() < deadline and child.poll() is None and len(workers) < 2:
            workers = [w for w in _children(child.pid) if _alive(w)]
            time.sleep(0.05)
        assert len(workers) >= 2, "the pool workers never started"
        time.sleep(0.5)
        os.kill(child.pid, signal.SIGKILL)                 # the main process only
        assert child.wait() == -signal.SIGKILL
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "pool workers outlived the killed ingest"
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_empty_input_folder_is_an_error_and_dropped_copies_are_reported(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["ingest", "dicom", str(tmp_path / "empty"), str(tmp_path / "st0"), "--no-progress"]) == 2
    assert "holds no files" in capsys.readouterr().err
    good_series(tmp_path / "in", n=1)
    shutil.copy(tmp_path / "in" / "ok0" / "IM0003.dcm", tmp_path / "in" / "ok0" / "A_copy.dcm")
    summary = ingest_dicom(tmp_path / "in", tmp_path / "st", recipe=RECIPE, progress=False)
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    assert summary["series_ok"] == 1 and summary["files_dropped"] == 1
    (row,) = [f for f in report["files"] if f["status"] == "dropped"]
    assert row["file"] in ("ok0/A_copy.dcm", "ok0/IM0003.dcm") and "identical copy" in row["reason"]
