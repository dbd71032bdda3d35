"""Synthetic CT cohort: DICOM files read back with pydicom / SimpleITK / MONAI, labels match the anatomy,
determinism, and the DeepLesion layout round-trips through plain csv / PNG readers."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, RLELossless

from dompre.data.synthetic import stored_values, write_dicom_series, write_scout


def _volume(seed: int = 0, shape=(4, 32, 40)) -> np.ndarray:
    hu = np.random.default_rng(seed).normal(0, 400, shape).astype(np.float32)
    hu[0, 0, 0], hu[1, 0, 0] = -1100.0, 3000.3  # below the unsigned floor; above 12 bits signed
    return hu


def _expected(hu: np.ndarray, unsigned: bool) -> np.ndarray:
    r = np.rint(hu)
    return np.maximum(r, -1024) if unsigned else r


def _pydicom_hu(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _sitk_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("kw", [
    {},
    {"unsigned": True},
    {"transfer_syntax": RLELossless},
    {"transfer_syntax": JPEG2000Lossless, "unsigned": True},
    {"shuffle_instance": True},
])
def test_series_reads_back_with_pydicom_and_sitk(tmp_path, kw):
    hu = _volume()
    paths = write_dicom_series(tmp_path / "s", hu, spacing=(2.5, 0.7, 0.8), origin=(-10.0, -20.0, 100.0),
                               rng=np.random.default_rng(1), **kw)
    assert [p.name for p in paths] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    exp = _expected(hu, kw.get("unsigned", False))
    got = np.stack([_pydicom_hu(p) for p in paths])
    np.testing.assert_array_equal(got, exp)
    ds = pydicom.dcmread(paths[0])
    assert ds.preamble == b"\0" * 128 and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.Modality == "CT"
    assert ds.PixelRepresentation == (0 if kw.get("unsigned") else 1)
    assert float(ds.RescaleIntercept) == (-1024.0 if kw.get("unsigned") else 0.0)
    assert 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
    assert ds.file_meta.TransferSyntaxUID == kw.get("transfer_syntax", "1.2.840.10008.1.2.1")
    for tag in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
                "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope", "BitsStored",
                "InstanceNumber", "BodyPartExamined", "WindowCenter", "WindowWidth", "FrameOfReferenceUID"):
        assert tag in ds, tag
    instances = sorted(int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths)
    assert instances == [1, 2, 3, 4]
    img = _sitk_series(tmp_path / "s")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), exp)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.7, 2.5), rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (-10.0, -20.0, 100.0))


def test_shuffled_instances_are_a_permutation_but_positions_stay_ordered(tmp_path):
    paths = write_dicom_series(tmp_path, np.zeros((12, 8, 8)), shuffle_instance=True, rng=np.random.default_rng(3))
    dss = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    inst = [int(d.InstanceNumber) for d in dss]
    assert sorted(inst) == list(range(1, 13)) and inst != list(range(1, 13))
    assert [float(d.ImagePositionPatient[2]) for d in dss] == [float(k) for k in range(12)]


def test_multiframe_enhanced_ct_reads_back(tmp_path):
    hu = _volume(2)
    (path,) = write_dicom_series(tmp_path, hu, spacing=(3.0, 0.9, 0.9), multiframe=True, unsigned=True,
                                 transfer_syntax=RLELossless, rng=np.random.default_rng(0))
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == 4
    frames = ds.PerFrameFunctionalGroupsSequence
    assert [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in frames] == [0.0, 3.0, 6.0, 9.0]
    tr = frames[0].PixelValueTransformationSequence[0]
    got = ds.pixel_array * float(tr.RescaleSlope) + float(tr.RescaleIntercept)
    np.testing.assert_array_equal(got, _expected(hu, True))
    assert [float(v) for v in frames[0].PixelMeasuresSequence[0].PixelSpacing] == [0.9, 0.9]
    img = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), _expected(hu, True))


def test_monai_load_image_reads_a_series(tmp_path):
    monai_transforms = pytest.importorskip("monai.transforms")
    hu = _volume(4)
    write_dicom_series(tmp_path, hu, spacing=(2.0, 0.5, 0.75), unsigned=True, rng=np.random.default_rng(0))
    img = monai_transforms.LoadImage(image_only=True)(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(img).transpose(2, 1, 0), _expected(hu, True))
    np.testing.assert_allclose(img.meta["spacing"], (0.75, 0.5, 2.0))


def test_scout_is_a_localizer_in_another_orientation(tmp_path):
    write_dicom_series(tmp_path, np.zeros((5, 8, 8)), rng=np.random.default_rng(0), study_uid="1.2.3")
    p = write_scout(tmp_path, np.full((5, 8, 8), 40.0), spacing=(1, 1, 1), patient_id="P0000",
                    study_uid="1.2.3", rng=np.random.default_rng(1))
    ds = pydicom.dcmread(p)
    assert "LOCALIZER" in ds.ImageType and [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert ds.SeriesInstanceUID != pydicom.dcmread(tmp_path / "IM0001.dcm").SeriesInstanceUID
    np.testing.assert_array_equal(ds.pixel_array, np.full((5, 8), 40))


def test_uids_and_bytes_are_deterministic_for_an_rng_seed(tmp_path):
    hu = _volume(5)
    a = write_dicom_series(tmp_path / "a", hu, rng=np.random.default_rng(7), shuffle_instance=True)
    b = write_dicom_series(tmp_path / "b", hu, rng=np.random.default_rng(7), shuffle_instance=True)
    c = write_dicom_series(tmp_path / "c", hu, rng=np.random.default_rng(8))
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert pydicom.dcmread(a[0]).SeriesInstanceUID != pydicom.dcmread(c[0]).SeriesInstanceUID
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left behind


def test_stored_values_bits_and_errors(tmp_path):
    assert stored_values(np.array([-2048.0, 2047.0]))[2] == 12
    assert stored_values(np.array([-2049.0, 0.0]))[2] == 13
    v, icpt, bits = stored_values(np.array([-1500.0, 3071.0]), unsigned=True)
    assert v.tolist() == [0, 4095] and icpt == -1024.0 and bits == 12
    with pytest.raises(ValueError, match="shape"):
        write_dicom_series(tmp_path, np.zeros((8, 8)))
