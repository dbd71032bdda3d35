"""CT DICOM reading: discovery, grouping by SeriesInstanceUID, slice ordering and Hounsfield units.

A download is a tree of folders whose layout cannot be trusted: :func:`scan_tree` reads the header of
every file once (:mod:`dompre.data.dicom_header`), groups them by ``SeriesInstanceUID`` (never by folder)
and reports the files it cannot use. :func:`read_series` turns one series into a :class:`CTVolume`:
scouts/localizers dropped, slices ordered by position along the slice normal, spacing and orientation
checked, stored values kept with their per-slice rescale to HU.

Native (uncompressed little-endian) pixel data are read straight from where the scan found them;
compressed syntaxes are decoded by pydicom (through the pylibjpeg plugins), with SimpleITK (GDCM) as the
fallback for files pydicom cannot decode. A series that cannot be used raises :class:`SeriesError`
whose message is the reason written to the ingest report; safe repairs are listed in ``meta["notes"]``.
"""
from __future__ import annotations

import filecmp
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pydicom

from dompre.data.dicom_header import FileHeader, SeriesError, SizedFile, scan_file

__all__ = ["CTVolume", "SeriesError", "SeriesInfo", "discover_series", "group_headers", "list_files", "read_series",
           "scan_file", "scan_tree"]

log = logging.getLogger(__name__)

_GAP_FACTOR = 1.5        # a step larger than this × the median step is a missing slice
_JITTER = 0.2            # steps within ±20 % of the median are regular
_SHARED = ("series_uid", "patient", "study_uid", "modality", "description", "body_part")


@dataclass
class SeriesInfo:
    """One series found by discovery: its files (sorted), their headers and the series' identifying values."""
    series_uid: str
    files: list[Path] = field(default_factory=list)
    patient: str = ""
    study_uid: str = ""
    modality: str = ""
    description: str = ""
    body_part: str = ""
    multiframe: bool = False
    headers: list[FileHeader] = field(default_factory=list, repr=False)  # one per file, when scanned

    @property
    def n_files(self) -> int:
        return len(self.files)


@dataclass
class CTVolume:
    """A CT volume: stored values and per-slice rescale as read, ``spacing`` (z, y, x) mm, ``meta`` dict.

    ``hu`` gives float32 (z, y, x) Hounsfield units (computed once, on first use); ``stored`` holds the files'
    own integer values, ``hu[k] = stored[k] * slope[k] + intercept[k]``, at half or a quarter of the memory.

    ``meta`` keys: patient, study_uid, series_uid, body_part, files (one per slice, in z order; the same file
    repeated for multi-frame), z (slice positions along the normal, mm), window ((low, high) HU or None),
    orientation (6 direction cosines), notes (repairs applied), dropped ([(file, reason)] of the files left
    out: identical or same-pixel copies of a slice, localizers, other orientations).
    """
    stored: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any]

    @cached_property
    def hu(self) -> np.ndarray:
        hu = np.empty(self.stored.shape, np.float32)
        for k in range(hu.shape[0]):  # slice by slice: one cast, no volume-sized temporary
            if self.slope[k] != 1:
                np.multiply(self.stored[k], self.slope[k], out=hu[k], casting="unsafe")
            else:
                hu[k] = self.stored[k]
            if self.intercept[k] != 0:
                hu[k] += self.intercept[k]
        return hu


