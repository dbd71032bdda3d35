"""One read per DICOM file: the header values dompre needs, and where native pixel data lie.

A scan of an archive reads every header once (:func:`scan_file`), with pydicom asked for the wanted tags only
and stopped before the pixel data; the scan keeps what reading a series needs (series keys, geometry, rescale
and the offset of native pixel data), so no header is read twice.

Nothing in a file is trusted: every length is compared with the file's size before anything is read or
allocated (pydicom's reads go through :class:`SizedFile`, which never asks for more than the file holds; a
zero-filled file or millions of elements stop after ``_MAX_ELEMENTS``; deflated data are never inflated),
the pixel data a header claims (Rows x Columns x frames x bits) must fit in the file, and a file that is not
usable DICOM gives a reason (:func:`scan_file`) or :class:`SeriesError` (:func:`read_header`), never another
exception. ``tools/fuzz_dicom.py`` checks this on mutated real files.

A hand-written Explicit/Implicit VR parser used to read most headers instead of pydicom; measured with
``tools/bench_ingest.py`` it read headers 1.7-1.9x as fast as pydicom but made the whole ingest only about
1.3x as fast (median of 14 interleaved runs 1.33, best over best 1.42), under the 1.5x that would justify a
second parser of untrusted input, so it is gone (see that tool's docstring for the runs).
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dompre.errors import UserError

_KEYS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SeriesDescription", "BodyPartExamined",
         "NumberOfFrames", "SOPInstanceUID", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
         "InstanceNumber", "RescaleSlope", "RescaleIntercept", "PixelSpacing", "WindowCenter", "WindowWidth", "Rows",
         "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")
_TAG = {k: tag_for_keyword(k) for k in _KEYS}
_WANTED = {t: (k, dictionary_VR(t).encode()) for k, t in _TAG.items()}
_LONG_VR = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_ELEMENTS = 100_000   # top-level elements before Pixel Data; real CT headers hold a few hundred


class SeriesError(UserError):
    """A file or series that cannot be used; ``str(e)`` is the reason written to the ingest report."""


class SizedFile(io.BufferedReader):
    """A file opened for reading whose ``read(n)`` never asks for more than what is left in it: pydicom reads
    an element's value with one ``read(length)``, and a buffered read allocates ``length`` bytes before it
    reads, so a length field of 4 GiB in a 40 KB file would allocate 4 GiB. Results are those of a plain read."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(io.FileIO(path, "rb"), 65536)
        self.size = os.fstat(self.raw.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 65536:  # smaller reads allocate no more than the buffer anyway
            n = min(n, max(self.size - self.tell(), 0))
            if n == 0:
                return b""
        return super().read(n)


@dataclass(slots=True)
class FileHeader:
    """Everything one header parse of a file gives: its series keys, the slice's geometry and rescale, and
    where its pixel data lie when they are native (uncompressed little-endian), so that reading a series
    never parses a header a second time. Values are None where the tag is absent or unreadable."""
    series_uid: str
    study_uid: str = ""
    patient: str = ""
    modality: str = ""
    description: str = ""
    body_part: str = ""
    frames: int = 1
    sop_uid: str = ""
    localizer: bool = False
    position: tuple[float, ...] | None = None       # ImagePositionPatient
    orientation: tuple[float, ...] | None = None    # ImageOrientationPatient
    instance: int = 0
    slope: float | str | None = None                # a string when the value is not a number
    intercept: float | str | None = None
    pixel_spacing: tuple[float, ...] | None = None
    window: tuple[float, float] | None = None       # (low, high) HU from the first WindowCenter/Width
    signed: bool | None = False                     # PixelRepresentation 1; None when absent
    native: tuple[int, str, int, int, int] | None = None  # (offset, dtype, rows, cols, bits stored) of raw pixels

    @property
    def multiframe(self) -> bool:
        return self.frames > 1


# Values are bytes as stored (pydicom leaves them raw until asked), or Python values where pydicom converted them.
def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("ascii").strip(" \x00")
    return "" if v is None else str(v)


def _numbers(v: Any) -> tuple[float, ...] | str | None:
    """A DS/IS value as a tuple of floats; the text itself when it is not numbers; None when absent/empty."""
    if v is None:
        return None
    if isinstance(v, bytes):
        text = v.decode("latin-1").strip(" \x00")
        if not text:
            return None
        try:
            return tuple(float(x) for x in text.split("\\"))
        except ValueError:
            return text
    try:
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]))
    except (TypeError, ValueError):
        return str(v)


def _us(v: Any) -> int | None:
    if isinstance(v, bytes):
        return int.from_bytes(v[:2], "little") if len(v) >= 2 else None
    return None if v is None else int(v)


