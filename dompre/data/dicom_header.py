"""One parse per DICOM file: the header values dompre needs, and where native pixel data lie.

A scan of an archive reads every header once (:func:`scan_file`). For Part 10 files in Explicit or Implicit
VR Little Endian (and the compressed syntaxes, whose headers are Explicit VR Little Endian), which is
nearly all CT, a small parser walks the top-level elements up to Pixel Data
with ``struct`` over one read of the file's first kilobytes: pydicom's ``dcmread(stop_before_pixels=True)``
spends about 10 µs of Python per element, which made the scan the costliest step of ingest. Anything the
parser does not handle exactly (no preamble, big endian, deflate, non-ASCII text, a wanted value with an
unexpected VR, elements out of order, a truncated header) goes to pydicom instead; tests check that both
paths give identical headers on pydicom's own test files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from struct import unpack_from
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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
_CHUNK = 16384


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
    signed: bool = False                            # PixelRepresentation 1
    native: tuple[int, str, int, int, int] | None = None  # (offset, dtype, rows, cols, bits stored) of raw pixels

    @property
    def multiframe(self) -> bool:
        return self.frames > 1


class _Fallback(Exception):
    """This file is left to pydicom."""


class _Window:
    """Bytes of an open file by absolute position, read in chunks (elements that are skipped are never read)."""

    def __init__(self, f) -> None:
        self.f, self.base, self.buf = f, 0, f.read(_CHUNK)

    def get(self, pos: int, n: int) -> bytes:
        if pos < self.base or pos + n > self.base + len(self.buf):
            self.f.seek(pos)
            self.base, self.buf = pos, self.f.read(max(n, _CHUNK))
            if len(self.buf) < n:
                raise EOFError
        return self.buf[pos - self.base:pos - self.base + n]


def _element(w: _Window, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, header length) of the element at ``pos``."""
    group, elem, rest = unpack_from("<HHI", w.get(pos, 8))
    tag = group << 16 | elem
    if tag in (_ITEM, _ITEM_END, _SEQ_END) or not explicit:
        return tag, None, rest, 8
    vr = w.get(pos + 4, 2)
    if vr in _LONG_VR:
        return tag, vr, unpack_from("<I", w.get(pos + 8, 4))[0], 12
    return tag, vr, unpack_from("<H", w.get(pos + 6, 2))[0], 8


def _skip_items(w: _Window, pos: int, explicit: bool) -> int:
    """The position after an undefined-length sequence (or encapsulated data) whose first item is at ``pos``."""
    while True:
        tag, _, length, _ = _element(w, pos, explicit)
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Fallback
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements, up to the item delimiter
            tag, vr, length, hdr = _element(w, pos, explicit)
            if tag == _ITEM_END:
                pos += 8
                break
            if length == _UNDEFINED:
                if vr == b"UN":  # its content is Implicit VR whatever the file's syntax
                    raise _Fallback
                pos = _skip_items(w, pos + hdr, explicit)
            else:
                pos += hdr + length


def _parse(f) -> tuple[dict[str, bytes], str, int | None, bytes]:
    """(wanted values as raw bytes, transfer syntax, position of Pixel Data or None, its first 12 bytes)."""
    w = _Window(f)
    if w.get(128, 4) != b"DICM":
        raise _Fallback
    pos, ts = 132, ""
    while True:  # file meta information: group 0002, always Explicit VR Little Endian
        tag, vr, length, hdr = _element(w, pos, True)
        if tag >> 16 != 0x0002:
            break
        if tag == 0x00020010:
            ts = w.get(pos + hdr, length).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += hdr + length
    uid = UID(ts)  # compressed syntaxes encode the dataset as Explicit VR Little Endian: parsed here too
    if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        raise _Fallback
    explicit, values, last = not uid.is_implicit_VR, {}, -1
    while True:
        try:
            tag, vr, length, hdr = _element(w, pos, explicit)
        except EOFError:
            if w.base + len(w.buf) == pos:  # the end of the file, between elements: no pixel data
                return values, ts, None, b""
            raise _Fallback from None
        if tag <= last:
            raise _Fallback
        last = tag
        if tag >= _PIXEL_DATA:
            return (values, ts, pos, w.get(pos, 8 if not explicit else 12)) if tag == _PIXEL_DATA \
                else (values, ts, None, b"")
        wanted = _WANTED.get(tag)
        if length == _UNDEFINED:
            if wanted or vr == b"UN":  # UN of undefined length holds Implicit VR content
                raise _Fallback
            pos = _skip_items(w, pos + hdr, explicit)
            continue
        if wanted:
            if (explicit and vr != wanted[1]) or length > _CHUNK:  # wanted values are short text
                raise _Fallback
            value = w.get(pos + hdr, length)
            if wanted[1] != b"US" and not value.isascii():  # a character set to decode: pydicom
                raise _Fallback
            values[wanted[0]] = value
        pos += hdr + length


