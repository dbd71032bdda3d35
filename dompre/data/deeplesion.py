"""DeepLesion (NIH) readers: ``DL_info.csv``, 16-bit PNG slices, LesaNet label files, the lesion ontology, and
the builder that turns one lesion into one labeled 3-channel input.

Layout (``../shared/formats.md``)::

    ROOT/Images_png/<patient:06d>_<study:02d>_<series:02d>/<slice:03d>.png   uint16, HU = value - 32768
    ROOT/DL_info.csv                                                          one row per lesion (18 columns)
    text_mined_labels_171_and_split.json, hand_labeled_test_set.json, lesion_ontology_181022.xlsx  (LesaNet)

The lesion index used by the label files is the 0-based row of ``DL_info.csv``.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from PIL import Image

from dompre.data.prep import PrepConfig, prepare_stack
from dompre.errors import UnknownName, UserError

DL_COLUMNS = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
    "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
    "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
    "Patient_age", "Train_Val_Test",
)
_LIST_COLUMNS = ("Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
                 "Normalized_lesion_location", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows")
_ONE_BASED = ("Measurement_coordinates", "Bounding_boxes")  # pixel coordinates counted from 1 in the csv
_INT_COLUMNS = ("Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Coarse_lesion_type",
                "Possibly_noisy", "Train_Val_Test")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {1: "train", 2: "val", 3: "test"}  # Train_Val_Test column
ONTOLOGY_COLUMNS = ("id", "class", "term", "synonyms", "num_detected", "term_exclusive", "term_parents",
                    "term_children")
HU_OFFSET = 32768


# ----------------------------------------------------------------------------------------------- DL_info.csv
def _parse_list(cell: str, path: Path, column: str, row: int) -> tuple[float, ...]:
    """One quoted list cell (``"221.1, 180.6"``) as a float tuple."""
    try:
        return tuple(float(v) for v in str(cell).split(",") if v.strip())
    except ValueError:
        raise UserError(f"{path}: row {row} column {column}: {cell!r} is not a comma-separated number list; "
                         "list cells must look like \"1.5, 2, 3\"") from None


def read_dl_info(path: str | Path) -> pd.DataFrame:
    """Read DeepLesion's ``DL_info.csv``.

    List cells become float tuples; ``Measurement_coordinates`` and ``Bounding_boxes`` are converted from the
    csv's 1-based pixels to 0-based. Two columns are added: ``folder`` (``000001_01_01``) and ``slice_file``
    (``109.png``), the key slice's path relative to ``Images_png``.

    Args:
        path: the csv file.

    Returns:
        DataFrame with the 18 columns in order (plus ``folder``, ``slice_file``), indexed by the lesion index
        (0-based row number).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: DL_info.csv not found; pass the DeepLesion DL_info.csv file")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in DL_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; DL_info.csv must have the 18 columns "
                         f"{list(DL_COLUMNS)}")
    df = df.loc[:, list(DL_COLUMNS)].copy()
    for col in _LIST_COLUMNS:
        values = [_parse_list(v, path, col, i) for i, v in enumerate(df[col])]
        if col in _ONE_BASED:
            values = [tuple(v - 1.0 for v in t) for t in values]
        df[col] = pd.Series(values, index=df.index, dtype=object)
    for col in _INT_COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        if num.isna().any():
            row = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise UserError(f"{path}: row {row} column {col}: {df[col].iat[row]!r} is not an integer")
        df[col] = num.astype(np.int64)
    df["Patient_age"] = pd.to_numeric(df["Patient_age"], errors="coerce")
    names = df["File_name"].astype(str)
    bad = ~names.str.contains("_", regex=False)
    if bad.any():
        raise UserError(f"{path}: File_name {names[bad].iat[0]!r} is not like 000001_01_01_109.png")
    parts = names.str.rsplit("_", n=1)
    df["folder"] = parts.str[0]
    df["slice_file"] = parts.str[1]
    df.index = pd.RangeIndex(len(df), name="lesion_idx")
    return df


