"""DICOM discovery and reading: grouping by series UID, ordering along the normal, HU, codecs, bad series."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from dompre.data.dicom import SeriesError, _read_native, discover_series, read_series, scan_file, scan_tree
from dompre.synth.dicom import write_dicom_series, write_scout

from _dicom_files import edit_dicom

SPACING = (2.5, 0.75, 0.75)


def phantom(z: int = 8, y: int = 24, x: int = 24) -> np.ndarray:
    """Air with a body box whose HU encodes the slice index (10 * k), so order and HU are checkable."""
    hu = np.full((z, y, x), -1000.0, np.float32)
    hu[:, 4:20, 5:19] = 10.0 * np.arange(z)[:, None, None]
    return hu


def test_order_by_position_not_instance_or_file_name(tmp_path):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, shuffle_instance=True,
                               rng=np.random.default_rng(1), origin=(0, 0, -100))
    perm = np.random.default_rng(2).permutation(len(files))  # file names no longer follow z either
    for f in files:
        f.rename(f.with_suffix(".tmp"))
    for f, k in zip(files, perm):
        f.with_suffix(".tmp").rename(f.parent / f"X{k:03d}.dcm")
    vol = read_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.hu.dtype == np.float32
    assert vol.spacing == pytest.approx(SPACING)
    assert vol.meta["z"] == pytest.approx(-100 + 2.5 * np.arange(8))
    assert vol.meta["window"] == pytest.approx((40 - 200, 40 + 200))


def test_descending_positions_are_reordered(tmp_path):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING)
    for k, f in enumerate(files):  # scanner writes the series head-first: positions decrease with k
        edit_dicom(f, ImagePositionPatient=[0, 0, -2.5 * k])
    vol = read_series(files)
    np.testing.assert_array_equal(vol.hu, hu[::-1])


@pytest.mark.parametrize("unsigned", [False, True])
def test_hu_from_rescale(tmp_path, unsigned):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, unsigned=unsigned)
    ds = pydicom.dcmread(files[0])
    assert ds.PixelRepresentation == (0 if unsigned else 1)
    np.testing.assert_array_equal(read_series(files).hu, hu)


@pytest.mark.parametrize("kind", ["rle", "j2k", "multiframe"])
def test_compressed_and_multiframe(tmp_path, kind):
    hu = phantom(y=48, x=48)  # openjpeg needs tiles larger than its 6 resolution levels allow at 24x24
    kw = {"rle": {"transfer_syntax": RLELossless}, "j2k": {"transfer_syntax": JPEG2000Lossless},
          "multiframe": {"multiframe": True}}[kind]
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, **kw)
    vol = read_series(files)
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.spacing == pytest.approx(SPACING)


def test_sitk_fallback_when_pydicom_cannot_decode(tmp_path, monkeypatch):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, transfer_syntax=RLELossless)

    def broken(self):
        raise RuntimeError("no decoder")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(broken))
    np.testing.assert_array_equal(read_series(files).hu, hu)


def test_group_by_series_uid_not_folder(tmp_path):
    a, b = phantom(), phantom() + 5
    fa = write_dicom_series(tmp_path / "a", a, spacing=SPACING, patient_id="PA")
    fb = write_dicom_series(tmp_path / "b", b, spacing=SPACING, patient_id="PB")
    (tmp_path / "c").mkdir()
    for f in fb[::2]:          # B is split over two folders, and folder a mixes A and B
        shutil.move(f, tmp_path / "a" / f"B{f.name}")
    for f in fa[:3]:
        shutil.move(f, tmp_path / "c" / f.name)
    (tmp_path / "notes.txt").write_text("not dicom")
    series, bad = scan_tree(tmp_path)
    assert sorted((s.patient, s.n_files) for s in series) == [("PA", 8), ("PB", 8)]
    assert [p.name for p, _ in bad] == ["notes.txt"]
    by = {s.patient: s for s in series}
    np.testing.assert_array_equal(read_series(by["PA"]).hu, a)
    np.testing.assert_array_equal(read_series(by["PB"]).hu, b)
    with pytest.raises(SeriesError, match="holds 2 series"):
        read_series(tmp_path / "a")


def test_scouts_dropped(tmp_path):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING)
    write_scout(tmp_path / "s", hu, spacing=SPACING, patient_id="P0000",
                study_uid=pydicom.dcmread(files[0]).StudyInstanceUID)
    extra = tmp_path / "s" / "IM9999.dcm"   # a localizer inside the axial series itself
    shutil.copy(files[0], extra)
    edit_dicom(extra, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SOPInstanceUID=generate_uid(),
          ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    series = discover_series(tmp_path)
    assert len(series) == 2
    scout = [s for s in series if s.n_files == 1][0]
    with pytest.raises(SeriesError, match="localizer"):
        read_series(scout)
    axial = [s for s in series if s.n_files == 9][0]
    vol = read_series(axial)
    np.testing.assert_array_equal(vol.hu, hu)
    assert any("localizer" in n for n in vol.meta["notes"])


def test_scan_file_reasons(tmp_path):
    f = write_dicom_series(tmp_path / "s", phantom(z=2), spacing=SPACING)[0]
    (tmp_path / "zero.dcm").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("hello, not a DICOM file\n" * 20)
    assert scan_file(tmp_path / "zero.dcm") == (None, "zero-byte file")
    header, reason = scan_file(tmp_path / "text.dcm")
    assert header is None and reason
    header, _ = scan_file(f)
    assert header.modality == "CT" and header.patient == "P0000" and header.native is not None


def test_duplicates_identical_copy_repaired_else_skipped(tmp_path):
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING)
    shutil.copy(files[3], tmp_path / "s" / "copy.dcm")            # same SOP instance twice: safe to drop
    vol = read_series(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, hu)
    assert any("duplicate" in n for n in vol.meta["notes"])
    edit_dicom(tmp_path / "s" / "copy.dcm", SOPInstanceUID=generate_uid())  # another image at the same place
    with pytest.raises(SeriesError, match="duplicated slice positions"):
        read_series(tmp_path / "s")


def test_bad_series_reasons(tmp_path):
    def series(name, z=8, **kw):
        return write_dicom_series(tmp_path / name, phantom(z=z), spacing=SPACING, patient_id=name, **kw)

    gap = series("gap")
    gap[4].unlink()
    with pytest.raises(SeriesError, match="gap in z"):
        read_series(gap[:4] + gap[5:])
    mixed = series("mixed")
    other = write_dicom_series(tmp_path / "tmp", phantom(z=8, y=16, x=16), spacing=SPACING,
                               series_uid=pydicom.dcmread(mixed[0]).SeriesInstanceUID, patient_id="mixed")
    shutil.copy(other[2], mixed[2])
    with pytest.raises(SeriesError, match="mixed matrix sizes"):
        read_series(mixed)
    with pytest.raises(SeriesError, match="single-slice"):
        read_series(series("one", z=1))
    mr = series("mr")
    for f in mr:
        edit_dicom(f, Modality="MR")
    with pytest.raises(SeriesError, match="modality MR"):
        read_series(mr)
    bad_px = series("pixels")
    ds = pydicom.dcmread(bad_px[5])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(bad_px[5])
    with pytest.raises(SeriesError, match="IM0006.dcm: pixel data too short: Pixel Data hold 100 bytes, fewer than the 1152"):
        read_series(bad_px)


def test_missing_rescale_repaired_only_when_signed(tmp_path):
    hu = phantom()
    signed = write_dicom_series(tmp_path / "s", hu, spacing=SPACING)
    for f in signed:
        edit_dicom(f, RescaleSlope=None, RescaleIntercept=None)
    vol = read_series(signed)
    np.testing.assert_array_equal(vol.hu, hu)       # signed values were HU already (intercept 0)
    assert any("Rescale" in n for n in vol.meta["notes"])
    unsigned = write_dicom_series(tmp_path / "u", hu, spacing=SPACING, unsigned=True, patient_id="U")
    edit_dicom(unsigned[2], RescaleIntercept=None)
    with pytest.raises(SeriesError, match="missing RescaleSlope/RescaleIntercept on unsigned"):
        read_series(unsigned)


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_series(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_tree(tmp_path / "nope")


def test_jpeg_ls_lossless_series_from_a_real_file_decodes(tmp_path):
    """pydicom ships an MR slice in JPEG-LS lossless and the same pixels uncompressed; made into a CT series."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import CTImageStorage, JPEGLSLossless
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    series_uid = generate_uid()
    for k in range(3):
        ds = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 2.0 * (2 - k)]
        ds.PixelSpacing, ds.SliceThickness, ds.InstanceNumber = [0.5, 0.5], 2.0, k + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(tmp_path / f"s{k}.dcm")
    vol = read_series(tmp_path)
    assert vol.hu.shape == (3, *ref.shape) and tuple(vol.spacing) == pytest.approx((2.0, 0.5, 0.5))
    np.testing.assert_array_equal(vol.hu[1], ref - 1024)