def group_headers(items: Iterable[tuple[Path, FileHeader]]) -> list[SeriesInfo]:
    """Group (path, header) pairs by SeriesInstanceUID; series sorted by patient, study, uid.

    Headers share their repeated values (series strings, orientation, spacing, window, rescale, pixel
    format), so a scan holds about 0.8 KB per file, path included."""
    series: dict[str, SeriesInfo] = {}
    shared: dict[Any, Any] = {}
    for path, h in items:
        info = series.get(h.series_uid)
        if info is None:
            info = series[h.series_uid] = SeriesInfo(h.series_uid, [], h.patient, h.study_uid, h.modality,
                                                     h.description, h.body_part, h.multiframe)
        for key in _SHARED:
            if getattr(h, key) == getattr(info, key):
                setattr(h, key, getattr(info, key))
        for key in ("orientation", "pixel_spacing", "window", "slope", "intercept"):
            value = getattr(h, key)
            setattr(h, key, shared.setdefault((key, value), value))
        if h.native is not None:  # (offset, dtype, rows, cols, bits): all but the offset repeat
            h.native = (h.native[0],) + shared.setdefault(h.native[1:], h.native[1:])
        info.files.append(path)
        info.headers.append(h)
        info.multiframe = info.multiframe or h.multiframe
    for info in series.values():
        order = sorted(range(len(info.files)), key=info.files.__getitem__)
        info.files = [info.files[i] for i in order]
        info.headers = [info.headers[i] for i in order]
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
    file: Path
    h: FileHeader                     # the header of its file
    pos: np.ndarray | None
    orient: np.ndarray | None
    instance: int
    slope: float | str | None
    intercept: float | str | None
    spacing: np.ndarray | None
    frame: int | None = None          # frame index in an enhanced multi-frame file
    ds: pydicom.Dataset | None = None  # the whole dataset, once read (multi-frame files)


def _arr(v: tuple[float, ...] | None) -> np.ndarray | None:
    return None if v is None else np.asarray(v, dtype=np.float64)


