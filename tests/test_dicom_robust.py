"""Untrusted DICOM: every probe of issue 15 gives a reason (scan) or SeriesError (read), never another
exception, a hang or an allocation the file's size does not back; values that would store garbage are refused."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dompre.data import dicom_header as dh
from dompre.data.dicom import SeriesError, read_series, scan_file, scan_tree
from dompre.synth.dicom import write_dicom_series

from _dicom_files import edit_dicom

SPACING = (2.5, 0.75, 0.75)
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"


def _series(folder: Path, z: int = 4, **kw) -> list[Path]:
    hu = np.full((z, 24, 24), -1000.0, np.float32)
    hu[:, 4:20, 5:19] = 10.0 * np.arange(z)[:, None, None]
    return write_dicom_series(folder, hu, spacing=SPACING, **kw)


def _element_at(raw: bytes, tag: int) -> int:
    """Byte offset of an Explicit VR Little Endian element's tag in ``raw``."""
    return raw.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF))


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_every_cut_of_a_file_is_a_reason_not_an_exception(tmp_path):
    """Item 1: a file cut at any byte (152 gave struct.error) is skipped with a reason or is whole."""
    for src in (_series(tmp_path / "s", z=2)[0], CT_SMALL):
        raw = src.read_bytes()
        end = scan_file(src)[0].native[0] + 2 * 128 * 128 if src == CT_SMALL else len(raw)  # CT_small: then a tail
        for n in list(range(1, 600)) + list(range(600, end, 97)):
            f = tmp_path / "cut.dcm"
            f.write_bytes(raw[:n])
            header, reason = scan_file(f)
            assert header is None and reason, (src.name, n)
        assert scan_file(src)[0] is not None


def test_malformed_meta_vr_and_deep_nesting_give_reasons(tmp_path):
    f = _series(tmp_path / "s", z=2)[0]
    raw = bytearray(f.read_bytes())
    bad = tmp_path / "bad.dcm"
    gl = _element_at(raw, 0x00020000)
    bad.write_bytes(bytes(raw[:gl + 8]) + struct.pack("<I", 3)[:2] + bytes(raw[gl + 10:]))  # meta length field 3
    header, reason = scan_file(bad)
    assert (header is None) == bool(reason)
    bad.write_bytes(bytes(raw[:gl + 8]) + struct.pack("<I", 3) + bytes(raw[gl + 12:]))  # its value 3
    header, reason = scan_file(bad)
    assert (header is None) == bool(reason)
    mod = _element_at(raw, 0x00080060)                            # Modality's VR CS -> SQ
    bad.write_bytes(bytes(raw[:mod + 4]) + b"SQ" + bytes(raw[mod + 6:]))
    header, reason = scan_file(bad)
    assert (header is None) == bool(reason)
    # undefined-length sequences nested 1,000 deep before the pixel data (RecursionError before)
    at = _element_at(raw, 0x7FE00010)
    nest = (struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                          0xFFFFFFFF))
    tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    bad.write_bytes(bytes(raw[:at]) + nest * 1000 + tail * 1000 + bytes(raw[at:]))
    header, reason = scan_file(bad)
    assert (header is None) == bool(reason)
    for depth in (10, 40):
        bad.write_bytes(bytes(raw[:at]) + nest * depth + tail * depth + bytes(raw[at:]))
        assert dh.read_header(bad).native[0] == at + 12 + (len(nest) + len(tail)) * depth


