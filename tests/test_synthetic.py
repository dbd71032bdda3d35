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


# ------------------------------------------------------------------------------------------ phantom + cohort
import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from dompre.data.phantom import (  # noqa: E402
    ANCESTORS,
    BODY_TERMS,
    PatientParams,
    make_phantom,
    sample_patient,
)
from dompre.data.synthetic import DL_COLUMNS, generate_cohort  # noqa: E402

REAL_LABELS = Path(__file__).resolve().parents[2] / "shared/data/lesanet/text_mined_labels_171_and_split.json"
REGIONS = {"neck", "chest", "abdomen", "pelvis", "thigh"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    meta = generate_cohort(out, patients=4, seed=3, labeled_fraction=0.5, quirk_rate=1.0, matrix=48,
                           max_slices=40, preview=True, progress=False)
    return out, meta


def _slice_at(ph, z):
    return int(np.argmin(np.abs(ph.body_z - z)))


def test_labels_agree_with_the_anatomy_at_known_slices():
    ph = make_phantom(PatientParams(seed=5, coverage="whole-body", thickness=5.0, pixel=6.5, matrix=64, noise=5))
    body = lambda k: ph.hu[k] > -960  # noqa: E731
    lung_share = lambda k: float(((ph.hu[k] < -600) & (ph.hu[k] > -950)).sum()) / max(1, body(k).sum())  # noqa: E731
    chest, head, abd, pelvis, thigh = (_slice_at(ph, z) for z in (420, 100, 570, 880, 1000))
    assert {"chest", "lung", "right lung", "left lung", "mediastinum", "thoracic spine"} <= set(ph.labels[chest])
    assert "lung" not in ph.labels[head] and "bone" in ph.labels[head]
    assert {"abdomen", "liver", "upper abdomen"} <= set(ph.labels[abd]) and "lung" not in ph.labels[abd]
    assert {"pelvis", "urinary bladder", "pelvic bone"} <= set(ph.labels[pelvis])
    assert {"thigh", "femur", "extremity"} <= set(ph.labels[thigh]) and "pelvis" not in ph.labels[thigh]
    assert lung_share(chest) > 0.3 and lung_share(abd) < 0.1  # the label is visible in the pixels
    for labels in ph.labels:
        assert len(REGIONS & set(labels)) <= 1 and set(labels) <= set(BODY_TERMS)
        for t in labels:
            assert set(ANCESTORS[t]) & set(BODY_TERMS) <= set(labels), t


def test_phantom_is_deterministic_and_patients_differ():
    p = sample_patient(np.random.default_rng(0), matrix=32, coverage="chest", max_slices=30)
    a, b = make_phantom(p), make_phantom(p)
    assert len(a.hu) <= 30
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.labels == b.labels and a.boxes == b.boxes
    q = sample_patient(np.random.default_rng(1), matrix=32, coverage="chest")
    assert q != p
    assert all(1.0 <= sample_patient(np.random.default_rng(i)).thickness <= 5.0 for i in range(20))
    with pytest.raises(ValueError, match="coverage"):
        sample_patient(np.random.default_rng(0), coverage="foot")


def test_cohort_dicom_series_read_back_with_the_rendered_hu(cohort):
    out, meta = cohort
    dicom = [s for s in meta["series"] if s["layout"] == "dicom"]
    assert dicom and meta["counts"]["quirks"]["scout"] == len(dicom)  # quirk rate 1: every series has a scout
    for s in dicom:
        i = int(s["patient_id"][3:])
        ph = make_phantom(sample_patient(np.random.default_rng([3, i]), matrix=48, max_slices=40))
        exp = _expected(ph.hu, "unsigned" in s["quirks"])
        folder = next((out / "dicom" / s["patient_id"]).glob(f"*/{s['series_uid']}"))
        files = sorted(folder.glob("IM*.dcm"))
        assert len(files) == s["slices"] and (folder / "SC0001.dcm").exists()
        np.testing.assert_array_equal(np.stack([_pydicom_hu(f) for f in files]), exp)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), s["series_uid"]))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(reader.Execute()), exp)


