"""Truth scoring of the built-in benchmark: store inputs get their middle slice's truth, held-out splits by
patient, pseudo-label quality and the arms summary on hand-made numbers."""
import csv

import numpy as np

from dompre.benchmark import heldout_sets, pseudo_quality, store_truth, summarize
from dompre.data.ingest import ingest_dicom, load_ingest_recipe
from dompre.data.store import SliceStore
from dompre.synth.cohort import generate_cohort
from dompre.train.bootstrap import Scored


def test_store_inputs_get_the_truth_of_their_middle_slice(tmp_path):
    generate_cohort(tmp_path / "c", patients=3, seed=4, layout="dicom", matrix=48, max_slices=30, quirk_rate=0.0,
                    progress=False)
    ingest_dicom(tmp_path / "c" / "dicom", tmp_path / "s", workers=1, progress=False,
                 recipe=load_ingest_recipe(None, ("prep.size=16", "prep.min_slices=5")))
    store = SliceStore(tmp_path / "s")
    names = ["chest", "lung", "liver", "femur", "not a body part"]
    y, patients = store_truth(store, tmp_path / "c" / "truth" / "slices.csv", names)
    rows = list(csv.DictReader(open(tmp_path / "c" / "truth" / "slices.csv")))
    meta = store.meta
    assert y.shape == (len(store), 5) and y[:, 4].sum() == 0 and y[:, :3].sum() > 0
    for i in range(len(store)):  # the truth row of the same series and slice index as the input's middle slice
        r = next(r for r in rows if r["series_uid"] == meta["series_uid"].iat[i]
                 and int(r["slice"]) == int(round(meta["z_index"].iat[i])))
        assert [int(n in r["labels"].split("|")) for n in names] == list(y[i]), i
        assert patients[i] == r["patient_id"]
    held = heldout_sets(store, tmp_path / "c" / "truth" / "slices.csv", names, val_fraction=0.34)
    assert not set(held.patients["val"]) & set(held.patients["test"])          # split by patient
    assert len(held.rows["val"]) + len(held.rows["test"]) == len(store)


def test_pseudo_quality_counts():
    kept = np.array([[1, 1, 0], [0, 0, 0]], bool)
    truth = np.array([[1, 0, 1], [0, 1, 0]])
    q = pseudo_quality(kept, truth)
    assert q["precision"] == 0.5 and q["recall"] == 1 / 3 and q["labels_per_input"] == 1.0
    assert q["truth_per_input"] == 1.5 and q["inputs_kept"] == 1


def _scored(auc, reps):
    return Scored(auc, 0.5, np.asarray(reps, float), np.zeros(len(reps)), 3, 10, 2)


def test_summary_chooses_the_student_on_validation_and_computes_gap_closed():
    def arms(t, s1, s2, o, val1, val2):
        out = {}
        for name, auc, val in (("teacher", t, 0.5), ("student-1", s1, val1), ("student-2", s2, val2),
                               ("oracle", o, 0.9), ("plain", t, 0.5)):
            sc = _scored(auc, [auc - 0.01, auc, auc + 0.01])
            out[name] = {"val_auc": val, "all": sc, "taught": sc}
        return {"arms": out, "pseudo": []}
    # seed 0: student-2 is better on test but worse on validation: the validation choice (student-1) counts
    s = summarize({0: arms(0.80, 0.85, 0.95, 0.90, 0.7, 0.6), 1: arms(0.80, 0.86, 0.84, 0.90, 0.8, 0.7)})
    assert s["per_seed"][0]["chosen"] == "student-1" and s["per_seed"][1]["chosen"] == "student-1"
    assert np.isclose(s["per_seed"][0]["gap_closed_all"], 0.5) and np.isclose(s["per_seed"][1]["gap_closed_all"], 0.6)
    assert np.isclose(s["gap_closed_all"]["mean"], 0.55) and s["gap_closed_all"]["ci"][0] < 0.55
    assert np.isclose(s["student_minus_teacher_all"]["mean"], 0.055)