def test_huge_lengths_allocate_nothing(tmp_path):
    """Items 1 and 3: a length of 0xFFFFFFF0 or Rows x Columns 65535 x 65535 with a huge Pixel Data length
    are compared with the file before anything is read (4 GiB were allocated before)."""
    f = _series(tmp_path / "s", z=2)[0]
    raw = bytearray(f.read_bytes())
    bad = tmp_path / "bad.dcm"
    desc = _element_at(raw, 0x0008103E)  # SeriesDescription LO: short length field; make it a UT-style long one
    big = bytes(raw[:desc]) + struct.pack("<HH2sHI", 0x0008, 0x103E, b"UT", 0, 0xFFFFFFF0) + bytes(raw[desc + 8:])
    bad.write_bytes(big)
    out = {}
    assert _peak(lambda: out.setdefault("r", scan_file(bad))) < 20e6
    assert out["r"][0] is None and out["r"][1]
    ds = pydicom.dcmread(f)
    ds.Rows = ds.Columns = 65535
    ds.save_as(bad)
    raw = bytearray(bad.read_bytes())
    px = _element_at(raw, 0x7FE00010)
    raw[px + 8:px + 12] = struct.pack("<I", 0xFFFFFFF0)
    bad.write_bytes(bytes(raw))
    assert _peak(lambda: out.update(r=scan_file(bad))) < 20e6
    assert out["r"][0] is None and "run past the end of the file" in out["r"][1]


def test_number_of_frames_is_checked_against_the_file(tmp_path):
    """Item 2: NumberOfFrames=100000000 in a small file hung the ingest (one slice object per frame)."""
    files = _series(tmp_path / "mf", z=3, multiframe=True)
    edit_dicom(files[0], NumberOfFrames=100_000_000)
    header, reason = scan_file(files[0])
    assert header is None and "100000000 frame(s)" in reason
    single = _series(tmp_path / "s", z=2)
    edit_dicom(single[0], NumberOfFrames=100_000_000)
    header, reason = scan_file(single[0])
    assert header is None and "fewer than the" in reason


def test_zero_filled_and_non_dicom_files_are_refused_quickly(tmp_path):
    """Item 3: 20 MB of zeros was parsed element by element with force=True (~0.27 s/MB)."""
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(20_000_000))
    assert "not DICOM" in scan_file(zeros)[1]
    marked = tmp_path / "marked.dcm"
    marked.write_bytes(bytes(128) + b"DICM" + bytes(20_000_000))
    header, reason = scan_file(marked)
    assert header is None and ("elements" in reason or "not" in reason)


