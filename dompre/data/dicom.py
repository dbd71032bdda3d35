"""CT DICOM reading: discovery, grouping by SeriesInstanceUID, slice ordering and Hounsfield units.

A download is a tree of folders whose layout cannot be trusted: :func:`scan_tree` reads only the headers
of every file, groups them by ``SeriesInstanceUID`` (never by folder) and reports the files it cannot use.
:func:`read_series` turns one series into a :class:`CTVolume`: scouts/localizers dropped, slices ordered by
position along the slice normal, stored values rescaled to HU, spacing and orientation checked.

Pixel data are decoded by pydicom (compressed syntaxes through the pylibjpeg plugins); SimpleITK (GDCM)
is the fallback for files pydicom cannot decode. A series that cannot be used raises :class:`SeriesError`
whose message is the reason written to the ingest report; safe repairs are listed in ``meta["notes"]``.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels import pixel_array
from pydicom.tag import Tag

log = logging.getLogger(__name__)

_HEADER_TAGS = [Tag(k) for k in ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SOPClassUID",
                                  "SeriesDescription", "NumberOfFrames", "BodyPartExamined")]
_HEADER_END = max(_HEADER_TAGS)  # the scan stops parsing after the last tag it needs
# read_series' tags besides group 0028 (which pydicom's pixel_array always reads)
_SLICE_TAGS = [Tag(k) for k in ("SOPInstanceUID", "Modality", "ImageType", "PatientID", "StudyInstanceUID",
                                "SeriesInstanceUID", "BodyPartExamined", "ImagePositionPatient",
                                "ImageOrientationPatient", "InstanceNumber", "PerFrameFunctionalGroupsSequence",
                                "SharedFunctionalGroupsSequence")]
_GAP_FACTOR = 1.5        # a step larger than this × the median step is a missing slice
_JITTER = 0.2            # steps within ±20 % of the median are regular


class SeriesError(ValueError):
    """A series that cannot be used; ``str(e)`` is the reason written to the ingest report."""


@dataclass
class SeriesInfo:
    """One series found by discovery: its files (unordered) and identifying header values."""
    series_uid: str
    files: list[Path] = field(default_factory=list)
    patient: str = ""
    study_uid: str = ""
    modality: str = ""
    description: str = ""
    body_part: str = ""
    multiframe: bool = False

    @property
    def n_files(self) -> int:
        return len(self.files)


@dataclass
class CTVolume:
    """A CT volume: ``hu`` float32 (z, y, x) in Hounsfield units, ``spacing`` (z, y, x) mm, ``meta`` dict.

    ``meta`` keys: patient, study_uid, series_uid, body_part, files (one per slice, in z order; the same file
    repeated for multi-frame), z (slice positions along the normal, mm), window ((low, high) HU or None),
    orientation (6 direction cosines), notes (repairs applied).
    """
    hu: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any]


def _read_header(path: Path) -> pydicom.Dataset:
    """The grouping tags only; parsing stops after the last of them (about half the cost of the full header)."""
    with open(path, "rb") as f:
        return read_partial(f, stop_when=lambda tag, vr, length: tag > _HEADER_END, force=True,
                            specific_tags=_HEADER_TAGS)


def scan_file(path: str | Path) -> tuple[dict | None, str]:
    """Header of one file as a dict of the grouping keys, or (None, reason) when it is not usable DICOM."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None, "zero-byte file"
        ds = _read_header(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as e:
        return None, f"not readable as DICOM ({type(e).__name__}: {e})"
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        return None, "not a DICOM image (no SeriesInstanceUID)"
    return {"series_uid": uid, "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "patient": str(ds.get("PatientID", "") or ""), "modality": str(ds.get("Modality", "") or ""),
            "description": str(ds.get("SeriesDescription", "") or ""),
            "body_part": str(ds.get("BodyPartExamined", "") or ""),
            "multiframe": int(ds.get("NumberOfFrames", 1) or 1) > 1}, ""


def group_headers(items: Iterable[tuple[Path, dict]]) -> list[SeriesInfo]:
    """Group (path, header dict) pairs by SeriesInstanceUID; series sorted by patient, study, uid."""
    series: dict[str, SeriesInfo] = {}
    for path, h in items:
        info = series.get(h["series_uid"])
        if info is None:
            info = series[h["series_uid"]] = SeriesInfo(
                h["series_uid"], [], h["patient"], h["study_uid"], h["modality"], h["description"],
                h["body_part"], h["multiframe"])
        info.files.append(path)
        info.multiframe = info.multiframe or h["multiframe"]
    for info in series.values():
        info.files.sort()
    return sorted(series.values(), key=lambda s: (s.patient, s.study_uid, s.series_uid))


def list_files(root: str | Path) -> list[Path]:
    """Every regular file under ``root`` (sorted; hidden files and folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist or is not a folder; pass the DICOM root")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def scan_tree(root: str | Path) -> tuple[list[SeriesInfo], list[tuple[Path, str]]]:
    """Walk ``root``, read headers and group by series; returns (series, [(bad file, reason)])."""
    good, bad = [], []
    for path in list_files(root):
        header, reason = scan_file(path)
        (good.append((path, header)) if header else bad.append((path, reason)))
    return group_headers(good), bad


def discover_series(root: str | Path) -> list[SeriesInfo]:
    """All series under ``root`` grouped by SeriesInstanceUID; unusable files are logged and left out."""
    series, bad = scan_tree(root)
    for path, reason in bad:
        log.info("skipped %s: %s", path, reason)
    return series


# ---------------------------------------------------------------------------------------------- reading

def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None


def _fg(ds: pydicom.Dataset, frame: int | None, seq: str, attr: str) -> Any:
    """A functional-group value of an enhanced multi-frame file: per-frame, then shared, then top level."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for g in groups:
        if seq in g and len(g[seq].value) and attr in g[seq].value[0]:
            return g[seq].value[0][attr].value
    return ds.get(attr)


@dataclass
class _Slice:
    pos: np.ndarray | None
    orient: np.ndarray | None
    instance: int
    slope: float | None
    intercept: float | None
    spacing: np.ndarray | None
    file: Path
    ds: pydicom.Dataset
    frame: int | None = None
    pixels: np.ndarray | None = None  # stored values of the whole file, when decoded while reading


def _slices_of(path: Path, ds: pydicom.Dataset, pixels: np.ndarray | None = None) -> list[_Slice]:
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n <= 1:
        return [_Slice(_floats(ds.get("ImagePositionPatient"), 3), _floats(ds.get("ImageOrientationPatient"), 6),
                       int(ds.get("InstanceNumber", 0) or 0), ds.get("RescaleSlope"), ds.get("RescaleIntercept"),
                       _floats(ds.get("PixelSpacing"), 2), path, ds, None, pixels)]
    out = []
    for i in range(n):
        out.append(_Slice(_floats(_fg(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3),
                          _floats(_fg(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6), i + 1,
                          _fg(ds, i, "PixelValueTransformationSequence", "RescaleSlope"),
                          _fg(ds, i, "PixelValueTransformationSequence", "RescaleIntercept"),
                          _floats(_fg(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2), path, ds, i, pixels))
    return out


def _is_localizer(ds: pydicom.Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in image_type


def _drop_scouts(slices: list[_Slice], notes: list[str]) -> list[_Slice]:
    """Drop localizers and slices whose orientation differs from the majority."""
    kept = [s for s in slices if not _is_localizer(s.ds)]
    if len(kept) < len(slices):
        notes.append(f"dropped {len(slices) - len(kept)} localizer/scout image(s)")
    if not kept:
        raise SeriesError("localizer/scout series (ImageType LOCALIZER), no axial images")
    keys = Counter(tuple(np.round(s.orient, 3)) for s in kept if s.orient is not None)
    if keys:
        major = np.asarray(keys.most_common(1)[0][0])
        same = [s for s in kept if s.orient is not None and np.allclose(s.orient, major, atol=1e-3)]
        if len(same) < len(kept):
            notes.append(f"dropped {len(kept) - len(same)} slice(s) with another orientation (scouts)")
        kept = same
    return kept


def _order(slices: list[_Slice], notes: list[str]) -> tuple[list[_Slice], np.ndarray]:
    """Sort by position along the slice normal; return slices and their z (mm)."""
    if all(s.pos is not None and s.orient is not None for s in slices):
        o = slices[0].orient
        normal = np.cross(o[:3], o[3:])
        z = np.array([float(np.dot(s.pos, normal)) for s in slices])
    else:
        notes.append("ImagePositionPatient/ImageOrientationPatient missing: ordered by InstanceNumber, 1 mm apart")
        z = np.array([float(s.instance) for s in slices])
    order = np.argsort(z, kind="stable")
    return [slices[i] for i in order], z[order]


def _sop(s: _Slice) -> str:
    return "" if s.frame is not None else str(s.ds.get("SOPInstanceUID", "") or "")


def _check_z(slices: list[_Slice], z: np.ndarray, notes: list[str]) -> tuple[list[_Slice], np.ndarray]:
    """Resolve duplicated positions (identical copies are dropped) and reject gaps in z."""
    dup = np.flatnonzero(np.isclose(np.diff(z), 0.0, atol=1e-3)) + 1
    same = [i for i in dup if _sop(slices[i]) and _sop(slices[i]) == _sop(slices[i - 1])]
    if same:  # the same image stored twice (copied file): safe to keep one
        notes.append(f"dropped {len(same)} duplicate copy(ies) of the same SOPInstanceUID")
        keep = np.setdiff1d(np.arange(len(z)), same)
        slices, z = [slices[i] for i in keep], z[keep]
        dup = np.flatnonzero(np.isclose(np.diff(z), 0.0, atol=1e-3)) + 1
    if dup.size:
        raise SeriesError(f"duplicated slice positions: {dup.size} slice(s) share a position with another "
                          f"(e.g. z={z[dup[0]]:.2f} mm in {slices[dup[0]].file.name})")
    if len(z) > 2:
        steps = np.diff(z)
        med = float(np.median(steps))
        gaps = np.flatnonzero(steps > _GAP_FACTOR * med)
        if gaps.size:
            g = gaps[0]
            raise SeriesError(f"gap in z: {gaps.size} step(s) larger than {_GAP_FACTOR}x the median "
                              f"{med:.2f} mm (e.g. {z[g]:.2f} -> {z[g + 1]:.2f} mm); missing slices")
        if np.any(np.abs(steps - med) > _JITTER * med):
            notes.append(f"uneven slice spacing (steps {steps.min():.2f}..{steps.max():.2f} mm)")
    return slices, z


def _rescale(slices: list[_Slice], notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (slope, intercept); missing tags are safe to default only on signed data."""
    missing = [s for s in slices if s.slope is None or s.intercept is None]
    if missing:
        signed = int(missing[0].ds.get("PixelRepresentation", 0) or 0) == 1
        if not signed:
            raise SeriesError(f"missing RescaleSlope/RescaleIntercept on unsigned pixel data "
                              f"({missing[0].file.name}); HU cannot be known")
        notes.append(f"RescaleSlope/RescaleIntercept missing on {len(missing)} signed slice(s): used 1 and 0")
    slope = np.array([1.0 if s.slope is None else float(s.slope) for s in slices], np.float32)
    inter = np.array([0.0 if s.intercept is None else float(s.intercept) for s in slices], np.float32)
    return slope, inter


def _decode_sitk(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """GDCM through SimpleITK, for compressed syntaxes only: on native (uncompressed) data that pydicom
    rejects, GDCM silently pads short pixel data, so there it is no fallback."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or not ts.is_compressed:
        raise ValueError("native pixel data; no other decoder")
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr


def _decode(s: _Slice) -> np.ndarray:
    """Stored values of one file: pydicom first, SimpleITK (GDCM) where pydicom fails on compressed data."""
    if s.pixels is not None:
        return s.pixels
    try:
        return s.ds.pixel_array
    except Exception as e:  # noqa: BLE001 - any decoder failure falls back to GDCM
        try:
            arr = _decode_sitk(s.file, s.ds)
        except Exception as e2:  # noqa: BLE001
            raise SeriesError(f"pixel data cannot be decoded in {s.file.name} "
                              f"(pydicom: {type(e).__name__}: {e}; SimpleITK: {str(e2).strip()[:120]})") from None
        log.info("decoded %s with SimpleITK (pydicom: %s)", s.file, e)
        return arr


def _hu(slices: list[_Slice], slope: np.ndarray, inter: np.ndarray) -> np.ndarray:
    """HU float32 (z, y, x) of the ordered slices, filled in place (one cast, no stacked copy)."""
    hu: np.ndarray | None = None
    shapes: Counter = Counter()
    last: tuple[Path | None, np.ndarray | None] = (None, None)
    for k, s in enumerate(slices):
        arr = last[1] if last[0] == s.file else _decode(s)
        last = (s.file, arr)
        plane = arr[s.frame] if s.frame is not None and arr.ndim == 3 else arr
        shapes[plane.shape] += 1
        if hu is None:
            hu = np.empty((len(slices),) + plane.shape, np.float32)
        if plane.shape != hu.shape[1:]:
            continue
        if slope[k] != 1:
            np.multiply(plane, slope[k], out=hu[k], casting="unsafe")  # cast and scale in one pass
        else:
            hu[k] = plane
        if inter[k] != 0:
            hu[k] += inter[k]
    if len(shapes) > 1:
        raise SeriesError("mixed matrix sizes in one series: " +
                          ", ".join(f"{'x'.join(map(str, k))}: {n}" for k, n in shapes.most_common()))
    return hu


def _read_fast(f: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """One pass over the file: the tags read_series uses and the decoded pixels (no full Dataset, no
    PixelData bytes copy). Raises on anything unusual; :func:`_load` then takes the general path."""
    ds = pydicom.Dataset()
    return ds, pixel_array(f, ds_out=ds, specific_tags=_SLICE_TAGS)


def _load(files: Sequence[Path]) -> list[_Slice]:
    slices = []
    for f in files:
        try:
            slices.extend(_slices_of(Path(f), *_read_fast(f)))
            continue
        except Exception:  # noqa: BLE001 - the general path below decides, with its own error messages
            pass
        try:
            ds = pydicom.dcmread(f, force=True)
        except Exception as e:  # noqa: BLE001 - a broken file makes the series unusable, with its name
            raise SeriesError(f"cannot read {f.name}: {type(e).__name__}: {e}") from None
        if "PixelData" not in ds:
            raise SeriesError(f"{f.name} has no pixel data")
        slices.extend(_slices_of(Path(f), ds))
    return slices


def read_series(path_or_files: str | Path | SeriesInfo | Sequence[str | Path]) -> CTVolume:
    """Read one CT series into a :class:`CTVolume` (HU, z-ordered).

    Args:
        path_or_files: a folder holding exactly one series, a list of its files, or a :class:`SeriesInfo`.

    Raises:
        FileNotFoundError: the path does not exist.
        SeriesError: the series cannot be used (the message is the reason: not CT, single slice, duplicated
            positions, gap in z, mixed matrix sizes, missing rescale on unsigned data, undecodable pixels).
    """
    if isinstance(path_or_files, SeriesInfo):
        files = list(path_or_files.files)
    elif isinstance(path_or_files, (str, Path)):
        p = Path(path_or_files)
        if p.is_dir():
            found = discover_series(p)
            if len(found) != 1:
                raise SeriesError(f"{p} holds {len(found)} series; pass one series' files or a SeriesInfo "
                                  f"from discover_series")
            files = found[0].files
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"{p} does not exist; pass a series folder or its files")
    else:
        files = [Path(f) for f in path_or_files]
    if not files:
        raise SeriesError("no files in series")
    notes: list[str] = []
    slices = _load(files)
    first = slices[0].ds
    modality = str(first.get("Modality", "") or "")
    if modality != "CT":
        raise SeriesError(f"modality {modality or 'missing'}, not CT")
    slices = _drop_scouts(slices, notes)
    if len(slices) < 2:
        raise SeriesError("single-slice series (one image; not a volume)")
    slices, z = _order(slices, notes)
    slices, z = _check_z(slices, z, notes)
    slope, inter = _rescale(slices, notes)
    hu = _hu(slices, slope, inter)
    dz = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
    px = slices[0].spacing
    if px is None:
        notes.append("PixelSpacing missing: assumed 1 mm")
        px = np.array([1.0, 1.0])
    window = _window(first)
    meta = {"patient": str(first.get("PatientID", "") or ""), "study_uid": str(first.get("StudyInstanceUID", "")),
            "series_uid": str(first.get("SeriesInstanceUID", "")),
            "body_part": str(first.get("BodyPartExamined", "") or ""),
            "files": [s.file for s in slices], "z": z.tolist(), "window": window,
            "orientation": None if slices[0].orient is None else slices[0].orient.tolist(), "notes": notes}
    return CTVolume(hu, (dz, float(px[0]), float(px[1])), meta)


def _window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The series' first (center, width) window as (low, high) HU, or None."""
    c = _fg(ds, 0 if "PerFrameFunctionalGroupsSequence" in ds else None, "FrameVOILUTSequence", "WindowCenter")
    w = _fg(ds, 0 if "PerFrameFunctionalGroupsSequence" in ds else None, "FrameVOILUTSequence", "WindowWidth")
    try:
        c = float(c[0] if isinstance(c, pydicom.multival.MultiValue) else c)
        w = float(w[0] if isinstance(w, pydicom.multival.MultiValue) else w)
    except (TypeError, ValueError):
        return None
    return (c - w / 2.0, c + w / 2.0) if w > 0 else None