def _vector(v: Any, n: int) -> tuple[float, ...] | None:
    return v if isinstance(v, tuple) and len(v) == n else None


def _single(v: Any) -> float | str | None:
    """A value of multiplicity 1: the number, or the text when it is several (never a number then)."""
    if isinstance(v, tuple):
        return v[0] if len(v) == 1 else "\\".join(f"{x:g}" for x in v)
    return v


def _scalar(v: Any) -> float | str | None:
    return v[0] if isinstance(v, tuple) else v


def _pixels(get: Callable[[str], Any], ts: str, implicit: bool, at: int | None, head: bytes, size: int,
            frames: int) -> tuple[int, str, int, int, int] | None:
    """Check that the pixel data the header claims fit in the file (before anything is allocated for them) and
    return where the raw values of a native single-frame, single-sample image start, from the Pixel Data
    element's own header at ``at``; None for anything pydicom must decode. Raises SeriesError."""
    if at is None or len(head) < 8:
        raise SeriesError("no Pixel Data (not an image, or the file ends before its pixels)")
    rows, cols, bits, stored = (_us(get(k)) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored"))
    samples, rep = _us(get("SamplesPerPixel")), _us(get("PixelRepresentation"))
    if not rows or not cols or not bits:
        raise SeriesError(f"no image size: Rows {rows}, Columns {cols}, BitsAllocated {bits} (missing or 0)")
    uid = UID(ts)
    little = not uid.is_transfer_syntax or uid.is_little_endian
    order = "little" if little else "big"
    if implicit:
        length, offset = int.from_bytes(head[4:8], order), at + 8
    elif head[4:6] in _LONG_VR:
        if len(head) < 12:
            raise SeriesError("no Pixel Data (the file ends inside its element header)")
        length, offset = int.from_bytes(head[8:12], order), at + 12
    else:
        length, offset = int.from_bytes(head[6:8], order), at + 8
    left = size - offset
    if length == _UNDEFINED:  # encapsulated: each frame takes one item (8 bytes) at least
        if frames * 8 > left:
            raise SeriesError(f"pixel data too short: NumberOfFrames {frames} cannot fit in the {left} bytes of "
                              f"encapsulated pixel data")
        return None
    if length > left:
        raise SeriesError(f"truncated: Pixel Data of {length} bytes at offset {offset} run past the end of the "
                          f"file ({size} bytes)")
    need = (rows * cols * frames * bits + 7) // 8  # a lower bound whatever the samples and their subsampling
    if not uid.is_compressed and need > length:
        raise SeriesError(f"pixel data too short: Pixel Data hold {length} bytes, fewer than the {need} that "
                          f"Rows {rows} x Columns {cols} x {frames} frame(s) x BitsAllocated {bits} need")
    if (frames != 1 or ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or bits not in (8, 16, 32)
            or (samples or 1) != 1 or rep not in (0, 1)
            or head[:4] != b"\xe0\x7f\x10\x00" or (not implicit and head[4:6] not in (b"OW", b"OB"))
            or (stored is not None and not 0 < stored <= bits)):
        return None
    dtype = np.dtype(f"<{'i' if rep == 1 else 'u'}{bits // 8}").str
    return offset, dtype, rows, cols, stored if stored else bits


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or np.isfinite(v) else None


def _header(get: Callable[[str], Any], ts: str, implicit: bool, at: int | None, head: bytes,
            size: int) -> FileHeader:
    """The FileHeader of the wanted values ``get(keyword)``; raises SeriesError when the file is no usable image."""
    frames = _scalar(_numbers(get("NumberOfFrames")))
    valid_frames = frames is None or (isinstance(frames, float) and frames >= 1 and frames.is_integer())
    n_frames = int(frames) if valid_frames and frames is not None else 1
    image_type = _text(get("ImageType")).upper().split("\\")
    center, width = _scalar(_numbers(get("WindowCenter"))), _scalar(_numbers(get("WindowWidth")))
    window = (center - width / 2.0, center + width / 2.0) if (
        isinstance(center, float) and isinstance(width, float) and width > 0
        and np.isfinite(center) and np.isfinite(width)) else None
    instance = _finite(_scalar(_numbers(get("InstanceNumber"))))
    rep = _us(get("PixelRepresentation"))
    series_uid = _text(get("SeriesInstanceUID"))
    if not series_uid:
        raise SeriesError("not a DICOM image (no SeriesInstanceUID)")
    native = _pixels(get, ts, implicit, at, head, size, n_frames)
    return FileHeader(
        series_uid=series_uid, study_uid=_text(get("StudyInstanceUID")),
        patient=_text(get("PatientID")), modality=_text(get("Modality")),
        description=_text(get("SeriesDescription")), body_part=_text(get("BodyPartExamined")),
        frames=n_frames, sop_uid=_text(get("SOPInstanceUID")),
        localizer="LOCALIZER" in image_type or "SCOUT" in image_type,
        position=_vector(_numbers(get("ImagePositionPatient")), 3),
        orientation=_vector(_numbers(get("ImageOrientationPatient")), 6),
        instance=int(instance) if isinstance(instance, float) else 0,
        slope=_single(_numbers(get("RescaleSlope"))), intercept=_single(_numbers(get("RescaleIntercept"))),
        pixel_spacing=_vector(_numbers(get("PixelSpacing")), 2), window=window,
        signed=None if rep is None else rep == 1,
        native=native if valid_frames else None)


def _pydicom_getter(ds: pydicom.Dataset) -> Callable[[str], Any]:
    """Raw bytes where pydicom left them raw, little-endian and ASCII; its converted value otherwise."""
    def get(key: str) -> Any:
        elem = ds.get_item(_TAG[key])
        if elem is None:
            return None
        if isinstance(elem, RawDataElement) and elem.VR is not None and elem.VR != _WANTED[_TAG[key]][1].decode():
            return ds[_TAG[key]].value  # the VR the file declares, as pydicom converts it (or refuses it)
        v = elem.value
        if isinstance(v, bytes) and (getattr(elem, "is_little_endian", True) is False
                                     or (_WANTED[_TAG[key]][1] != b"US" and not v.isascii())):
            return ds[_TAG[key]].value
        return v
    return get


class _Stop:
    """pydicom's ``stop_when``: stop before pixel data (as ``stop_before_pixels`` does), and after
    ``_MAX_ELEMENTS`` top-level elements (a zero-filled file is millions of empty elements)."""

    def __init__(self) -> None:
        self.n, self.tag = 0, None

    def __call__(self, tag: int, vr: Any, length: int) -> bool:
        self.n += 1
        if self.n > _MAX_ELEMENTS:
            raise SeriesError(f"not DICOM: more than {_MAX_ELEMENTS} elements before any pixel data")
        t = int(tag)  # pydicom's BaseTag compares in Python: one int() is cheaper
        if t >= 0x7FE00008 and t in (0x7FE00010, 0x7FE00009, 0x7FE00008):
            self.tag = t
            return True
        return False


def _pydicom_header(f: SizedFile) -> FileHeader:
    """pydicom's reading of the header (through ``f``, whose reads never exceed the file)."""
    head = f.read(132)
    groups = (int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big"))
    if head[128:132] != b"DICM" and not any(g and g % 2 == 0 and g <= 0x7FE0 for g in groups):
        raise SeriesError("not DICOM (no DICM marker at byte 128 and no dataset at the start)")
    f.seek(0)
    read_preamble(f, True)
    if _read_file_meta_info(f).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        raise SeriesError("deflated transfer syntax (never used for CT; not inflated: it could be a zip bomb)")
    if f.read(2) == b"\x00\x00":  # pydicom reads command-group elements without its element limit
        raise SeriesError("not DICOM: the dataset starts with group 0000 (a network command, or zeros)")
    f.seek(0)
    stop = _Stop()
    ds = read_partial(f, stop, force=True, specific_tags=list(_TAG.values()))
    at = f.tell() if stop.tag == _PIXEL_DATA else None
    head = f.read(12) if at is not None else b""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    raw = ds.get_item(_TAG["SeriesInstanceUID"])  # read as pydicom found it (it switches on a wrong syntax)
    implicit = raw.is_implicit_VR if isinstance(raw, RawDataElement) else bool(ds.original_encoding[0])
    return _header(_pydicom_getter(ds), ts, implicit, at, head, f.size)


def read_header(path: str | Path) -> FileHeader:
    """The :class:`FileHeader` of one file, read by pydicom up to the pixel data.

    Raises:
        SeriesError: the file is not a usable DICOM image (the message says why); nothing else, except
            OSError when it cannot be opened.
    """
    with SizedFile(path) as f:
        try:
            return _pydicom_header(f)
        except (SeriesError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - whatever pydicom raises on a broken file is a reason
            raise SeriesError(f"not readable as DICOM ({type(e).__name__}: {str(e)[:200]})") from None


def scan_file(path: str | Path) -> tuple[FileHeader | None, str]:
    """The header of one file, or (None, reason) when it is not usable DICOM. One parse, up to the pixel data.

    Never raises for what a file holds (MemoryError excepted: nothing is allocated before its size is checked)."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return None, f"not a regular file ({_kind(st.st_mode)})"
        if st.st_size == 0:
            return None, "zero-byte file"
        return read_header(path), ""
    except SeriesError as e:
        return None, str(e)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"