# Values are bytes as stored (both parsers), or Python values where pydicom had to convert them.
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


def _scalar(v: Any) -> float | str | None:
    return v[0] if isinstance(v, tuple) else v


def _native(get: Callable[[str], Any], ts: str, at: int | None, head: bytes
            ) -> tuple[int, str, int, int, int] | None:
    """Where the raw values of a native single-frame, single-sample image start (from the Pixel Data element's
    own header at ``at``); None for anything pydicom must decode."""
    rows, cols, bits, stored = (_us(get(k)) for k in ("Rows", "Columns", "BitsAllocated", "BitsStored"))
    if (at is None or ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or not rows or not cols
            or bits not in (8, 16, 32) or (_us(get("SamplesPerPixel")) or 1) != 1
            or len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00"):
        return None
    if ts == ExplicitVRLittleEndian:
        if len(head) < 12 or head[4:6] not in (b"OW", b"OB"):
            return None
        length, offset = int.from_bytes(head[8:12], "little"), at + 12
    else:
        length, offset = int.from_bytes(head[4:8], "little"), at + 8
    if length == _UNDEFINED or length < rows * cols * bits // 8:
        return None
    dtype = np.dtype(f"<{'i' if _us(get('PixelRepresentation')) == 1 else 'u'}{bits // 8}").str
    return offset, dtype, rows, cols, stored if stored and 0 < stored < bits else bits


def _header(get: Callable[[str], Any], ts: str, at: int | None, head: bytes) -> FileHeader:
    frames = _scalar(_numbers(get("NumberOfFrames")))
    valid_frames = frames is None or (isinstance(frames, float) and frames >= 1 and frames.is_integer())
    image_type = _text(get("ImageType")).upper().split("\\")
    center, width = _scalar(_numbers(get("WindowCenter"))), _scalar(_numbers(get("WindowWidth")))
    window = (center - width / 2.0, center + width / 2.0) if (
        isinstance(center, float) and isinstance(width, float) and width > 0) else None
    instance = _scalar(_numbers(get("InstanceNumber")))
    single = valid_frames and (frames is None or frames == 1)
    return FileHeader(
        series_uid=_text(get("SeriesInstanceUID")), study_uid=_text(get("StudyInstanceUID")),
        patient=_text(get("PatientID")), modality=_text(get("Modality")),
        description=_text(get("SeriesDescription")), body_part=_text(get("BodyPartExamined")),
        frames=int(frames) if valid_frames and frames is not None else 1, sop_uid=_text(get("SOPInstanceUID")),
        localizer="LOCALIZER" in image_type or "SCOUT" in image_type,
        position=_vector(_numbers(get("ImagePositionPatient")), 3),
        orientation=_vector(_numbers(get("ImageOrientationPatient")), 6),
        instance=int(instance) if isinstance(instance, float) else 0,
        slope=_scalar(_numbers(get("RescaleSlope"))), intercept=_scalar(_numbers(get("RescaleIntercept"))),
        pixel_spacing=_vector(_numbers(get("PixelSpacing")), 2), window=window,
        signed=_us(get("PixelRepresentation")) == 1,
        native=_native(get, ts, at, head) if single else None)


def _pydicom_getter(ds: pydicom.Dataset) -> Callable[[str], Any]:
    """Raw bytes where pydicom left them raw, little-endian and ASCII; its converted value otherwise."""
    def get(key: str) -> Any:
        elem = ds.get_item(_TAG[key])
        if elem is None:
            return None
        v = elem.value
        if isinstance(v, bytes) and (getattr(elem, "is_little_endian", True) is False
                                     or (_WANTED[_TAG[key]][1] != b"US" and not v.isascii())):
            return ds[_TAG[key]].value
        return v
    return get


def read_header(path: str | Path, *, fast: bool = True) -> FileHeader:
    """The :class:`FileHeader` of one file (dompre's parser, or pydicom where it declines or ``fast=False``).

    Raises what pydicom raises on files that are not DICOM (InvalidDicomError, EOFError, ...)."""
    with open(path, "rb") as f:
        if fast:
            try:
                values, ts, at, head = _parse(f)
                return _header(values.get, ts, at, head)
            except (_Fallback, EOFError, UnicodeDecodeError):
                f.seek(0)
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        at = f.tell()
        head = f.read(12)
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        return _header(_pydicom_getter(ds), ts, at, head)


def scan_file(path: str | Path) -> tuple[FileHeader | None, str]:
    """The header of one file, or (None, reason) when it is not usable DICOM. One parse, up to the pixel data."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None, "zero-byte file"
        header = read_header(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError) as e:
        return None, f"not readable as DICOM ({type(e).__name__}: {e})"
    if not header.series_uid:
        return None, "not a DICOM image (no SeriesInstanceUID)"
    return header, ""