def read_png_slice(path: str | Path) -> np.ndarray:
    """Read one DeepLesion 16-bit PNG slice as float32 Hounsfield units (pixel value − 32768)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PNG slice not found")
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.asarray(im)
    except OSError as e:
        raise UserError(f"{path}: unreadable PNG ({e})") from None
    if mode not in ("I;16", "I;16L", "I;16B", "I") or (mode == "I" and (arr.min() < 0 or arr.max() > 65535)):
        raise UserError(f"{path}: PNG mode {mode!r} is not 16-bit grayscale; DeepLesion slices are uint16 "
                         "PNGs holding HU + 32768")
    return arr.astype(np.float32) - HU_OFFSET


# ------------------------------------------------------------------------------------------- LesaNet labels
@dataclass
class LesaNetLabels:
    """LesaNet's ``text_mined_labels_171_and_split.json``.

    Attributes:
        term_list: label names (171 in the real file).
        lesion_idxs: per split, the lesion indices (rows of ``DL_info.csv``).
        relevant, uncertain, irrelevant: per split, one list of term indices per lesion (may repeat; the real
            file has irrelevant labels for ``train`` only, empty lists elsewhere).
        path: the file read.
    """
    term_list: list[str]
    lesion_idxs: dict[str, list[int]]
    relevant: dict[str, list[list[int]]]
    uncertain: dict[str, list[list[int]]]
    irrelevant: dict[str, list[list[int]]]
    path: Path | None = None

    def term_indices(self, terms: list[str] | None) -> list[int]:
        """Indices into ``term_list`` of ``terms`` (all terms when None)."""
        if terms is None:
            return list(range(len(self.term_list)))
        pos = {t: i for i, t in enumerate(self.term_list)}
        unknown = [t for t in terms if t not in pos]
        if unknown:
            raise UnknownName(f"{self.path}: term(s) {unknown[:5]} not in the term list; use names from term_list")
        return [pos[t] for t in terms]

    def matrix(self, split: str, terms: list[str] | None = None) -> np.ndarray:
        """Label matrix of one split: 1 relevant, NaN uncertain, 0 otherwise.

        A term both relevant and uncertain for a lesion counts as relevant, as LesaNet's loader does.

        Args:
            split: ``train``, ``val`` or ``test``.
            terms: columns to return, in this order (default: the whole term list).

        Returns:
            float32 (n_lesions_in_split, n_terms).
        """
        if split not in self.lesion_idxs:
            raise UnknownName(f"{self.path}: split {split!r} not found; choose one of {list(self.lesion_idxs)}")
        cols = self.term_indices(terms)
        full = np.zeros((len(self.lesion_idxs[split]), len(self.term_list)), np.float32)
        for i, unc in enumerate(self.uncertain[split]):
            full[i, unc] = np.nan
        for i, rel in enumerate(self.relevant[split]):
            full[i, rel] = 1.0
        return full[:, cols]

    def split_of(self) -> dict[int, tuple[str, int]]:
        """Map lesion index -> (split, row in that split's matrix)."""
        return {idx: (s, i) for s in self.lesion_idxs for i, idx in enumerate(self.lesion_idxs[s])}


def _read_json(path: Path) -> Any:
    """A JSON file's content; ValueError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e}); pass the LesaNet JSON label file") from None


def _inside(base: Path, rel: str, what: str) -> Path:
    """``base / rel``, refused when ``rel`` is absolute or climbs out of ``base`` (a path from a data file)."""
    path = Path(os.path.normpath(base / rel))
    if Path(rel).is_absolute() or not path.is_relative_to(Path(os.path.normpath(base))):
        raise UserError(f"{what} {rel!r} points outside {base}; refused")
    return path


def load_lesanet_labels(path: str | Path) -> LesaNetLabels:
    """Load LesaNet's ``text_mined_labels_171_and_split.json`` (or a file of the same layout)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LesaNet label file not found; pass text_mined_labels_171_and_split.json")
    data = _read_json(path)
    if not isinstance(data, dict) or "term_list" not in data:
        raise UserError(f"{path}: not a LesaNet label file (a dict with term_list and <split>_lesion_idxs)")
    splits = [s for s in SPLITS if f"{s}_lesion_idxs" in data]
    if not splits:
        raise UserError(f"{path}: no <split>_lesion_idxs key; expected train/val/test_lesion_idxs")
    n_terms = len(data["term_list"])
    out = LesaNetLabels(list(data["term_list"]), {}, {}, {}, {}, path)
    for s in splits:
        idxs = [int(i) for i in data[f"{s}_lesion_idxs"]]
        out.lesion_idxs[s] = idxs
        for kind, store in (("relevant", out.relevant), ("uncertain", out.uncertain),
                            ("irrelevant", out.irrelevant)):
            lists = data.get(f"{s}_{kind}_labels", [[] for _ in idxs])
            if len(lists) != len(idxs):
                raise UserError(f"{path}: {s}_{kind}_labels has {len(lists)} entries for {len(idxs)} lesions")
            lists = [[int(j) for j in lst] for lst in lists]
            bad = [j for lst in lists for j in lst if not 0 <= j < n_terms]
            if bad:
                raise UserError(f"{path}: {s}_{kind}_labels holds term index {bad[0]} outside 0..{n_terms - 1}")
            store[s] = lists
    return out


@dataclass
class HandLabeledSet:
    """LesaNet's hand-labeled test set: ``labels`` float32 (n, L) over ``terms`` (1 present, 0 absent)."""
    lesion_idxs: list[int]
    texts: list[str]
    terms: list[str]
    labels: np.ndarray
    ignored_terms: set[str] = field(default_factory=set)


def load_hand_labeled(path: str | Path, terms: list[str]) -> HandLabeledSet:
    """Load ``hand_labeled_test_set.json``; ``expanded_terms`` not in ``terms`` are ignored (and listed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-labeled set not found; pass hand_labeled_test_set.json")
    items = _read_json(path)
    if not isinstance(items, list) or any("lesion_idx" not in d for d in items):
        raise UserError(f"{path}: expected a list of {{text, lesion_idx, expanded_terms}} dicts")
    pos = {t: i for i, t in enumerate(terms)}
    labels = np.zeros((len(items), len(terms)), np.float32)
    ignored: set[str] = set()
    for i, d in enumerate(items):
        for t in d.get("expanded_terms", []):
            if t in pos:
                labels[i, pos[t]] = 1.0
            else:
                ignored.add(t)
    return HandLabeledSet([int(d["lesion_idx"]) for d in items], [str(d.get("text", "")) for d in items],
                          list(terms), labels, ignored)


# ------------------------------------------------------------------------------------------------- ontology
def _split_names(cell) -> list[str]:
    """A `` | ``-joined ontology cell as a list of names."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [s.strip() for s in str(cell).split("|") if s.strip()]


@dataclass
class Ontology:
    """LesaNet's lesion ontology with the exclusivity closure.

    Attributes:
        terms: term names in file order.
        term_class: term -> ``bodypart`` / ``type`` / ``attribute``.
        parents: term -> all its ancestors (transitive).
        children: term -> all its descendants (transitive, from ``parents``).
        exclusive: term -> the terms it is exclusive with, after the closure (symmetric).
        synonyms: term -> synonyms.
        path: the file read.
    """
    terms: list[str]
    term_class: dict[str, str]
    parents: dict[str, list[str]]
    children: dict[str, list[str]]
    exclusive: dict[str, set[str]]
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    path: Path | None = None

    def _index(self, label_names: list[str]) -> dict[str, int]:
        unknown = [t for t in label_names if t not in self.term_class]
        if unknown:
            raise UnknownName(f"{self.path}: label(s) {unknown[:5]} not in the ontology; use the ontology's terms")
        return {t: i for i, t in enumerate(label_names)}

    def select(self, class_: str = "bodypart", within: list[str] | None = None) -> list[str]:
        """Terms of one class, in ``within``'s order if given (e.g. the label file's term list), else file order."""
        classes = sorted(set(self.term_class.values()))
        if class_ not in classes:
            raise UserError(f"{self.path}: class {class_!r} not in the ontology; choose one of {classes}")
        pool = self.terms if within is None else [t for t in within if t in self.term_class]
        return [t for t in pool if self.term_class[t] == class_]

    def exclusive_pairs(self, label_names: list[str]) -> list[tuple[int, int]]:
        """Index pairs (i < j) of mutually exclusive labels among ``label_names``."""
        pos = self._index(label_names)
        return sorted({(min(i, pos[e]), max(i, pos[e])) for i, t in enumerate(label_names)
                       for e in self.exclusive[t] if e in pos})

    def parent_indices(self, label_names: list[str]) -> list[list[int]]:
        """Per label, the indices of all its ancestors among ``label_names``."""
        pos = self._index(label_names)
        return [sorted(pos[p] for p in self.parents[t] if p in pos) for t in label_names]


def apply_label_relations(labels: np.ndarray, exclusive: np.ndarray, parents: list[list[int]]) -> np.ndarray:
    """LesaNet's relational cleaning of text-mined labels (1 relevant, 0 irrelevant, NaN uncertain); a copy.

    As the official loader (rsummers11/CADLab ``LesaNet/dataset_DeepLesion.py`` ``__getitem__``), per lesion:

    1. an uncertain label makes its ancestors uncertain too: a 0 ancestor of a NaN label becomes NaN (a
       relevant ancestor stays 1);
    2. every label exclusive with one of the lesion's relevant labels and not relevant itself is a certain
       negative: it becomes 0, also where it was uncertain (NaN) or was made uncertain by step 1;
    3. relevant labels stay 1, even when two of them are exclusive with each other (contradictory report text):
       neither is turned into a negative.

    Differences from the official code: ancestors are the ontology's transitive parents (the official step 1
    takes one level of ``parents``); uncertain labels stay uncertain in training too (the official training
    option ``TEXT_MINED_LABEL: RU`` counts them as positives, and then their exclusive labels as negatives).

    Args:
        labels: (N, L) float matrix over the label names.
        exclusive: (L, L) bool exclusivity matrix of those names (e.g. from :meth:`Ontology.exclusive_pairs`).
        parents: per label, the indices of its ancestors among the names (:meth:`Ontology.parent_indices`).
    """
    out = np.array(labels, dtype=np.float32, copy=True)
    if out.ndim != 2 or exclusive.shape != (out.shape[1], out.shape[1]) or len(parents) != out.shape[1]:
        raise ValueError(f"labels {out.shape}, exclusive {exclusive.shape} and {len(parents)} parent lists "
                         f"must cover the same labels")
    pos = out == 1
    unc = np.isnan(out)
    for j, ps in enumerate(parents):
        if ps:
            rows = unc[:, j]
            sub = out[np.ix_(rows, ps)]
            sub[sub == 0] = np.nan
            out[np.ix_(rows, ps)] = sub
    negative = (pos.astype(np.float32) @ np.asarray(exclusive, dtype=np.float32) > 0) & ~pos
    out[negative] = 0.0
    return out


def _read_ontology_rows(path: Path) -> list[dict]:
    """Rows of the ontology sheet (xlsx via openpyxl) or csv as dicts keyed by column name."""
    if path.suffix.lower() in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook
        wb = load_workbook(path, read_only=True, data_only=True)
        try:
            rows = list(wb.worksheets[0].iter_rows(values_only=True))
        finally:
            wb.close()
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    else:
        raise UserError(f"{path}: ontology must be .xlsx or .csv (columns {list(ONTOLOGY_COLUMNS)})")
    if not rows:
        raise UserError(f"{path}: empty ontology file")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    missing = [c for c in ONTOLOGY_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; expected {list(ONTOLOGY_COLUMNS)}")
    col = {c: header.index(c) for c in ONTOLOGY_COLUMNS}
    out = []
    for r in rows[1:]:
        r = list(r) + [None] * (len(header) - len(r))
        if r[col["term"]] in (None, ""):
            continue
        out.append({c: (None if r[i] == "" else r[i]) for c, i in col.items()})
    return out


def _ancestors(direct: dict[str, list[str]]) -> dict[str, list[str]]:
    """Transitive closure of a term -> parents map."""
    out: dict[str, list[str]] = {}
    for t in direct:
        seen, stack = [], list(direct[t])
        while stack:
            p = stack.pop()
            if p not in seen and p != t:
                seen.append(p)
                stack.extend(direct.get(p, []))
        out[t] = seen
    return out


def exclusivity_closure(exclusive: dict[str, set[str]], parents: dict[str, list[str]],
                        children: dict[str, list[str]]) -> dict[str, set[str]]:
    """Spread exclusivity until nothing changes (formats.md, as LesaNet's ``gen_exclusive_list``).

    A term is exclusive with the children of its exclusive terms, and inherits its parents' exclusive terms.
    The input relation is made symmetric first; with transitive ``parents``/``children`` the result then stays
    symmetric. Finally a term is never exclusive with its own ancestor or descendant: with several parents the
    rules can produce such pairs (``rectum`` inherits ``abdomen``'s exclusion of its other parent ``pelvis``),
    and they would contradict parent expansion, so they are removed (symmetrically).
    """
    ex = {t: set(v) for t, v in exclusive.items()}
    for t in list(ex):
        for e in list(ex[t]):
            ex.setdefault(e, set()).add(t)
    changed = True
    while changed:
        changed = False
        for t in ex:
            new = set(ex[t])
            for e in ex[t]:
                new.update(children.get(e, ()))
            for p in parents.get(t, ()):
                new.update(ex.get(p, ()))
            new.discard(t)
            if new != ex[t]:
                ex[t], changed = new, True
    for t in ex:
        ex[t] -= set(parents.get(t, ())) | set(children.get(t, ()))
    return ex


def load_ontology(path: str | Path) -> Ontology:
    """Load LesaNet's ``lesion_ontology_181022.xlsx`` (or a csv with the same columns), with the closure.

    Names used in the parent / child / exclusive lists but missing from the ``term`` column (the real file has
    a few, e.g. ``artery``) are kept as nodes of the hierarchy, so relations still pass through them; they are
    not in ``terms``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ontology not found; pass lesion_ontology_181022.xlsx or a csv copy")
    rows = _read_ontology_rows(path)
    terms = [str(r["term"]).strip() for r in rows]
    if len(set(terms)) != len(terms):
        dup = sorted({t for t in terms if terms.count(t) > 1})
        raise UserError(f"{path}: duplicated term(s) {dup[:5]}; each term must appear once")
    direct: dict[str, set[str]] = {t: set() for t in terms}
    exclusive: dict[str, set[str]] = {t: set() for t in terms}
    for t, r in zip(terms, rows):
        direct[t].update(_split_names(r["term_parents"]))
        for c in _split_names(r["term_children"]):
            direct.setdefault(c, set()).add(t)
        exclusive[t].update(_split_names(r["term_exclusive"]))
    nodes = set(direct) | {p for ps in direct.values() for p in ps} | {e for es in exclusive.values() for e in es}
    parents = _ancestors({n: sorted(direct.get(n, ())) for n in sorted(nodes)})
    children: dict[str, list[str]] = {n: [] for n in parents}
    for n in sorted(parents):
        for p in parents[n]:
            children[p].append(n)
    return Ontology(terms=terms,
                    term_class={t: str(r["class"]).strip() for t, r in zip(terms, rows)},
                    parents=parents, children=children,
                    exclusive=exclusivity_closure({n: exclusive.get(n, set()) for n in parents}, parents, children),
                    synonyms={t: _split_names(r["synonyms"]) for t, r in zip(terms, rows)}, path=path)


# --------------------------------------------------------------------------------------------- lesion input
@dataclass(frozen=True)
class LesionInputConfig:
    """How one DeepLesion lesion becomes one 3-channel input (the lesion part of an ingest recipe)."""
    neighbours: Literal["consecutive", "interval"] = "consecutive"  # key-1, key, key+1 | key -/+ interval_mm
    interval_mm: float = 2.0   # "interval": neighbour distance; LesaNet's 2 mm, linearly interpolated
    prep: PrepConfig = field(default_factory=PrepConfig)  # window, body crop, size, keep_aspect (as for DICOM)

    def __post_init__(self) -> None:
        if not self.interval_mm > 0:
            raise UserError(f"interval_mm = {self.interval_mm!r} must be > 0 mm (LesaNet uses 2)")


@dataclass
class LesionInput:
    """One lesion as a stored input: ``image`` uint8 (3, S, S), ``bbox`` (x1, y1, x2, y2) in its pixels."""
    image: np.ndarray
    bbox: tuple[float, float, float, float]
    lesion_idx: int
    split: str
    labels: np.ndarray | None
    meta: dict


def _slice_reader(folder: Path, key: int) -> Callable[[int], np.ndarray]:
    """``get(delta)``: HU of slice ``key + delta``, or of the nearest existing slice toward the key (LesaNet)."""
    available = {int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()}
    if key not in available:
        raise FileNotFoundError(f"{folder / f'{key:03d}.png'}: key slice PNG missing")
    cache: dict[int, np.ndarray] = {}

    def get(delta: int) -> np.ndarray:
        d = int(delta)
        while d != 0 and key + d not in available:
            d -= int(np.sign(d))
        if key + d not in cache:
            cache[key + d] = read_png_slice(folder / f"{key + d:03d}.png")
        return cache[key + d]
    return get


def load_lesion_slices(folder: str | Path, key: int, slice_interval: float,
                       neighbours: Literal["consecutive", "interval"] = "consecutive",
                       interval_mm: float = 2.0) -> np.ndarray:
    """The key slice and its two neighbours as float32 HU (3, H, W), channel 1 = key slice.

    ``consecutive`` takes slices key-1 and key+1. ``interval`` takes the planes ``interval_mm`` away, linearly
    interpolated between the two nearest slices when the slice interval does not divide ``interval_mm``, and
    the key slice three times when the interval is unknown, as LesaNet's loader does. A missing neighbour file
    is replaced by the nearest existing slice toward the key.
    """
    folder = Path(folder)
    get = _slice_reader(folder, int(key))
    if neighbours == "consecutive":
        rel = 1.0
    elif neighbours == "interval":
        if not (np.isfinite(slice_interval) and slice_interval > 0):
            cur = get(0)
            return np.stack([cur, cur, cur])
        rel = round(float(interval_mm) / float(slice_interval), 6)
    else:
        raise UserError(f"neighbours={neighbours!r}; choose 'consecutive' or 'interval'")
    lo, hi = int(np.floor(rel)), int(np.ceil(rel))
    a = rel - lo  # weight of the farther slice
    planes = []
    for sign in (-1, 1):
        if lo == hi:
            planes.append(get(sign * lo))
        else:
            planes.append(a * get(sign * hi) + (1.0 - a) * get(sign * lo))
    shapes = {p.shape for p in (planes[0], get(0), planes[1])}
    if len(shapes) != 1:
        raise UserError(f"{folder}: slices around {key:03d}.png differ in size {sorted(shapes)}")
    return np.stack([planes[0], get(0), planes[1]]).astype(np.float32, copy=False)


def _map_box(box: np.ndarray, crop: tuple[int, int, int, int], size: int, keep_aspect: bool) -> np.ndarray:
    """Map (x1, y1, x2, y2) of the original slice through the crop (y0, y1, x0, x1) and the resize."""
    y0, y1, x0, x1 = crop
    h, w = y1 - y0, x1 - x0
    if keep_aspect:  # monai Resize(size_mode="longest") then symmetric SpatialPad
        scale = size / max(h, w)
        nh, nw = int(round(h * scale)), int(round(w * scale))
        sy, sx, oy, ox = nh / h, nw / w, (size - nh) // 2, (size - nw) // 2
    else:
        sy, sx, oy, ox = size / h, size / w, 0, 0
    out = np.array([(box[0] - x0) * sx + ox, (box[1] - y0) * sy + oy,
                    (box[2] - x0) * sx + ox, (box[3] - y0) * sy + oy])
    return np.clip(out, 0, size - 1)


def build_lesion_input(root: str | Path, info: pd.DataFrame, lesion_idx: int, *,
                       cfg: LesionInputConfig = LesionInputConfig(), split: str = "",
                       labels: np.ndarray | None = None) -> LesionInput:
    """One DeepLesion lesion -> one labeled 3-channel input, prepared like the DICOM inputs.

    Args:
        root: DeepLesion folder holding ``Images_png/``.
        info: :func:`read_dl_info` table.
        lesion_idx: the lesion (row of ``info``).
        cfg: neighbour slices and preparation (window, body crop, resize).
        split: ``train`` / ``val`` / ``test`` (stored in the meta).
        labels: the lesion's label row (1 / 0 / NaN), carried as is.

    Returns:
        :class:`LesionInput` with ``meta`` ready for ``StoreWriter.add``.

    Raises:
        FileNotFoundError: the key slice PNG is missing. ValueError: a slice is not a 16-bit PNG.
    """
    if lesion_idx not in info.index:
        raise UnknownName(f"lesion {lesion_idx} is not a row of DL_info.csv ({len(info)} rows)")
    row = info.loc[lesion_idx]
    root = Path(root)
    folder = _inside(root / "Images_png", row["folder"], "DL_info.csv File_name")
    spacing = tuple(row["Spacing_mm_px_"]) + (float("nan"),) * 3
    dz = float(spacing[2])
    hu = load_lesion_slices(folder, int(row["Key_slice_index"]), dz, cfg.neighbours, cfg.interval_mm)
    p = cfg.prep
    own = tuple(row["DICOM_windows"][:2]) if len(row["DICOM_windows"]) >= 2 else None
    image, crop = prepare_stack(hu, p, window=own)  # the same preparation as every DICOM input
    y0, y1, x0, x1 = crop
    win = own if (p.window_source == "series" and own is not None) else p.window
    box = np.asarray(row["Bounding_boxes"][:4], np.float64)
    bbox = _map_box(box, crop, p.size, p.keep_aspect) if box.size == 4 else np.empty(0)  # empty: no box given
    scale = max(y1 - y0, x1 - x0) / p.size if p.keep_aspect else None
    sy = scale or (y1 - y0) / p.size
    sx = scale or (x1 - x0) / p.size
    bbox_t = tuple(float(v) for v in bbox)
    meta = {"source": "deeplesion", "series_uid": row["folder"], "patient": f"{int(row['Patient_index']):06d}",
            "z": float(row["Key_slice_index"]) * dz if np.isfinite(dz) else float("nan"),
            "z_index": int(row["Key_slice_index"]),
            "spacing": [cfg.interval_mm if cfg.neighbours == "interval" else dz,
                        float(spacing[1]) * sy, float(spacing[0]) * sx],
            "window": [float(win[0]), float(win[1])], "split": split, "lesion_idx": int(lesion_idx),
            "bbox": list(bbox_t), "body_box": [int(v) for v in crop],
            "file": f"Images_png/{row['folder']}/{row['slice_file']}",
            "lesion_type": int(row["Coarse_lesion_type"])}
    return LesionInput(image, bbox_t, int(lesion_idx), split, labels, meta)