@pytest.mark.parametrize("change, match", [
    ({"RescaleSlope": "NaN"}, "RescaleSlope"), ({"RescaleSlope": 0}, "RescaleSlope"),
    ({"RescaleIntercept": "inf"}, "RescaleIntercept"), ({"PixelSpacing": ["inf", "0.75"]}, "PixelSpacing"),
    ({"ImagePositionPatient": [0, 0, "NaN"]}, "ImagePositionPatient"),
    ({"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}, "ImageOrientationPatient"),
    ({"PixelRepresentation": None}, "PixelRepresentation missing")])
def test_non_finite_degenerate_or_unknown_values_are_refused(tmp_path, change, match):
    """Items 4 and 5: NaN/0 slope, inf intercept or spacing, NaN position, collinear orientation were stored as
    good (all-0 / all-255 inputs, a hidden gap); a missing PixelRepresentation was read as unsigned."""
    files = _series(tmp_path / "s", z=4)
    edit_dicom(files[2], **change)
    with pytest.raises(SeriesError, match=match):
        read_series(files)


def test_window_of_non_finite_values_is_ignored(tmp_path):
    files = _series(tmp_path / "s", z=3)
    for f in files:
        edit_dicom(f, WindowCenter="NaN")
    assert read_series(files).meta["window"] is None


def test_value_cut_by_end_of_file_and_implicit_explicit_mismatch_agree_with_pydicom(tmp_path):
    """Item 6: a value running past the end of the file was a clean end for the removed fast parser (pydicom never
    saw it); a meta that says Implicit VR over an Explicit VR dataset was rejected though pydicom reads it."""
    f = _series(tmp_path / "s", z=2)[0]
    raw = f.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:_element_at(raw, 0x00280030) + 10])  # inside PixelSpacing's value
    with pytest.raises(SeriesError, match="no Pixel Data"):
        dh.read_header(cut)
    ds = pydicom.dcmread(f)
    ds.save_as(f)
    raw = f.read_bytes()
    ts = pydicom.uid.ExplicitVRLittleEndian.encode()
    mixed = tmp_path / "mixed.dcm"
    mixed.write_bytes(raw.replace(ts + b"\x00", b"1.2.840.10008.1.2\x00\x00\x00", 1))  # same length
    ref = pydicom.dcmread(mixed, force=True)
    assert str(ref.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
    header = dh.read_header(mixed)
    assert header.native is not None
    from dompre.data.dicom import _read_native
    np.testing.assert_array_equal(_read_native(mixed, header.native), ref.pixel_array)


def test_duplicates_resolved_by_content_and_listed(tmp_path):
    """Item 7: a partial copy sorting first made the intact series undecodable; sorting second it was dropped
    silently. Now the partial copy is a skipped file with a reason, and each dropped copy is listed."""
    files = _series(tmp_path / "s", z=4)
    raw = files[1].read_bytes()
    for name in ("A_partial.dcm", "z_partial.dcm"):
        (tmp_path / "s" / name).write_bytes(raw[:-100])
    series, bad = scan_tree(tmp_path / "s")
    assert sorted(p.name for p, _ in bad) == ["A_partial.dcm", "z_partial.dcm"]
    assert all("truncated" in r for _, r in bad)
    vol = read_series(series[0])
    assert vol.stored.shape[0] == 4
    shutil.copy(files[1], tmp_path / "s" / "A_copy.dcm")       # an identical copy sorting first
    shutil.copy(files[2], tmp_path / "s" / "z_copy.dcm")       # and one sorting last
    series, _ = scan_tree(tmp_path / "s")
    vol = read_series(series[0])
    assert vol.stored.shape[0] == 4
    assert sorted(Path(p).name for p, _ in vol.meta["dropped"]) == ["IM0003.dcm", "z_copy.dcm"] or \
        len(vol.meta["dropped"]) == 2
    edit_dicom(tmp_path / "s" / "z_copy.dcm", RescaleIntercept=5)  # same SOP and place, other values: refused
    with pytest.raises(SeriesError, match="different images"):
        read_series(scan_tree(tmp_path / "s")[0][0])


def test_multiframe_with_fewer_per_frame_groups_is_a_series_error(tmp_path):
    files = _series(tmp_path / "mf", z=3, multiframe=True)
    ds = pydicom.dcmread(files[0])
    del ds.PerFrameFunctionalGroupsSequence[1:]
    ds.save_as(files[0])
    with pytest.raises(SeriesError, match="per-frame"):
        read_series(files)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_and_devices_are_named_not_zero_byte(tmp_path):
    os.mkfifo(tmp_path / "pipe.dcm")
    assert scan_file(tmp_path / "pipe.dcm") == (None, "not a regular file (a FIFO)")
    if os.path.exists("/dev/null"):
        assert scan_file("/dev/null") == (None, "not a regular file (a character device)")


def test_memory_limited_scan_of_huge_lengths(tmp_path):
    """Item 1: an element length of 0xFFFFFFFF raised MemoryError under a memory limit: run under one."""
    f = _series(tmp_path / "s", z=2)[0]
    raw = bytearray(f.read_bytes())
    px = _element_at(raw, 0x7FE00010)
    raw[px + 8:px + 12] = struct.pack("<I", 0xFFFFFFFE)
    (tmp_path / "bad.dcm").write_bytes(bytes(raw))
    code = ("import resource, sys; from dompre.data.dicom import scan_file, read_series\n"
            "soft = resource.getrlimit(resource.RLIMIT_AS)\n"
            "import re; vm = int(re.search(r'VmSize:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 512 * 2**20, soft[1]))\n"
            "h, r = scan_file(sys.argv[1]); print(repr(r))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.dcm")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run past the end of the file" in out.stdout