def test_native_files_are_read_without_pydicom_decoding(tmp_path, monkeypatch):
    """One header parse per file (the scan) and a raw read of the pixels: pydicom's decoder is never asked."""
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, unsigned=True)
    (series,) = discover_series(tmp_path)
    assert all(h.native is not None for h in series.headers)

    def broken(self):
        raise RuntimeError("pydicom decoder called")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(broken))
    vol = read_series(series)
    assert vol.stored.dtype == np.uint16
    np.testing.assert_array_equal(vol.hu, hu)
    rle = write_dicom_series(tmp_path / "r", hu, spacing=SPACING, transfer_syntax=RLELossless)
    assert scan_file(rle[0])[0].native is None and len(files) == 8  # compressed: decoded by pydicom or GDCM


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_and_implicit_vr_match_pydicom(tmp_path, signed):
    """BitsStored 12 of 16 with junk in the top 4 bits: masked (unsigned) or sign-extended (signed) exactly as
    pydicom does; the files are also rewritten as Implicit VR Little Endian."""
    from pydicom.uid import ImplicitVRLittleEndian
    hu = phantom()
    files = write_dicom_series(tmp_path / "s", hu, spacing=SPACING, unsigned=not signed)
    rng = np.random.default_rng(3)
    for f in files:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array.view(np.uint16) & 0x0FFF
        arr = arr | (rng.integers(0, 16, arr.shape, dtype=np.uint16) << 12)  # junk in the unused bits
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = arr.astype("<u2").tobytes()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    vol = read_series(files)
    assert all(scan_file(f)[0].native is not None for f in files)
    ref = np.stack([pydicom.dcmread(f).pixel_array for f in files]).astype(np.float32)
    ref = ref * float(pydicom.dcmread(files[0]).RescaleSlope) + float(pydicom.dcmread(files[0]).RescaleIntercept)
    np.testing.assert_array_equal(vol.hu, ref)


