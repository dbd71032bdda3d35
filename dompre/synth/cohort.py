"""The synthetic CT cohort: phantom patients written, one at a time, in the layouts dompre reads.

``generate_cohort`` streams :mod:`dompre.synth.phantom` patients into the folder layout of the team contract:
``dicom/`` (TCIA-like series with scanner quirks, :mod:`dompre.synth.dicom`), ``deeplesion/`` (the labeled share
as DeepLesion PNGs with ``DL_info.csv``, LesaNet's text-mined labels and ontology), ``truth/`` (every slice's
body-part labels and every lesion box), ``cohort.json`` and optionally ``preview.png``. Every file is written
atomically (:mod:`dompre._io`; the slice files without an fsync each, the tables and ``cohort.json`` with one).
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import RLELossless
from tqdm.auto import tqdm

from dompre._io import atomic_open, save_figure, write_atomic
from dompre.errors import UserError
from dompre.synth.anatomy import region_of
from dompre.synth.dicom import derive_uid, write_dicom_series, write_scout
from dompre.synth.phantom import (
    BODY_PART_EXAMINED,
    BODY_TERMS,
    COVERAGES,
    Phantom,
    close_terms,
    make_phantom,
    sample_patient,
)
from dompre.synth.terms import TERMS

DL_COLUMNS = ["File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index",
              "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location",
              "Coarse_lesion_type", "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size",
              "DICOM_windows", "Patient_gender", "Patient_age", "Train_Val_Test"]
ONTOLOGY_COLUMNS = ["id", "class", "term", "synonyms", "num_detected", "term_exclusive", "term_parents",
                    "term_children"]
LAYOUTS = ("both", "dicom", "deeplesion")
_WINDOWS = {"chest": (-1350, 150), "bone": (-450, 1050)}  # DeepLesion DICOM_windows (low, high)


def _nums(values: Sequence[float]) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


def _splits(labeled: list[int], rng: np.random.Generator) -> dict[int, int]:
    """Patient -> Train_Val_Test code (1 train, 2 val, 3 test), about 70/15/15, val and test non-empty from 3."""
    order = [labeled[i] for i in rng.permutation(len(labeled))]
    n = len(order)
    n_small = max(1, round(0.15 * n)) if n >= 3 else 0
    return {p: 2 if j < n_small else 3 if j < 2 * n_small else 1 for j, p in enumerate(order)}


def _write_png(path: Path, hu: np.ndarray) -> None:
    """A DeepLesion slice: 16-bit PNG of HU + 32768."""
    arr = np.clip(np.rint(hu) + 32768, 0, 65535).astype(np.uint16)
    with atomic_open(path, fsync=False) as f:  # one of thousands of regenerable slices: see dompre._io
        Image.fromarray(arr).save(f, format="PNG", compress_level=1)


class _CohortWriter:
    """Streams truth tables and accumulates the (small) DeepLesion tables while patients are written."""

    def __init__(self, out: Path, seed: int):
        self.out, self.seed = out, seed
        (out / "truth").mkdir(parents=True, exist_ok=True)
        self._files = {n: atomic_open(out / "truth" / f"{n}.csv", "w") for n in ("slices", "lesions")}
        self.slices = csv.writer(self._files["slices"].file)
        self.slices.writerow(["patient_id", "series_uid", "layout", "slice", "z", "body_z", "region", "labels"])
        self.lesions = csv.writer(self._files["lesions"].file)
        self.lesions.writerow(["patient_id", "series_uid", "lesion", "slice", "x1", "y1", "x2", "y2", "key",
                               "coarse_type", "dl_lesion_idx", "terms"])
        self.dl_rows: list[list] = []
        self.dl_labels: list[tuple[int, list[str], list[str], str]] = []  # split, relevant, own terms, text
        self.rng = np.random.default_rng([seed, 99])

    def close(self, ok: bool) -> None:
        """Finish the truth tables (``ok``) or drop them."""
        for f in self._files.values():
            f.commit() if ok else f.abort()

    def add_truth(self, pid: str, series_uid: str, layout: str, ph: Phantom, dl_idx: dict[int, int]) -> None:
        for k, (z, labels) in enumerate(zip(ph.body_z, ph.labels)):
            zp = ph.origin[2] + k * ph.spacing[0]
            self.slices.writerow([pid, series_uid, layout, k, f"{zp:.3f}", f"{z:.2f}", region_of(float(z)),
                                  "|".join(labels)])
        keys = {i: int(np.argmin(np.abs(ph.body_z - les.z))) for i, les in enumerate(ph.lesions)}
        for i, k, x1, y1, x2, y2 in ph.boxes:
            les = ph.lesions[i]
            self.lesions.writerow([pid, series_uid, i, k, x1, y1, x2, y2, int(keys[i] == k), les.coarse_type,
                                   dl_idx.get(i, -1) if keys[i] == k else -1, "|".join(close_terms(les.terms))])

    def add_deeplesion(self, pat: int, split: int, ph: Phantom) -> dict[int, int]:
        """Write PNG slices of one labeled patient; return {lesion: DL_info row} for lesions with a key box."""
        p = ph.params
        folder = self.out / "deeplesion" / "Images_png" / f"{pat:06d}_01_01"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(ph.hu.shape[0]):
            _write_png(folder / f"{k + 1:03d}.png", ph.hu[k])
        n, (h, w) = ph.hu.shape[0], ph.hu.shape[1:]
        boxes = {(i, k): (x1, y1, x2, y2) for i, k, x1, y1, x2, y2 in ph.boxes}
        rows = {}
        for i, les in enumerate(ph.lesions):
            k = int(np.argmin(np.abs(ph.body_z - les.z)))
            if (i, k) not in boxes:
                continue
            x1, y1, x2, y2 = (v + 1 for v in boxes[(i, k)])  # DeepLesion counts pixels from 1
            xc, yc = (x1 + x2) / 2, (y1 + y2) / 2
            win = _WINDOWS.get("chest" if les.coarse_type == 5 else "bone" if les.coarse_type == 1 else "", (-175, 275))
            rows[i] = len(self.dl_rows)
            self.dl_rows.append([
                f"{pat:06d}_01_01_{k + 1:03d}.png", pat, 1, 1, k + 1, _nums((x1, yc, x2, yc, xc, y1, xc, y2)),
                _nums((x1, y1, x2, y2)), _nums(sorted((x2 - x1 + 1, y2 - y1 + 1), reverse=True)),
                _nums((xc / w, yc / h, k / max(n - 1, 1))), les.coarse_type, 0, _nums((1, n)),
                _nums((p.pixel, p.pixel, p.thickness)), _nums((h, w)), _nums(win), p.sex, p.age, split])
            relevant = close_terms(set(ph.labels[k]) | set(les.terms))
            kind = next((t for t in ("mass", "nodule", "cyst", "lymphadenopathy", "lytic", "sclerotic")
                         if t in les.terms), "lesion")
            self.dl_labels.append((split, relevant, close_terms(les.terms), f"{les.organ} {kind}"))
        return rows

    def write_deeplesion_tables(self) -> None:
        dl = self.out / "deeplesion"
        dl.mkdir(parents=True, exist_ok=True)
        with atomic_open(dl / "DL_info.csv", "w") as f:
            wr = csv.writer(f, quoting=csv.QUOTE_MINIMAL)
            wr.writerow(DL_COLUMNS)
            wr.writerows(self.dl_rows)
        terms = [r[2] for r in TERMS]
        index = {t: j for j, t in enumerate(terms)}
        js: dict = {"term_list": terms}
        hand, counts = [], dict.fromkeys(terms, 0)
        term_class = {r[2]: r[1] for r in TERMS}
        for code, split in ((1, "train"), (2, "val"), (3, "test")):
            idx = [j for j, lab in enumerate(self.dl_labels) if lab[0] == code]
            rel, unc = [], []
            for j in idx:
                _, relevant, own, text = self.dl_labels[j]
                for t in relevant:
                    counts[t] += 1
                attrs = [t for t in relevant if term_class[t] == "attribute"]
                uncertain = [attrs[0]] if attrs and self.rng.random() < 0.1 else []
                rel.append([index[t] for t in relevant if t not in uncertain])
                unc.append([index[t] for t in uncertain])
                if split == "test":
                    hand.append({"text": text, "lesion_idx": j, "expanded_terms": own})
            js[f"{split}_lesion_idxs"], js[f"{split}_relevant_labels"] = idx, rel
            js[f"{split}_uncertain_labels"] = unc
            if split == "train":
                js["train_irrelevant_labels"] = [[] for _ in idx]
        write_atomic(dl / "text_mined_labels_171_and_split.json", json.dumps(js))
        write_atomic(dl / "hand_labeled_test_set.json", json.dumps(hand, indent=1))
        with atomic_open(dl / "lesion_ontology.csv", "w") as f:
            wr = csv.writer(f)
            wr.writerow(ONTOLOGY_COLUMNS)
            for rid, cls, term, syn, _, exc, par, chi in TERMS:
                wr.writerow([rid, cls, term, syn, counts[term], " | ".join(exc), " | ".join(par), " | ".join(chi)])


def _remove_stale_tmp(out: Path) -> None:
    """Remove the hidden ``.*.tmp`` files a killed synth left in its own cohort folder (each file is written
    under such a name and renamed when complete, so they are never a finished file)."""
    if out.is_dir():
        for p in out.rglob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)


def generate_cohort(
    out_dir: str | Path,
    *,
    patients: int,
    seed: int = 0,
    layout: str = "both",
    labeled_fraction: float = 0.25,
    quirk_rate: float = 0.1,
    lesions: bool = True,
    lesions_per_patient: tuple[int, int] = (2, 6),
    labeled_lesions: tuple[int, int] | None = None,
    labeled_coverage: str | None = None,
    matrix: int = 256,
    max_slices: int = 240,
    preview: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a synthetic CT cohort, one patient at a time (nothing is held beyond one volume).

    Args:
        out_dir: cohort folder (layout in the team contract: ``dicom/``, ``deeplesion/``, ``truth/``,
            ``cohort.json``, ``preview.png``).
        patients: number of phantom patients.
        seed: the cohort is a pure function of the arguments; patient ``i`` depends only on ``(seed, i)``.
        layout: ``both`` (labeled share as DeepLesion, the rest as DICOM), ``dicom`` or ``deeplesion``.
        labeled_fraction: share of patients written as the labeled DeepLesion share when ``layout="both"``.
        quirk_rate: probability per DICOM series of each scanner quirk (unsigned storage with intercept
            -1024, shuffled InstanceNumber, a scout in the same folder; RLE compression at half the rate).
        lesions: paint lesions, ``lesions_per_patient`` (low, high) per patient (more give the labeled share
            more key slices).
        labeled_lesions: (low, high) lesions per patient of the labeled share (default ``lesions_per_patient``):
            more give the labeled share more key slices (labeled inputs) without more patients.
        labeled_coverage: scan protocol of every labeled patient (e.g. ``whole-body``, so the labeled share
            covers the anatomy the labels name; default: drawn like every other patient).
        matrix: image size (256 default; 512 works, slower).
        max_slices: thickness is drawn (1-5 mm) among values that keep each series within about this many
            slices; thicker slices beyond 5 mm only when the coverage needs them.
        preview: also save ``preview.png``, a montage of windowed slices per body region with their labels.
        overwrite: write into a folder that already holds a finished cohort.
        progress: show a tqdm bar over patients.

    Returns:
        The ``cohort.json`` content (parameters, counts, term list, per-series summary).
    """
    if patients < 1:
        raise UserError(f"patients must be >= 1, got {patients}")
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not one of {LAYOUTS}")
    if not 0 <= lesions_per_patient[0] <= lesions_per_patient[1]:
        raise UserError(f"lesions_per_patient must be (low, high) with 0 <= low <= high, got {lesions_per_patient}")
    if labeled_lesions is not None and not 0 <= labeled_lesions[0] <= labeled_lesions[1]:
        raise UserError(f"labeled_lesions must be (low, high) with 0 <= low <= high, got {labeled_lesions}")
    if labeled_coverage is not None and labeled_coverage not in COVERAGES:
        raise UserError(f"labeled_coverage {labeled_coverage!r} is not one of {sorted(COVERAGES)}")
    for name, v in (("labeled_fraction", labeled_fraction), ("quirk_rate", quirk_rate)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {v}")
    if not 32 <= matrix <= 1024:
        raise UserError(f"matrix must be in 32..1024 pixels, got {matrix}")
    if max_slices < 8:
        raise UserError(f"max_slices must be >= 8, got {max_slices}")
    out = Path(out_dir)
    if (out / "cohort.json").exists() and not overwrite:
        raise UserError(f"{out} already holds a cohort (cohort.json); choose another folder or pass overwrite")
    _remove_stale_tmp(out)
    rng = np.random.default_rng([seed, 0])
    n_lab = {"both": round(labeled_fraction * patients), "dicom": 0, "deeplesion": patients}[layout]
    labeled = sorted(int(i) for i in rng.permutation(patients)[:n_lab])
    split = _splits(labeled, rng)
    writer, series, previews = _CohortWriter(out, seed), [], []
    ok = False
    try:
        for i in tqdm(range(patients), desc="synth patients", unit="patient", disable=not progress):
            lab = i in split
            params = sample_patient(np.random.default_rng([seed, i]), matrix=matrix, max_slices=max_slices,
                                    coverage=labeled_coverage if lab else None)
            ph = make_phantom(params, lesions=lesions,
                              lesions_per_patient=(labeled_lesions or lesions_per_patient) if lab else lesions_per_patient)
            pid = f"SYN{i:05d}"
            study_uid, series_uid = derive_uid(seed, i, "study"), derive_uid(seed, i, "series", 1)
            info = {"patient_id": pid, "coverage": params.coverage, "slices": int(ph.hu.shape[0]),
                    "thickness": params.thickness, "pixel": params.pixel, "contrast": params.contrast,
                    "lesions": len(ph.lesions), "series_uid": series_uid}
            if lab:
                pat = labeled.index(i) + 1
                rows = writer.add_deeplesion(pat, split[i], ph)
                info.update(layout="deeplesion", folder=f"{pat:06d}_01_01", split=split[i], dl_lesions=len(rows))
            else:
                rows = {}
                info.update(layout="dicom", quirks=_write_dicom_patient(out, seed, i, pid, study_uid, series_uid,
                                                                        ph, quirk_rate))
            writer.add_truth(pid, series_uid, info["layout"], ph, rows)
            series.append(info)
            if preview:
                previews += _preview_picks(ph, len(previews))
        if labeled:
            writer.write_deeplesion_tables()
        ok = True
    finally:
        writer.close(ok)
    if preview:
        _write_preview(out / "preview.png", previews)
    meta = {
        "generator": "dompre.synth.cohort", "seed": seed, "patients": patients, "layout": layout,
        "labeled_fraction": labeled_fraction, "quirk_rate": quirk_rate, "lesions": lesions,
        "lesions_per_patient": list(lesions_per_patient),
        "labeled_lesions": list(labeled_lesions) if labeled_lesions else None, "labeled_coverage": labeled_coverage,
        "matrix": matrix,
        "max_slices": max_slices,
        "counts": {"dicom_series": sum(s["layout"] == "dicom" for s in series),
                   "deeplesion_series": sum(s["layout"] == "deeplesion" for s in series),
                   "slices": sum(s["slices"] for s in series), "lesions": sum(s["lesions"] for s in series),
                   "dl_lesions": len(writer.dl_rows),
                   "quirks": {q: sum(q in s.get("quirks", ()) for s in series)
                              for q in ("unsigned", "shuffled", "scout", "rle")}},
        "term_list": [r[2] for r in TERMS], "body_terms": BODY_TERMS, "series": series,
    }
    write_atomic(out / "cohort.json", json.dumps(meta, indent=1))
    return meta


def _write_dicom_patient(out: Path, seed: int, i: int, pid: str, study_uid: str, series_uid: str,
                         ph: Phantom, quirk_rate: float) -> list[str]:
    """One unlabeled TCIA-like series (with its drawn quirks) under dicom/<PatientID>/<Study>/<Series>/."""
    q = np.random.default_rng([seed, i, 3]).random(4)
    quirks = [name for name, r, rate in zip(("unsigned", "shuffled", "scout", "rle"), q,
                                            (quirk_rate, quirk_rate, quirk_rate, quirk_rate / 2)) if r < rate]
    folder = out / "dicom" / pid / study_uid / series_uid
    p = ph.params
    body_part = BODY_PART_EXAMINED[p.coverage]
    write_dicom_series(folder, ph.hu, spacing=ph.spacing, patient_id=pid, study_uid=study_uid,
                       series_uid=series_uid, origin=ph.origin, body_part=body_part,
                       window=(40, 400) if p.coverage != "head" else (40, 80), unsigned="unsigned" in quirks,
                       shuffle_instance="shuffled" in quirks, transfer_syntax=RLELossless if "rle" in quirks else None,
                       rng=np.random.default_rng([seed, i, 4]))
    if "scout" in quirks:
        write_scout(folder, ph.hu, spacing=ph.spacing, patient_id=pid, study_uid=study_uid, origin=ph.origin,
                    body_part=body_part, rng=np.random.default_rng([seed, i, 5]))
    return quirks


_PREVIEW_REGIONS = ("head", "neck", "chest", "abdomen", "pelvis", "thigh")


def _preview_picks(ph: Phantom, have: int, per_region: int = 2) -> list[tuple[str, np.ndarray, list[str]]]:
    """Up to ``per_region`` mid-region slices per body region of this patient (first patients first)."""
    if have >= len(_PREVIEW_REGIONS) * per_region * 2:
        return []
    picks = []
    for reg in _PREVIEW_REGIONS:
        ks = [k for k, z in enumerate(ph.body_z) if region_of(float(z)) == reg]
        if ks:
            picks.append((reg, ph.hu[ks[len(ks) // 2]].copy(), ph.labels[ks[len(ks) // 2]]))
    return picks


def _write_preview(path: Path, picks: list[tuple[str, np.ndarray, list[str]]]) -> None:
    """Montage of windowed slices with their labels (matplotlib Agg), sorted head to thighs."""
    import matplotlib  # lazy: pyplot costs ~0.34 s to import and only --preview draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = sorted(picks, key=lambda p: _PREVIEW_REGIONS.index(p[0]))[:24]
    cols = min(6, max(1, len(picks)))
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (reg, img, labels) in zip(axes.flat, picks):
        lo, hi = {"head": (-20, 120), "chest": (-1000, 250)}.get(reg, (-160, 240))
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        text = ", ".join(labels)
        ax.set_title(f"{reg}: " + "\n".join(text[j:j + 48] for j in range(0, len(text), 48)), fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
