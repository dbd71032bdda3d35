"""DeepLesion readers on the real LesaNet files, and a tiny DeepLesion layout written in tmp_path."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dompre.data import deeplesion as dl
from dompre.data.prep import PrepConfig

N = np.nan


def _real_dir() -> Path:
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "shared/data/lesanet", Path("/work/shared/data/lesanet")):
        if (cand / "text_mined_labels_171_and_split.json").is_file():
            return cand
    if os.environ.get("CI"):  # CI lays ../shared beside the clone: a missing copy is a failure, not a skip
        pytest.fail("real LesaNet files (../shared/data/lesanet) not found beside the checkout")
    pytest.skip("real LesaNet files (shared/data/lesanet) not available")


@pytest.fixture(scope="module")
def real():
    d = _real_dir()
    labels = dl.load_lesanet_labels(d / "text_mined_labels_171_and_split.json")
    ontology = dl.load_ontology(d / "lesion_ontology_181022.xlsx")
    return d, labels, ontology


# ------------------------------------------------------------------------------------------ real LesaNet files
def test_real_label_file(real):
    _, labels, _ = real
    assert len(labels.term_list) == 171
    assert {s: len(v) for s, v in labels.lesion_idxs.items()} == {"train": 20266, "val": 1976, "test": 1879}
    m = labels.matrix("val")
    assert m.shape == (1976, 171) and m.dtype == np.float32
    # first val lesion: relevant [12, 61, 1, 7, 31, 31, 1, 7, 5, 4] (repeats), uncertain [140]
    assert np.flatnonzero(m[0] == 1).tolist() == [1, 4, 5, 7, 12, 31, 61]
    assert np.flatnonzero(np.isnan(m[0])).tolist() == [140]
    sub = labels.matrix("val", ["lung", "chest"])
    np.testing.assert_array_equal(sub, m[:, [labels.term_list.index("lung"), 0]])
    with pytest.raises(KeyError, match="not in the term list"):
        labels.matrix("val", ["no such term"])


def test_real_relevant_wins_over_uncertain(real):
    _, labels, _ = real
    i = next(i for i, (r, u) in enumerate(zip(labels.relevant["train"], labels.uncertain["train"]))
             if set(r) & set(u))
    both = sorted(set(labels.relevant["train"][i]) & set(labels.uncertain["train"][i]))
    assert (labels.matrix("train")[i, both] == 1).all()


def test_real_ontology_and_hand_labeled(real):
    d, labels, onto = real
    body = onto.select("bodypart", within=labels.term_list)
    assert len(body) == 115
    assert len(onto.select("type", within=labels.term_list)) == 27
    assert len(onto.select("attribute", within=labels.term_list)) == 29
    hand = dl.load_hand_labeled(d / "hand_labeled_test_set.json", body)
    assert len(hand.lesion_idxs) == 500 and hand.labels.shape == (500, 115)
    assert int((hand.labels.sum(1) > 0).sum()) == 490
    assert "opacity" in hand.ignored_terms  # a type term, not a body part
    full = dl.load_hand_labeled(d / "hand_labeled_test_set.json", labels.term_list)
    assert all(t not in labels.term_list for t in full.ignored_terms)


def test_real_exclusivity_closure(real):
    _, labels, onto = real
    ex = onto.exclusive
    assert "right lung" in ex["left lung"]
    assert {"right upper lobe", "right lower lobe", "right mid lung"} <= ex["left lung"]  # children of right lung
    assert "left lung" in ex["right upper lobe"] and "left lower lobe" in ex["right upper lobe"]  # inherited
    assert "lung" not in ex["left lung"] and "chest" not in ex["left lung"]
    assert all(t in ex[e] for t in ex for e in ex[t])  # symmetric
    assert not any(p in ex[t] for t in onto.terms for p in onto.parents[t])  # never exclusive with an ancestor
    assert set(onto.parents["right upper lobe"]) == {"right lung", "lung", "chest"}
    pairs = onto.exclusive_pairs(labels.term_list)
    i, j = labels.term_list.index("left lung"), labels.term_list.index("right lung")
    assert (min(i, j), max(i, j)) in pairs and all(a < b for a, b in pairs)
    parents = onto.parent_indices(labels.term_list)
    assert sorted(labels.term_list[k] for k in parents[labels.term_list.index("right upper lobe")]) == \
        ["chest", "lung", "right lung"]


# ----------------------------------------------------------------------------------------------- tiny layout
HEADER = list(dl.DL_COLUMNS)


def _row(fname, key, box, *, spacing="0.8, 0.8, 1.0", noisy=0, split=1, window="-175, 275", patient=1):
    return [fname, patient, 1, 1, key, "1, 2, 3, 4, 5, 6, 7, 8", box, "10.5, 3.25", "0.5, 0.5, 0.5", -1, noisy,
            "1, 7", spacing, "32, 40", window, "F", "" if patient == 2 else "51", split]


def _write_slices(folder: Path, n: int = 7, lesion_slice: int = 4) -> None:
    """Slices 1..n of 32x40: air outside a body box, body HU = 100*k; a 2000 HU lesion on one slice."""
    folder.mkdir(parents=True)
    for k in range(1, n + 1):
        hu = np.full((32, 40), -1024.0)
        hu[4:28, 6:38] = 100.0 * k
        if k == lesion_slice:
            hu[10:16, 12:20] = 2000.0
        Image.fromarray((hu + 32768).astype(np.uint16)).save(folder / f"{k:03d}.png")


@pytest.fixture()
def layout(tmp_path):
    root = tmp_path / "DeepLesion"
    _write_slices(root / "Images_png" / "000001_01_01")
    rows = [_row("000001_01_01_004.png", 4, "13, 11, 20, 16"),             # 0: ok (train)
            _row("000001_01_01_005.png", 5, "13, 11, 20, 16", noisy=1),    # 1: possibly noisy
            _row("000002_01_01_010.png", 10, "5, 5, 9, 9", patient=2),     # 2: PNG folder missing
            _row("000001_01_01_006.png", 6, "13, 11, 20, 16", split=2),    # 3: ok (val)
            _row("000001_01_01_003.png", 3, "13, 11, 20, 16")]             # 4: not in the label file
    with open(root / "DL_info.csv", "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
        w.writerow(HEADER)
        w.writerows(rows)
    labels = {"term_list": ["chest", "lung", "liver", "mass"],
              "train_lesion_idxs": [0, 1, 2], "train_relevant_labels": [[0, 1, 1], [0], [2]],
              "train_uncertain_labels": [[3], [], []], "train_irrelevant_labels": [[2], [], []],
              "val_lesion_idxs": [3], "val_relevant_labels": [[2, 3]], "val_uncertain_labels": [[0, 2]],
              "test_lesion_idxs": [9], "test_relevant_labels": [[0]], "test_uncertain_labels": [[]]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    with open(tmp_path / "ontology.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(dl.ONTOLOGY_COLUMNS)
        w.writerow([1, "bodypart", "chest", "chest | thorax", 10, "abdomen", "", "lung"])
        w.writerow([2, "bodypart", "abdomen", "abdomen", 10, "chest", "", "liver"])
        w.writerow([3, "bodypart", "lung", "lung", 5, "", "chest", ""])
        w.writerow([4, "bodypart", "liver", "liver | hepatic", 5, "", "abdomen", ""])
        w.writerow([5, "type", "mass", "mass", 3, "", "", ""])
    return root, tmp_path / "labels.json", tmp_path / "ontology.csv"


def test_read_dl_info_round_trip(layout):
    root, _, _ = layout
    info = dl.read_dl_info(root / "DL_info.csv")
    assert list(info.columns[:18]) == HEADER and len(info) == 5
    assert info.index.tolist() == [0, 1, 2, 3, 4] and info.index.name == "lesion_idx"
    assert info.loc[0, "Bounding_boxes"] == (12.0, 10.0, 19.0, 15.0)  # 1-based -> 0-based
    assert info.loc[0, "Measurement_coordinates"] == tuple(float(v) for v in range(0, 8))
    assert info.loc[0, "Spacing_mm_px_"] == (0.8, 0.8, 1.0)
    assert info.loc[0, "Lesion_diameters_Pixel_"] == (10.5, 3.25)  # not shifted
    assert info.loc[0, "DICOM_windows"] == (-175.0, 275.0)
    assert info.loc[3, "Train_Val_Test"] == 2 and info.loc[1, "Possibly_noisy"] == 1
    assert (info.loc[0, "folder"], info.loc[0, "slice_file"]) == ("000001_01_01", "004.png")
    assert np.isnan(info.loc[2, "Patient_age"]) and info.loc[0, "Patient_age"] == 51


def test_read_dl_info_errors(tmp_path):
    bad = tmp_path / "DL_info.csv"
    bad.write_text("File_name,Patient_index\nx_001.png,1\n")
    with pytest.raises(ValueError, match="missing column"):
        dl.read_dl_info(bad)
    with pytest.raises(FileNotFoundError, match="DL_info.csv"):
        dl.read_dl_info(tmp_path / "nope.csv")


def test_read_png_slice(layout, tmp_path):
    root, _, _ = layout
    hu = dl.read_png_slice(root / "Images_png/000001_01_01/002.png")
    assert hu.dtype == np.float32 and hu.shape == (32, 40)
    assert hu[0, 0] == -1024 and hu[10, 10] == 200
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ValueError, match=r"eight\.png.*not 16-bit"):
        dl.read_png_slice(tmp_path / "eight.png")


def test_tiny_labels_and_ontology(layout):
    _, labels_path, onto_path = layout
    lab = dl.load_lesanet_labels(labels_path)
    np.testing.assert_array_equal(lab.matrix("train"), [[1, 1, 0, N], [1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(lab.matrix("val"), [[N, 0, 1, 1]])  # relevant wins over uncertain
    onto = dl.load_ontology(onto_path)
    assert onto.select("bodypart", within=lab.term_list) == ["chest", "lung", "liver"]
    assert onto.select("bodypart") == ["chest", "abdomen", "lung", "liver"]
    # lung inherits chest's exclusion of abdomen, and so excludes abdomen's child liver
    assert onto.exclusive["lung"] == {"abdomen", "liver"}
    assert onto.exclusive_pairs(lab.term_list) == [(0, 2), (1, 2)]
    assert onto.parent_indices(lab.term_list) == [[], [0], [], []]
    assert onto.synonyms["liver"] == ["liver", "hepatic"]
    with pytest.raises(ValueError, match="class 'organ'"):
        onto.select("organ")


def _folder(layout):
    return layout[0] / "Images_png" / "000001_01_01"


@pytest.mark.parametrize("mode, interval, expected", [
    ("consecutive", 1.0, [3, 4, 5]),
    ("consecutive", 5.0, [3, 4, 5]),        # slice interval does not matter
    ("interval", 1.0, [2, 4, 6]),           # 2 mm = 2 slices
    ("interval", 0.8, [1.5, 4, 6.5]),       # 2.5 slices: mean of two slices
    ("interval", 1.25, [2.4, 4, 5.6]),      # 1.6 slices: 0.6 * far + 0.4 * near
    ("interval", 4.0, [3.5, 4, 4.5]),       # 0.5 slice: between the key and its neighbour
    ("interval", float("nan"), [4, 4, 4]),  # unknown interval: key slice three times
])
def test_lesion_slices(layout, mode, interval, expected):
    hu = dl.load_lesion_slices(_folder(layout), 4, interval, mode)
    np.testing.assert_allclose(hu[:, 20, 30], np.array(expected) * 100, atol=1e-3)
    assert hu[1, 12, 14] == 2000  # channel 1 is the key slice


def test_lesion_slices_missing_neighbours(layout):
    folder = _folder(layout)
    hu = dl.load_lesion_slices(folder, 7, 1.0, "consecutive")  # last slice: next -> nearest existing (7)
    np.testing.assert_allclose(hu[:, 20, 30], [600, 700, 700])
    (folder / "002.png").unlink()
    hu = dl.load_lesion_slices(folder, 4, 1.0, "interval")  # 002 missing -> 003, toward the key
    np.testing.assert_allclose(hu[:, 20, 30], [300, 400, 600])
    with pytest.raises(FileNotFoundError, match="002.png"):
        dl.load_lesion_slices(folder, 2, 1.0)


@pytest.mark.parametrize("keep_aspect, box", [(False, (3.0, 4.0, 6.5, 11 * 2 / 3)),
                                              (True, (3.0, 5.0, 6.5, 7.5))])
def test_lesion_input_box_maps_to_stored_pixels(layout, keep_aspect, box):
    root = layout[0]
    info = dl.read_dl_info(root / "DL_info.csv")
    cfg = dl.LesionInputConfig(prep=PrepConfig(size=16, crop_margin=0, keep_aspect=keep_aspect))
    item = dl.build_lesion_input(root, info, 0, cfg=cfg, split="train", labels=np.array([1, 0], np.float32))
    assert item.image.dtype == np.uint8 and item.image.shape == (3, 16, 16)
    # body box rows 4..27, cols 6..37 -> 24 x 32 crop -> 16 x 16 (or 12 x 16 padded by 2 rows)
    np.testing.assert_allclose(item.bbox, box)
    bright = np.argwhere(item.image[1] > 130)  # the 2000 HU lesion on the key slice only
    assert bright.size and not (item.image[[0, 2]] > 130).any()
    (r0, c0), (r1, c1) = bright.min(0), bright.max(0)
    assert box[0] - 1 <= c0 and c1 <= box[2] + 1 and box[1] - 1 <= r0 and r1 <= box[3] + 1
    m = item.meta
    assert (m["lesion_idx"], m["split"], m["series_uid"], m["patient"]) == (0, "train", "000001_01_01", "000001")
    assert m["window"] == [-1024.0, 3071.0] and m["bbox"] == list(item.bbox)
    assert m["spacing"][0] == 1.0 and m["spacing"][2] == pytest.approx(0.8 * 32 / 16)


def test_lesion_input_series_window(layout):
    root = layout[0]
    info = dl.read_dl_info(root / "DL_info.csv")
    cfg = dl.LesionInputConfig(prep=PrepConfig(size=16, window_source="series", crop=False))
    item = dl.build_lesion_input(root, info, 0, cfg=cfg)
    assert item.meta["window"] == [-175.0, 275.0]
    assert item.image[1, 8, 10] == 255 and item.image[0, 0, 0] == 0  # 2000 HU and air clip at the ends


def test_ingest_deeplesion_store_labels_skips_and_resume(layout, tmp_path, capsys):
    from dompre.cli import main
    from dompre.data.store import SliceStore
    root, labels_path, onto_path = layout
    store_dir = tmp_path / "store"
    argv = ["ingest", "deeplesion", str(root), str(store_dir), "--labels", str(labels_path), "--ontology",
            str(onto_path), "--classes", "bodypart", "--no-progress", "--set", "prep.size=16"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "2 lesions ok, 3 skipped" in line
    store = SliceStore(store_dir)
    assert len(store) == 2 and store.label_names == ["chest", "lung", "liver"]
    np.testing.assert_array_equal(store.labels, [[1, 1, 0], [N, 0, 1]])
    meta = store.meta
    assert meta["lesion_idx"].tolist() == [0, 3] and meta["split"].tolist() == ["train", "val"]
    assert meta["source"].tolist() == ["deeplesion"] * 2 and len(meta["bbox"].iat[0]) == 4
    assert store[0].shape == (3, 16, 16)
    report = json.loads((store_dir / "report.json").read_text())
    by_idx = {r["lesion_idx"]: r for r in report["lesions"]}
    assert by_idx[2]["status"] == "skipped" and "missing PNG" in by_idx[2]["reason"]
    assert "000002_01_01" in by_idx[2]["reason"]
    assert "noisy" in by_idx[1]["reason"] and "not a row" in by_idx[9]["reason"]
    assert 4 not in by_idx
    assert report["summary"]["lesions_ok"] == 2 and report["summary"]["skip_reasons"]["missing PNG"] == 1
    # a rerun finds every lesion done and adds nothing
    assert main(argv) == 0
    assert "(5 lesions already done)" in capsys.readouterr().out
    assert len(SliceStore(store_dir)) == 2


def test_ingest_deeplesion_full_term_list_and_bad_config(layout, tmp_path):
    from dompre.data.ingest_deeplesion import DeepLesionIngestRecipe, ingest_deeplesion
    from dompre.data.store import SliceStore
    root, labels_path, onto_path = layout
    recipe = DeepLesionIngestRecipe(prep=PrepConfig(size=16), neighbours="interval", drop_noisy=False)
    s = ingest_deeplesion(root, tmp_path / "s", labels=labels_path, recipe=recipe, progress=False, workers=2)
    assert s["lesions_ok"] == 3 and s["labels"] == 4  # the noisy lesion kept this time
    store = SliceStore(tmp_path / "s")
    assert store.meta["lesion_idx"].tolist() == [0, 1, 3]  # worker results come back in order
    np.testing.assert_array_equal(store.labels[0], [1, 1, 0, N])
    info = dl.read_dl_info(root / "DL_info.csv")
    np.testing.assert_array_equal(store[0], dl.build_lesion_input(root, info, 0, cfg=recipe.lesion).image)
    with pytest.raises(ValueError, match="written with info"):  # other settings cannot mix into this store
        ingest_deeplesion(root, tmp_path / "s", labels=labels_path, progress=False,
                          recipe=DeepLesionIngestRecipe(prep=PrepConfig(size=16)))
    with pytest.raises(ValueError, match="needs --ontology"):
        ingest_deeplesion(root, tmp_path / "t", labels=labels_path, classes="bodypart", progress=False)
    small = tmp_path / "small.csv"
    small.write_text("".join(line for line in onto_path.read_text().splitlines(True) if ",mass," not in line))
    with pytest.raises(ValueError, match=r"\['mass'\].*not in the ontology"):
        ingest_deeplesion(root, tmp_path / "t", labels=labels_path, ontology=small, progress=False)
    with pytest.raises(FileNotFoundError, match="Images_png"):
        ingest_deeplesion(tmp_path, tmp_path / "t", labels=labels_path, progress=False)


def test_file_names_outside_the_root_are_refused_and_bad_json_is_named(layout, tmp_path):
    """Issue 15, items 11 and 12: a DL_info.csv File_name of ../../outside/... was read from outside ROOT; a
    non-JSON --labels said only 'Expecting value: line 1 column 1'."""
    root, labels_path, onto_path = layout
    outside = tmp_path / "outside"
    _write_slices(outside / "000001_01_01")
    rows = list(csv.reader(open(root / "DL_info.csv")))
    rows[1][0] = "../../outside/000001_01_01_004.png"
    with open(root / "DL_info.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    info = dl.read_dl_info(root / "DL_info.csv")
    with pytest.raises(ValueError, match="points outside"):
        dl.build_lesion_input(root, info, 0, cfg=dl.LesionInputConfig(), split="train", labels=None)
    from dompre.data.ingest_deeplesion import ingest_deeplesion
    s = ingest_deeplesion(root, tmp_path / "st", labels=labels_path, progress=False)
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    by_idx = {r["lesion_idx"]: r for r in report["lesions"]}
    assert by_idx[0]["status"] == "skipped" and "points outside" in by_idx[0]["reason"]
    assert s["lesions_ok"] == 1
    bad = tmp_path / "labels.txt"
    bad.write_text("term_list: [a, b]\n")
    from dompre.cli import main
    argv = ["ingest", "deeplesion", str(root), str(tmp_path / "st2"), "--labels", str(bad), "--no-progress"]
    assert main(argv) == 2
    with pytest.raises(ValueError, match="labels.txt: not a JSON file"):
        dl.load_lesanet_labels(bad)