def test_cohort_deeplesion_layout_round_trips(cohort):
    from PIL import Image

    out, meta = cohort
    dl = out / "deeplesion"
    with open(dl / "DL_info.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == DL_COLUMNS and len(rows) - 1 == meta["counts"]["dl_lesions"] > 0
    folders = {s["folder"]: s for s in meta["series"] if s["layout"] == "deeplesion"}
    for row in rows[1:]:
        assert len(row) == 18
        box = [float(v) for v in row[6].split(",")]
        assert len(box) == 4 and len(row[5].split(",")) == 8 and 1 <= int(row[9]) <= 8
        assert row[17] in {"1", "2", "3"} and [float(v) for v in row[12].split(",")][2] > 0
        folder, key = row[0].rsplit("_", 1)
        s = folders[folder]
        ph = make_phantom(sample_patient(np.random.default_rng([3, int(s["patient_id"][3:])]), matrix=48,
                                          max_slices=40))
        k = int(row[4]) - 1
        img = np.asarray(Image.open(dl / "Images_png" / folder / key), dtype=np.int32)
        np.testing.assert_array_equal(img - 32768, np.rint(ph.hu[k]))
        assert 1 <= box[0] <= box[2] <= 48 and 1 <= box[1] <= box[3] <= 48
    labels = json.loads((dl / "text_mined_labels_171_and_split.json").read_text())
    n = len(rows) - 1
    idx = labels["train_lesion_idxs"] + labels["val_lesion_idxs"] + labels["test_lesion_idxs"]
    assert sorted(idx) == list(range(n))
    terms = labels["term_list"]
    if REAL_LABELS.exists():
        assert set(terms) <= set(json.loads(REAL_LABELS.read_text())["term_list"])
    for split in ("train", "val", "test"):
        rel = labels[f"{split}_relevant_labels"]
        assert len(rel) == len(labels[f"{split}_lesion_idxs"]) == len(labels[f"{split}_uncertain_labels"])
        assert all(0 <= j < len(terms) for r in rel for j in r) and all(r for r in rel)
    with open(dl / "lesion_ontology.csv", newline="") as f:
        onto = list(csv.DictReader(f))
    assert list(onto[0]) == ["id", "class", "term", "synonyms", "num_detected", "term_exclusive", "term_parents",
                             "term_children"]
    assert {r["term"] for r in onto} == set(terms) and {r["class"] for r in onto} == {"bodypart", "type", "attribute"}
    lung = next(r for r in onto if r["term"] == "right lung")
    assert "left lung" in lung["term_exclusive"].split(" | ") and lung["term_parents"] == "chest | lung"
    hand = json.loads((dl / "hand_labeled_test_set.json").read_text())
    assert all(h["lesion_idx"] in labels["test_lesion_idxs"] and h["expanded_terms"] for h in hand)
    with open(out / "truth" / "slices.csv", newline="") as f:
        slices = list(csv.DictReader(f))
    assert len(slices) == meta["counts"]["slices"] and (out / "preview.png").stat().st_size > 1000


def test_cohort_is_byte_identical_for_a_seed(tmp_path):
    kw = dict(patients=2, seed=9, labeled_fraction=0.5, quirk_rate=0.5, matrix=32, max_slices=30, progress=False)
    generate_cohort(tmp_path / "a", **kw)
    generate_cohort(tmp_path / "b", **kw)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert fa == fb and len(fa) > 10 and not [p for p in fa if p.name.startswith(".")]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in fa)
    with pytest.raises(ValueError, match="already holds a cohort"):
        generate_cohort(tmp_path / "a", **kw)


def test_cli_synth_prints_a_summary(tmp_path, capsys):
    from dompre.cli import main

    assert main(["synth", str(tmp_path / "c"), "--patients", "1", "--matrix", "32", "--layout", "deeplesion",
                 "--no-lesions", "--max-slices", "20"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("dompre synth: 1 patients") and "1 DeepLesion series" in line
    assert main(["synth", str(tmp_path / "d"), "--patients", "1", "--quirk-rate", "2"]) == 2
    assert "quirk_rate must be in [0, 1]" in capsys.readouterr().err


def test_lesions_per_patient_sets_how_many_lesions_are_drawn():
    from dompre.data.phantom import make_lesions, sample_patient, slice_positions
    p = sample_patient(np.random.default_rng([0, 1]), matrix=64, max_slices=40)  # a whole-body patient
    zr = (float(slice_positions(p).min()), float(slice_positions(p).max()))
    assert [len(make_lesions(p, zr, n)) for n in ((0, 0), (6, 6), (10, 10))] == [0, 6, 10]
    assert 2 <= len(make_lesions(p, zr)) <= 6  # the default range
    with pytest.raises(ValueError, match="lesions_per_patient"):
        generate_cohort("unused", patients=1, lesions_per_patient=(3, 1))


def test_rerun_after_a_kill_leaves_no_hidden_tmp_files(tmp_path):
    """Issue 15, item 12: a kill -9 mid-write leaves ``.IM0001.dcm.<pid>.tmp`` and ``.slices.csv.tmp``; the
    rerun (how a killed synth is continued) removes them."""
    kw = dict(patients=1, seed=9, layout="dicom", quirk_rate=0.0, matrix=32, max_slices=20, progress=False)
    out = tmp_path / "c"
    (out / "dicom" / "x").mkdir(parents=True)
    (out / "truth").mkdir()
    for stale in (out / "dicom" / "x" / ".IM0001.dcm.4242.tmp", out / "truth" / ".slices.csv.tmp"):
        stale.write_bytes(b"half a file")
    generate_cohort(out, **kw)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