def test_header_scan_and_raw_pixels_match_pydicom_on_its_shipped_files():
    """pydicom's own test files (real scanner output among them: CT_small.dcm, MR_small*.dcm) and its
    deliberately broken ones: the scan's values equal pydicom's, raw pixels equal ``pixel_array``, and what
    the raw path cannot read exactly (big endian, compressed, short pixel data) is left to pydicom."""
    import warnings
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    native = []
    for f in sorted(folder.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(f, force=True)
            except Exception:  # noqa: BLE001 - files pydicom cannot read are not compared
                continue
            header, reason = scan_file(f)
            if header is None:
                assert not ds.get("SeriesInstanceUID") or "PixelData" not in ds or "deflated" in reason \
                    or "truncated" in reason, (f.name, reason)
                continue
            assert (header.series_uid, header.patient, header.modality, header.sop_uid) == (
                ds.SeriesInstanceUID, str(ds.get("PatientID", "") or ""), str(ds.get("Modality", "") or ""),
                str(ds.get("SOPInstanceUID", "") or "")), f.name
            if ds.get("ImagePositionPatient"):
                assert header.position == tuple(float(v) for v in ds.ImagePositionPatient), f.name
            if header.native is None:
                continue
            raw = _read_native(f, header.native)
            try:
                ref = ds.pixel_array
            except Exception:  # noqa: BLE001
                assert raw is None or f.name == "badVR.dcm", f.name  # badVR: an unreadable tag pydicom needs
                continue
            assert raw is not None and raw.dtype == ref.dtype and np.array_equal(raw, ref), f.name
            native.append(f.name)
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"} <= set(native)
    assert scan_file(folder / "MR_small_bigendian.dcm")[0].native is None
    assert scan_file(folder / "MR_small_RLE.dcm")[0].native is None


def test_jpeg_lossless_process_14_decodes_with_pydicom_and_gdcm_alike(monkeypatch):
    """JPEG Lossless (Process 14, SV1): pydicom ships one real file (RGB, as no CT sample ships and no encoder
    is installed). dompre's decode path reads it through pylibjpeg, and through GDCM when pydicom fails."""
    import SimpleITK as sitk
    from dompre.data import dicom as dm
    f = Path(pydicom.__file__).parent / "data" / "test_files" / "SC_rgb_jpeg_gdcm.dcm"
    header, _ = scan_file(f)
    assert header.native is None
    assert str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    (s,) = dm._slices_of(f, header)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).reshape(100, 100, 3)
    np.testing.assert_array_equal(dm._decode(s), reference)

    def broken(self):
        raise RuntimeError("no decoder")
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(broken))
    np.testing.assert_array_equal(dm._decode(s).reshape(100, 100, 3), reference)


def test_header_of_nested_undefined_length_sequences_and_non_ascii_text(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from dompre.data import dicom_header as dh
    f = write_dicom_series(tmp_path / "s", phantom(z=2), spacing=SPACING)[0]
    ds = pydicom.dcmread(f)
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D0050", "Chest"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.AnatomicRegionSequence = Sequence([inner])  # nested, undefined lengths at both levels
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    item["AnatomicRegionSequence"].is_undefined_length = True
    ds.save_as(f)
    raw = f.read_bytes()
    assert raw.count(b"\xfe\xff\xdd\xe0") == 2 and raw.count(b"\xfe\xff\x0d\xe0") == 1  # delimiters written
    header = dh.read_header(f)
    assert header.native is not None and header.patient == "P0000"
    np.testing.assert_array_equal(_read_native(f, header.native), pydicom.dcmread(f).pixel_array)

    ds.SpecificCharacterSet, ds.PatientID = "ISO_IR 192", "Müller-0001"
    ds.save_as(f)
    assert dh.read_header(f).patient == "Müller-0001"
