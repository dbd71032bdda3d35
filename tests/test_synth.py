"""Synthetic CT cohort: DICOM files read back with pydicom / SimpleITK / MONAI, labels match the anatomy,
determinism (pinned checksums), and the DeepLesion layout round-trips through plain csv / PNG readers."""
from __future__ import annotations

import hashlib

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, RLELossless

from dompre.synth.dicom import stored_values, write_dicom_series, write_scout


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

from dompre.synth.phantom import (  # noqa: E402
    ANCESTORS,
    BODY_TERMS,
    PatientParams,
    make_phantom,
    sample_patient,
)
from dompre.synth.cohort import DL_COLUMNS, generate_cohort  # noqa: E402

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


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_phantom_matches_its_pinned_checksum():
    """The generator's output is pinned: these checksums were computed before the phantom moved to
    dompre.synth (its anatomy then a class, now a table). A change to the anatomy, the lesions, the rendering or
    the random draws shows here; update the pins only for a deliberate change of the generator."""
    p = sample_patient(np.random.default_rng([7, 0]), matrix=48, coverage="whole-body", max_slices=120)
    ph = make_phantom(p, lesions_per_patient=(6, 6))
    assert ph.hu.shape == (104, 48, 48) and len(ph.lesions) == 6 and len(ph.boxes) == 5
    assert _sha(np.rint(ph.hu).astype(np.int16).tobytes()) == \
        "d64fe165dfe3169bfea06571cfca742a80ebbcc44be8f6957eb5763ee81f366b"
    truth = json.dumps([ph.labels, [list(b) for b in ph.boxes],
                        [[les.kind, les.organ, list(les.terms), les.coarse_type] for les in ph.lesions]])
    assert _sha(truth.encode()) == "ad7d2d767f67b2db01e6cc5f8da5741a833d328fe39ffdc76165ab1314d73851"


def test_cohort_is_byte_identical_for_a_seed(tmp_path):
    kw = dict(patients=2, seed=9, labeled_fraction=0.5, quirk_rate=0.5, matrix=32, max_slices=30, progress=False)
    generate_cohort(tmp_path / "a", **kw)
    generate_cohort(tmp_path / "b", **kw)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert fa == fb and len(fa) > 10 and not [p for p in fa if p.name.startswith(".")]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in fa)
    pinned = {  # computed before the move to dompre.synth, like test_phantom_matches_its_pinned_checksum
        "truth/slices.csv": "feca9b3216bd53827b0883177300c71097c82bf6198ab8e379d4789e90ce7540",
        "truth/lesions.csv": "5123243c711739539ce34bf238521c2c0eb5b510f8d4e9203b5229eba915ee0b",
        "deeplesion/DL_info.csv": "336e14740915a6f1aeed0654f8a147fad6823afed9a5efb240243c3bdb5f0a4b"}
    assert {name: _sha((tmp_path / "a" / name).read_bytes()) for name in pinned} == pinned
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
    from dompre.synth.phantom import make_lesions, sample_patient, slice_positions
    p = sample_patient(np.random.default_rng([0, 1]), matrix=64, max_slices=40)  # a whole-body patient
    zr = (float(slice_positions(p).min()), float(slice_positions(p).max()))
    assert [len(make_lesions(p, zr, n)) for n in ((0, 0), (6, 6), (10, 10))] == [0, 6, 10]
    assert 2 <= len(make_lesions(p, zr)) <= 6  # the default range
    with pytest.raises(ValueError, match="lesions_per_patient"):
        generate_cohort("unused", patients=1, lesions_per_patient=(3, 1))


def test_rerun_after_a_kill_leaves_no_hidden_tmp_files(tmp_path):
    """Issue 15, item 12: a kill -9 mid-write leaves the atomic writer's ``.IM0001.dcm.<random>.tmp`` and
    ``.slices.csv.<random>.tmp``; the rerun (how a killed synth is continued) removes them."""
    kw = dict(patients=1, seed=9, layout="dicom", quirk_rate=0.0, matrix=32, max_slices=20, progress=False)
    out = tmp_path / "c"
    (out / "dicom" / "x").mkdir(parents=True)
    (out / "truth").mkdir()
    for stale in (out / "dicom" / "x" / ".IM0001.dcm.k2x9_q1.tmp", out / "truth" / ".slices.csv.a7bq3z0e.tmp"):
        stale.write_bytes(b"half a file")
    generate_cohort(out, **kw)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ the anatomy table
def test_anatomy_rows_show_body_terms_and_the_table_is_checked():
    from dompre.synth.anatomy import F, SECTIONS, Part, Section, _compile

    labels = {part.label for sec in SECTIONS for part in sec.parts if part.label}
    assert labels <= set(BODY_TERMS) and {"liver", "right lung", "femur", "thyroid gland"} <= labels
    assert [s.name for s in SECTIONS] == ["head", "neck", "chest", "abdomen", "pelvis", "thighs"]
    assert all(a.z[1] == b.z[0] for a, b in zip(SECTIONS, SECTIONS[1:]))  # the sections tile the body
    with pytest.raises(ValueError, match="needs a profile"):
        _compile([Section("x", (0, 1), (Part("blob", "fat", at=(0, 0), size=(10 * F, 5)),))])
    with pytest.raises(ValueError, match="unknown tissue"):
        _compile([Section("x", (0, 1), (Part("blob", "gold", at=(0, 0), size=(10, 5)),))])


def test_mirrored_rows_swap_sides_and_the_shapes_are_in_painting_order():
    from dompre.synth.anatomy import Anatomy

    anat = Anatomy(PatientParams(seed=1, coverage="whole-body"))
    chest = {s.name: s for s in anat.shapes(420.0)}
    assert chest["right lung"].cx < 0 < chest["left lung"].cx and chest["rib35-1"].cx < 0 < chest["rib351"].cx
    names = [s.name for s in anat.shapes(600.0)]
    assert names[:3] == ["body", "wall", "cavity"] and names.index("right kidney") < names.index("sinus-1")
    assert anat.shapes(-1.0) == [] and anat.shapes(1300.0) == []