def _read_full(f: Path) -> pydicom.Dataset:
    """The whole dataset (its size was checked by the header scan; reads never exceed the file)."""
    try:
        with SizedFile(f) as fh:
            ds = pydicom.dcmread(fh, force=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken file makes the series unusable, with its name
        raise SeriesError(f"cannot read {f.name}: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        raise SeriesError(f"{f.name} has no pixel data")
    return ds


def _slices_of(path: Path, h: FileHeader) -> list[_Slice]:
    """The slices of one file: itself, or each frame of an enhanced multi-frame file (read whole here)."""
    if h.frames <= 1:
        return [_Slice(path, h, _arr(h.position), _arr(h.orientation), h.instance, h.slope, h.intercept,
                       _arr(h.pixel_spacing))]
    ds = _read_full(path)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) < h.frames:
        raise SeriesError(f"bad multi-frame file: {path.name} has NumberOfFrames {h.frames} but "
                          f"{len(per_frame)} per-frame groups")
    try:
        return [_Slice(path, h, _floats(_fg(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3),
                       _floats(_fg(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient"), 6), i + 1,
                       _fg(ds, i, "PixelValueTransformationSequence", "RescaleSlope"),
                       _fg(ds, i, "PixelValueTransformationSequence", "RescaleIntercept"),
                       _floats(_fg(ds, i, "PixelMeasuresSequence", "PixelSpacing"), 2), i, ds)
                for i in range(h.frames)]
    except Exception as e:  # noqa: BLE001 - pydicom converting a broken functional group
        raise SeriesError(f"bad multi-frame file: {path.name} has unreadable functional groups "
                          f"({type(e).__name__}: {str(e)[:120]})") from None


def _drop_scouts(slices: list[_Slice], notes: list[str], dropped: list) -> list[_Slice]:
    """Drop localizers and slices whose orientation differs from the majority."""
    kept = [s for s in slices if not s.h.localizer]
    dropped += [(s.file, "localizer/scout image") for s in slices if s.h.localizer and s.frame is None]
    if len(kept) < len(slices):
        notes.append(f"dropped {len(slices) - len(kept)} localizer/scout image(s)")
    if not kept:
        raise SeriesError("localizer/scout series (ImageType LOCALIZER), no axial images")
    keys = Counter(tuple(np.round(s.orient, 3)) for s in kept if s.orient is not None)
    if keys:
        major = np.asarray(keys.most_common(1)[0][0])
        same = [s for s in kept if s.orient is not None and np.allclose(s.orient, major, atol=1e-3)]
        ids = {id(s) for s in same}
        dropped += [(s.file, "another orientation than the series (scout)") for s in kept
                    if id(s) not in ids and s.frame is None]
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
    return "" if s.frame is not None else s.h.sop_uid


def _same_image(a: _Slice, b: _Slice) -> str:
    """Why ``b`` may be dropped as a copy of ``a`` (same SOP instance at the same place), or "" if it may not:
    the files are identical, or their stored values and rescale are."""
    if not _sop(a) or _sop(a) != _sop(b):
        return ""
    if filecmp.cmp(a.file, b.file, shallow=False):
        return f"identical copy of {a.file.name}"
    if (a.slope, a.intercept) == (b.slope, b.intercept) and np.array_equal(_decode(a), _decode(b)):
        return f"same SOPInstanceUID, position and pixel values as {a.file.name}"
    return ""


def _check_z(slices: list[_Slice], z: np.ndarray, notes: list[str], dropped: list
             ) -> tuple[list[_Slice], np.ndarray]:
    """Resolve duplicated positions (copies of the same image are dropped, by content) and reject gaps in z."""
    dup = np.flatnonzero(np.isclose(np.diff(z), 0.0, atol=1e-3)) + 1
    drop = []
    for i in dup:
        first = next(j for j in range(i - 1, -1, -1) if j not in drop)  # the kept slice of that position
        why = _same_image(slices[first], slices[i])
        if not why:
            raise SeriesError(f"duplicated slice positions: {slices[i].file.name} and {slices[first].file.name} "
                              f"are different images at z={z[i]:.2f} mm")
        drop.append(i)
        dropped.append((slices[i].file, why))
    if drop:
        notes.append(f"dropped {len(drop)} duplicate copy(ies) of the same SOPInstanceUID")
        keep = np.setdiff1d(np.arange(len(z)), drop)
        slices, z = [slices[i] for i in keep], z[keep]
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


def _check_values(slices: list[_Slice]) -> None:
    """Refuse what would store garbage as good: non-finite or degenerate geometry, unknown signedness."""
    for s in slices:
        name = s.file.name
        if s.h.signed is None:
            raise SeriesError(f"PixelRepresentation missing: in {name}; signed or unsigned values cannot be "
                              f"known (pydicom refuses such a file too)")
        if s.pos is not None and not np.all(np.isfinite(s.pos)):
            raise SeriesError(f"bad geometry: ImagePositionPatient {s.pos.tolist()} in {name} is not finite")
        if s.orient is not None:
            o = s.orient
            if not np.all(np.isfinite(o)) or np.linalg.norm(np.cross(o[:3], o[3:])) < 0.5:
                raise SeriesError(f"bad geometry: ImageOrientationPatient {o.tolist()} in {name} is not two "
                                  f"direction cosines at right angles")
        if s.spacing is not None and not (np.all(np.isfinite(s.spacing)) and np.all(s.spacing > 0)):
            raise SeriesError(f"bad geometry: PixelSpacing {s.spacing.tolist()} in {name} is not positive and "
                              f"finite")


def _number(s: _Slice, key: str, default: float) -> float:
    value = getattr(s, key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        name = "RescaleSlope" if key == "slope" else "RescaleIntercept"
        raise SeriesError(f"{name} {value!r} in {s.file.name} is not a number; HU cannot be known") from None


def _rescale(slices: list[_Slice], notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (slope, intercept); missing tags are safe to default only on signed data."""
    missing = [s for s in slices if s.slope is None or s.intercept is None]
    if missing:
        if missing[0].h.signed is not True:
            raise SeriesError(f"missing RescaleSlope/RescaleIntercept on unsigned pixel data "
                              f"({missing[0].file.name}); HU cannot be known")
        notes.append(f"RescaleSlope/RescaleIntercept missing on {len(missing)} signed slice(s): used 1 and 0")
    slope = np.array([_number(s, "slope", 1.0) for s in slices], np.float32)
    inter = np.array([_number(s, "intercept", 0.0) for s in slices], np.float32)
    bad = np.flatnonzero(~np.isfinite(slope) | (slope == 0) | ~np.isfinite(inter))
    if bad.size:
        s = slices[bad[0]]
        raise SeriesError(f"bad rescale: RescaleSlope {s.slope!r} / RescaleIntercept {s.intercept!r} in "
                          f"{s.file.name}: the slope must be finite and non-zero, the intercept finite; HU cannot "
                          f"be known")
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


def _read_native(path: Path, where: tuple[int, str, int, int, int], out: np.ndarray | None = None
                 ) -> np.ndarray | None:
    """Raw stored values straight from the file (what pydicom's native decoder returns, unused high bits
    corrected the same way), into ``out`` when given; None when the file is shorter than its header says."""
    offset, dtype, rows, cols, stored = where
    arr = np.empty((rows, cols), dtype) if out is None else out
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        if f.readinto(arr) != arr.nbytes:
            return None
    shift = arr.dtype.itemsize * 8 - stored
    if shift:  # left then right: masks unsigned values, sign-extends signed ones (as pydicom does)
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _decode(s: _Slice, scratch: dict | None = None) -> np.ndarray:
    """Stored values of a slice's file: raw read for native files, else pydicom (compressed syntaxes through
    the pylibjpeg plugins), else SimpleITK (GDCM). Native reads go into ``scratch`` buffers when given."""
    if s.h.native is not None and s.ds is None:
        _, dtype, rows, cols, _ = s.h.native
        if scratch is not None and (dtype, rows, cols) not in scratch:
            scratch[dtype, rows, cols] = np.empty((rows, cols), dtype)
        arr = _read_native(s.file, s.h.native, None if scratch is None else scratch[dtype, rows, cols])
        if arr is not None:
            return arr
    ds = s.ds if s.ds is not None else _read_full(s.file)
    try:
        return ds.pixel_array
    except Exception as e:  # noqa: BLE001 - any decoder failure falls back to GDCM
        try:
            arr = _decode_sitk(s.file, ds)
        except Exception as e2:  # noqa: BLE001
            raise SeriesError(f"pixel data cannot be decoded in {s.file.name} "
                              f"(pydicom: {type(e).__name__}: {e}; SimpleITK: {str(e2).strip()[:120]})") from None
        log.info("decoded %s with SimpleITK (pydicom: %s)", s.file, e)
        return arr


def _stored(slices: list[_Slice], alloc: Callable[..., np.ndarray]) -> np.ndarray:
    """Stored values (z, y, x) of the ordered slices in one ``alloc``-ated array of the files' own dtype;
    native files are read straight into their plane."""
    vol: np.ndarray | None = None
    shapes: Counter = Counter()
    scratch: dict = {}
    last: tuple[Path | None, np.ndarray | None] = (None, None)
    for k, s in enumerate(slices):
        native = s.h.native if s.ds is None else None
        if native is not None and vol is not None and (native[2], native[3]) == vol.shape[1:] \
                and np.dtype(native[1]) == vol.dtype and _read_native(s.file, native, vol[k]) is not None:
            shapes[vol.shape[1:]] += 1
            continue
        arr = last[1] if last[0] == s.file else _decode(s, scratch)
        last = (s.file, arr)
        plane = arr[s.frame] if s.frame is not None and arr.ndim == 3 else arr
        shapes[plane.shape] += 1
        if vol is None:
            vol = alloc((len(slices),) + plane.shape, plane.dtype)
        if plane.shape != vol.shape[1:]:
            continue
        if not np.can_cast(plane.dtype, vol.dtype):  # e.g. uint16 among int16 files: widen (rare)
            vol = vol.astype(np.result_type(vol.dtype, plane.dtype))
        vol[k] = plane
    if len(shapes) > 1:
        raise SeriesError("mixed matrix sizes in one series: " +
                          ", ".join(f"{'x'.join(map(str, k))}: {n}" for k, n in shapes.most_common()))
    return vol


def _headers(files: Sequence[Path]) -> list[FileHeader]:
    out = []
    for f in files:
        h, reason = scan_file(f)
        if h is None:
            raise SeriesError(f"cannot read {f.name}: {reason}")
        out.append(h)
    return out


def read_series(path_or_files: str | Path | SeriesInfo | Sequence[str | Path], *,
                alloc: Callable[..., np.ndarray] = np.empty) -> CTVolume:
    """Read one CT series into a :class:`CTVolume` (z-ordered; ``.hu`` in Hounsfield units).

    Args:
        path_or_files: a folder holding exactly one series, a list of its files, or a :class:`SeriesInfo`.
        alloc: ``alloc(shape, dtype)`` gives the array the stored values are read into (``np.empty``; the
            ingest job passes a buffer it reuses from series to series).

    Raises:
        FileNotFoundError: the path does not exist.
        SeriesError: the series cannot be used (the message is the reason: not CT, single slice, duplicated
            positions, gap in z, mixed matrix sizes, missing rescale on unsigned data, non-finite geometry or
            rescale, missing PixelRepresentation, undecodable pixels). Whatever the files hold, nothing else
            is raised (MemoryError aside: sizes are checked against the files before anything is allocated).
    """
    try:
        return _read_series(path_or_files, alloc)
    except (SeriesError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a broken file found by no check above is still only a bad series
        log.warning("read_series: unexpected %r", e)
        raise SeriesError(f"cannot read the series ({type(e).__name__}: {str(e)[:200]})") from None


def _read_series(path_or_files: str | Path | SeriesInfo | Sequence[str | Path],
                 alloc: Callable[..., np.ndarray]) -> CTVolume:
    headers: list[FileHeader] = []
    if isinstance(path_or_files, SeriesInfo):
        files, headers = list(path_or_files.files), list(path_or_files.headers)
    elif isinstance(path_or_files, (str, Path)):
        p = Path(path_or_files)
        if p.is_dir():
            found = discover_series(p)
            if len(found) != 1:
                raise SeriesError(f"{p} holds {len(found)} series; pass one series' files or a SeriesInfo "
                                  f"from discover_series")
            files, headers = found[0].files, found[0].headers
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"{p} does not exist; pass a series folder or its files")
    else:
        files = [Path(f) for f in path_or_files]
    if not files:
        raise SeriesError("no files in series")
    if len(headers) != len(files):
        headers = _headers(files)
    notes: list[str] = []
    dropped: list[tuple[Path, str]] = []
    slices = [s for f, h in zip(files, headers) for s in _slices_of(Path(f), h)]
    first = slices[0]
    if first.h.modality != "CT":
        raise SeriesError(f"modality {first.h.modality or 'missing'}, not CT")
    _check_values(slices)
    slices = _drop_scouts(slices, notes, dropped)
    if len(slices) < 2:
        raise SeriesError("single-slice series (one image; not a volume)")
    slices, z = _order(slices, notes)
    slices, z = _check_z(slices, z, notes, dropped)
    slope, inter = _rescale(slices, notes)
    stored = _stored(slices, alloc)
    dz = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
    px = slices[0].spacing
    if px is None:
        notes.append("PixelSpacing missing: assumed 1 mm")
        px = np.array([1.0, 1.0])
    window = _window(first.ds) if first.ds is not None else first.h.window
    meta = {"patient": first.h.patient, "study_uid": first.h.study_uid, "series_uid": first.h.series_uid,
            "body_part": first.h.body_part, "files": [s.file for s in slices], "z": z.tolist(), "window": window,
            "orientation": None if slices[0].orient is None else slices[0].orient.tolist(), "notes": notes,
            "dropped": dropped}
    return CTVolume(stored, slope, inter, (dz, float(px[0]), float(px[1])), meta)


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
